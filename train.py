"""
train.py: continue-train a target LLM on L = lambda * L_CLM + (1 - lambda) * L_fusion.

    python train.py                                                            # the built-in demo (demo.py)
    python train.py --data DATA --target TARGET --out runs/fuse              # fusion-ready data from data.py
    python train.py --data DATA --target TARGET --online --out runs/fuse     # sources run inside the loop
    torchrun --nproc_per_node 8 train.py --data DATA --target TARGET --paper  # DDP; add --fsdp for big targets

Each step: a batch of windows (the target's tokens, every candidate's top-K on the target's tokens and
its CE), the fused distribution P_t (fusellm.fuse: MinCE / AvgCE per window as in the paper, or per token),
and the loss: L_CLM = cross-entropy on the next token, L_fusion = soft-label cross-entropy against P_t
computed sparsely from the target logits. Both are means over the step's real tokens, whatever the number
of processes. `python train.py --help` lists every setting; --paper sets the paper's.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import data
import fusellm
from common import atomic_path


@dataclass
class TrainConfig:
    # data and models
    data: str = ""                 # a data.py folder (its windows, and unless --online its distributions)
    target: str = ""               # the target model folder
    out: str = "runs/fuse"         # checkpoints, metrics, the exported model
    online: bool = False           # run the sources (the manifest's, or --sources) inside the loop
    sources: tuple = ()            # online: source model folders (default: the manifest's)
    topk: int = 10                 # online: top-K kept per candidate (stored data brings its own)
    use_sources: tuple = ()        # stored: the names of the sources to fuse (default: every aligned one)
    # fusion
    fusion: str = "mince"          # mince | avgce (per window, paper) | mince_token | avgce_token
    lam: float = 0.9               # lambda: weight of the CLM loss
    lam_end: float = -1.0          # if >= 0: lambda moves linearly from lam to lam_end over training
    temperature: float = 1.0       # candidates' top-K renormalised as p^(1/T)
    avg_weights: str = "official"  # AvgCE weights: official softmax(exp(-CE)) | softmax softmax(-CE/tau)
    tau: float = 1.0               # AvgCE softmax weights and per-token AvgCE: their temperature
    ce_unit: str = "token"         # candidates' CE compared per token (paper) or per byte of the window's text
    # optimisation
    batch_size: int = 8            # windows per optimizer step, all processes together (the global batch)
    micro_batch: int = 0           # windows per forward pass on each process (0: largest divisor of its share <= 8)
    epochs: float = 1.0            # passes over the data (fractions allowed)
    max_steps: int = 0             # if > 0: stop after this many steps instead
    lr: float = 3e-4               # peak learning rate
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup: float = 0.05           # warm-up: a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.1      # AdamW decay on matrices (embeddings, projections), none on norms, biases
    beta1: float = 0.9             # AdamW beta1
    beta2: float = 0.95            # AdamW beta2
    grad_clip: float = 1.0         # clip the gradient norm to this
    # system
    device: str = "auto"           # auto: cuda:LOCAL_RANK when a GPU is there, else cpu; or cpu, cuda:1, ...
    compile: bool = False          # torch.compile the model
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    fsdp: bool = False             # FSDP2 (fully_shard) instead of DDP when several processes run
    seed: int = 1337               # the window order (one seed: the same windows in the same order) and RNGs
    shuffle_shards: int = 16       # windows are shuffled across blocks of this many shards (0: all shards)
    # progress and checkpoints
    log_every: int = 10            # steps between progress lines
    ckpt_every: int = 100          # steps between checkpoints (out/ckpt.pt; under FSDP the sharded out/ckpt/)
    resume: bool = False           # continue from the checkpoint in --out
    export: bool = True            # write out/final: the model (save_model) and the target's tokenizer files
    paper: bool = False            # the paper's settings (see PAPER)


# The paper's setup (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024): 1 epoch, 128 windows
# of 2048 tokens, lr 1e-5 cosine, warm-up 0.8%, AdamW (0.9, 0.95), weight decay 0.1, clipping 1.0, bf16 (on
# GPU), lambda 0.9, MinCE.
PAPER = dict(epochs=1.0, batch_size=128, lr=1e-5, min_lr_ratio=0.0, warmup=0.008, beta1=0.9, beta2=0.95,
             weight_decay=0.1, grad_clip=1.0, lam=0.9, fusion="mince", temperature=1.0)


class TrainingError(RuntimeError):
    pass


# The settings with a fixed set of values: a typo is refused by the command line, before anything loads.
CHOICES = {"fusion": fusellm.FUSIONS, "avg_weights": fusellm.AVG_WEIGHTS, "ce_unit": ("token", "byte")}


def field_help() -> dict[str, str]:
    """The comment written after each TrainConfig field, which --help shows."""
    src = inspect.getsource(TrainConfig)
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): \w+ = [^#\n]*#(.*)$", src, re.M)}


def parse_config(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = field_help()
    for f in fields(TrainConfig):
        what = helps.get(f.name, "")
        if f.type == "bool":
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action=argparse.BooleanOptionalAction,
                           default=f.default, help=what)
        elif f.type == "tuple":                      # a list: --sources A B (space-separated, as in every script)
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, nargs="+", default=f.default, help=what)
        else:
            cast = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=cast, default=f.default,
                           choices=CHOICES.get(f.name), help=f"{what} (default {f.default!r})")
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.dest for a in p._actions if any(s in given for s in a.option_strings)}
    cfg = TrainConfig(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                         for f in fields(TrainConfig)})
    if cfg.paper:                     # paper settings, except what the command line sets explicitly
        cfg = dataclasses.replace(cfg, **{k: v for k, v in PAPER.items() if k not in explicit})
    return cfg


# ----------------------------------------------------------------------------------------------------
# Distributed setup


def setup_distributed(cfg):
    rank, world = common.rank_world()
    device = common.device(cfg.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def all_reduce_sum(values: list[float], device, world) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------
# Data: the order of windows, and batches


def window_order(windows_per_shard: list[int], seed: int, epoch: int, block: int = 0) -> list[tuple[int, int]]:
    """Every (shard, window) once, in an order fixed by (seed, epoch): the shards shuffled, cut into blocks of
    `block` shards (0: one block of all of them), and the windows of each block shuffled together. A batch is
    then drawn from `block` shards spread over the corpus, not from the few neighbouring documents of one.
    The shards of one block are read once and held in memory together (FusionData's cache, sized to a
    block). The demo shuffles its whole data at once; at paper scale (thousands of shards of 256 windows)
    the default blocks of 16 shards mix 4,096 windows from 16 places while holding 16 shards in memory."""
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(windows_per_shard)).tolist()
    block = block or len(shards)
    order = []
    for k in range(0, len(shards), block):
        every = [(s, w) for s in shards[k:k + block] for w in range(windows_per_shard[s])]
        order += [every[i] for i in rng.permutation(len(every))]
    return order


def batch_plan(batch_size: int, micro_batch: int, world: int) -> tuple[int, int]:
    """The global batch (windows per optimizer step, all processes together) is the setting; what each process
    does follows from it: (windows per forward pass on each process, forward passes per step), with
    batch_size = world x micro x accumulation exactly. micro_batch 0 picks the largest divisor of each
    process's share up to 8 windows. A split that does not come out even is an error that says which fit."""
    if batch_size < 1 or micro_batch < 0:
        raise TrainingError(f"--batch-size {batch_size} --micro-batch {micro_batch}: the global batch must be at "
                            f"least 1 window and the micro-batch 0 (automatic) or more")
    if batch_size % world:
        lo = batch_size // world * world
        raise TrainingError(f"--batch-size {batch_size} is the global batch (windows per optimizer step, all "
                            f"processes together); it must split evenly over the {world} processes: use a "
                            f"multiple of {world}, e.g. {max(lo, world)} or {lo + world}")
    share = batch_size // world
    fits = [d for d in range(1, share + 1) if share % d == 0]
    if micro_batch and micro_batch not in fits:
        raise TrainingError(f"--micro-batch {micro_batch} must divide the {share} windows each of the {world} "
                            f"processes takes per step (--batch-size {batch_size}): choose one of {fits}")
    micro = micro_batch or max(d for d in fits if d <= 8)
    return micro, share // micro


class Batches:
    """The windows of micro-batch m of step k, for this rank. A step is the next batch_size windows of the
    order; its micro-batch m is the m-th run of micro x world of them, and item i of that run goes to rank
    i % world. The order depends only on (seed, step), which is all a resumed run needs, and the windows of a
    step do not depend on how many processes share it or how it is cut into micro-batches."""

    def __init__(self, source, cfg, rank, world, micro: int):
        self.source, self.cfg, self.rank, self.world, self.micro = source, cfg, rank, world, micro
        self.sizes = data.shard_sizes(data.load_manifest(cfg.data))
        self.n = sum(self.sizes)
        self._orders = {}

    def items(self, step: int, micro: int) -> list[dict]:
        run = self.micro * self.world                                  # windows of one micro-batch, all ranks
        start = step * self.cfg.batch_size + micro * run
        picked = []
        for g in range(start + self.rank, start + run, self.world):
            epoch, i = divmod(g, self.n)
            if epoch not in self._orders:
                self._orders = {epoch: window_order(self.sizes, self.cfg.seed, epoch, self.cfg.shuffle_shards)}
            picked.append(self._orders[epoch][i])
        return self.source.items(picked)


class StoredCandidates:
    """Candidates from data.py's fusion-ready data."""

    def __init__(self, cfg, tok):
        chosen = list(cfg.use_sources) or None
        shards = data.load_manifest(cfg.data)["shards"]
        self.fd = data.FusionData(cfg.data, tokenizer=tok, sources=chosen,
                                  cache_shards=min(cfg.shuffle_shards or shards, shards))
        self.names = ["target"] + self.fd.sources

    def items(self, picked):
        return [self.fd.shard(s)[w] for s, w in picked]


class OnlineCandidates:
    """Candidates computed inside the loop: a frozen copy of the target and every source run over each window
    (data.window_topk), the sources aligned onto the target with the same code and settings as data.py (a
    source's stored aligned/<name>/settings.json when there is one, data.ALIGN_DEFAULTS otherwise)."""

    def __init__(self, cfg, tok, device):
        import align
        m = data.load_manifest(cfg.data)
        sources = list(cfg.sources) or m["sources"]
        self.device, self.tok, self.k = device, tok, cfg.topk
        dtype = common.dtype_for(device)
        self.models = {"target": fusellm.load(cfg.target, device, dtype)}
        self.names = ["target"]
        for path in sources:
            name = data.source_name(path)
            self.models[name] = fusellm.load(path, device, dtype)
            self.names.append(name)
        tv = align.normalized_vocab(tok)
        self.align, self.settings = {}, {}
        for name in self.names[1:]:
            s_tok = self.models[name][1]
            self.settings[name] = data.stored_align_settings(cfg.data, name)
            kind, ties = self.settings[name]["vocab_map"], self.settings[name]["map_ties"]
            vmap = common.first_rank_then_all(      # built once, on rank 0; the others read it from the cache
                lambda: align.vocab_map(s_tok, tok, kind, Path(cfg.data) / "cache", ties))
            self.align[name] = (vmap, align.normalized_vocab(s_tok), tv, align.PairCosts())
        self.out = cfg.data

    def items(self, picked):
        shards = {s: data.read_windows(self.out, s) for s in {s for s, _ in picked}}   # each shard file once
        texts = [shards[s][w]["text"] for s, w in picked]
        items = [{"text": t, "tokens": self.tok.encode(t), "sources": {}} for t in texts]
        model, tok = self.models["target"]
        ids, lps, ces = data.window_topk(model, tok, [it["tokens"] for it in items], self.k, self.device)
        for it, i_, l_, c_ in zip(items, ids, lps, ces):
            it["target"] = {"topk_ids": i_.astype(np.int64), "topk_logprobs": l_, "ce": c_,
                            "ce_per_byte": data.ce_per_byte(c_, len(it["tokens"]), tok.bos_id is not None,
                                                            len(it["text"].encode()))}
        for name in self.names[1:]:
            model, s_tok = self.models[name]
            vmap, sv, tv, costs = self.align[name]
            s_ids = [s_tok.encode(it["text"]) for it in items]
            ids, lps, ces = data.window_topk(model, s_tok, s_ids, self.k, self.device)
            for it, si, i_, l_, c_ in zip(items, s_ids, ids, lps, ces):
                tr = data.align_window(si, it["tokens"], i_.astype(np.int64), l_, vmap, sv, tv, costs,
                                       self.settings[name])
                it["sources"][name] = {"counts": np.diff(tr.offsets), "ids": tr.ids, "logprobs": tr.logprobs, "ce": c_,
                                       "ce_per_byte": data.ce_per_byte(c_, len(si), s_tok.bos_id is not None,
                                                                       len(it["text"].encode()))}
        return items


# ----------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices (embeddings and projections), not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = str(device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio."""
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def lam_at(step: int, total: int, cfg) -> float:
    if cfg.lam_end < 0:
        return cfg.lam
    return cfg.lam + (cfg.lam_end - cfg.lam) * step / max(1, total - 1)


def step_losses(model, batches: list[fusellm.Batch], cfg, lam, V, device, world, autocast):
    """Forward and backward over one step's micro-batches. Both losses are sums divided by the step's global
    token counts (times world size, as DDP averages gradients), so any split over processes trains alike.
    Returns (clm, fusion) means for logging, and the step's token count."""
    n_clm = sum(int((b.labels != -100).sum()) for b in batches)
    n_fus = sum(int(b.fusion_mask.sum()) for b in batches if b.fusion_mask is not None)
    n_clm, n_fus = all_reduce_sum([n_clm, n_fus], device, world)
    clm_sum = fus_sum = 0.0
    for i, b in enumerate(batches):
        b = b.to(device)
        sync = i == len(batches) - 1
        ctx = model.no_sync() if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast():
                logits = model(b.input_ids)[..., :V]                               # (B, T, V)
            if lam == 1.0:                                 # plain CLM: no fusion computed at all
                clm = F.cross_entropy(logits.reshape(-1, V).float(), b.labels.reshape(-1), ignore_index=-100,
                                      reduction="sum")
                loss = clm / max(n_clm, 1)
            else:
                loss, clm, fus = fusellm.fusion_loss(logits, b, lam, n_clm, n_fus, cfg.fusion, cfg.temperature,
                                                     cfg.avg_weights, cfg.tau)
                fus_sum += float(fus)
            (loss * world).backward()
        clm_sum += float(clm.detach())
    clm_sum, fus_sum = all_reduce_sum([clm_sum, fus_sum], device, world)
    return clm_sum / max(n_clm, 1), fus_sum / max(n_fus, 1), n_clm


class LossNotFinite(TrainingError):
    pass


def run_steps(model, opt, cfg, total: int, batches_at, device, V: int, world: int = 1, start: int = 0):
    """The training loop's steps, the one loop of nanofuse (train() below, the demo's pre-training and bench.py
    all run it): for each step from `start` to `total`, set the learning rate and lambda by their schedules,
    run forward and backward over the step's micro-batches (batches_at(step): a list of fusellm.Batch), clip
    the gradient norm and update. Yields after each update a record: step (the steps done), loss, clm,
    fusion, lr, lam, grad_norm, tokens. A non-finite loss stops it (LossNotFinite) before the update."""
    cuda = str(device).startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    for step in range(start, total):
        lr, lam = lr_at(step, total, cfg), lam_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        clm, fus, n_tok = step_losses(model, batches_at(step), cfg, lam, V, device, world, autocast)
        loss = lam * clm + (1 - lam) * fus if lam < 1 else clm
        if not math.isfinite(loss):
            raise LossNotFinite(f"step {step}: the loss is {loss} (CLM {clm}, fusion {fus}); stopped without "
                                f"updating")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield {"step": step + 1, "loss": loss, "clm": clm, "fusion": fus if lam < 1 else None, "lr": lr, "lam": lam,
               "grad_norm": float(gnorm), "tokens": n_tok}


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def unwrap(model):
    return getattr(model, "module", model)


def full_weights(model, fsdp):
    """The whole model's weights (under FSDP gathered into host memory, without the optimizer state), for export."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def checkpoint_path(out: Path, fsdp: bool) -> Path:
    """out/ckpt.pt (one file, written by rank 0), or under FSDP out/ckpt/ (torch.distributed.checkpoint: each
    rank writes its own shards of the weights and Adam state, and no rank ever holds the whole model)."""
    return out / "ckpt" if fsdp else out / "ckpt.pt"


def save_checkpoint(path: Path, model, opt, step, cfg, fsdp, rank):
    extra = {"step": step, "config": dataclasses.asdict(cfg),
             "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)                  # this rank's shards (DTensors)
        tmp = path.with_name(f".{path.name}.tmp")              # the same name on every rank
        if rank == 0:
            common.remove_path(tmp)
        torch.distributed.barrier()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
        torch.distributed.barrier()                            # every rank's shards are written
        if rank == 0:
            torch.save(extra, tmp / "train_state.pt")
            old = path.with_name(f".{path.name}.old")
            common.remove_path(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)                              # the new checkpoint appears whole
            common.remove_path(old)
        torch.distributed.barrier()
        return
    if rank != 0:
        return
    msd, osd = unwrap(model).state_dict(), opt.state_dict()
    with atomic_path(path) as tmp:
        torch.save({"model": msd, "optim": osd, **extra}, tmp)


def load_checkpoint(path: Path, model, opt, fsdp):
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)                    # each rank reads its own shards
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        state.update(torch.load(path / "train_state.pt", weights_only=False))
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    return state["step"]


def load_target(cfg, device, fsdp: bool):
    """The target in fp32, the master weights (bf16 autocast computes on GPU), without an fp32 copy of the
    whole model on the host: the checkpoint is memory-mapped, and each tensor is cast and moved to the device
    on its own. Under FSDP2 each rank builds the model on the meta device and shards it; then, one tensor at
    a time, every rank reads the whole tensor from the mapped file (whose pages the node's processes share),
    moves it to its device and keeps only its own shard."""
    if not fsdp:
        model, tok = fusellm.load(cfg.target, device=device, dtype=torch.float32)
        return model, tok
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    if Path(cfg.target).suffix == ".gguf":
        raise TrainingError(f"--target {cfg.target}: under --fsdp every rank would dequantise the whole .gguf into "
                            f"host memory; convert it to a model folder first: python -c \"import fusellm; "
                            f"fusellm.save_model(fusellm.load_model('{cfg.target}'), 'target_folder')\"")
    mapped, tok = fusellm.load(cfg.target)                    # views of the file: nothing read yet
    with torch.device("meta"):
        model = fusellm.Transformer(mapped.args)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    set_model_state_dict(model, mapped.state_dict(), options=StateDictOptions(full_state_dict=True))
    return model, tok


def export(args: fusellm.ModelArgs, state: dict, target: Path, out: Path):
    """The trained weights as a model folder (save_model) with the target's tokenizer files, in the target
    checkpoint's own dtype (bf16 in, bf16 out) and shards no larger than its largest."""
    dtype, shard_bytes = fusellm.checkpoint_layout(target)
    with torch.device("meta"):
        final = fusellm.Transformer(args)
    final.load_state_dict({k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype)
                           for k, v in state.items()}, assign=True, strict=False)
    if args.tie_embeddings:
        final.output.weight = final.tok_embeddings.weight
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
    extra = [target / n for n in names if (target / n).is_file()]
    return fusellm.save_model(final, out, max_shard_bytes=shard_bytes, extra_files=extra)


# ----------------------------------------------------------------------------------------------------
# The loop


def train(cfg: TrainConfig):
    if not cfg.data or not cfg.target:
        raise TrainingError("give --data (a data.py folder) and --target (the target model folder); "
                            "`python train.py --help` lists every setting")
    rank, world, device = setup_distributed(cfg)
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch, world)      # before anything loads
    fsdp = cfg.fsdp and world > 1                  # FSDP2 shards only across several processes; alone it is off
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    model, tok = load_target(cfg, device, fsdp)
    model.train()
    model.gradient_checkpointing = cfg.grad_checkpointing
    candidates = OnlineCandidates(cfg, tok, device) if cfg.online else StoredCandidates(cfg, tok)
    K = cfg.topk if cfg.online else data.model_info(cfg.data, "target")["topk"]
    if world > 1 and not fsdp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    opt = make_optimizer(model, cfg, device)
    fmodel = torch.compile(model) if cfg.compile else model
    batches = Batches(candidates, cfg, rank, world, micro)
    per_step = cfg.batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * batches.n / per_step))
    ckpt = checkpoint_path(out, fsdp)
    step = 0
    if cfg.resume and not ckpt.exists() and ckpt.with_name(f".{ckpt.name}.old").is_dir():
        ckpt = ckpt.with_name(f".{ckpt.name}.old")              # killed while swapping in a new checkpoint
    if cfg.resume:
        if not ckpt.exists():
            other = checkpoint_path(out, not fsdp)
            hint = (f"; {other} is there, written by a run {'with' if other.is_dir() else 'without'} FSDP on "
                    f"several processes: resume the same way") if other.exists() else ""
            raise TrainingError(f"--resume: no checkpoint at {ckpt}{hint}")
        step = load_checkpoint(ckpt, model, opt, fsdp)
        if rank == 0:
            print(f"[train] resumed from {ckpt} at step {step}")
    elif rank == 0 and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    n_params = sum(p.numel() for p in unwrap(model).parameters())
    if rank == 0:
        seq = data.load_manifest(cfg.data)["seq_len"]
        print(f"[train] {n_params / 1e6:.3g}M parameters on {device} x{world}; {batches.n} windows, {total} steps of "
              f"{per_step} windows; fusion {cfg.fusion} over {candidates.names}, lambda {cfg.lam}")
        print(f"[train] global batch {per_step} windows per step = {world} process{'es' * (world > 1)} x "
              f"{micro} windows per forward pass x {accum} accumulation step{'s' * (accum > 1)}; at most "
              f"{per_step * seq:,} tokens per step (windows of <= {seq} tokens)")
        if cfg.paper and seq != 2048:
            print(f"[train] note: the paper's windows are 2048 tokens (128 x 2048 tokens per step); this data's "
                  f"are {seq} (`data.py windows --seq-len 2048` for the paper's)")

    def batches_at(k):
        return [fusellm.collate(batches.items(k, m), candidates.names, tok.bos_id, K, cfg.ce_unit)
                for m in range(accum)]

    t0, last_good, start_step, tokens_done = time.time(), None, step, 0
    try:
        for rec in run_steps(fmodel, opt, cfg, total, batches_at, device, tok.vocab_size, world, start=step):
            step, now = rec["step"], time.time()
            tokens_done += rec["tokens"]
            if rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({**rec, "time": now - t0}) + "\n")
                if step % cfg.log_every == 0 or step == total:
                    print(progress_line(rec, total, tokens_done / (now - t0), (total - step) * (now - t0) /
                                        max(step - start_step, 1), n_params, world, cuda), flush=True)
            if step % cfg.ckpt_every == 0 or step == total:
                save_checkpoint(ckpt, model, opt, step, cfg, fsdp, rank)
                last_good = step
    except LossNotFinite as e:
        where = f"{ckpt} (step {last_good})" if last_good is not None else "none yet"
        raise TrainingError(f"{e}. Last good checkpoint: {where}. Try a lower --lr or check the data") from None
    if cfg.export:
        state = full_weights(model, fsdp)           # a collective under FSDP: every rank
        if rank == 0:
            print(f"[train] exported {export(unwrap(model).args, state, Path(cfg.target), out / 'final')}")
    if rank == 0:
        plot_losses(out)
    if world > 1:
        torch.distributed.barrier()
    return out


def progress_line(rec, total, tokens_per_s, eta_s, n_params, world, cuda) -> str:
    """step, losses, lr, tokens/s, (on GPU: model FLOPs utilisation against H100 bf16 peak,) ETA."""
    mfu = f", MFU {6 * n_params * tokens_per_s / (989e12 * world):.1%}" if cuda else ""
    fus = f"{rec['fusion']:.4f}" if rec["fusion"] is not None else "-"
    return (f"[train] step {rec['step']}/{total} loss {rec['loss']:.4f} (CLM {rec['clm']:.4f}, fusion {fus}) "
            f"lr {rec['lr']:.2e} {tokens_per_s:,.0f} tokens/s{mfu}, ETA {time.strftime('%H:%M:%S', time.gmtime(eta_s))}")


def plot_losses(out: Path):
    """out/loss.png from metrics.jsonl, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in recs], [r["clm"] for r in recs], label="CLM")
    if any(r["fusion"] is not None for r in recs):
        ax.plot([r["step"] for r in recs if r["fusion"] is not None], [r["fusion"] for r in recs if r["fusion"] is not None],
                label="fusion")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out / "loss.png"


def main(argv=None):
    given = sys.argv[1:] if argv is None else argv
    if not given:             # `python train.py` is the built-in demo: demo.py, run as its own program (it
        demo = Path(__file__).with_name("demo.py")            # imports this file; importing it here would
        raise SystemExit(subprocess.call([sys.executable, str(demo)]))     # make a cycle)
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (TrainingError, ValueError) as e:         # also DataError, CheckpointError, TokenizerError
        raise SystemExit(f"error: {e}") from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
