"""extras/checkpoint_files.py: a Hugging Face model folder's files, read and written by hand.

Why it exists: to learn the model, a learner needs only that a checkpoint is a config.json and a
dict of named tensors. A user loading a real checkpoint needs the files themselves read exactly and
fast: the safetensors format (memory-mapped, so a 7B model "loads" in milliseconds and its pages are
read as they are used), sharded checkpoints and their index, older `pytorch_model*.bin` files, a
truncated download or a missing shard named with its fix, and an export that `transformers` loads,
written atomically.

What it holds:
- `read_safetensors` / `write_safetensors`: the format, without the `safetensors` package;
- `read_config(path)`, `checkpoint_files(path)`, `read_checkpoint_tensors(path)`: a folder's config
  and tensors by their Hugging Face names; `read_state`: those tensors under model.py's names,
  checked; `reader_for(path)`: this module for a folder, extras/gguf.py for a .gguf file;
- `save_folder`: model.save_model's files (config.json, shards, index, extra files);
- `checkpoint_layout(path)`: the dtype and shard size an export of a checkpoint keeps;
- `no_init()`: nn.init skipped while a model whose weights come from a file is built;
- `tokenizer_misfit`: why a tokenizer cannot belong to a checkpoint (model.load's check).
Errors are extras.format_error.FormatError; model.py turns them into CheckpointError.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import mmap
import shutil
import struct
import sys
from pathlib import Path

import torch
import torch.nn as nn

from extras.atomic_files import atomic_path
from extras.format_error import FormatError, mismatch
from extras.hf_configs import hf_config, hf_names

# --------------------------------------------------------------------------------------------------
# safetensors, read and written by hand: an 8-byte little-endian header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets}}, then the tensors, little-endian and row-major

ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Memory-map a .safetensors file; tensors are views of the file (copy-on-write), nothing is
    read yet."""
    path = Path(path)
    fix = "re-download or re-export the checkpoint"
    size = path.stat().st_size
    if size < 8:
        raise FormatError(f"{path}: truncated safetensors file ({size} bytes); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise FormatError(f"{path}: header claims {n} bytes but the file has {size}; truncated "
                              f"or not safetensors; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nested too deep
            raise FormatError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    header.pop("__metadata__", None)
    out, spans = {}, []
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, OverflowError):
            raise FormatError(f"{path}: corrupt header entry for tensor {name!r}: {info}; "
                              f"{fix}") from None
        numel = math.prod(shape)
        if (end - begin != numel * dtype.itemsize or begin < 0 or 8 + n + end > size
                or min(shape, default=0) < 0):
            raise FormatError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) does not fit its "
                              f"byte range [{begin}, {end}) in a {size}-byte file; truncated or "
                              f"corrupt; {fix}")
        spans.append((begin, end, name))
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=numel,
                                         offset=8 + n + begin).view(shape)
    spans = sorted(s for s in spans if s[0] < s[1])
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise FormatError(f"{path}: tensors {a!r} and {b!r} share bytes; corrupt; {fix}")
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None):
    """Write tensors (contiguous, little-endian) to `path` atomically (extras/atomic_files.py)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                 # align the data to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


# --------------------------------------------------------------------------------------------------
# A Hugging Face model folder


def reader_for(path):
    """The module that reads this checkpoint: extras/gguf.py for a .gguf file, else this one (a
    Hugging Face folder). Both answer read_config(path) and read_state(path, args, expected,
    ...)."""
    from extras import gguf
    is_gguf = Path(path).suffix == ".gguf" and Path(path).is_file()
    return gguf if is_gguf else sys.modules[__name__]


def read_config(path) -> tuple[dict, str]:
    """A model folder's config.json as a dict, and the name to cite it by in errors."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise FormatError(f"{path}: not a folder; point to a Hugging Face model folder holding "
                          f"config.json")
    if not cfg_path.is_file():
        raise FormatError(f"{cfg_path}: not found; a model folder needs its config.json next to "
                          f"the weights")
    try:
        return json.loads(cfg_path.read_text()), str(cfg_path)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:    # nested too deep
        raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None


def checkpoint_files(path) -> tuple[str, list[str]]:
    """The weights files of a model folder and their kind ("st" or "bin"): model.safetensors,
    sharded safetensors (model.safetensors.index.json), or pytorch_model*.bin (+ index); other files
    beside them (an optimizer.bin, a consolidated.safetensors) are not the model's."""
    path = Path(path)
    for index_name, single, kind in (("model.safetensors.index.json", "model.safetensors", "st"),
                                      ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin")):
        files = None
        if (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
                raise FormatError(f"{path / index_name}: not a valid index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise FormatError(f"{path / index_name}: lists shard(s) {', '.join(missing)} that "
                                  f"are not in {path}; download the missing shard(s)")
        elif (path / single).is_file():
            files = [single]
        if files is not None:
            return kind, files
    raise FormatError(f"{path}: no weights found; expected model.safetensors, "
                      f"model.safetensors.index.json, pytorch_model.bin or "
                      f"pytorch_model.bin.index.json")


def read_checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder by their Hugging Face names (checkpoint_files),
    memory-mapped."""
    path = Path(path)
    kind, files = checkpoint_files(path)
    tensors = {}
    for f in files:
        if kind == "st":
            tensors.update(read_safetensors(path / f))
        else:
            try:
                tensors.update(torch.load(path / f, map_location="cpu", mmap=True,
                                          weights_only=True))
            except Exception as e:
                raise FormatError(f"{path / f}: cannot be read as a PyTorch checkpoint ({e}); "
                                  f"re-download it") from None
    return tensors


def read_state(path, args, expected: dict, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
    """A folder's tensors under model.py's names (hf_names for model.ModelArgs `args`), a fused
    tensor (MPT Wqkv, Phi-3 qkv_proj) cut into its row blocks, each checked against `expected` (our
    name -> a tensor of the shape config.json implies; a tied output.weight there is not read, as
    hf_names has none), floating ones cast to dtype when given, all moved to device. Every tensor
    that does not fit is named in one error."""
    tensors = read_checkpoint_tensors(path)
    used, problems, state = set(), [], {}
    for ours, (theirs, chunk) in hf_names(args).items():
        if theirs not in tensors:
            problems.append(f"missing tensor {theirs}")
            continue
        t = tensors[theirs]
        used.add(theirs)
        if chunk is not None:           # a fused tensor (MPT Wqkv, Phi-3 qkv_proj): its row block
            part, sizes = chunk
            if t.shape[0] != sum(sizes):
                problems.append(f"tensor {theirs} has {t.shape[0]} rows, config.json implies "
                                f"{sum(sizes)} ({' + '.join(map(str, sizes))})")
                continue
            t = t.split(list(sizes), dim=0)[part]
        if t.shape != expected[ours].shape:
            problems.append(f"tensor {theirs} has shape {list(t.shape)}, config.json implies "
                            f"{list(expected[ours].shape)}")
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[ours] = t.to(device)
    # Tolerated extras: a tied lm_head saved anyway, and old checkpoints' RoPE buffers.
    extra = [k for k in tensors if k not in used and not k.endswith("rotary_emb.inv_freq")
             and not (args.tie_embeddings and k == "lm_head.weight")]
    problems += [f"unexpected tensor {k}" for k in sorted(extra)]
    if problems:
        raise mismatch(f"{path}: checkpoint does not match config.json ({args.model_type})",
                       problems)
    return state


def save_folder(state: dict, args, path, max_shard_bytes: int, extra_files=()) -> Path:
    """model.save_model's files: config.json (the one the model was loaded from, or a new Llama/MPT
    one), the tensors of `state` under Hugging Face names (fused ones re-fused) in safetensors
    filled up to max_shard_bytes each in the model's order (with an index when there are several),
    and `extra_files` copied in. The folder appears whole or not at all."""
    path = Path(path)
    fused = {}
    tensors = {}
    for ours, (theirs, chunk) in hf_names(args).items():
        t = state[ours].detach()
        if chunk is None:
            tensors[theirs] = t.contiguous()
        else:
            part, sizes = chunk
            fused.setdefault(theirs, [None] * len(sizes))[part] = t
    for theirs, parts in fused.items():
        tensors[theirs] = torch.cat(parts, dim=0)
    cfg = dict(args.hf_config) if args.hf_config else hf_config(args)
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    cfg["torch_dtype"] = str(max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.")
    # shards: fill each up to max_shard_bytes, in the model's order
    shards, cur, cur_bytes = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name], cur_bytes = t, cur_bytes + nbytes
    shards.append(cur)
    path.parent.mkdir(parents=True, exist_ok=True)
    # swapped in whole: the old folder leaves only once the new is complete
    with atomic_path(path, folder=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if len(shards) == 1:
            write_safetensors(shards[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / fname)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
    return path


def checkpoint_layout(path) -> tuple[torch.dtype, int]:
    """What an export of a model loaded from `path` keeps: (the dtype of most of its floating
    weights, the tensor bytes of its largest weights file, as save_model's max_shard_bytes: its
    greedy fill then cuts the same tensors into the same files). A .gguf file (quantised blocks, no
    torch dtype): bf16, 5 GiB shards."""
    path = Path(path)
    if path.suffix == ".gguf":
        return torch.bfloat16, 5 * 2**30
    by_dtype = collections.Counter()
    for t in read_checkpoint_tensors(path).values():     # memory-mapped: only headers are read
        if t.is_floating_point():
            by_dtype[t.dtype] += t.numel()
    kind, files = checkpoint_files(path)
    sizes = []                                             # the tensor bytes of each weights file
    for f in files:
        size = (path / f).stat().st_size
        if kind == "st":                      # less the 8-byte length and the JSON header
            with open(path / f, "rb") as fh:
                size -= 8 + struct.unpack("<Q", fh.read(8))[0]
        sizes.append(size)
    return by_dtype.most_common(1)[0][0], max(sizes)


@contextlib.contextmanager
def no_init():
    """Skip nn.init while building a model whose weights come from a file. On the meta device the
    random init does nothing anyway, but its first call costs about 2 s of one-time setup inside
    torch."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def tokenizer_misfit(tokens: int, rows: int, path="model") -> str | None:
    """Why a tokenizer of `tokens` tokens cannot belong to a checkpoint whose embedding has `rows`
    rows (it is larger), or None. A smaller one is normal (MPT: 50432 rows for about 50277 tokens),
    and downstream code uses only the first tok.vocab_size logits."""
    if tokens <= rows:
        return None
    return (f"{path}: the tokenizer has {tokens} tokens but the model's embedding has only {rows} "
            f"rows; this tokenizer does not belong to this model")
