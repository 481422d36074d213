"""extras/distributed.py: training on several processes (torchrun: DDP or FSDP2) and its
checkpoints.

Why it exists: the paper's setup (128 windows of 2,048 tokens per step, 7B targets) needs several
GPUs, a model sharded over them when it does not fit on one, and a run that survives being killed. A
learner reads train.py's one-process loop; train.py hands this file what that loop does not need
to show: the processes under torchrun, --fsdp, the checkpoints it writes or resumes, and the
plumbing of a run around them (the check that a batch splits, seeding, loading the target, the
export).

What it holds:
- check_batch_plan: train.batch_plan's error when a global batch does not split over the processes
  and micro-batches, naming the sizes that fit.
- setup / wrap_ddp / no_sync / all_reduce_sum / finish: the process group (NCCL on GPUs, gloo on
  CPUs), the DDP wrapper and its gradient sync on a step's last micro-batch only, the sums of a
  step's token counts and losses over every process, and leaving the group at the end.
- seed_all: torch's, numpy's and python's random generators seeded (a checkpoint saves their
  states).
- load_target / load_sharded_target: the target in fp32 for training; under FSDP2 each rank builds
  it on the meta device, shards it and reads only its own shard of every tensor.
- unwrap / full_weights: the model inside DDP, and the whole model's weights (under FSDP gathered).
- checkpoint_path / save_checkpoint / load_checkpoint: out/ckpt.pt (one file written by rank 0), or
  under FSDP out/ckpt/ (torch.distributed.checkpoint: each rank writes and reads its own shards),
  each with the step, the config and the random generators' states, so that a resumed run continues
  the same run.
- resume: --resume's checkpoint (also one left half-swapped by a kill), loaded.
- Checkpoints: train()'s use of them: resume, save every --ckpt-every steps and at the last, and
  say which was the last good one when the loss stops being finite.
- export_final: --export's out/final (extras/export.py), its weights gathered under FSDP.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path

import numpy as np
import torch

import common
import fusellm
from extras.atomic_files import atomic_path, remove_path
from extras import ranks          # on import, under torchrun: die_with_agent

# --------------------------------------------------------------------------------------------------
# Processes


def check_batch_plan(batch_size: int, micro_batch: int, world: int, error=ValueError):
    """Nothing when --batch-size and --micro-batch split over `world` processes; else `error`
    (train.py passes its TrainingError) saying why, and which sizes fit."""
    if batch_size < 1 or micro_batch < 0:
        raise error(f"--batch-size {batch_size} --micro-batch {micro_batch}: the global batch "
                    f"must be at least 1 window and the micro-batch 0 (automatic) or more")
    if batch_size % world:
        lo = batch_size // world * world
        raise error(f"--batch-size {batch_size} is the global batch (windows per optimizer step, "
                    f"all processes together); it must split evenly over the {world} processes: "
                    f"use a multiple of {world}, e.g. {max(lo, world)} or {lo + world}")
    share = batch_size // world
    fits = [d for d in range(1, share + 1) if share % d == 0]
    if micro_batch and micro_batch not in fits:
        raise error(f"--micro-batch {micro_batch} must divide the {share} windows each of the "
                    f"{world} processes takes per step (--batch-size {batch_size}): choose one of "
                    f"{fits}")


def setup(device_name: str) -> tuple[int, int, str]:
    """(this process's rank, the number of processes, its device): torchrun sets RANK and
    WORLD_SIZE, alone (0, 1). Under torchrun, the process group: NCCL between GPUs, gloo between CPU
    processes."""
    rank, world = ranks.rank_world()
    device = common.device(device_name)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def finish():
    """Leave torchrun's process group, if this process joined one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model, device: str):
    """DDP: the whole model on every process, gradients averaged over the processes in
    backward()."""
    ids = [device] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], device, world) -> list[float]:
    """The values summed over every process (alone: as they are)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def no_sync(model, last: bool):
    """DDP averages the gradients over the processes in backward(); with micro-batches, only the
    last one's backward needs to (no_sync for the others). Anything else: a context that does
    nothing."""
    if hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def seed_all(seed: int):
    """torch's, numpy's and python's random generators, seeded (a checkpoint saves their states)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def load_target(target, device: str, fsdp: bool):
    """The target in fp32 (the master weights; bf16 autocast computes on GPU), without an fp32 copy
    of the whole model on the host: the checkpoint is memory-mapped, and each tensor is cast and
    moved to the device on its own. Under FSDP2 each rank loads only its own shard."""
    if fsdp:
        return load_sharded_target(target, device)
    return fusellm.load(target, device=device, dtype=torch.float32)


def load_sharded_target(target, device):
    """The target in fp32 under FSDP2: each rank builds the model on the meta device and shards it;
    then, one tensor at a time, every rank reads the whole tensor from the memory-mapped file (whose
    pages the node's processes share), moves it to its device and keeps only its own shard. No rank
    ever holds the whole model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    if Path(target).suffix == ".gguf":
        raise fusellm.CheckpointError(
            f"--target {target}: under --fsdp every rank would dequantise the whole .gguf into "
            f"host memory; convert it to a model folder first: python -c \"import fusellm; "
            f"fusellm.save_model(fusellm.load_model('{target}'), 'target_folder')\"")
    mapped, tok = fusellm.load(target)                    # views of the file: nothing read yet
    with torch.device("meta"):
        model = fusellm.Transformer(mapped.args)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, mapped.state_dict(), options=options)
    return model, tok


# --------------------------------------------------------------------------------------------------
# Weights and checkpoints


def unwrap(model):
    """The model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def full_weights(model, fsdp):
    """The whole model's weights (under FSDP gathered into host memory, without the optimizer
    state), for export. Under FSDP a collective: every rank calls it."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)
    return unwrap(model).state_dict()


def checkpoint_path(out: Path, fsdp: bool) -> Path:
    """out/ckpt.pt (one file, written by rank 0), or under FSDP out/ckpt/
    (torch.distributed.checkpoint: each rank writes its own shards of the weights and Adam state,
    and no rank ever holds the whole model)."""
    return out / "ckpt" if fsdp else out / "ckpt.pt"


def save_checkpoint(path: Path, model, opt, step, cfg, fsdp, rank):
    """The weights, Adam's state, the step, the config and the random generators' states: under FSDP
    each rank's shards into path/ (swapped in whole), else one file written by rank 0."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}
    extra = {"step": step, "config": dataclasses.asdict(cfg), "rng": rng}
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(model, opt)                  # this rank's shards (DTensors)
        tmp = path.with_name(f".{path.name}.tmp")              # the same name on every rank
        if rank == 0:
            remove_path(tmp)
        torch.distributed.barrier()
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
        torch.distributed.barrier()                            # every rank's shards are written
        if rank == 0:
            torch.save(extra, tmp / "train_state.pt")
            old = path.with_name(f".{path.name}.old")
            remove_path(old)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)                              # the new checkpoint appears whole
            remove_path(old)
        torch.distributed.barrier()
        return
    if rank != 0:
        return
    msd, osd = unwrap(model).state_dict(), opt.state_dict()
    with atomic_path(path) as tmp:
        torch.save({"model": msd, "optim": osd, **extra}, tmp)


def load_checkpoint(path: Path, model, opt, fsdp):
    """Weights, Adam state and the random generators back from a checkpoint; returns its step."""
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


def resume(out: Path, fsdp: bool, model, opt, rank: int, error=ValueError) -> tuple[Path, int]:
    """--resume: (the checkpoint, its step) with the weights, Adam state and random generators
    loaded. No checkpoint is `error` (train.py passes its TrainingError), saying when the other kind
    is there."""
    ckpt = checkpoint_path(out, fsdp)
    if not ckpt.exists() and ckpt.with_name(f".{ckpt.name}.old").is_dir():
        ckpt = ckpt.with_name(f".{ckpt.name}.old")      # killed while swapping in a new checkpoint
    if not ckpt.exists():
        other = checkpoint_path(out, not fsdp)
        how = "with" if other.is_dir() else "without"
        hint = (f"; {other} is there, written by a run {how} FSDP on several processes: resume the "
                f"same way") if other.exists() else ""
        raise error(f"--resume: no checkpoint at {ckpt}{hint}")
    step = load_checkpoint(ckpt, model, opt, fsdp)
    if rank == 0:
        print(f"[train] resumed from {ckpt} at step {step}")
    return ckpt, step


class Checkpoints:
    """A run's checkpoints as train() uses them: out/ckpt.pt (under FSDP out/ckpt/), resumed from
    with --resume, saved every cfg.ckpt_every steps and at the last step."""

    def __init__(self, out: Path, fsdp: bool, model, opt, cfg, rank: int):
        self.out, self.fsdp, self.rank = out, fsdp, rank
        self.model, self.opt, self.cfg = model, opt, cfg
        self.path = checkpoint_path(out, fsdp)
        self.last_good = None               # the step of the last checkpoint this run saved

    def resume(self, error=ValueError) -> int:
        """--resume: the weights, Adam's state, the RNGs back; returns the step to continue from."""
        self.path, step = resume(self.out, self.fsdp, self.model, self.opt, self.rank, error)
        return step

    def after(self, step: int, total: int):
        """Save after every ckpt_every steps and after the last."""
        if step % self.cfg.ckpt_every == 0 or step == total:
            save_checkpoint(self.path, self.model, self.opt, step, self.cfg, self.fsdp, self.rank)
            self.last_good = step

    def last_good_text(self) -> str:
        where = f"{self.path} (step {self.last_good})" if self.last_good is not None else "none yet"
        return f"Last good checkpoint: {where}"


def export_final(model, fsdp: bool, rank: int, target: str, out: Path):
    """--export: out/final, the trained model as a model folder with the target's tokenizer files
    (extras/export.py)."""
    from extras.export import export
    state = full_weights(model, fsdp)       # a collective under FSDP: every rank
    if rank == 0:
        args = unwrap(model).args
        print(f"[train] exported {export(args, state, Path(target), out / 'final')}")
