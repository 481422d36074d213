"""
eval.py: compare models side by side on the same text and tasks, fairly across tokenizers, with the
numbers lm-evaluation-harness (lm-eval 0.4.13, `hf` backend) gives (the parity test,
tests/parity/test_lm_eval_parity.py, runs both). Output: a markdown table (models as rows, metrics
as columns), and the same as --json.

    python eval.py --models A B --lm tasks/sample_text.txt --mc tasks/sample_mc.jsonl \\
        --gen tasks/sample_bbh.json --humaneval tasks/sample_humaneval.jsonl

--lm (.txt, .jsonl or a folder): bits per byte, the headline since it does not depend on the
tokenizer, word perplexity, and each model's perplexity per token of its own tokenizer (eval_lm).
--mc (JSONL {"context": str, "choices": [str, ...], "label": int}; write choices bare, "Paris"
not " Paris"): acc, acc_norm, acc_bytes (eval_mc). --gen (JSONL {"input": str, "target": str}):
few-shot greedy generation, exact match (extras/benchmarks.py eval_gen). Every text starts with BOS
when the model's tokenizer adds one by default (--bos auto), as lm-eval does. Benchmarks as they
ship (the rows of ARC, OpenBookQA, BoolQ, HellaSwag or PIQA, BIG-bench task.json files, --bbh,
--humaneval) are read by extras/benchmarks.py; HumanEval's completions run contained by
extras/sandbox.py.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch

import fusellm
import common
from common import Progress


class EvalError(ValueError):
    """A bad task file or model folder; the message names it and what to do."""


# --------------------------------------------------------------------------------------------------
# Scoring with one model


class Scorer:
    """One model and its tokenizer, scoring text as lm-evaluation-harness's `hf` backend does
    (lm-eval 0.4.13). bos: None follows the tokenizer's own default (tok.add_bos: Llama, Mistral and
    Gemma put BOS before a text, GPT-2 and Qwen2 do not), as lm-eval's add_bos_token=None does; True
    or False forces it. The prefix token (BOS, else EOS) is what the first token of a text is
    predicted from when nothing precedes it. window: the most tokens the model sees in one forward
    pass (lm-eval's max_length)."""

    def __init__(self, model, tok, device="cpu", window=1024, bos: bool | None = None, stop_ids=()):
        self.model, self.tok, self.device, self.window = model, tok, device, window
        self.add_bos = tok.add_bos if bos is None else bos
        if self.add_bos and tok.bos_id is None:
            raise EvalError(f"BOS asked for, but the tokenizer {tok!r} has no BOS token; "
                            f"use --bos no or auto")
        # lm-eval's prefix_token_id
        self.prefix_id = tok.bos_id if tok.bos_id is not None else tok.eos_id
        # generation ends at EOS or any end id of the checkpoint's generation_config.json (instruct
        # models list several: <|eot_id|>, <|im_end|>, <end_of_turn>), and its text leaves special
        # tokens out, as HF's does
        self.stop_ids = {i for i in (tok.eos_id, *stop_ids) if i is not None}
        self.special_ids = {i for i, p in enumerate(tok.pieces) if p in tok.special}
        self.warned = False

    def encode(self, text: str) -> list[int]:
        """The tokens of a text as the model's own tokenizer gives them: BOS first when it adds
        one."""
        return ([self.tok.bos_id] if self.add_bos else []) + self.tok.encode(text)

    @torch.no_grad()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i >= 1: (len(ids) - 1,) in nats. The model sees ids[:-1]."""
        x = torch.tensor([ids], device=self.device)
        # (T-1, V): over every row the model has, padded ones too (Qwen2.5: 151,936 for 151,665
        # tokens)
        logp = self.model(x[:, :-1])[0].float().log_softmax(-1)
        return logp.gather(-1, x[0, 1:, None])[:, 0].cpu()

    def document_nats(self, text: str, stride: int | None = None) -> tuple[float, int, int]:
        """(nats, scored tokens, scored bytes) of a whole document: lm-eval's loglikelihood_rolling.
        The tokens are encode(text), BOS included when the tokenizer adds one (lm-eval scores it
        too, after the prefix token). Each window predicts the next `stride` tokens (default:
        window, lm-eval's non-overlapping windows) from at most the `window` tokens before the last
        of them, the first from the prefix token on. A smaller stride gives every token more
        context, at the cost of more passes. With neither BOS nor EOS the first token cannot be
        predicted and its bytes are left out."""
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
            # predictions of seq[begin+1:end], the last end-done new
            lp = self.logprobs(seq[begin:end])
            nats -= float(lp[done - begin - 1:].sum())
            done = end
        return nats, len(seq) - 1, n_bytes

    def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), lm-eval's _encode_pair: whitespace ending the
        context moves to the continuation ("Answer: " + "Paris" is scored as "Answer:" + " Paris");
        context + continuation is encoded whole, and the continuation is what follows the context's
        own encoding in it. An empty context is the prefix token alone. (Where lm-eval asserts, on a
        context of whitespace only with no BOS, the prefix token is the context here.)"""
        if not context:
            cont = self.tok.encode(continuation)
            if cont and cont[0] == self.prefix_id:        # it starts with the prefix token itself
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    def continuation_logprob(self, context: str, continuation: str) -> float:
        """log p(continuation | context) in nats, from the last `window` tokens before each
        continuation token."""
        ctx, cont = self.split(context, continuation)
        if not cont:
            raise EvalError(f"the continuation {continuation!r} adds no tokens after "
                            f"{context[-40:]!r}")
        ctx = ctx or [self.prefix_id]             # a context of whitespace only, without BOS
        if len(cont) > self.window:
            raise EvalError(f"the continuation {continuation[:40]!r}... is {len(cont)} tokens, "
                            f"more than the window of {self.window}; raise --window")
        if None in ctx:
            raise EvalError(f"{self.tok!r} has neither BOS nor EOS to predict {continuation!r} "
                            f"from an empty context")
        ids = (ctx + cont)[-(self.window + 1):]
        return float(self.logprobs(ids)[-len(cont):].sum())

    @torch.no_grad()
    def next_token(self, ids: list[int]) -> int:
        """The most likely token after ids, from their last `window` tokens: the whole context runs
        through the model again at every step (extras/cached_generation.py: the same with a KV
        cache)."""
        x = torch.tensor([ids[-self.window:]], device=self.device)
        return int(self.model(x)[0, -1].argmax())                  # model(x): (1, T, V)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int, stops: list[str]) -> str:
        """Greedy decoding until a stop string appears (cut there), EOS, or max_new_tokens. The
        prompt keeps its last window - max_new_tokens tokens, as lm-eval's generate_until does, so
        that prompt and answer fit the window together. Each step takes the most likely next token
        (next_token). A nanofuse Transformer takes the same steps with a KV cache
        (extras/cached_generation.py: the prompt runs once, then each new token alone; the same
        text: tests/parity/test_generation.py)."""
        ids = self.encode(prompt) or [self.prefix_id]
        # lm-eval keeps the prompt's last (window - max_new_tokens) tokens
        if max_new_tokens < self.window:
            ids = ids[-(self.window - max_new_tokens):]
        elif not self.warned:
            self.warned = True
            print(f"warning: {max_new_tokens} new tokens fill the window of {self.window}: the "
                  f"context slides (lm-eval refuses this); raise --window or lower "
                  f"--max-new-tokens for lm-eval's numbers", file=sys.stderr)
        next_token = self.next_token
        if isinstance(self.model, fusellm.Transformer):
            from extras.cached_generation import CachedSteps
            next_token = CachedSteps(self.model, self.window, max_new_tokens, self.device)
        out, text = [], ""
        for _ in range(max_new_tokens):
            nxt = next_token(ids)
            if nxt in self.stop_ids:
                break
            ids.append(nxt)
            # special tokens and the model's spare rows: the text leaves these out
            if nxt < self.tok.vocab_size and nxt not in self.special_ids:
                out.append(nxt)
            text = self.tok.decode(out)
            hit = [text.find(s) for s in stops if s in text]
            if hit:
                return text[:min(hit)]
        return text


# --------------------------------------------------------------------------------------------------
# Two kinds of task: text (bits per byte) and multiple choice. The third, exact match of few-shot
# generation (--gen), and the benchmarks' own files: extras/benchmarks.py


def eval_lm(scorer: Scorer, path, stride: int | None, limit: int | None) -> dict:
    """Bits per byte, byte and word perplexity over all documents, as lm-eval reports a
    loglikelihood_rolling task: totals first, then one division (-Σ ll / Σ bytes / ln 2,
    exp(-Σ ll / Σ bytes), exp(-Σ ll / Σ words), words being re.split(r"\\s+", text)), and
    perplexity per token of the model's own tokenizer."""
    from extras.corpus import read_corpus             # .txt, .jsonl or a folder of them
    docs = list(read_corpus(path))[:limit]
    if not docs:
        raise EvalError(f"{path}: no documents with text to score")
    prog = Progress(f"lm {Path(path).name}", len(docs), "documents")
    nats = tokens = n_bytes = words = 0
    for d in docs:
        a, b, c = scorer.document_nats(d, stride)
        nats, tokens, n_bytes = nats + a, tokens + b, n_bytes + c
        words += len(re.split(r"\s+", d))
        prog.update(1, b)
    return {"bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "byte_perplexity": _exp(nats / max(n_bytes, 1)),
            "word_perplexity": _exp(nats / max(words, 1)),
            "ppl_per_token": _exp(nats / max(tokens, 1)),
            "tokens": tokens, "bytes": n_bytes, "words": words}


def _exp(x: float) -> float:
    # a random model's word perplexity can pass float's range
    return math.exp(x) if x < 709 else math.inf


def eval_mc(scorer: Scorer, path, limit: int | None, delimiter: str = " ") -> dict:
    """lm-eval's multiple_choice: each choice is scored as the continuation delimiter + choice after
    the context; acc takes the highest log-likelihood, acc_norm the highest per character of the
    choice (without the delimiter), acc_bytes per UTF-8 byte of the choice. Ties go to the first
    choice, as numpy's argmax."""
    from extras.benchmarks import read_mc, warn_spaced_choices
    rows = read_mc(path)[:limit]                       # plain JSONL, commonsense rows, task.json
    warn_spaced_choices(path, rows, delimiter)         # " Paris" after the delimiter " ": both
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


# --------------------------------------------------------------------------------------------------
# Putting it together


def evaluate(models: list[str], names: list[str] | None = None, lm=(), mc=(), gen=(),
             humaneval=None, device="auto", window=None, stride=None, shots=3,
             max_new_tokens=None, timeout=3.0, limit=None, bos: bool | None = None,
             delimiter: str = " ", bbh=(), bbh_prompts=None, dtype: str = "auto") -> dict:
    """{model name: {metric: value}} for every model and task. Models are loaded one at a time.
    dtype: auto is bf16 on a GPU and fp32 on the CPU; lm-eval's numbers are equal at float32 (its
    dtype=float32)."""
    from extras import benchmarks           # generation_end_ids; BIG-Bench Hard and HumanEval
    names = names or [Path(m).name for m in models]
    if len(names) != len(models):
        raise EvalError(f"{len(names)} names for {len(models)} models")
    results, device = {}, common.device(device)
    for path, name in zip(models, names):
        weights = common.dtype_for(device) if dtype == "auto" else getattr(torch, dtype)
        model, tok = fusellm.load(path, device, weights)
        # lm-eval's max_length default: the model's own context length (max_position_embeddings),
        # else 2048
        context = getattr(getattr(model, "args", None), "max_seq_len", 2048)
        stop_ids = benchmarks.generation_end_ids(path)
        scorer = Scorer(model, tok, device, window or context, bos, stop_ids)
        r = {}
        for f in lm:
            m = eval_lm(scorer, f, stride, limit)
            for key, metric in (("bpb", "bits_per_byte"), ("word_ppl", "word_perplexity"),
                                ("ppl/token", "ppl_per_token")):
                r[f"{key}:{Path(f).stem}"] = m[metric]
        for f in mc:
            m = eval_mc(scorer, f, limit, delimiter)
            for metric in ("acc", "acc_norm", "acc_bytes"):
                r[f"{metric}:{Path(f).stem}"] = m[metric]
        for f in gen:
            m = benchmarks.eval_gen(scorer, f, shots, max_new_tokens or 64, limit)
            r[f"em:{Path(f).stem}"] = m["exact_match"]
        # BIG-Bench Hard and HumanEval as they ship: em:bbh, pass@1:<file>
        r.update(benchmarks.eval_benchmarks(scorer, name, bbh, bbh_prompts, humaneval,
                                            max_new_tokens, timeout, limit))
        results[name] = r
        del model, scorer
    return results


if __name__ == "__main__":
    from extras.eval_cli import main        # the flags, one error line, the table, --json
    main()
