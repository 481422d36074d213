"""
tools/gpu_bench.py: every GPU figure of nanofuse in one command, `python tools/bench.py gpu`.

Why it exists: nanofuse is run as `python train.py` on one or more GPUs, yet GPU machines are lent
only now and then, for minutes. So everything measured on a GPU is prepared here, runs in one call
of at most 8 minutes on one H100/H200, and writes its figures (OUT/gpu_bench.json) and the tables
the docs show (OUT/gpu_bench.md), each row with the device, the torch version and the date; both
are written again before and after each part and with each row, so a command stopped midway
keeps what it had measured.
`--dry-run` runs the same code at tiny sizes on the CPU (gloo instead of NCCL, torch.compile's
"eager" backend instead of inductor, Triton's interpreter for the Triton head), in the test
suite, so that the command cannot rot between GPU sessions.

What it holds, one part each (PARTS), every part time-boxed (its children killed when its time is
up) and recorded on its own: a part that fails writes its error and the next one runs.
- precision: our Transformer's log-probs in bf16 against fp32 on a Llama-3.2-1B and a Gemma 3 270M
  shape (random weights, built on the device): the largest difference, top-1 agreement, and the
  attention kernel SDPA picks for each call (sdpa_kernels);
- dists: source distributions, data.window_topk against transformers' forward + log_softmax + topk
  (tools/bench.py dists_child, each in a fresh process), tokens/s and peak memory, at vocabularies
  of 262k, 128k and 32k; ours with each of extras/fast_head.py's head modes in turn (HEADS: the
  default compiled log-sum-exp, extras/triton_head.py's one-read kernel, ...) and the fastest
  named, the 262k pass of both profiled;
- train: optimizer steps (train.run_steps) of the Llama-3.2-1B shape, micro-batches of 4 windows
  of 2,048 tokens, bf16 autocast, CLM-only and fusion, eager, torch.compile'd block by block and
  whole (as train.py --compile), each also with 4 micro-batches a step: tokens/s and MFU against
  the GPU's dense bf16 peak (PEAK_BF16), the graphs compiled; both compiled fusion steps
  profiled;
- generate: greedy generation with the KV cache (extras/cached_generation.py) against transformers'
  generate on the same weights, new tokens/s at batch 1 and 8, and whether they chose the same;
  our batched steps also with cuDNN's attention allowed (eval.py's steps leave it out);
- torchrun: `torchrun --nproc_per_node 1` over NCCL, a FSDP2 model whose DCP checkpoint
  (extras/distributed.py) is saved, the process killed (SIGKILL) and resumed: equal to the run
  that was never killed. (train.py itself shards only across several processes, so at one process
  it writes ckpt.pt; this worker shards its one process's model to write the DCP checkpoint.)
The profiles: where the time goes (the largest kernels and their shares) in the table, the
profiler's whole tables in OUT/profile-*.txt.
transformers may be absent on the GPU machine (docs/benchmarks.md: the wheels folder): then the
comparisons say so and give our figures alone.
"""
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                   # the repository's top-level files

# Model shapes, as their config.json files give them (random weights: nothing is downloaded).
LLAMA_1B = {    # meta-llama/Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001}
GEMMA_270M = {  # google/gemma-3-270m: 5 sliding layers, then a global one
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "query_pre_attn_scalar": 256, "sliding_window": 512, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                    for i in range(18)],
    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
# Dense bf16 peaks (no sparsity), TFLOP/s, by a piece of torch.cuda.get_device_name; first match.
PEAK_BF16 = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))


def shrink(cfg: dict, vocab: int) -> dict:
    """The same family at a dry-run's size: 2 layers of width 64, the given vocabulary."""
    small = dict(cfg, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, head_dim=16, bos_token_id=1, eos_token_id=2)
    small["num_key_value_heads"] = 1 if cfg["model_type"] == "gemma3_text" else 2
    if cfg["model_type"] == "gemma3_text":
        small.update(query_pre_attn_scalar=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])
    return small


@dataclass
class Sizes:
    """What each part runs: the GPU's sizes, or the dry run's tiny ones."""
    models: dict            # name -> config.json dict
    vocab_models: tuple     # dists: (vocabulary label, model name)
    precision: tuple        # (batch, tokens) of the bf16 / fp32 comparison
    dists: tuple            # (batch, tokens, reps)
    train: tuple            # (model name, batch, tokens, timed steps)
    accum: int              # train: micro-batches in the accumulated step
    compile_backend: str    # torch.compile's backend in the train part
    generate: tuple         # (model name, prompt tokens, new tokens, batches)
    torchrun_steps: int     # the killed-and-resumed run: steps (a checkpoint every 2)
    dry: bool               # the dry run: CPU, gloo, a tiny torchrun model
    budget_s: dict          # each part's time box, seconds

    @staticmethod
    def for_gpu():
        llama32k = dict(LLAMA_1B, vocab_size=32000)
        return Sizes(models={"llama-1b": LLAMA_1B, "llama-1b-32k": llama32k,
                             "gemma-270m": GEMMA_270M},
                     vocab_models=(("262k", "gemma-270m"), ("128k", "llama-1b"),
                                   ("32k", "llama-1b-32k")),
                     precision=(2, 1024), dists=(4, 2048, 3), train=("llama-1b", 4, 2048, 5),
                     accum=4, compile_backend="inductor", generate=("llama-1b", 128, 64, (1, 8)),
                     torchrun_steps=6, dry=False,
                     budget_s=dict(precision=35, dists=155, train=180, generate=40, torchrun=50))

    @staticmethod
    def for_dry_run():
        return Sizes(models={"llama-1b": shrink(LLAMA_1B, 1280),
                             "llama-1b-32k": shrink(LLAMA_1B, 320),
                             "gemma-270m": shrink(GEMMA_270M, 2620)},
                     vocab_models=(("2620", "gemma-270m"), ("1280", "llama-1b"),
                                   ("320", "llama-1b-32k")),
                     precision=(2, 32), dists=(2, 32, 1), train=("llama-1b", 2, 32, 1),
                     accum=2, compile_backend="eager", generate=("llama-1b", 8, 4, (1, 8)),
                     torchrun_steps=4, dry=True,
                     budget_s=dict(precision=60, dists=150, train=60, generate=60, torchrun=90))


# --------------------------------------------------------------------------------------------------
# Children: each runs in a fresh process (no memory, imports or CUDA state from another part)


def random_model(cfg: dict, device, dtype, seed: int = 0):
    """Our Transformer of a config.json's shape, built on the device: matrices N(0, 0.02), norms at
    their identity (1; Gemma's x (1 + w): 0)."""
    import fusellm
    args = fusellm.ModelArgs.from_hf(cfg)
    with torch.device(device):
        model = fusellm.Transformer(args)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(0.0 if args.norm == "gemma" else 1.0)
            else:
                p.normal_(0, 0.02, generator=g)
    return model.to(dtype)


def save_child(cfg: dict, path: str) -> dict:
    """A random model of this shape saved as a model folder (Hugging Face names, config.json), in
    the device's dtype, so that nanofuse and transformers load the same weights."""
    import common
    import fusellm
    device = common.device("auto")
    model = random_model(cfg, device, common.dtype_for(device)).cpu()
    fusellm.save_model(model, path)
    return dict(params=sum(p.numel() for p in model.parameters()))


def precision_child(cfg: dict, B: int, T: int) -> dict:
    """Log-probs of one random batch with the weights in fp32, then the same weights in bf16 (the
    dtype data.py runs frozen models in on a GPU): the largest difference, its mean, and the share
    of positions whose top-1 is the same; and the kernel SDPA picks for each of the bf16 pass's
    attention calls, counted ("math": the unfused fallback)."""
    import common
    device = common.device("auto")
    model = random_model(cfg, device, torch.float32).eval()
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(0))
    x = x.to(device)
    with torch.no_grad():
        lp32 = model(x).log_softmax(-1)                                           # (B, T, V)
        top32 = lp32.argmax(-1)                                                   # (B, T)
        with sdpa_kernels() as kernels:
            lp16 = model.to(torch.bfloat16)(x).log_softmax(-1)                    # (B, T, V)
        diff = (lp16 - lp32).abs()
        return dict(max_logprob_diff=float(diff.max()), mean_logprob_diff=float(diff.mean()),
                    top1_agreement=float((lp16.argmax(-1) == top32).float().mean()),
                    positions=B * T, device=device,
                    attention=", ".join(f"{k.removesuffix('_attention')} x{kernels.count(k)}"
                                        for k in sorted(set(kernels))))


@contextlib.contextmanager
def sdpa_kernels():
    """A list that gets, for each scaled_dot_product_attention call made inside, the kernel torch's
    dispatcher picks for it (torch._fused_sdp_choice, the choice SDPA itself makes, outside
    autocast): on a GPU "cudnn_attention", "flash_attention" or "efficient_attention", or
    "math", the unfused fallback that writes the (B, H, T, S) scores out in fp32."""
    from torch.nn.attention import SDPBackend
    F, seen = torch.nn.functional, []
    sdpa = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
        seen.append(SDPBackend(choice).name.lower())
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = recorded
    try:
        yield seen
    finally:
        F.scaled_dot_product_attention = sdpa


def train_child(cfg: dict, B: int, T: int, steps: int, kinds: tuple, backend: str, blocks: bool,
                accum: int, profile: bool, cache: str) -> dict:
    """On one model (backend: compiled once with it, whole as train.py --compile does, or blocks:
    each Transformer block on its own, one compilation serving all), for each (label, lambda) of
    `kinds`: one untimed optimizer step of train.run_steps (bf16 autocast on a GPU, fp32 master
    weights, fused AdamW; the first compiles, into the empty folder `cache`), `steps` timed steps
    of one micro-batch of B x T tokens, then, accum > 1, 2 timed steps of `accum` micro-batches
    (the gradients adding up, one update: how a 1B target trains), with their own peak memory and
    loss; profile: one more step of the last kind under torch.profiler. Per kind: s/step,
    tokens/s, the untimed step's seconds, peak memory; N, the parameters (the tied embedding
    once); compiled: the graphs torch.compile made, the graph breaks that split them and the
    operations captured."""
    import common
    import train
    from tools.bench import fusion_batch, peak_rss, profiled
    # inductor's and Triton's caches on disk would serve this process what an earlier one (or an
    # earlier run on the same machine) compiled: the first step would not time a compilation
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    os.environ.pop("TRITON_CACHE_DIR", None)         # Triton's then goes under inductor's
    device = common.device("auto")
    cuda = device.startswith("cuda")
    model = random_model(cfg, device, torch.float32).train()
    V = model.args.vocab_size
    fmodel = torch.compile(model, backend=backend) if backend and not blocks else model
    if backend and blocks:
        for layer in model.layers:
            layer.compile(backend=backend)
    batch = fusion_batch(V, B, T)
    out = dict(params=sum(p.numel() for p in model.parameters()), device=device, kinds={},
               graphs=None, graph_breaks=None, ops_captured=None)
    for n, (label, lam) in enumerate(kinds):
        tcfg = train.TrainConfig(lam=lam, batch_size=B)
        opt = train.make_optimizer(model, tcfg, device)
        plan = [1] + [1] * steps + [accum] * (2 if accum > 1 else 0)
        plan += [1] if profile and n == len(kinds) - 1 else []
        loop = train.run_steps(fmodel, opt, tcfg, len(plan), lambda k: [batch] * plan[k], device, V)

        def one():                               # the loop's next step, timed
            t0 = time.perf_counter()
            rec = next(loop)
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t0, rec

        first_s, _ = one()                      # allocations, kernel choice, compilation
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed = [one() for _ in range(steps)]
        dt = sum(t for t, _ in timed) / steps
        r = dict(step_s=dt, tokens_per_s=B * T / dt, first_step_s=first_s,
                 loss=timed[-1][1]["loss"])
        r["peak_mib"] = (torch.cuda.max_memory_allocated() if cuda else peak_rss()) / 2**20
        if accum > 1:                           # their own peak and loss
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            acc = [one() for _ in range(2)]
            dt = sum(t for t, _ in acc) / 2
            peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
            r.update(accum_step_s=dt, accum_tokens_per_s=accum * B * T / dt,
                     accum_loss=acc[-1][1]["loss"], accum_peak_mib=peak / 2**20)
        if profile and n == len(kinds) - 1:
            out["profile"] = profiled(one, cuda)
        out["kinds"][label] = r
        del opt
    if backend:             # what torch.compile made of it: graphs, and breaks that split them
        from torch._dynamo.utils import counters
        out.update(graphs=counters["stats"]["unique_graphs"],
                   graph_breaks=sum(counters["graph_break"].values()),
                   ops_captured=counters["stats"]["calls_captured"])
    return out


def greedy_batch(model, x, new: int, sdpa_choice: bool = False):
    """B prompts of one length, `new` greedy tokens each with a KVCache: the prompts run once, then
    each step one token per row, in the attention kernels eval.py's generation uses (cuDNN's left
    out), or sdpa_choice: in whichever SDPA picks. (B, new) ids."""
    from extras.cached_generation import KVCache, decoding
    B, P = x.shape
    p = next(model.parameters())
    cache = KVCache(model.args, B, P + new, p.device, p.dtype)
    with contextlib.nullcontext() if sdpa_choice else decoding():
        out = [model.logits(model.hidden(x, cache)[:, -1]).argmax(-1)]             # (B,)
        while len(out) < new:
            out.append(model.logits(model.hidden(out[-1][:, None], cache)[:, -1]).argmax(-1))
    return torch.stack(out, 1)                                                     # (B, new)


def generate_child(path: str, prompt: int, new: int, batches: tuple, with_hf: bool) -> dict:
    """New tokens/s of greedy generation from a model folder: at batch 1 eval.py's own steps
    (Scorer.generate -> extras/cached_generation.CachedSteps), at larger batches the same KVCache
    over B rows (greedy_batch); greedy_batch again in the attention kernels SDPA picks itself
    (cuDNN's included, which eval.py's steps leave out), its time over greedy_batch's as they run
    (at batch 1 timed for it: eval.py's steps also wait for each token); against transformers'
    generate (greedy, its cache, SDPA's own choice) on the same weights and prompts when with_hf.
    Each timed after one untimed run of 2 tokens, so cuDNN's plans for longer key counts are
    built in the timed run, as in a process's first generation of that length."""
    import types
    import common
    import eval as ev
    import fusellm
    device = common.device("auto")
    dtype = common.dtype_for(device)
    cuda = device.startswith("cuda")
    model = fusellm.load_model(path, device, dtype).eval()
    V = model.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (max(batches), prompt), generator=g)                # (B, P)
    hf = None
    if with_hf:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        hf.generation_config.eos_token_id = None                # exactly `new` tokens, as ours

    def timed(fn):
        fn(2)                                                   # untimed: allocations, kernels
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(new)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    rows = []
    for B in batches:
        x = prompts[:B]
        if B == 1:        # eval.py's path; a tokenizer stand-in: ids in, one character per id out
            tok = types.SimpleNamespace(bos_id=None, eos_id=None, vocab_size=V, pieces=[],
                                        special=set(), add_bos=False,
                                        encode=lambda t: x[0].tolist(),
                                        decode=lambda ids: ",".join(map(str, ids)))
            scorer = ev.Scorer(model, tok, device, window=prompt + new)
            ours, s = timed(lambda n: torch.tensor([[int(i) for i in
                                                     scorer.generate("", n, []).split(",")]]))
        else:
            with torch.no_grad():
                ours, s = timed(lambda n: greedy_batch(model, x.to(device), n).cpu())
        row = dict(batch=B, prompt=prompt, new=new, ours_tokens_per_s=B * new / s)
        with torch.no_grad():                  # the batched steps both ways: cuDNN out, then in
            s_out = s if B > 1 else timed(lambda n: greedy_batch(model, x.to(device), n))[1]
            _, s_own = timed(lambda n: greedy_batch(model, x.to(device), n, sdpa_choice=True))
        row.update(ours_sdpa_tokens_per_s=B * new / s_own, no_cudnn_gain=s_own / s_out)
        if hf is not None:
            with torch.no_grad():
                theirs, s = timed(lambda n: hf.generate(
                    x.to(device), attention_mask=torch.ones_like(x).to(device), do_sample=False,
                    max_new_tokens=n, min_new_tokens=n, pad_token_id=0)[:, prompt:].cpu())
            row.update(hf_tokens_per_s=B * new / s, speed=row["ours_tokens_per_s"] * s / (B * new),
                       same_rows=int((ours == theirs).all(1).sum()),
                       same_tokens=float((ours == theirs).float().mean()))
        rows.append(row)
    return dict(rows=rows, device=device)


def _child_main(conn, fn, args):
    try:
        conn.send((True, fn(*args)))
    except BaseException:                       # noqa: BLE001 - sent back to the parent as text
        conn.send((False, traceback.format_exc()[-3000:]))


def fresh(fn, *args, deadline: float):
    """fn(*args) in a new (spawned) Python process, killed if it is not done by `deadline` (a
    time.monotonic() value): a part cannot overrun its time box. fn must be a module-level function;
    its error comes back as the child's traceback."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
    p.start()
    send.close()
    try:
        if not recv.poll(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{fn.__name__} did not finish within its part's time box")
        ok, value = recv.recv()
    except EOFError:
        raise RuntimeError(f"{fn.__name__}: the child process died (exit code {p.exitcode}); "
                           f"out of memory?") from None
    finally:
        if p.is_alive():
            p.kill()
        p.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{value}")
    return value


# --------------------------------------------------------------------------------------------------
# The torchrun worker: `python -m torch.distributed.run --nproc_per_node 1 tools/gpu_bench.py
# --torchrun-worker OUT STEPS {run,crash,resume} DRY`


def torchrun_worker(out: str, steps: int, mode: str, dry: bool):
    """One rank: its process group (NCCL on a GPU, gloo on the CPU) checked by an all-reduce, a
    model sharded with FSDP2 (fully_shard, as train.py --fsdp), train.run_steps with a DCP
    checkpoint (extras/distributed.save_checkpoint) every 2 steps and after the last. mode "crash":
    SIGKILL right after the first checkpoint; "resume": start from the checkpoint. Writes
    metrics.jsonl (step, loss), final.pt (the whole weights) and info.json."""
    import train
    from extras import distributed
    from torch.distributed.fsdp import fully_shard
    import common
    from tools.bench import fusion_batch
    out = Path(out)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = common.device("auto")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    t = torch.full((1,), rank + 1.0, device=device)
    torch.distributed.all_reduce(t)                       # the sum of 1..world over every rank
    distributed.seed_all(0)
    cfg = shrink(LLAMA_1B, 512) if dry else dict(shrink(LLAMA_1B, 4096), hidden_size=256,
                                                    intermediate_size=512, head_dim=64)
    model = random_model(cfg, device, torch.float32).train()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    tcfg = train.TrainConfig(lam=0.9, batch_size=4, lr=3e-3, warmup=1, max_steps=steps)
    opt = train.make_optimizer(model, tcfg, device)
    path = out / "ckpt"
    start = distributed.load_checkpoint(path, model, opt, True) if mode == "resume" else 0
    V = cfg["vocab_size"]
    for rec in train.run_steps(model, opt, tcfg, steps, lambda k: [fusion_batch(V, 4, 64, seed=k)],
                               device, V, world, start):
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": rec["step"], "loss": rec["loss"]}) + "\n")
        if rec["step"] % 2 == 0 or rec["step"] == steps:
            distributed.save_checkpoint(path, model, opt, rec["step"], tcfg, True, rank)
            if mode == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
    weights = distributed.full_weights(model, True)
    if rank == 0:
        torch.save(weights, out / "final.pt")
        (out / "info.json").write_text(json.dumps(dict(
            backend=torch.distributed.get_backend(), all_reduce=float(t), world=world,
            resumed_at=start, device=device)))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_marked(marker: str):
    """SIGKILL every live process whose environment holds NANOFUSE_GPU_BENCH_RUN=marker: torchrun's
    agent and its workers, which run in sessions of their own, out of reach of one group kill."""
    needle = f"NANOFUSE_GPU_BENCH_RUN={marker}".encode()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):         # gone meanwhile, or not ours to read
                pass


def torchrun(out: Path, steps: int, mode: str, dry: bool, deadline: float) -> int:
    """One `torchrun --nproc_per_node 1` launch of torchrun_worker, its exit code; whatever
    happens, nothing it started outlives it."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "NANOFUSE_GPU_BENCH_RUN": marker, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__,
           "--torchrun-worker", str(out), str(steps), mode, str(int(dry))]
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    try:
        log = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        kill_marked(marker)
        p.wait()
    if p.returncode != 0 and mode != "crash":
        raise RuntimeError(f"torchrun ({mode}) exited with {p.returncode}:\n{log[-3000:]}")
    return p.returncode


# --------------------------------------------------------------------------------------------------
# The parts: each adds its rows (dicts of figures) to `rows` (main's Rows, which saves the files
# each time), run by main() in its time box


def part_precision(sz: Sizes, work: Path, deadline: float, rows: Rows):
    B, T = sz.precision
    for name in ("llama-1b", "gemma-270m"):
        r = fresh(precision_child, sz.models[name], B, T, deadline=deadline)
        rows.append(dict(model=name, dtype="bf16 vs fp32", **r))


def has_transformers() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformers") is not None


def saved(sz: Sizes, work: Path, name: str, deadline: float) -> str:
    """The folder of model `name` (saved once, then reused by the next part)."""
    path = work / name
    if not (path / "config.json").is_file():
        fresh(save_child, sz.models[name], str(path), deadline=deadline)
    return str(path)


BIG = 2**29     # logits a block in the "1 GiB blocks" columns: 2,048 rows of 262,144 in bf16
# fast_head.py's NANOFUSE_HEAD modes, the default first; "@BIG": with blocks 8x the GPU's default
HEADS = ("compiled", "triton", f"compiled@{BIG}", f"triton@{BIG}", "eager", "fp32")


def heads() -> tuple:
    """HEADS, less the triton ones where the triton package is not installed (the table then has
    no Triton columns: a column no row has a figure for is left out)."""
    from extras import triton_head
    return HEADS if triton_head.triton is not None else tuple(m for m in HEADS if "triton" not in m)


def fastest(timed: dict, triton_failed) -> str:
    """The mode of most tokens/s among those that ran as themselves: where the Triton kernel failed,
    its modes ran the compiled one's code, so none of them is named."""
    real = [m for m in timed if not (triton_failed and "triton" in m)] or list(timed)
    return max(real, key=lambda m: timed[m]["tokens_per_s"])


def part_dists(sz: Sizes, work: Path, deadline: float, rows: Rows):
    """Per vocabulary, the largest first: one process times window_topk with each head mode (HEADS)
    on one loaded model, another transformers; the first vocabulary's default head and transformers
    also profiled. The dry run's model is bf16, so the CPU runs the GPU's head."""
    from tools.bench import dists_child
    B, T, reps = sz.dists
    modes = heads()
    for n, (label, name) in enumerate(sz.vocab_models):
        path = saved(sz, work, name, deadline)
        ours = fresh(dists_child, "nanofuse", path, B, T, 10, reps, 0, 0, modes, n == 0,
                     "bfloat16" if sz.dry else "", True, deadline=deadline)
        timed = ours["heads"]
        best = fastest(timed, ours["triton_failed"])
        row = dict(vocab=label, model=name, tokens=B * T, ours_tokens_per_s=ours["tokens_per_s"],
                   ours_peak_mib=ours["extra"] / 2**20,
                   **{f"{m}_tokens_per_s": r["tokens_per_s"] for m, r in timed.items()},
                   first_s=timed[modes[0]]["first_s"],
                   best_mode=best.replace(f"@{BIG}", ", 1 GiB blocks"),
                   max_logprob_diff=max(r["max_logprob_diff"] for r in timed.values()),
                   max_ce_diff=max(r["max_ce_diff"] for r in timed.values()),
                   compile_failed=ours["compile_failed"], triton_failed=ours["triton_failed"],
                   body_tokens_per_s=ours["body_tokens_per_s"])
        if "profile" in ours:
            row["profile"] = ours["profile"]
        rows.append(row)                        # kept if transformers' process runs out of time
        if has_transformers():
            hf = fresh(dists_child, "transformers", path, B, T, 10, reps, 0, 0, ("",), n == 0,
                       "", True, deadline=deadline)
            row.update(hf_tokens_per_s=hf["tokens_per_s"], hf_peak_mib=hf["extra"] / 2**20,
                       speed=ours["tokens_per_s"] / hf["tokens_per_s"],
                       best_speed=timed[best]["tokens_per_s"] / hf["tokens_per_s"],
                       hf_body_tokens_per_s=hf["body_tokens_per_s"],
                       body_speed=ours["body_tokens_per_s"] / hf["body_tokens_per_s"],
                       memory=ours["extra"] / max(hf["extra"], 1))
            if "profile" in hf:
                row["hf_profile"] = hf["profile"]
            rows.save()                         # the row changed in place: saved again


def peak_tflops(device_name: str):
    return next((v for k, v in PEAK_BF16 if k in device_name), None)


def part_train(sz: Sizes, work: Path, deadline: float, rows: Rows):
    """Eager, compiled block by block, then compiled whole (does the whole model's compilation pay
    for its time? It goes last, so that if it outruns the time box the compiled figures are still
    there): one process each, CLM only and CLM + fusion on the one model; each also with sz.accum
    micro-batches a step; both compiled fusion steps profiled."""
    name, B, T, steps = sz.train
    peak = peak_tflops(device_name())
    kinds = (("CLM only", 1.0), ("CLM + fusion", 0.9))
    be = sz.compile_backend
    ways = (("", False, "no"), (be, True, f"{be}, each block"), (be, False, be))
    for n, (backend, blocks, label) in enumerate(ways):
        r = fresh(train_child, sz.models[name], B, T, steps, kinds, backend, blocks, sz.accum,
                  bool(backend), str(work / f"compile-cache-{n}"),
                  deadline=deadline)
        for step, k in r["kinds"].items():
            figures = ("step_s", "tokens_per_s", "peak_mib", "loss")
            variants = [dict(step=step, tokens=B * T, first_step_s=k["first_step_s"],
                             **{x: k[x] for x in figures})]
            if "accum_step_s" in k:                # the same, sz.accum micro-batches a step
                variants.append(dict(step=f"{step}, {sz.accum} micro-batches",
                                     tokens=sz.accum * B * T, first_step_s=None,
                                     **{x: k[f"accum_{x}"] for x in figures}))
            if "profile" in r and step == kinds[-1][0]:   # its one-micro-batch step, profiled
                variants[0]["profile"] = r["profile"]
            for v in variants:
                flops = 6 * r["params"] * v["tokens_per_s"]      # 6 N per token: fwd + bwd
                rows.append(dict(model=name, compile=label, params=r["params"], **v,
                                 graphs=r["graphs"], graph_breaks=r["graph_breaks"],
                                 ops_captured=r["ops_captured"],
                                 mfu=flops / (peak * 1e12) if peak else None))


def part_generate(sz: Sizes, work: Path, deadline: float, rows: Rows):
    name, prompt, new, batches = sz.generate
    path = saved(sz, work, name, deadline)
    r = fresh(generate_child, path, prompt, new, batches, has_transformers(), deadline=deadline)
    rows += [dict(model=name, **row) for row in r["rows"]]


def part_torchrun(sz: Sizes, work: Path, deadline: float, rows: Rows):
    steps, dry = sz.torchrun_steps, sz.dry
    whole, split = work / "torchrun_whole", work / "torchrun_killed"
    for d in (whole, split):
        d.mkdir(parents=True, exist_ok=True)
    torchrun(whole, steps, "run", dry, deadline)
    killed_rc = torchrun(split, steps, "crash", dry, deadline)
    kept = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    torchrun(split, steps, "resume", dry, deadline)
    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (whole, split))
    if [r["step"] for r in a] != [r["step"] for r in b]:
        raise RuntimeError(f"steps differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    w1, w2 = (torch.load(d / "final.pt", map_location="cpu", weights_only=False)
              for d in (whole, split))
    info = json.loads((split / "info.json").read_text())
    loss_diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    weight_diff = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    rows.append(dict(backend=info["backend"], world=info["world"],
                 all_reduce_ok=info["all_reduce"] == 1,
                 checkpoint="DCP (FSDP2)", steps=steps, killed_exit_code=killed_rc,
                 steps_before_kill=len(kept), resumed_at=info["resumed_at"],
                 max_loss_diff=loss_diff, max_weight_diff=weight_diff,
                 equal=loss_diff <= 1e-5 and weight_diff <= 1e-4))


PARTS = {"precision": part_precision, "dists": part_dists, "train": part_train,
         "generate": part_generate, "torchrun": part_torchrun}
PROBE_S = 60            # naming the GPU (a fresh process: torch's import and CUDA's start)
STOPPED = "not finished: the command was stopped while this part ran (its time limit?)"
FAIL_ENV = "NANOFUSE_GPU_BENCH_FAIL"     # a part's name: it raises at once (the tests' check)


@functools.cache
def device_name() -> str:
    """The GPU's name, asked in a child process so that this one never holds CUDA; or the CPU.
    Asked once (main and the train part both need it)."""
    cpu = f"cpu ({os.cpu_count()} cores)"
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return cpu
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    try:
        name = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=PROBE_S).stdout.strip()
    except subprocess.TimeoutExpired:
        raise SystemExit(f"error: torch.cuda did not name the GPU within {PROBE_S} s (the driver "
                         f"hangs?): no part can run; check `nvidia-smi`") from None
    return name or cpu


# --------------------------------------------------------------------------------------------------
# The tables


COLUMNS = {
    "precision": [("model", "model (random weights)", "{}"),
                  ("max_logprob_diff", "largest log-prob difference (nats)", "{:.3g}"),
                  ("mean_logprob_diff", "mean difference", "{:.2g}"),
                  ("top1_agreement", "top-1 agreement", "{:.4f}"),
                  ("positions", "positions", "{:,}"),
                  ("attention", "attention kernels (bf16 pass, calls)", "{}")],
    "dists": [("vocab", "vocabulary", "{}"), ("model", "model", "{}"), ("tokens", "tokens", "{:,}"),
              ("compiled_tokens_per_s", "window_topk tokens/s (bf16, compiled: default)",
               "{:,.0f}"),
              ("triton_tokens_per_s", "bf16, Triton kernel", "{:,.0f}"),
              (f"compiled@{BIG}_tokens_per_s", "compiled, 1 GiB blocks", "{:,.0f}"),
              (f"triton@{BIG}_tokens_per_s", "Triton, 1 GiB blocks", "{:,.0f}"),
              ("eager_tokens_per_s", "bf16, eager", "{:,.0f}"),
              ("fp32_tokens_per_s", "fp32 logits (before)", "{:,.0f}"),
              ("hf_tokens_per_s", "transformers tokens/s", "{:,.0f}"),
              ("speed", "speed (default)", "{:.2f}x"), ("best_mode", "fastest mode", "{}"),
              ("best_speed", "its speed", "{:.2f}x"),
              ("body_tokens_per_s", "body alone tokens/s, ours", "{:,.0f}"),
              ("hf_body_tokens_per_s", "transformers' body", "{:,.0f}"),
              ("body_speed", "body speed", "{:.2f}x"),
              ("ours_peak_mib", "peak MiB added, ours", "{:,.0f}"),
              ("hf_peak_mib", "transformers", "{:,.0f}"), ("memory", "memory", "{:.3f}x"),
              ("max_logprob_diff", "largest log-prob difference between modes", "{:.2g}"),
              ("first_s", "first pass s (compiles)", "{:.1f}")],
    "train": [("step", "step", "{}"), ("compile", "torch.compile", "{}"),
              ("tokens", "tokens", "{:,}"), ("step_s", "s/step", "{:.3f}"),
              ("tokens_per_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"),
              ("first_step_s", "first step s", "{:.1f}"), ("peak_mib", "peak MiB", "{:,.0f}"),
              ("graphs", "graphs compiled", "{}"), ("graph_breaks", "graph breaks", "{}")],
    "generate": [("batch", "batch", "{}"), ("prompt", "prompt", "{}"), ("new", "new", "{}"),
                 ("ours_tokens_per_s", "KV cache new tokens/s", "{:,.1f}"),
                 ("ours_sdpa_tokens_per_s", "batched steps, SDPA's own kernels", "{:,.1f}"),
                 ("no_cudnn_gain", "cuDNN left out (batched steps)", "{:.2f}x"),
                 ("hf_tokens_per_s", "transformers generate", "{:,.1f}"),
                 ("speed", "speed", "{:.2f}x"), ("same_tokens", "same tokens", "{:.3f}")],
    "torchrun": [("backend", "backend", "{}"), ("checkpoint", "checkpoint", "{}"),
                 ("steps_before_kill", "steps before SIGKILL", "{}"),
                 ("resumed_at", "resumed at step", "{}"),
                 ("max_loss_diff", "largest loss difference", "{:.2g}"),
                 ("max_weight_diff", "largest weight difference", "{:.2g}"),
                 ("equal", "equal to the uninterrupted run", "{}")],
}


def markdown(result: dict) -> str:
    """Each part's table, every row ending with device, torch version and date; a failed part
    its error's last line."""
    stamp = [result["device"], result["torch"], result["date"]]
    out = [f"# `python tools/bench.py gpu{' --dry-run' if result['dry_run'] else ''}`", "",
           f"{result['device']}, torch {result['torch']}, {result['date']}; dense bf16 peak: "
           f"{result['peak_bf16_tflops'] or 'unknown for this device (no MFU)'}"
           f"{' TFLOP/s' if result['peak_bf16_tflops'] else ''}; {result['seconds']:.0f} s", ""]
    for name, part in result["parts"].items():
        out.append(f"## {name} ({part['seconds']:.0f} s)")
        out.append("")
        if part["error"]:                       # and the rows it made before, if any
            out += [f"failed: {part['error'].strip().splitlines()[-1]}", ""]
        if not part["rows"]:
            continue
        cols = [c for c in COLUMNS[name] if any(r.get(c[0]) is not None for r in part["rows"])]
        out.append("| " + " | ".join([c[1] for c in cols] + ["device", "torch", "date"]) + " |")
        out.append("|" + " --- |" * (len(cols) + 3))
        for row in part["rows"]:
            cells = ["-" if row.get(k) is None else f.format(row[k]) for k, _, f in cols]
            out.append("| " + " | ".join(cells + stamp) + " |")
        for row in part["rows"]:
            if row.get("compile_failed"):
                out.append(f"\n{row['vocab']}: torch.compile failed ({row['compile_failed']}), so "
                           f"the compiled column and the ratios ran uncompiled.")
            if row.get("triton_failed"):
                out.append(f"\n{row['vocab']}: the Triton kernel failed ({row['triton_failed']}): "
                           f"from the block it failed on, the Triton columns ran the compiled "
                           f"mode, and the fastest mode is named among the others.")
            for key, who in PROFILES:
                if key in row:
                    out.append(f"\n{profile_line(name, row, who, row[key])}")
        for note in part["notes"]:
            out.append(f"\n{note}")
        out.append("")
    return "\n".join(out)


PROFILES = (("profile", "ours"), ("hf_profile", "transformers"))   # a row's key: whose pass


def profile_name(part: str, row: dict, who: str) -> str:
    """The file a profiled row's whole table is written to, in OUT."""
    label = re.sub(r"[^\w.-]+", "-", str(row.get("vocab") or row.get("compile", "")), flags=re.A)
    return f"profile-{part}-{who}-{label}.txt"     # the device call returns only such names


def profile_line(part: str, row: dict, who: str, prof: dict) -> str:
    """Where one profiled pass spends its time: its largest operations and their shares."""
    top = "; ".join(f"`{k[:60]}` {share:.0%}" for k, share in prof["top"][:6])
    what = row.get("vocab") or f"{row.get('step')}, compiled: {row.get('compile')}"
    return (f"Where the time goes, {who} ({what}, "
            f"{prof['total_ms']:.1f} ms of {prof['clock']} time under the profiler): {top}. "
            f"The whole table: {profile_name(part, row, who)}.")


class Rows(list):
    """A part's rows, the files written again each time rows are added (`save`): a command killed
    in the middle of a part keeps the rows it had made."""

    def __init__(self, save):
        super().__init__()
        self.save = save

    def append(self, row):
        super().append(row)
        self.save()

    def extend(self, rows):
        super().extend(rows)
        self.save()

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def write(result: dict, out: Path):
    """OUT/gpu_bench.json, OUT/gpu_bench.md and the profiler's tables (one file each) of the parts
    done so far; each written atomically (extras/atomic_files.py), so a kill leaves the last
    complete version."""
    from extras.atomic_files import write_text
    try:
        table = markdown(result)
    except Exception:                    # a formatting bug must not cost the figures or the parts
        table = f"The tables could not be written:\n\n```\n{traceback.format_exc()}```\n"
    files = {"gpu_bench.json": json.dumps(result, indent=1, default=str), "gpu_bench.md": table}
    for part, rec in result["parts"].items():
        for row in rec["rows"]:
            for key, who in PROFILES:
                if key in row:
                    files[profile_name(part, row, who)] = row[key]["table"]
    for name, text in files.items():
        write_text(out / name, text)


def main(dry_run: bool = False, out: str = "runs/gpu_bench", parts: str = ""):
    """Every part in turn, each in its time box; OUT/gpu_bench.json and OUT/gpu_bench.md."""
    if dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""          # the children too: the CPU, gloo
        os.environ["TRITON_INTERPRET"] = "1"             # the Triton head in Triton's interpreter
    sz = Sizes.for_dry_run() if dry_run else Sizes.for_gpu()
    chosen = parts.split(",") if parts else list(PARTS)
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise SystemExit(f"error: --parts {parts}: unknown {unknown}; choose from {list(PARTS)}")
    name = device_name()
    if not dry_run and name.startswith("cpu"):      # GPU sizes on a CPU would only time out
        raise SystemExit(f"error: no CUDA GPU visible here (torch {torch.__version__}: "
                         f"torch.cuda.is_available() is False); on a CPU run --dry-run")
    peak = peak_tflops(name)
    result = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  dry_run=dry_run, peak_bf16_tflops=peak, transformers=None, parts={})
    if has_transformers():
        from importlib.metadata import version
        result["transformers"] = version("transformers")
    print(f"gpu bench{' (dry run)' if dry_run else ''} on {name}, torch {torch.__version__}, "
          f"transformers {result['transformers'] or 'not installed: our figures alone'}; "
          f"dense bf16 peak {f'{peak:.0f} TFLOP/s' if peak else 'unknown (no MFU)'}", flush=True)
    t_all = time.monotonic()
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for part in chosen:
            t0 = time.monotonic()
            rec = dict(notes=[], error=STOPPED, seconds=0.0)      # until the part ends: said so

            def save(rec=rec, t0=t0):     # the files as they stand: what a kill from here leaves
                rec["seconds"] = time.monotonic() - t0
                result["seconds"] = time.monotonic() - t_all
                write(result, Path(out))

            rec["rows"] = Rows(save)
            result["parts"][part] = rec
            save()
            try:
                if os.environ.get(FAIL_ENV) == part:
                    raise RuntimeError(f"{part} failed on purpose ({FAIL_ENV}={part})")
                # each part adds its rows as it goes (saved each time): a part cut short by its
                # time box, an error or a kill keeps those it made
                PARTS[part](sz, Path(work), t0 + sz.budget_s[part], rec["rows"])
                if part in ("dists", "generate") and not has_transformers():
                    rec["notes"].append("transformers is not installed here: our figures alone "
                                        "(docs/benchmarks.md: the wheels folder)")
                if part == "dists" and "triton" not in heads():
                    rec["notes"].append("The triton package is not installed here: no Triton "
                                        "kernel column.")
                rec["error"] = None
            except Exception:                           # recorded; the next part still runs
                rec["error"] = traceback.format_exc()[-4000:]
            save()
            status = "failed: " + rec["error"].strip().splitlines()[-1] if rec["error"] else "ok"
            print(f"[{part}] {rec['seconds']:.1f} s, {status}", flush=True)
    print((Path(out) / "gpu_bench.md").read_text())     # as written: a table that failed says so
    print(f"wrote {Path(out) / 'gpu_bench.json'} and gpu_bench.md in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["--torchrun-worker"]:
    out_dir, n_steps, run_mode, is_dry = sys.argv[2:6]
    torchrun_worker(out_dir, int(n_steps), run_mode, bool(int(is_dry)))
elif __name__ == "__main__":         # `python tools/bench.py gpu ...` runs this
    import argparse
    ap = argparse.ArgumentParser(description="every GPU figure (python tools/bench.py gpu --help)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default="runs/gpu_bench")
    ap.add_argument("--parts", default="")
    cli = ap.parse_args()
    main(cli.dry_run, cli.out, cli.parts)
