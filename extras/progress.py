"""extras/progress.py: what a run shows while it trains: the plan, progress lines, metrics, the
curve.

Why it exists: the loop (train.run_steps) yields one record per step, which is all a learner needs
to follow it. A user running for hours wants more around it: how the global batch splits over
processes and micro-batches, tokens per second, the GPU's model FLOPs utilisation, an ETA, every
record kept in out/metrics.jsonl (a resumed run appends to it), and a picture of the losses at the
end.

What it holds: RunLog (the run's folder, the header, out/metrics.jsonl and a progress line every
log_every steps, on rank 0 only; at the end the curve), plan_line, progress_line, and plot_losses
(out/loss.png, when matplotlib is installed).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import data
from extras.atomic_files import atomic_path


class RunLog:
    """The run's log on rank 0 (the other ranks write nothing): a header, then for each step its
    record in out/metrics.jsonl and every log_every steps (and the last) a progress line."""

    def __init__(self, cfg, out: Path, rank: int, world: int, device: str, total: int, start: int):
        self.cfg, self.out, self.rank, self.world, self.total = cfg, out, rank, world, total
        self.cuda, self.start = device.startswith("cuda"), start
        self.t0, self.tokens = time.time(), 0
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)     # the run's folder
        if rank == 0 and not cfg.resume and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()           # a new run: a new log

    def header(self, model, device, n_windows, names, micro, accum):
        seq = data.load_manifest(self.cfg.data)["seq_len"]          # tokens per window
        self.n_params = sum(p.numel() for p in model.parameters())
        if self.rank == 0:
            cfg = self.cfg
            print(f"[train] {self.n_params / 1e6:.3g}M parameters on {device} x{self.world}; "
                  f"{n_windows} windows, {self.total} steps of {cfg.batch_size} windows; fusion "
                  f"{cfg.fusion} over {names}, lambda {cfg.lam}")
            print(plan_line(cfg, self.world, micro, accum, seq))

    def step(self, rec: dict):
        step, now = rec["step"], time.time()
        self.tokens += rec["tokens"]
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**rec, "time": now - self.t0}) + "\n")
        if step % self.cfg.log_every == 0 or step == self.total:
            eta = (self.total - step) * (now - self.t0) / max(step - self.start, 1)
            print(progress_line(rec, self.total, self.tokens / (now - self.t0), eta, self.n_params,
                                self.world, self.cuda), flush=True)


    def finish(self):
        """out/loss.png (rank 0); then every process waits for the others, so none exits early."""
        if self.rank == 0:
            plot_losses(self.out)
        if self.world > 1:
            import torch
            torch.distributed.barrier()


def plan_line(cfg, world, micro, accum, seq) -> str:
    """How the global batch splits, and (with --paper on shorter windows) what differs from the
    paper."""
    line = (f"[train] global batch {cfg.batch_size} windows per step = {world} "
            f"process{'es' * (world > 1)} x {micro} windows per forward pass x {accum} "
            f"accumulation step{'s' * (accum > 1)}; at most {cfg.batch_size * seq:,} tokens per "
            f"step (windows of <= {seq} tokens)")
    if cfg.paper and seq != 2048:
        line += (f"\n[train] note: the paper's windows are 2048 tokens (128 x 2048 tokens per "
                 f"step); this data's are {seq} (`data.py windows --seq-len 2048` for the paper's)")
    return line


def progress_line(rec, total, tokens_per_s, eta_s, n_params, world, cuda) -> str:
    """step, losses, lr, tokens/s, (on GPU: model FLOPs utilisation against H100 bf16 peak,) ETA."""
    mfu = f", MFU {6 * n_params * tokens_per_s / (989e12 * world):.1%}" if cuda else ""
    fus = f"{rec['fusion']:.4f}" if rec["fusion"] is not None else "-"
    eta = time.strftime('%H:%M:%S', time.gmtime(eta_s))
    return (f"[train] step {rec['step']}/{total} loss {rec['loss']:.4f} (CLM {rec['clm']:.4f}, "
            f"fusion {fus}) lr {rec['lr']:.2e} {tokens_per_s:,.0f} tokens/s{mfu}, ETA {eta}")


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
    fused = [r for r in recs if r["fusion"] is not None]
    if fused:
        ax.plot([r["step"] for r in fused], [r["fusion"] for r in fused], label="fusion")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return out / "loss.png"
