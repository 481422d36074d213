"""
extras/atomic_files.py: every file and folder nanofuse writes appears whole or not at all.

Why it exists: long runs get killed. Each output is written under a temporary name beside it and
renamed into place when complete, so a kill never leaves half a file under the real name, and a
rerun that checks for the file redoes exactly the unfinished work. A learner can read
`write_json(path, obj)` as "write the file"; how it is made safe is here.

What it holds: `atomic_path` (a temporary path that becomes the real one), `remove_path`,
`write_bytes`, `write_text`, `write_json`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

@contextlib.contextmanager
def atomic_path(path, folder: bool = False):
    """A temporary path beside `path` to write into. When the block ends normally it becomes `path`
    (a folder is swapped in whole: the old one is removed only after the new one is in place); when
    it raises, the temporary is removed and `path` is untouched.

        with atomic_path(out / "map.npy") as tmp:       # writers that take a path: np.save, savefig
            np.save(tmp, m)
        with atomic_path(out / "final", folder=True) as tmp:   # tmp is created as an empty folder
            ...

    The temporary keeps the suffix (np.save and savefig choose the format by it) and starts with a
    dot."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    remove_path(tmp)                                  # left by a killed process that had our pid
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
