"""
extras/ranks.py: several processes under torchrun sharing one data folder.

Why it exists: on one machine data.py runs as one process, and a learner can read it so. A user with
several GPUs runs it under torchrun, and then N processes write into the same folder: what all of
them share (the windows, a vocab map, the merged diagnostics) must be built by one while the others
wait, or two would write, swap or delete the same file at once; and the per-shard work (each
model's distributions, each source's alignment) is split, every process taking its own shards.
Alone (no torchrun) every function here does the one-process thing and waits for nobody.

What it holds:
- rank_world: this process's rank and the number of processes (torchrun's RANK and WORLD_SIZE).
- barrier: wait until every process has come here (gloo, set up on first use).
- first_rank_then_all: build() on rank 0 alone, then on the others, which read what it wrote.
- my_shards / rank_label: this process's shards of a stage still to write, with a Progress over
  them labelled with its rank.
- die_with_agent: under torchrun, this process ends when torchrun's agent does (run on import).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from common import Progress


def die_with_agent():
    """Under torchrun, have Linux kill this process when its parent, torchrun's agent, dies. The
    agent starts each rank in a session of its own, so a kill -9 of the agent (or the OOM killer)
    ends nothing else: a rank left waiting for a dead one would wait a day (barrier's timeout).
    prctl(PR_SET_PDEATHSIG) through libc; elsewhere, or alone, nothing. Run when this module is
    first imported (data.py's stages, extras/distributed.py for train.py)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:          # the agent died before that, leaving this process to init
        os.kill(os.getpid(), signal.SIGKILL)


die_with_agent()


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): torchrun sets RANK and WORLD_SIZE; (0, 1)
    alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier():
    """Wait until every process under torchrun has come here (alone: return at once). The process
    group is set up on first use when the script has none (data.py): gloo, which needs no GPU and
    only passes the meeting along, with a day's timeout, since a rank that finished its shards may
    wait hours for the slowest one. If any rank dies, torchrun stops the others, and if torchrun
    dies, die_with_agent ends them: no rank waits forever."""
    if rank_world()[1] == 1:
        return
    import datetime
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=1))
    dist.barrier()


def first_rank_then_all(build):
    """build() on rank 0 alone, then on the other ranks once rank 0 has finished: for work whose
    result goes to disk (a cache, a folder) and is only read back by the later calls, so it is done
    once and no rank reads, deletes or rewrites what another is writing. Returns build()'s result on
    every rank."""
    rank = rank_world()[0]
    result = build() if rank == 0 else None
    barrier()
    return result if rank == 0 else build()


def my_shards(d: Path, sizes: list[int], what: str, quiet: bool = False):
    """This process's part of a stage whose shards hold `sizes` windows each: the shards still to
    write in folder d, every world_size-th from its rank, without those already there (a rerun
    resumes), and a Progress over their windows, labelled `what` (rank_label)."""
    rank, world = rank_world()
    todo = [s for s in range(rank, len(sizes), world) if not (d / f"shard-{s:05d}.npz").is_file()]
    return todo, Progress(rank_label(what), sum(sizes[s] for s in todo), quiet=quiet)


def rank_label(what: str) -> str:
    """A progress label, with the rank when several processes print."""
    rank, world = rank_world()
    return f"{what} rank {rank}/{world}" if world > 1 else what
