"""
common.py: the plumbing every script shares, so each does it one way.

How files are written (atomically: extras/atomic_files.py) and how processes under torchrun share
the work (extras/ranks.py) live one import away.

- Progress: one line every few seconds for long work: items done of the total, rate, ETA.
- device / dtype_for: the device a script runs on ("auto": the GPU of this process when there is
  one, else the CPU) and the dtype a frozen model runs in there (bf16 on GPU, fp32 on CPU).
"""
from __future__ import annotations

import math
import os
import time

import torch

# --------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One line every `every` seconds: done/total items, rate, (tokens/s,) ETA."""

    def __init__(self, what: str, total: int, unit: str = "windows", every: float = 5.0,
                 quiet=False):
        self.what, self.total, self.unit, self.every, self.quiet = what, total, unit, every, quiet
        self.t0 = self.last = time.time()
        self.done = self.tokens = 0

    def update(self, n: int, tokens: int = 0, force=False):
        self.done += n
        self.tokens += tokens
        now = time.time()
        if self.quiet or not (force or now - self.last >= self.every):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tok = f", {self.tokens / el:,.0f} tokens/s" if self.tokens else ""
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        print(f"[{self.what}] {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s{tok}, "
              f"ETA {eta_s}", flush=True)


# --------------------------------------------------------------------------------------------------
# Devices

DEVICE_HELP = ("auto (default): cuda:LOCAL_RANK when a GPU is there, else cpu; "
               "or cpu, cuda, cuda:1, ...")


def device(name: str | None = "auto") -> str:
    """The device a script runs on: "auto" (or None) is this process's GPU (cuda:LOCAL_RANK, set by
    torchrun) when CUDA is available, else the CPU; any other name is taken as given."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return "cpu"
    return name


def dtype_for(dev) -> torch.dtype:
    """The dtype frozen models run in: bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are
    slow)."""
    return torch.bfloat16 if str(dev).startswith("cuda") else torch.float32
