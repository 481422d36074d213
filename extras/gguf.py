"""extras/gguf.py: GGUF files (llama.cpp, Ollama), the model and its vocabulary in one file.

Why it exists: many people have their models as a quantised .gguf file, not a Hugging Face folder. A
learner does not need it; a user who wants to fuse the models they already have does. A GGUF file
holds the config in its metadata (under llama.cpp's names), the tensors under llama.cpp's names,
quantised in blocks, with two of llama.cpp's own conventions baked in, and the vocabulary without
the tokenizer.json it came from. This file reads all of it back into what model.py and tokenizer.py
already run.

What it holds:
- `read_gguf(path)`: the header, read directly (metadata, tensor infos, where the data starts);
- the model: `gguf_config` (the metadata as a Hugging Face config.json dict, so one reader,
  model.ModelArgs.from_hf, builds every model and save_model writes a folder transformers loads),
  `read_config` and `read_state` (every tensor dequantised with the `gguf` package, under model.py's
  names), the same two calls extras/checkpoint_files.py answers for a folder;
- the vocabulary: a byte-level BPE ("gpt2" model: `gguf_tokenizer_spec` rebuilds its tokenizer.json,
  `gguf_bpe` the keyword arguments of tokenizer.TiktokenBPE) or a sentencepiece-style one ("llama"
  model: `gguf_sentencepiece` writes the sentencepiece model file it came from).
Errors are extras.format_error.FormatError; model.py and tokenizer.py turn them into their own.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
import sys
from pathlib import Path

import numpy as np

from extras.format_error import FormatError, mismatch
from extras.tokenizer_json import (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, STARCODER_PATTERN,
                                   bpe_from_spec)


def read_gguf(path) -> tuple[dict, list[dict], int]:
    """A GGUF file's header, read directly: the metadata {key: value}, the tensors' infos (name,
    shape in numpy order, ggml type, offset from the data start) and where the data starts. The
    layout (little-endian): b"GGUF", version u32, tensor count u64, metadata count u64; each
    metadata entry a string key, a u32 type and its value (strings: u64 length + UTF-8; arrays: u32
    element type, u64 count, elements); each tensor a string name, u32 dims, u64 sizes (innermost
    first), u32 ggml type, u64 offset; then the data, aligned to general.alignment (32 by
    default)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":            # checked first: an empty file cannot be mapped
            raise FormatError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
              11: "<q", 12: "<d"}
    numpy_of = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def room(n, size, what):
        """n items of `size` bytes must fit in what is left: a count past the end of the file
        (a cut or corrupt one) is named here, before a huge slice or array is asked for."""
        if n * size > len(buf) - pos:
            raise FormatError(f"{path}: {what} of {n:,} at byte {pos:,} runs past the end of the "
                              f"file ({len(buf):,} bytes); it is truncated or corrupt, re-download "
                              f"it")

    def string():
        nonlocal pos
        n = take("<Q")
        room(n, 1, "a string")
        pos += n
        return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            elem, n = take("<I"), take("<Q")
            if elem == 8:
                room(n, 8, "an array of strings")           # each at least its length
                return [string() for _ in range(n)]
            if elem not in numpy_of:
                raise FormatError(f"{path}: metadata array of type {elem} is not supported")
            room(n, np.dtype(numpy_of[elem]).itemsize, "an array")
            arr = np.frombuffer(buf, dtype=numpy_of[elem], count=n, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        if kind not in scalar:
            raise FormatError(f"{path}: metadata value of type {kind} is not supported "
                              f"(a corrupt file?)")
        return take(scalar[kind])

    try:
        version, n_tensors, n_kv = take("<4x I"), take("<Q"), take("<Q")
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        fields = {}
        for _ in range(n_kv):
            key = string()
            fields[key] = value(take("<I"))
        tensors = []
        for _ in range(n_tensors):
            name, n_dims = string(), take("<I")
            if not 1 <= n_dims <= 4:                        # GGML_MAX_DIMS
                raise FormatError(f"{path}: tensor {name} has {n_dims} dimensions, not 1 to 4; "
                                  f"the file is corrupt, re-download it")
            dims = [take("<Q") for _ in range(n_dims)]
            tensors.append({"name": name, "shape": dims[::-1], "type": take("<I"),
                            "offset": take("<Q")})
    except struct.error:
        raise FormatError(f"{path}: the GGUF header is truncated; re-download the file") from None
    align = fields.get("general.alignment", 32)
    if type(align) is not int or align < 1 or align & (align - 1):     # llama.cpp's rule
        raise FormatError(f"{path}: general.alignment is {align!r}, not a power of two; the "
                          f"file is corrupt, re-download it")
    return fields, tensors, (pos + align - 1) // align * align


def gguf_fields(path) -> dict:
    """A GGUF file's metadata."""
    return read_gguf(path)[0]


# --------------------------------------------------------------------------------------------------
# The model: the config in the metadata, tensors quantised in blocks

GGUF_LAYER_NAMES = {   # GGUF name inside blk.N -> ours inside layers.N (norms: see read_state)
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias",
    "attn_v.bias": "attention.wv.bias",
    "attn_q_norm.weight": "attention.q_norm.weight",
    "attn_k_norm.weight": "attention.k_norm.weight",
    "attn_norm.weight": "attention_norm.weight",
    "post_attention_norm.weight": "post_attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight", "post_ffw_norm.weight": "post_ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}
GGUF_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                  "output.weight": "output.weight"}

# GGUF general.architecture -> (Hugging Face model_type, architectures, what GGUF leaves out)
GGUF_ARCHS = {
    "llama": ("llama", "LlamaForCausalLM", {"hidden_act": "silu"}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {"hidden_act": "silu"}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"hidden_act": "silu"}),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", {"hidden_activation": "gelu_pytorch_tanh",
                                                    "rope_local_base_freq": 10000.0}),
}


def gguf_config(fields: dict, path, tensor_names=()) -> dict:
    """A Hugging Face config.json dict from a GGUF file's metadata (architectures in GGUF_ARCHS).
    What GGUF leaves out, llama.cpp fixes per architecture, and so does this: Gemma's sliding layers
    (Gemma 2: every other layer, from the first; Gemma 3: all but every 6th), Gemma 3's local RoPE
    base 10,000, Gemma's query_pre_attn_scalar (head_dim; Gemma 2 27B: hidden / heads). Embeddings
    are tied when the file has no output.weight."""
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or arch not in GGUF_ARCHS:
        raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported "
                          f"({', '.join(GGUF_ARCHS)}); use the Hugging Face folder of the model "
                          f"instead")

    def g(key, default=None):
        return fields.get(f"{arch}.{key}", default)

    if g("embedding_length") is None or g("block_count") is None:
        raise FormatError(f"{path}: GGUF metadata lacks {arch}.embedding_length or block_count")
    for key in ("embedding_length", "block_count", "attention.head_count"):    # divided by here
        if type(g(key)) is not int or g(key) < 1:
            raise FormatError(f"{path}: GGUF metadata {arch}.{key} is {g(key)!r}, not a positive "
                              f"integer; the file is corrupt, re-download it")
    heads, n = g("attention.head_count"), g("block_count")
    head_dim = g("attention.key_length") or g("embedding_length") // heads
    model_type, cls, extra = GGUF_ARCHS[arch]
    cfg = {"architectures": [cls], "model_type": model_type, **extra,
           "hidden_size": g("embedding_length"), "num_hidden_layers": n,
           "intermediate_size": g("feed_forward_length"), "num_attention_heads": heads,
           "num_key_value_heads": g("attention.head_count_kv") or heads, "head_dim": head_dim,
           "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6),
           "rope_theta": g("rope.freq_base", 10000.0),
           "max_position_embeddings": g("context_length", 4096),
           "vocab_size": len(vocabulary(path, fields)[0]),
           "tie_word_embeddings": bool(tensor_names) and "output.weight" not in tensor_names}
    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": g("rope.scaling.factor")}
    if arch in ("gemma2", "gemma3"):
        every = 2 if arch == "gemma2" else 6
        gemma2_27b = arch == "gemma2" and n == 46
        cfg.update(sliding_window=g("attention.sliding_window", 4096),
                   layer_types=["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(n)],
                   query_pre_attn_scalar=g("embedding_length") // heads if gemma2_27b else head_dim)
    if arch == "gemma2":
        cfg.update(attn_logit_softcapping=g("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=g("final_logit_softcapping", 30.0))
    return cfg


def read_config(path) -> tuple[dict, str]:
    """A .gguf file's config as a Hugging Face config.json dict, and the name to cite it by."""
    fields, infos, _ = read_gguf(path)
    return gguf_config(fields, path, [t["name"] for t in infos]), str(path)


def read_state(path, args, expected: dict, dtype=None, device="cpu") -> dict:
    """Every tensor of a .gguf file under model.py's names, dequantised to fp32 (then cast to dtype
    when given) and moved to device, checked against `expected` (our name -> a tensor of the shape
    the metadata implies; `args` the model.ModelArgs). llama.cpp stores Gemma's norm weights as
    1 + w and Llama's q/k rows interleaved for its RoPE; both are undone here."""
    import torch
    path = Path(path)
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise FormatError(f"{path}: reading GGUF files needs the `gguf` package: "
                          f"pip install gguf") from None
    if args.tie_embeddings:         # the output head is the embedding itself, not in the file
        expected = {k: v for k, v in expected.items() if k != "output.weight"}
    fields, infos, start = read_gguf(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    end, align = 0, fields.get("general.alignment", 32)
    for t in infos:     # llama.cpp's check: the tensors one after another, each aligned, no gaps
        if t["offset"] != end:
            raise FormatError(f"{path}: tensor {t['name']} starts at byte {t['offset']:,} of the "
                              f"data, not at {end:,} where the tensors before it end; the file is "
                              f"corrupt, re-download it")
        t["qtype"], t["size"] = stored_as(path, t, gguf)
        end += (t["size"] + align - 1) // align * align
    need = start + infos[-1]["offset"] + infos[-1]["size"] if infos else 0
    if need > len(raw):                                 # found before any tensor is read
        raise FormatError(f"{path}: the tensors need {need:,} bytes, the file has {len(raw):,}; "
                          f"truncated, re-download it")
    state, problems = {}, []
    for t in infos:
        name = t["name"]
        if name.startswith("blk.") and name.count(".") >= 2:
            _, layer, rest = name.split(".", 2)
            ours = f"layers.{layer}.{GGUF_LAYER_NAMES.get(rest, rest)}"
        else:
            ours = GGUF_TOP_NAMES.get(name, name)
        if ours not in expected:
            problems.append(f"unexpected tensor {name}")
            continue
        # the shape first: reading the data and undoing the q/k interleave both rely on it
        if t["shape"] != list(expected[ours].shape):
            problems.append(f"tensor {name} has shape {t['shape']}, the metadata implies "
                            f"{list(expected[ours].shape)}")
            continue
        qtype, size, rows = t["qtype"], t["size"], math.prod(t["shape"][:-1])
        data = raw[start + t["offset"]:start + t["offset"] + size]
        if len(data) != size:
            raise FormatError(f"{path}: tensor {name} runs past the end of the file; truncated, "
                              f"re-download it")
        try:
            w = np.array(dequantize(data.reshape(rows, -1), qtype), dtype=np.float32)
        except NotImplementedError:     # a type the gguf package knows but cannot read yet
            raise FormatError(f"{path}: tensor {name} is stored as {qtype.name}, which the gguf "
                              f"package cannot dequantize; use a file quantised otherwise, or a "
                              f"newer gguf (pip install -U gguf)") from None
        w = torch.from_numpy(w).reshape(t["shape"])
        if args.norm == "gemma" and ours.endswith("norm.weight"):
            w = w - 1                                   # llama.cpp wrote 1 + w
        if args.model_type == "llama" and ours.endswith(("wq.weight", "wk.weight")):
            h = args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads
            w = w.reshape(h, w.shape[0] // h // 2, 2, -1).transpose(1, 2)   # undo the interleave
            w = w.reshape(t["shape"])
        state[ours] = w.to(dtype or torch.float32).to(device)
    problems += [f"missing tensor for {k}" for k in expected if k not in state]
    if problems:
        raise mismatch(f"{path}: tensors do not match the metadata ({args.model_type})", problems)
    return state


def stored_as(path, t: dict, gguf) -> tuple:
    """(ggml type, bytes) of a tensor's data: its rows, each in whole blocks of its type. A type
    the `gguf` package does not know, or a row that is not whole blocks, is a corrupt file."""
    try:
        qtype = gguf.GGMLQuantizationType(t["type"])
    except ValueError:
        raise FormatError(f"{path}: tensor {t['name']} has ggml type {t['type']}, which the gguf "
                          f"package does not know; the file is corrupt (re-download it) or newer "
                          f"than this gguf package (pip install -U gguf)") from None
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if t["shape"][-1] % block:
        raise FormatError(f"{path}: tensor {t['name']} has rows of {t['shape'][-1]}, not whole "
                          f"blocks of {block} ({qtype.name}); the file is corrupt, re-download it")
    return qtype, math.prod(t["shape"]) // block * nbytes


# --------------------------------------------------------------------------------------------------
# The vocabulary. A byte-level BPE ("gpt2" model) keeps its tokens, merges, token types and special
# ids, but not its pre-tokenizer regex: only a name (tokenizer.ggml.pre), which this table turns
# back into the regex, normalizer and ignore_merges of the original tokenizer.json.

GGUF_PRE = {   # tokenizer.ggml.pre -> (regex, NFC, ignore_merges)
    "gpt-2": (GPT2_PATTERN, False, False),
    "gpt2": (GPT2_PATTERN, False, False),
    "mpt": (GPT2_PATTERN, True, False),             # GPT-NeoX-20B's tokenizer
    "gpt-neox": (GPT2_PATTERN, True, False),
    "starcoder": (STARCODER_PATTERN, False, False),
    "refact": (STARCODER_PATTERN, False, False),
    "llama-bpe": (LLAMA3_PATTERN, False, True),     # Llama-3
    "llama3": (LLAMA3_PATTERN, False, True),
    "qwen2": (QWEN2_PATTERN, True, False),
}


def vocabulary(path, fields: dict) -> tuple[list, list, list]:
    """A GGUF file's tokens, token types (1 where it has none) and scores (0 where it has none),
    checked before use: strings, and as many types (0 to 6, llama.cpp's) and numbers, and special
    token ids (BOS, EOS, unknown) that are integers from 0. A corrupt file is named here, not met
    as a TypeError, or a negative type that would never end the varints of the sentencepiece
    model written from them."""
    def bad(what):
        return FormatError(f"{path}: GGUF metadata tokenizer.ggml.{what}; the file is corrupt, "
                           f"re-download it")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise bad("tokens is not a list of strings")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if (not isinstance(types, list) or len(types) != len(tokens)
            or not all(type(k) is int and 0 <= k <= 6 for k in types)):
        raise bad(f"token_type is not {len(tokens)} token types (0 to 6), one per token")
    if (not isinstance(scores, list) or len(scores) != len(tokens)
            or not all(type(x) in (int, float) for x in scores)):
        raise bad(f"scores is not {len(tokens)} numbers, one per token")
    for name in ("bos", "eos", "unknown"):
        i = fields.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None and (type(i) is not int or i < 0):
            raise bad(f"{name}_token_id is {i!r}, not a token id")
    return tokens, types, scores


def gguf_tokenizer_spec(path: Path, fields: dict) -> tuple[dict, dict]:
    """The tokenizer.json content and tokenizer_config names of a GGUF file's byte-level BPE
    vocabulary. Token types: 1 normal, 3 control (special added tokens), 4 user-defined (added, not
    special, and kept in the vocabulary, as GPT-NeoX's space runs are); llama.cpp's [PAD<n>] fillers
    are left out."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"{path}: GGUF vocabulary of type {kind!r}; nanofuse reads byte-level "
                          f"BPE ('gpt2') and sentencepiece ('llama') vocabularies from GGUF; use "
                          f"the model's tokenizer files instead")
    pre = fields.get("tokenizer.ggml.pre", "gpt-2")
    if not isinstance(pre, str) or pre not in GGUF_PRE:
        raise FormatError(f"{path}: pre-tokenizer {pre!r} is unknown (known: "
                          f"{', '.join(GGUF_PRE)}); use the model's tokenizer.json instead")
    pattern, nfc, ignore_merges = GGUF_PRE[pre]
    tokens, types, _ = vocabulary(path, fields)
    vocab, added = {}, []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == 4 and re.fullmatch(r"\[PAD\d+\]", t):
            continue
        if ty in (1, 4):
            vocab[t] = i
        if ty in (3, 4):
            added.append({"id": i, "content": t, "special": ty == 3, "normalized": ty == 4})
    merges = fields.get("tokenizer.ggml.merges") or []             # checked in bpe_from_spec
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": merges,
                      "ignore_merges": ignore_merges},
            "normalizer": {"type": "NFC"} if nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]},
            "added_tokens": added}
    config = {}
    for name in ("bos", "eos"):
        i = fields.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None and i < len(tokens):          # an id past them: none, as before
            config[f"{name}_token"] = tokens[i]
    return spec, config


def gguf_bpe(path: Path, fields: dict, config: dict, alphabet: dict[int, str]) -> dict:
    """tokenizer.TiktokenBPE(**these) for a GGUF file's byte-level BPE vocabulary: its
    tokenizer.json rebuilt (gguf_tokenizer_spec), read as one (extras/tokenizer_json.py), BOS as the
    file says."""
    spec, names = gguf_tokenizer_spec(path, fields)
    kwargs = bpe_from_spec(spec, path, {**names, **config}, alphabet)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    kwargs["add_bos"] = add_bos and kwargs["bos_id"] is not None
    return kwargs


def sentencepiece_model_bytes(pieces: list[tuple[str, float, int]], bpe: bool, byte_fallback: bool,
                              add_dummy_prefix: bool, unk_id: int | None) -> bytes:
    """A sentencepiece ModelProto, written in protobuf's wire format by hand (no protobuf needed):
    the pieces (text, score, type: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6
    byte), the model type, byte fallback, and an identity normaliser that writes spaces as U+2581
    (what GGUF's llama vocabularies assume)."""
    def varint(n):
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def key(field, wire):
        return varint(field << 3 | wire)

    def blob(field, data: bytes):
        return key(field, 2) + varint(len(data)) + data

    def number(field, n):
        return key(field, 0) + varint(n)

    out = bytearray()
    for text, score, kind in pieces:
        piece = blob(1, text.encode()) + key(2, 5) + struct.pack("<f", score) + number(3, kind)
        out += blob(1, piece)
    trainer = number(3, 2 if bpe else 1) + number(35, int(byte_fallback))
    if unk_id is not None:
        trainer += number(40, unk_id)
    out += blob(2, trainer)
    normalizer = blob(1, b"identity") + number(3, int(add_dummy_prefix))
    out += blob(3, normalizer + number(4, 0) + number(5, 1))
    return bytes(out)


def gguf_sentencepiece(path: Path, fields: dict) -> dict:
    """tokenizer.SentencePieceTokenizer(path, **these) for a GGUF file's sentencepiece-style
    ('llama') vocabulary: Llama-2, Mistral, Gemma, Phi-3. The scores decide a BPE vocabulary's
    merges (llama.cpp's convention: Gemma's are BPE). BOS and EOS ids: the file's, where it names
    them."""
    tokens, types, scores = vocabulary(path, fields)
    for name in ("bos", "eos", "unknown"):          # ids of pieces here: none past the last
        if (i := fields.get(f"tokenizer.ggml.{name}_token_id")) is not None and i >= len(tokens):
            if name == "unknown":
                raise FormatError(f"{path}: GGUF metadata tokenizer.ggml.unknown_token_id is {i}, "
                                  f"past the {len(tokens)} tokens; the file is corrupt, "
                                  f"re-download it")
            # older converters wrote such ids (a ChatML end id equal to the vocabulary size):
            # llama.cpp warns and keeps its default, and so do we
            print(f"warning: {path}: tokenizer.ggml.{name}_token_id {i} is past the "
                  f"{len(tokens)} tokens; using the tokenizer's default", file=sys.stderr)
            fields = {k: v for k, v in fields.items() if k != f"tokenizer.ggml.{name}_token_id"}
    # sentencepiece allows one unknown piece: the file's unknown_token_id. llama.cpp also types its
    # [PAD<n>] fillers (Phi-3) as unknown; they become unused pieces, which the encoder never emits
    unk = fields.get("tokenizer.ggml.unknown_token_id")
    types = [5 if kind == 2 and i != unk else kind for i, kind in enumerate(types)]
    if unk is not None:
        types[unk] = 2
    # llama.cpp writes user-defined pieces (Gemma's runs of spaces, tabs, newlines) with plain
    # spaces; sentencepiece matches them after its normaliser has turned spaces into U+2581
    pieces = [(t.replace(" ", "\u2581") if kind == 4 else t, float(x), int(kind))
              for t, x, kind in zip(tokens, scores, types)]
    byte_fallback = any(t == 6 for t in types)
    is_bpe = str(fields.get("general.architecture")).startswith("gemma") or byte_fallback
    proto = sentencepiece_model_bytes(
        pieces, bpe=is_bpe, byte_fallback=byte_fallback,
        add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)),
        unk_id=fields.get("tokenizer.ggml.unknown_token_id"))
    ids = {}
    for name in ("bos", "eos"):
        i = fields.get(f"tokenizer.ggml.{name}_token_id")
        if i is not None:
            ids[f"{name}_id"] = int(i)
    return dict(model_proto=proto, **ids,
                add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)))
