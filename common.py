"""
common.py: the plumbing every script shares, so each does it one way.

- atomic_path / write_bytes / write_text / write_json: every file and folder nanofuse writes is written under
  a temporary name beside it and renamed into place when complete, so a kill never leaves half a file under
  the real name (and a rerun that checks for the file redoes exactly the unfinished work).
- Progress: one line every few seconds for long work: items done of the total, rate, ETA.
- rank_world / barrier / first_rank_then_all: processes under torchrun. One rank builds what all of them share
  (the windows, a vocab map, diagnostics) while the others wait; the per-shard work is split between them.
- device / dtype_for: the device a script runs on ("auto": the GPU of this process when there is one, else
  the CPU) and the dtype a frozen model runs in there (bf16 on GPU, fp32 on CPU).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

# ----------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path, folder: bool = False):
    """A temporary path beside `path` to write into. When the block ends normally it becomes `path` (a folder
    is swapped in whole: the old one is removed only after the new one is in place); when it raises, the
    temporary is removed and `path` is untouched.

        with atomic_path(out / "map.npy") as tmp:       # writers that take a path: np.save, torch.save, savefig
            np.save(tmp, m)
        with atomic_path(out / "final", folder=True) as tmp:   # folder=True: tmp is created as an empty folder
            ...

    The temporary keeps the suffix (np.save and savefig choose the format by it) and starts with a dot."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    remove_path(tmp)                                            # left by a killed process that had our pid
    if folder:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            remove_path(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        remove_path(tmp)


def remove_path(p: Path):
    """Remove a file, a link or a whole folder, if it is there."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode())


def write_json(path, obj, indent: int | None = 1):
    write_bytes(path, json.dumps(obj, indent=indent).encode())


# ----------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """One line every `every` seconds: done/total items, rate, (tokens/s,) ETA."""

    def __init__(self, what: str, total: int, unit: str = "windows", every: float = 5.0, quiet=False):
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
        print(f"[{self.what}] {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s{tok}, ETA {eta_s}",
              flush=True)


# ----------------------------------------------------------------------------------------------------
# Processes under torchrun


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): torchrun sets RANK and WORLD_SIZE; (0, 1) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier():
    """Wait until every process under torchrun has come here (alone: return at once). The process group is set
    up on first use when the script has none (data.py): gloo, which needs no GPU and only passes the meeting
    along, with a day's timeout, since a rank that finished its shards may wait hours for the slowest one.
    If any rank dies, torchrun stops the others, so no rank waits forever."""
    if rank_world()[1] == 1:
        return
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    dist.barrier()


def first_rank_then_all(build):
    """build() on rank 0 alone, then on the other ranks once rank 0 has finished: for work whose result goes to
    disk (a cache, a folder) and is only read back by the later calls, so it is done once and no rank reads,
    deletes or rewrites what another is writing. Returns build()'s result on every rank."""
    rank = rank_world()[0]
    result = build() if rank == 0 else None
    barrier()
    return result if rank == 0 else build()


# ----------------------------------------------------------------------------------------------------
# Devices

DEVICE_HELP = "auto (default): cuda:LOCAL_RANK when a GPU is there, else cpu; or cpu, cuda, cuda:1, ..."


def device(name: str | None = "auto") -> str:
    """The device a script runs on: "auto" (or None) is this process's GPU (cuda:LOCAL_RANK, set by torchrun)
    when CUDA is available, else the CPU; any other name is taken as given."""
    if name in (None, "", "auto"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    return name


def dtype_for(dev) -> torch.dtype:
    """The dtype frozen models run in: bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are slow)."""
    return torch.bfloat16 if str(dev).startswith("cuda") else torch.float32


def package_path(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed registry package, found without importing the package (None when
    the package is not installed)."""
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
