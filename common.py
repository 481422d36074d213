"""
common.py: the plumbing every script shares, so each does it one way.

- atomic_path / write_bytes / write_text / write_json: every file and folder nanofuse writes is written under
  a temporary name beside it and renamed into place when complete, so a kill never leaves half a file under
  the real name (and a rerun that checks for the file redoes exactly the unfinished work).
- Progress: one line every few seconds for long work: items done of the total, rate, ETA.
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
    _remove(tmp)                                            # left by a killed process that had our pid
    if folder:
        tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(p: Path):
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
