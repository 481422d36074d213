"""
train.py: continue-train a target LLM on L = lambda * L_CLM + (1 - lambda) * L_fusion.

    python train.py                                         # the built-in demo (demo.py)
    python train.py --data DATA --target TARGET --out runs/fuse            # data from data.py
    python train.py --data DATA --target TARGET --online --out runs/fuse   # sources in the loop
    torchrun --nproc_per_node 8 train.py --data DATA --target TARGET --paper
                                                  # DDP on 8 GPUs; add --fsdp for big targets

Each step: a batch of windows (the target's tokens, every candidate's top-K on the target's tokens
and its CE), the fused distribution P_t (fusellm.fuse: MinCE / AvgCE per window as in the paper, or
per token), and the loss: L_CLM = cross-entropy on the next token, L_fusion = soft-label
cross-entropy against P_t computed sparsely from the target logits. Both are means over the step's
real tokens, whatever the number of processes. `python train.py --help` lists every setting; --paper
sets the paper's.

This file is the loop on one process. What a real run adds is one import away, pulled in only where
it is used: extras/distributed.py (torchrun: DDP, FSDP2, all-reduces; checkpoints, sharded under
FSDP), extras/online.py (--online: the candidates computed inside the loop), extras/export.py (the
trained model written as a model folder, and the loss curve).
"""
from __future__ import annotations

import contextlib
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
import fusellm


@dataclass
class TrainConfig:
    # data and models
    data: str = ""  # a data.py folder (its windows, and unless --online its distributions)
    target: str = ""  # the target model folder
    out: str = "runs/fuse"  # checkpoints, metrics, the exported model
    online: bool = False  # run the sources (the manifest's, or --sources) inside the loop
    sources: tuple = ()  # online: source model folders (default: the manifest's)
    topk: int = 10  # online: top-K kept per candidate (stored data brings its own)
    use_sources: tuple = ()  # stored: the names of the sources to fuse (default: every aligned one)
    # fusion
    fusion: str = "mince"  # mince | avgce (per window, paper) | mince_token | avgce_token
    lam: float = 0.9  # lambda: weight of the CLM loss
    lam_end: float = -1.0  # if >= 0: lambda moves linearly from lam to lam_end over training
    temperature: float = 1.0  # candidates' top-K renormalised as p^(1/T)
    avg_weights: str = "official"  # AvgCE weights: official softmax(exp(-CE)) | softmax
                                   # softmax(-CE/tau)
    tau: float = 1.0  # AvgCE softmax weights and per-token AvgCE: their temperature
    ce_unit: str = "token"  # candidates' CE compared per token (paper) or per byte of the window's
                            # text
    fusion_loss: str = "ce"  # L_fusion: ce (paper) | uld | gold | xtoken (extras/successors.py)
    # optimisation
    batch_size: int = 8  # windows per optimizer step, all processes together (the global batch)
    micro_batch: int = 0  # windows per forward pass on each process (0: largest divisor of its
                          # share <= 8)
    epochs: float = 1.0  # passes over the data (fractions allowed)
    max_steps: int = 0  # if > 0: stop after this many steps instead
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: float = 0.05  # warm-up: a fraction of the steps (< 1) or a number of steps
    weight_decay: float = 0.1  # AdamW decay on matrices (embeddings, projections), none on norms,
                               # biases
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this
    # system
    device: str = "auto"  # auto: cuda:LOCAL_RANK when a GPU is there, else cpu; or cpu, cuda:1, ...
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass
                                      # (less memory)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when several processes run
    seed: int = 1337  # the window order (one seed: the same windows in the same order) and RNGs
    shuffle_shards: int = 16  # windows are shuffled across blocks of this many shards (0: all
                              # shards)
    # progress and checkpoints
    log_every: int = 10  # steps between progress lines
    ckpt_every: int = 100  # steps between checkpoints (out/ckpt.pt; under FSDP the sharded
                           # out/ckpt/)
    resume: bool = False  # continue from the checkpoint in --out
    export: bool = True  # write out/final: the model (save_model) and the target's tokenizer files
    paper: bool = False  # the paper's settings (see PAPER)


# The paper's setup (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024): 1 epoch,
# 128 windows of 2048 tokens, lr 1e-5 cosine, warm-up 0.8%, AdamW (0.9, 0.95), weight decay 0.1,
# clipping 1.0, bf16 (on GPU), lambda 0.9, MinCE.
PAPER = dict(epochs=1.0, batch_size=128, lr=1e-5, min_lr_ratio=0.0, warmup=0.008, beta1=0.9,
             beta2=0.95, weight_decay=0.1, grad_clip=1.0, lam=0.9, fusion="mince", temperature=1.0)


class TrainingError(RuntimeError):
    pass


class LossNotFinite(TrainingError):
    pass


def parse_config(argv=None) -> TrainConfig:
    """TrainConfig from the command line: a flag per field, --help from the fields' comments,
    --paper for PAPER's settings except those given explicitly (extras/cli.py)."""
    from extras import cli
    return cli.parse(TrainConfig, argv, __doc__, cli.TRAIN_CHOICES, {"paper": PAPER})


# --------------------------------------------------------------------------------------------------
# Data: the order of windows, and batches


def window_order(windows_per_shard: list[int], seed: int, epoch: int,
                 block: int = 0) -> list[tuple[int, int]]:
    """Every (shard, window) once, in an order fixed by (seed, epoch): the shards shuffled, cut into
    blocks of `block` shards (0: one block of all of them), and the windows of each block shuffled
    together. A batch is then drawn from `block` shards spread over the corpus, not from the few
    neighbouring documents of one. The shards of one block are read once and held in memory together
    (FusionData's cache, sized to a block). The demo shuffles its whole data at once; at paper scale
    (thousands of shards of 256 windows) the default blocks of 16 shards mix 4,096 windows from 16
    places while holding 16 shards in memory."""
    rng = np.random.default_rng([seed, epoch])
    shards = rng.permutation(len(windows_per_shard)).tolist()
    block = block or len(shards)
    order = []
    for k in range(0, len(shards), block):
        every = [(s, w) for s in shards[k:k + block] for w in range(windows_per_shard[s])]
        order += [every[i] for i in rng.permutation(len(every))]
    return order


def batch_plan(batch_size: int, micro_batch: int, world: int) -> tuple[int, int]:
    """The global batch (windows per optimizer step, all processes together) is the setting; what
    each process does follows from it: (windows per forward pass on each process, forward passes per
    step), with batch_size = world x micro x accumulation exactly. micro_batch 0 picks the largest
    divisor of each process's share up to 8 windows. A split that does not come out even is an error
    that says which fit."""
    from extras.distributed import check_batch_plan
    check_batch_plan(batch_size, micro_batch, world, TrainingError)     # or an error naming the fix
    share = batch_size // world                            # each process's windows per step
    fits = [d for d in range(1, share + 1) if share % d == 0]
    micro = micro_batch or max(d for d in fits if d <= 8)
    return micro, share // micro


class Batches:
    """The windows of micro-batch m of step k, for this rank. A step is the next batch_size windows
    of the order; its micro-batch m is the m-th run of micro x world of them, and item i of that run
    goes to rank i % world. The order depends only on (seed, step), which is all a resumed run
    needs, and the windows of a step do not depend on how many processes share it or how it is cut
    into micro-batches."""

    def __init__(self, source, cfg, rank, world, micro: int):
        self.source, self.cfg, self.rank, self.world, self.micro = source, cfg, rank, world, micro
        self.sizes = data.shard_sizes(data.load_manifest(cfg.data))
        self.n = sum(self.sizes)
        self._orders = {}

    def items(self, step: int, micro: int) -> list[dict]:
        run = self.micro * self.world                      # windows of one micro-batch, all ranks
        start = step * self.cfg.batch_size + micro * run
        picked = []
        for g in range(start + self.rank, start + run, self.world):
            epoch, i = divmod(g, self.n)
            if epoch not in self._orders:
                order = window_order(self.sizes, self.cfg.seed, epoch, self.cfg.shuffle_shards)
                self._orders = {epoch: order}
            picked.append(self._orders[epoch][i])
        return self.source.items(picked)


# --------------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on matrices (embeddings and projections), not on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = str(device).startswith("cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio."""
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min((step - warm) / max(1, total - warm), 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))                    # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def lam_at(step: int, total: int, cfg) -> float:
    if cfg.lam_end < 0:
        return cfg.lam
    return cfg.lam + (cfg.lam_end - cfg.lam) * step / max(1, total - 1)


# --------------------------------------------------------------------------------------------------
# The training loop


def run_steps(model, opt, cfg, total: int, batches_at, device, V: int, world: int = 1,
              start: int = 0, distance=None):
    """The training loop, the one loop of nanofuse (train() below, the demo's pre-training and
    bench.py all run it). Each step from `start` to `total`: the learning rate and lambda by their
    schedules; then for each of the step's micro-batches (batches_at(step): a list of fusellm.Batch)
    logits -> loss -> backward, the gradients adding up; then clip the gradient norm and update.
    Both losses are sums divided by the step's token counts over every micro-batch and process
    (times world size, as DDP averages gradients), so any split trains alike. Yields after each
    update a record: step (the steps done), loss, clm, fusion, lr, lam, grad_norm, tokens. A
    non-finite loss stops it (LossNotFinite) before the update."""
    from extras.distributed import all_reduce_sum, no_sync    # alone: the values, no context
    cuda = str(device).startswith("cuda")
    autocast = contextlib.nullcontext
    if cuda:                                       # bf16 compute, fp32 master weights
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    for step in range(start, total):
        lr, lam = lr_at(step, total, cfg), lam_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = batches_at(step)
        n_clm = sum(int((b.labels != -100).sum()) for b in batches)              # the step's tokens
        n_fus = sum(int(b.fusion_mask.sum()) for b in batches if b.fusion_mask is not None)
        n_clm, n_fus = all_reduce_sum([n_clm, n_fus], device, world)       # over every process
        clm_sum = fus_sum = 0.0         # added up on the device, read once a step: no GPU waits
        for i, b in enumerate(batches):                    # micro-batches: the gradients accumulate
            b = b.to(device)
            last = i == len(batches) - 1                   # DDP: average gradients after the last
            with no_sync(model, last):
                with autocast():
                    logits = model(b.input_ids)[..., :V]                          # (B, T, V)
                if lam == 1.0:                             # plain CLM: no fusion computed at all
                    clm = F.cross_entropy(logits.reshape(-1, V).float(), b.labels.reshape(-1),
                                          ignore_index=-100, reduction="sum")
                    loss = clm / max(n_clm, 1)
                else:                                     # lambda * L_CLM + (1 - lambda) * L_fusion
                    loss, clm, fus = fusellm.fusion_loss(logits, b, lam, n_clm, n_fus, cfg.fusion,
                                                         cfg.temperature, cfg.avg_weights, cfg.tau,
                                                         distance)
                    fus_sum += fus
                (loss * world).backward()
            clm_sum += clm.detach()
        clm_sum, fus_sum = all_reduce_sum([float(clm_sum), float(fus_sum)], device, world)
        clm, fus = clm_sum / max(n_clm, 1), fus_sum / max(n_fus, 1)        # means, for the log
        loss = lam * clm + (1 - lam) * fus if lam < 1 else clm
        if not math.isfinite(loss):
            raise LossNotFinite(f"step {step}: the loss is {loss} (CLM {clm}, fusion {fus}); "
                                f"stopped without updating")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield {"step": step + 1, "loss": loss, "clm": clm, "fusion": fus if lam < 1 else None,
               "lr": lr, "lam": lam, "grad_norm": float(gnorm), "tokens": n_clm}


# --------------------------------------------------------------------------------------------------
# A run: the target, the candidates, the loop, checkpoints, the exported model


def train(cfg: TrainConfig):
    if not cfg.data or not cfg.target:
        raise TrainingError("give --data (a data.py folder) and --target (the target model "
                            "folder); `python train.py --help` lists every setting")
    distance = None                  # L_fusion: the paper's soft-label CE, or one of its successors
    if cfg.fusion_loss != "ce":      # (ULD, GOLD, X-Token): checked, tables built, before the rest
        from extras.successors import distance_for
        distance = distance_for(cfg)
    from extras import distributed           # torchrun's processes, and checkpoints
    rank, world, device = distributed.setup(cfg.device)     # alone: rank 0 of 1
    micro, accum = batch_plan(cfg.batch_size, cfg.micro_batch, world)      # before anything loads
    fsdp = cfg.fsdp and world > 1            # FSDP2 shards only across several processes
    distributed.seed_all(cfg.seed)           # torch's, numpy's and python's random generators
    out = Path(cfg.out)
    # The target in fp32, the master weights (bf16 autocast computes on GPU): fusellm.load, or under
    # FSDP2 each rank's own shard of it (extras/distributed.py).
    model, tok = distributed.load_target(cfg.target, device, fsdp)
    model.train()
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.online:                           # the frozen models run inside the loop
        from extras.online import OnlineCandidates
        candidates = OnlineCandidates(cfg, tok, device)
    else:                                    # their distributions, stored by data.py
        from extras.stored_candidates import StoredCandidates
        candidates = StoredCandidates(cfg, tok)
    if world > 1 and not fsdp:
        model = distributed.wrap_ddp(model, device)
    opt = make_optimizer(model, cfg, device)
    fmodel = torch.compile(model) if cfg.compile else model
    batches = Batches(candidates, cfg, rank, world, micro)
    steps = math.ceil(cfg.epochs * batches.n / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, steps)
    ckpts = distributed.Checkpoints(out, fsdp, model, opt, cfg, rank)   # out/ckpt.pt or out/ckpt/
    # --resume: the weights, Adam's state, the RNGs and the step back from the checkpoint
    step = ckpts.resume(TrainingError) if cfg.resume else 0
    from extras.progress import RunLog       # out/ and out/metrics.jsonl (appended to if resumed)
    log = RunLog(cfg, out, rank, world, device, total, start=step)
    log.header(model, device, batches.n, candidates.names, micro, accum)

    def batches_at(k):                      # the step's micro-batches, as tensors (fusellm.Batch)
        return [fusellm.collate(batches.items(k, m), candidates.names, tok.bos_id, candidates.k,
                                cfg.ce_unit) for m in range(accum)]

    try:
        for rec in run_steps(fmodel, opt, cfg, total, batches_at, device, tok.vocab_size, world,
                             start=step, distance=distance):
            log.step(rec)                    # out/metrics.jsonl, and a progress line
            ckpts.after(rec["step"], total)  # every --ckpt-every steps, and the last
    except LossNotFinite as e:
        raise TrainingError(f"{e}. {ckpts.last_good_text()}. Try a lower --lr or check the "
                            f"data") from None
    if cfg.export:                           # out/final: the model folder, tokenizer files too
        distributed.export_final(model, fsdp, rank, cfg.target, out)
    log.finish()                             # out/loss.png; every process waits for the others
    return out


def main(argv=None):
    from extras.distributed import finish
    cfg = parse_config(argv)
    try:
        train(cfg)
    except (TrainingError, ValueError) as e:     # also DataError, CheckpointError, TokenizerError
        raise SystemExit(f"error: {e}") from None
    finally:
        finish()                                 # torchrun: leave the process group


if __name__ == "__main__":
    if len(sys.argv) == 1:
        # `python train.py` is the built-in demo: demo.py's main, in this process. demo imports this
        # file as `train` (loaded once more under that name); an import here, under __main__, is no
        # import cycle: train.main([]) itself never imports demo.
        import demo
        demo.main([])
    else:
        main()
