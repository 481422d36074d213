"""Bad inputs, generated: a GGUF file, a tokenizer.json, a sentencepiece or tiktoken
tokenizer.model, a corpus, a data folder or an eval task file, corrupted in ways hypothesis picks,
ends in one error of its reader's own class that names the file and what to do (or, where the
reader's documented handling reads it, is read and counted), never in another exception; so does
every JSON reader given arrays nested too deep. The same style as test_bad_files.py (safetensors,
config.json)."""
import base64
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import fusellm
from conftest import MIXED_TEXT, byte_level_bpe, llama, mpt, randomize_, sentencepiece_model
from extras import storage
from extras.benchmarks import BenchmarkError, read_gen, read_mc
from extras.corpus import CorpusError, CorpusStats, read_corpus
from extras.gguf import GGUF_LAYER_NAMES, GGUF_TOP_NAMES
from extras.tokenizer_json import bytes_to_unicode
from fusellm import CheckpointError
from tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])


def cli(*argv) -> list[str]:
    """A command's output lines, after checking it failed with one `error:` line and no
    traceback."""
    out = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode != 0
    assert len(said) == 1 and said[0].startswith("error:"), said
    assert "Traceback" not in out.stderr
    return said


# --------------------------------------------------------------------------------------------------
# GGUF: a tiny Llama with a byte-level vocabulary, as llama.cpp's converter writes one

TOKENS = [*bytes_to_unicode().values(), "ĠĠ", "ĠĠĠĠ", "<|endoftext|>"]
ARGS = fusellm.ModelArgs(vocab_size=len(TOKENS), dim=8, n_layers=1, n_heads=2, n_kv_heads=1,
                         head_dim=4, hidden_dim=8, sliding_layers=(False,))
METADATA = {"llama.context_length": 64, "llama.embedding_length": 8, "llama.block_count": 1,
            "llama.feed_forward_length": 8, "llama.attention.head_count": 2,
            "llama.attention.head_count_kv": 1, "llama.attention.key_length": 4,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": TOKENS,
            "tokenizer.ggml.token_type": [1] * (len(TOKENS) - 1) + [3],
            "tokenizer.ggml.merges": ["Ġ Ġ", "ĠĠ ĠĠ"],
            "tokenizer.ggml.bos_token_id": len(TOKENS) - 1,
            "tokenizer.ggml.eos_token_id": len(TOKENS) - 1}


def write_gguf(path, tensors: dict, metadata: dict):
    """A GGUF file written by the `gguf` package (llama.cpp's own writer): `metadata` (each value
    written in the GGUF type of its Python type), then the tensors, f32."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            (w.add_uint32 if value >= 0 else w.add_int32)(key, value)
        else:
            w.add_float32(key, value)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """The tiny GGUF model: (path, its tensors under GGUF names, file bytes); it loads, model and
    tokenizer, as it is."""
    ours = {v: k for k, v in {**GGUF_LAYER_NAMES, **GGUF_TOP_NAMES}.items()}
    state = randomize_(fusellm.Transformer(ARGS)).state_dict()
    tensors = {(f"blk.{k.split('.')[1]}.{ours[k.split('.', 2)[2]]}" if k.startswith("layers.")
                else ours[k]): v.float().numpy() for k, v in state.items()}
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, tensors, METADATA)
    fusellm.load(path)                                                      # the start is valid
    return path, tensors, path.read_bytes()


SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def layout(blob: bytes) -> dict[str, list[int]]:
    """Where each count, length, type and offset of a GGUF header lies: {field: [byte positions]}
    (read here independently of extras/gguf.py)."""
    at = {k: [] for k in ("str_len", "kv_type", "arr_type", "arr_len", "n_dims", "dim",
                          "ggml_type", "offset")}
    pos = 24

    def u(fmt):
        nonlocal pos
        pos += struct.calcsize(fmt)
        return struct.unpack_from(fmt, blob, pos - struct.calcsize(fmt))[0]

    def string():
        nonlocal pos
        at["str_len"].append(pos)
        n = u("<Q")
        pos += n

    n_tensors, n_kv = struct.unpack_from("<QQ", blob, 8)
    for _ in range(n_kv):
        string()
        at["kv_type"].append(pos)
        kind = u("<I")
        if kind == 8:
            string()
        elif kind == 9:
            at["arr_type"].append(pos)
            elem = u("<I")
            at["arr_len"].append(pos)
            for _ in range(u("<Q")):
                if elem == 8:
                    string()
                else:
                    pos += SCALAR_SIZES[elem]
        else:
            pos += SCALAR_SIZES[kind]
    for _ in range(n_tensors):
        string()
        at["n_dims"].append(pos)
        for _ in range(u("<I")):
            at["dim"].append(pos)
            pos += 8
        at["ggml_type"].append(pos)
        pos += 4
        at["offset"].append(pos)
        pos += 8
    return at


def gguf_corruptions(blob: bytes):
    """Strategies for bad GGUF files made from the good one's bytes: cut anywhere; a count or a
    length past the end of the file; a value type, array type or tensor type that does not exist,
    or that the gguf package cannot dequantize, or whose blocks do not fit a row; dimensions out
    of 1..4 or changed; a tensor's data moved (out of place, misaligned, overlapping, past the
    end)."""
    gguf = pytest.importorskip("gguf")
    at = layout(blob)
    formats = {"str_len": "<Q", "kv_type": "<I", "arr_type": "<I", "arr_len": "<Q",
               "n_dims": "<I", "dim": "<Q", "ggml_type": "<I", "offset": "<Q"}

    def put(field, pos, value):
        out = bytearray(blob)
        struct.pack_into(formats[field], out, pos, value)
        return bytes(out)

    def field(name, values):           # a field at one of its places, set to one of `values`
        return st.tuples(st.sampled_from(at[name]), values).map(lambda a: put(name, *a))

    def changed(name):                 # a field set to anything but what it was
        return st.tuples(st.sampled_from(at[name]), st.integers(0, 2**64 - 1)).filter(
            lambda a: struct.unpack_from(formats[name], blob, a[0])[0] != a[1]).map(
            lambda a: put(name, *a))

    known = {t.value for t in gguf.GGMLQuantizationType}
    unreadable = [t.value for t in gguf.GGMLQuantizationType
                  if t.name in ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64")
                  or gguf.GGML_QUANT_SIZES[t][0] > 8]                # blocks wider than a row
    past_end = st.integers(len(blob), 2**64 - 1)
    return st.one_of(
        st.integers(0, len(blob) - 1).map(lambda cut: blob[:cut]),                  # truncated
        st.tuples(st.sampled_from([8, 16]), past_end).map(                           # counts
            lambda a: blob[:a[0]] + struct.pack("<Q", a[1]) + blob[a[0] + 8:]),
        field("str_len", past_end), field("arr_len", past_end),                      # lengths
        field("kv_type", st.integers(13, 2**32 - 1)),                                # no such
        field("arr_type", st.just(9) | st.integers(13, 2**32 - 1)),                  # types
        field("ggml_type", st.integers(0, 2**32 - 1).filter(lambda t: t not in known)
              | st.sampled_from(unreadable)),
        field("n_dims", st.just(0) | st.integers(5, 2**32 - 1)),                     # 1 to 4
        changed("dim"), changed("offset"),                                           # moved
    )


def test_corrupt_gguf_files_end_in_one_clear_error(gguf_file, tmp_path):
    """Idea: every corruption of a valid GGUF file's bytes (cut anywhere; a tensor count, metadata
    count, string or array length past the end; unknown value, array or tensor types; tensor types
    the gguf package cannot read or whose blocks do not fit a row; 0 or more than 4 dimensions;
    a dimension or a data offset changed) is refused by load_model with one CheckpointError naming
    the file. Catches: a reader that lets mmap, struct, numpy, enum or gguf errors escape (an
    empty file, a length of 2**63, an unknown ggml type, a type the gguf package cannot
    dequantize), or loads tensors that overlap or lie misaligned."""
    _, _, blob = gguf_file
    target = tmp_path / "bad.gguf"

    @settings(max_examples=200, **SETTINGS)
    @given(gguf_corruptions(blob))
    def check(bad):
        target.write_bytes(bad)
        with pytest.raises(CheckpointError) as e:
            fusellm.load_model(target)
        assert type(e.value) is CheckpointError
        assert str(target) in str(e.value), str(e.value)

    check()


INT_KEYS = ["llama.context_length", "llama.embedding_length", "llama.block_count",
            "llama.feed_forward_length", "llama.attention.head_count"]
WRONG_INT = st.one_of(st.text(min_size=1, max_size=4),       # (the writer drops an empty text)
                      st.lists(st.integers(1, 4), min_size=1, max_size=2),
                      st.floats(allow_nan=True, width=32), st.booleans(), st.integers(-5, 0))


def bad_metadata():
    """Strategies for GGUF metadata made wrong: (metadata, the key made wrong, the reader it
    breaks: "model", "tokenizer" or "both")."""
    def set_(key, value, reader):
        return {**METADATA, key: value}, key, reader

    singles = [t for t in TOKENS[:256] if len(t) == 1]
    unknown_merge = st.tuples(st.sampled_from(singles), st.sampled_from(singles)).filter(
        lambda p: p[0] + p[1] not in TOKENS).map(" ".join)
    return st.one_of(
        st.tuples(st.sampled_from(INT_KEYS), WRONG_INT).map(lambda a: set_(*a, "model")),
        st.tuples(st.sampled_from(["llama.attention.key_length", "llama.attention.head_count_kv"]),
                  WRONG_INT.filter(bool))                          # 0: the default
        .map(lambda a: set_(*a, "model")),
        (st.integers(0, 100).filter(lambda n: n & (n - 1) or not n) | st.text(min_size=1)
         | st.booleans()).map(lambda v: set_("general.alignment", v, "model")),
        (st.text(min_size=1, max_size=4) | st.integers(0, 9)
         | st.lists(st.integers(0, 9), min_size=1))
        .map(lambda v: set_("tokenizer.ggml.tokens", v, "both")),
        (st.sampled_from(["bert", "t5", "rwkv"]) | st.integers(0, 9))
        .map(lambda v: set_("tokenizer.ggml.model", v, "tokenizer")),
        (st.sampled_from(["deepseek-llm", "GPT-2"]) | st.integers(0, 9) | st.booleans())
        .map(lambda v: set_("tokenizer.ggml.pre", v, "tokenizer")),
        st.one_of(st.integers(1, 40).map(lambda d: [1] * (len(TOKENS) + d)),
                  st.integers(1, len(TOKENS) - 1).map(lambda d: [1] * (len(TOKENS) - d)),
                  st.integers(7, 2**20).map(lambda k: [1] * (len(TOKENS) - 1) + [k]),
                  st.integers(-2**20, -1).map(lambda k: [1] * (len(TOKENS) - 1) + [k]),
                  st.just(["normal"] * len(TOKENS)))
        .map(lambda v: set_("tokenizer.ggml.token_type", v, "tokenizer")),
        st.one_of(st.lists(st.integers(0, 9), min_size=1, max_size=3),
                  st.lists(st.sampled_from(singles), min_size=1, max_size=3).map("".join),
                  unknown_merge.map(lambda m: [m]), st.just(["Ġ Ġ", "ĠĠ ĠĠ", "Ġ Ġ"]))
        .map(lambda v: set_("tokenizer.ggml.merges", v, "tokenizer")),
        (st.integers(-2**20, -1) | st.text(min_size=1, max_size=3)
         | st.lists(st.integers(0, 9), min_size=1))
        .map(lambda v: set_("tokenizer.ggml.bos_token_id", v, "tokenizer")),
    )


def test_bad_gguf_metadata_ends_in_one_clear_error(gguf_file, tmp_path):
    """Idea: GGUF metadata of the wrong type or value, written by llama.cpp's own writer (sizes as
    text, floats, booleans, lists, zero or negative; an alignment that is not a power of two; a
    vocabulary that is not a list of strings; an unknown vocabulary model or pre-tokenizer; token
    types too few, too many, or out of 0..6; merges that are not "a b" strings or join tokens not
    in the vocabulary; a BOS id that is not an id) is refused by the reader it breaks with one
    error naming the file: CheckpointError from load_model, TokenizerError from load_tokenizer.
    Catches: a TypeError or ZeroDivisionError from the metadata, token types the reader zipped
    short or dropped (a negative one would never end the varints of a sentencepiece vocabulary's
    model), a BOS id of -1 read as the last token."""
    _, tensors, _ = gguf_file
    target = tmp_path / "bad.gguf"

    @settings(max_examples=150, **SETTINGS)
    @given(bad_metadata())
    def check(bad):
        metadata, key, reader = bad
        write_gguf(target, tensors, metadata)
        wanted = {"model": [(fusellm.load_model, CheckpointError)],
                  "tokenizer": [(load_tokenizer, TokenizerError)]}
        for read, error in wanted.get(reader, wanted["model"] + wanted["tokenizer"]):
            with pytest.raises(error) as e:
                read(target)
            assert type(e.value) is error
            assert str(target) in str(e.value), str(e.value)

    check()


def test_corrupt_gguf_through_the_cli(tmp_path):
    """Idea: a user running the CLI on an empty .gguf file (a download that never started) sees
    one `error:` line naming it, no traceback. Catches: mmap's "cannot mmap an empty file",
    which named no file."""
    (tmp_path / "empty.gguf").write_bytes(b"")
    said = cli(ROOT / "fusellm.py", tmp_path / "empty.gguf", "hi")
    assert "empty.gguf" in said[0]


# --------------------------------------------------------------------------------------------------
# tokenizer.json: a byte-level BPE trained here with Hugging Face tokenizers

@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A folder holding a byte-level BPE tokenizer.json (300 tokens); it loads as it is."""
    folder = tmp_path_factory.mktemp("bpe")
    byte_level_bpe([MIXED_TEXT] * 3, 300).save(str(folder / "tokenizer.json"))
    load_tokenizer(folder)
    return folder


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats()
                        | st.text(max_size=3),
                        lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(max_size=2), c, max_size=3), max_leaves=5)


def bad_tokenizer_json(spec: dict):
    """Strategies for tokenizer.json texts made wrong from a valid one's content."""
    text = json.dumps(spec)
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    singles = [t for t in vocab if len(t) == 1]

    def at(path, value):                # the content with one part replaced
        out = json.loads(text)
        part = out
        for k in path[:-1]:
            part = part[k]
        part[path[-1]] = value
        return json.dumps(out)

    def not_(*kinds):                   # any JSON value but these kinds, and not falsy (which
        return ANY_JSON.filter(lambda v: v and not isinstance(v, kinds))     # reads as absent)

    big_id = st.integers(2**24, 2**62) | st.integers(-2**62, -1)
    some = st.integers(0, len(merges) - 1)
    return st.one_of(
        st.integers(0, len(text) - 1).map(lambda cut: text[:cut]),                  # truncated
        not_(dict).map(json.dumps),                                                  # no object
        st.tuples(st.sampled_from(["model", "normalizer", "pre_tokenizer", "post_processor"]),
                  not_(dict)).map(lambda a: at((a[0],), a[1])),
        not_(dict).map(lambda v: at(("model", "vocab"), v)),                         # vocab
        st.tuples(st.sampled_from(sorted(vocab)), not_(int) | big_id | st.booleans())
        .map(lambda a: at(("model", "vocab", a[0]), a[1])),
        st.sampled_from(sorted(vocab)).map(                                          # same id
            lambda t: at(("model", "vocab", t), vocab[t] + 1 if vocab[t] + 1 < len(vocab)
                         else 0)),
        not_(list).map(lambda v: at(("model", "merges"), v)),                        # merges
        st.tuples(some, not_(str, list) | st.text(max_size=4).filter(lambda s: " " not in s)
                  | st.lists(st.text(max_size=2), max_size=4).filter(lambda m: len(m) != 2))
        .map(lambda a: at(("model", "merges", a[0]), a[1])),
        st.tuples(some, st.sampled_from(singles), st.sampled_from(singles))          # missing
        .filter(lambda a: a[1] + a[2] not in vocab)                                  # tokens
        .map(lambda a: at(("model", "merges", a[0]), [a[1], a[2]])),
        st.tuples(some, st.text(min_size=1, max_size=3).filter(lambda t: t not in vocab))
        .map(lambda a: at(("model", "merges", a[0]), [a[1], merges[a[0]][1]])),
        not_(list).map(lambda v: at(("added_tokens",), v)),                          # added
        st.tuples(st.sampled_from(["id", "content"]), not_(int, str) | big_id)
        .map(lambda a: at(("added_tokens", 0, a[0]), a[1])),
        st.sampled_from(["(", "[a-", r"\p{Nope}", "a)"]).map(                        # regex
            lambda r: at(("pre_tokenizer",), {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated",
                 "invert": False}, {"type": "ByteLevel", "use_regex": False}]})),
        not_(str).map(lambda v: at(("model", "unk_token"), v)),                      # unk
    )


def test_bad_tokenizer_json_ends_in_one_clear_error(bpe_folder, tmp_path):
    """Idea: a tokenizer.json cut anywhere, not an object, with a model, vocabulary, merges or
    added tokens of the wrong JSON type, ids that are not integers from 0 to 2**24 - 1 or that two
    tokens share, merges not "a b" or ["a", "b"] or naming tokens not in the vocabulary, or a
    pre-tokenizer regex that does not compile, is refused by load_tokenizer with one
    TokenizerError naming the file. Catches: AttributeError, TypeError, KeyError or IndexError from
    inside the reader, tiktoken's ValueError on the regex, an id of 2**40 asking for a table that
    size."""
    spec = json.loads((bpe_folder / "tokenizer.json").read_text())
    case = tmp_path / "tok"
    case.mkdir()
    target = case / "tokenizer.json"

    @settings(max_examples=200, **SETTINGS)
    @given(bad_tokenizer_json(spec))
    def check(bad):
        target.write_text(bad)
        refused_naming(case, target)

    check()


def test_the_last_id_no_merge_makes_is_kept(bpe_folder, tmp_path):
    """Idea: a tokenizer.json whose last merge is gone (a hand-edited or cut-down file) keeps the
    token that merge made, at its id: no merge makes it now, but decoding it gives its bytes.
    Catches: the vocabulary size taken from the ranked and added ids only, so that the table of
    bytes per id had no room for the last one (an IndexError); found building a GGUF fixture."""
    spec = json.loads((bpe_folder / "tokenizer.json").read_text())
    last = max(spec["model"]["vocab"].values())
    made = "".join(spec["model"]["merges"].pop())
    assert spec["model"]["vocab"][made] == last
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == last + 1 and tok.token_str(last) == made


def test_any_tokenizer_config_json_leaves_the_tokenizer_loading(bpe_folder, tmp_path):
    """Idea: tokenizer_config.json is optional, so one of any content (not JSON, not an object,
    BOS/EOS names and add_bos_token of any type) leaves a tokenizer.json's tokenizer loading,
    whole. Catches: a list or a number named as the BOS token raising TypeError (unhashable) or
    AttributeError."""
    case = tmp_path / "tok"
    shutil.copytree(bpe_folder, case)

    @settings(max_examples=60, **SETTINGS)
    @given(st.one_of(st.binary(max_size=20),
                     ANY_JSON.map(lambda v: json.dumps(v).encode()),
                     st.fixed_dictionaries({}, optional={k: ANY_JSON for k in (
                         "bos_token", "eos_token", "add_bos_token", "added_tokens_decoder")})
                     .map(lambda v: json.dumps(v).encode())))
    def check(config):
        (case / "tokenizer_config.json").write_bytes(config)
        tok = load_tokenizer(case)
        assert tok.decode(tok.encode(MIXED_TEXT)) == MIXED_TEXT

    check()


# --------------------------------------------------------------------------------------------------
# tokenizer.model: sentencepiece's protobuf, and Llama-3's tiktoken text

@pytest.fixture(scope="module")
def sentencepiece_blob():
    """A sentencepiece BPE (byte fallback, 400 pieces) trained here: the model file's bytes."""
    return sentencepiece_model([MIXED_TEXT], 400)


def test_corrupt_sentencepiece_model_is_named_or_runs(sentencepiece_blob, tmp_path):
    """Idea: a tokenizer.model cut anywhere is refused with one TokenizerError naming it; one with
    a bit flipped or a byte changed either loads and runs (a changed score or piece is still a
    model) or is refused the same way. sentencepiece raises RuntimeError for what it refuses, and,
    for a piece that is no longer UTF-8, a UnicodeDecodeError from its wrapper; in 300 tries none
    crashed the process, so this runs in it. Catches: that UnicodeDecodeError escaping."""
    blob = sentencepiece_blob
    target = tmp_path / "tokenizer.model"

    def at(pos, change):
        out = bytearray(blob)
        out[pos] = change(out[pos])
        return bytes(out)

    position = st.integers(0, len(blob) - 1)
    changed = st.one_of(
        st.tuples(position, st.integers(0, 7)).map(lambda a: at(a[0], lambda b: b ^ 1 << a[1])),
        st.tuples(position, st.integers(0, 255)).map(lambda a: at(a[0], lambda b: a[1])))

    @settings(max_examples=150, **SETTINGS)
    @given(st.one_of(position.map(lambda cut: ("cut", blob[:cut])),
                     changed.map(lambda b: ("changed", b))))
    def check(case):
        kind, bad = case
        target.write_bytes(bad)
        try:
            tok = load_tokenizer(target)
        except TokenizerError as e:
            assert type(e) is TokenizerError and str(target) in str(e), str(e)
            return
        assert kind == "changed", "a cut sentencepiece model loaded"
        tok.decode(tok.encode(MIXED_TEXT))

    check()


@pytest.fixture(scope="module")
def tiktoken_text():
    """A tiktoken-format file of 128,000 distinct tokens ('base64 rank' lines; the reader knows
    only Llama-3's size): its text. It loads as it is."""
    pairs = (bytes(p) for p in itertools.product(range(256), repeat=2))
    triples = (bytes([97 + a, b, c]) for a in range(26) for b in range(256) for c in range(256))
    tokens = itertools.islice(itertools.chain((bytes([b]) for b in range(256)), pairs, triples),
                              128000)
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens))


def bad_tiktoken(text: str):
    """Strategies for tiktoken files made wrong: a line among the first 2,000 replaced (not
    base64, a rank that is not an integer, a missing or an extra field, a token or a rank
    repeated), the file cut anywhere, or a byte that is not UTF-8 in it."""
    lines = text.split("\n")

    def line(n, new):
        return "\n".join([*lines[:n], new, *lines[n + 1:]]).encode()

    n = st.integers(0, 1999)
    return st.one_of(
        st.tuples(n, st.sampled_from(["!!!! 5", "QQ= 1", "QQ==", "QQ== 1 2", "QQ== x", "QQ== 1.5",
                                      "Q Q== 3", "QQ==\t"])).map(lambda a: line(*a)),
        st.tuples(n, n).filter(lambda a: a[0] != a[1]).map(                          # repeated
            lambda a: line(a[0], f"{lines[a[1]].split()[0]} {a[0]}")),
        st.tuples(n, n).filter(lambda a: a[0] != a[1]).map(
            lambda a: line(a[0], f"{lines[a[0]].split()[0]} {a[1]}")),
        st.integers(0, len(text) - 2).map(lambda cut: text[:cut].encode()),          # cut
        st.tuples(st.integers(0, 4000), st.sampled_from([b"\xff", b"\xc3", b"\x80"]))   # UTF-8
        .map(lambda a: text[:a[0]].encode() + a[1] + text[a[0]:].encode()),
    )


def test_bad_tiktoken_file_ends_in_one_clear_error(tiktoken_text, tmp_path):
    """Idea: a tiktoken-format tokenizer.model with a line that is not 'base64 rank', a repeated
    token or rank, cut anywhere, or holding a byte that is not UTF-8, is refused with one
    TokenizerError naming it; as is a tokenizer_config.json whose added_tokens_decoder is not
    {id: {"content": text}}. Catches: UnicodeDecodeError from read_text, TypeError or KeyError from
    the decoder."""
    case = tmp_path / "llama3"
    case.mkdir()
    target = case / "tokenizer.model"
    target.write_text(tiktoken_text)
    assert load_tokenizer(case).vocab_size == 128256                     # the start is valid

    @settings(max_examples=25, **SETTINGS)
    @given(bad_tiktoken(tiktoken_text))
    def check(bad):
        target.write_bytes(bad)
        refused_naming(case, target)

    check()
    target.write_text(tiktoken_text)
    config = case / "tokenizer_config.json"

    @settings(max_examples=40, **SETTINGS)
    @given(st.one_of(ANY_JSON.filter(lambda v: not isinstance(v, dict) and v),
                     st.dictionaries(st.text(min_size=1, max_size=3), ANY_JSON, min_size=1)
                     .filter(lambda d: not all(k.isascii() and k.isdigit() and isinstance(v, dict)
                                               and isinstance(v.get("content"), str)
                                               and v["content"] for k, v in d.items()))))
    def check_decoder(decoder):
        config.write_text(json.dumps({"added_tokens_decoder": decoder}))
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(case)
        assert str(config) in str(e.value), str(e.value)

    check_decoder()


# --------------------------------------------------------------------------------------------------
# Corpora

ESCAPED_NUL = "a\x00b"          # a NUL in a .jsonl document, written as JSON's \u0000: text
LINE_BREAKERS = "\u2028\u2029\x85\x0b\x0c\x1c\r"        # line ends to str.splitlines, not to JSON
TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(LINE_BREAKERS + "\n "),
               max_size=60)


def jsonl_lines():
    """One line of a .jsonl corpus file, as bytes: a document, an empty one, or a line the reader
    must skip and count (not JSON, not an object, no text field, text not a string, not UTF-8,
    arrays nested 10,000 deep)."""
    return st.one_of(
        TEXT.map(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode()),
        ANY_JSON.map(lambda v: json.dumps(v).encode()),
        ANY_JSON.map(lambda v: json.dumps({"text": v}).encode()),
        st.binary(max_size=30).filter(lambda b: b"\n" not in b),
        st.just(b"[" * 10000), st.just(json.dumps({"text": ESCAPED_NUL}).encode()),
        st.just(b""),
    )


def corpus_files():
    """A corpus folder, {name: bytes}: .jsonl files of jsonl_lines, and .txt files of text
    (stray invalid bytes, NUL bytes, line ends of every kind), binary, empty or long."""
    txt = st.one_of(TEXT.map(str.encode), st.binary(max_size=300),
                    st.text("ab \n", min_size=1).map(lambda t: t.encode("utf-16-le")),  # UTF-16
                    st.binary(min_size=20, max_size=300).map(                        # binary
                        lambda b: bytes(x | 0x80 for x in b)),
                    st.tuples(TEXT, st.binary(max_size=2), TEXT).map(
                        lambda a: a[0].encode() + a[1] + a[2].encode()),
                    st.integers(10**5, 10**6).map(lambda n: b"word " * (n // 5)))
    jsonl = st.lists(jsonl_lines(), max_size=8).map(b"\n".join)
    file = st.from_regex(r"[a-c]{1,2}\.(txt|jsonl)", fullmatch=True).flatmap(
        lambda n: st.tuples(st.just(n), txt if n.endswith("txt") else jsonl))
    return st.lists(file, min_size=1, max_size=4, unique_by=lambda f: f[0]).map(dict)


def not_text(blob: bytes) -> bool:
    """The corpus reader's rule, written again: UTF-16 (a byte-order mark, or NULs in more than
    1% of the bytes and more than 8), or more than 1% and 8 invalid UTF-8 sequences."""
    nuls = blob.count(0)
    if blob[:2] in (b"\xff\xfe", b"\xfe\xff") or nuls > max(8, 0.01 * len(blob)):
        return True
    try:
        blob.decode("utf-8")
        return False
    except UnicodeDecodeError:
        text = blob.decode("utf-8", errors="replace")
        return text.count("\ufffd") > max(8, 0.01 * len(text))


def test_a_stray_nul_in_a_text_file_is_read_and_utf16_is_named(tmp_path):
    """Scraped or PDF-extracted text holds stray NULs: one does not stop the corpus; a UTF-16 file
    (NULs between its ASCII letters) is named. Catches any NUL refusing the file."""
    (tmp_path / "a.txt").write_bytes(b"text with a stray NUL\x00 here\n")
    (tmp_path / "b.txt").write_bytes(b"plain\n")
    assert len(list(read_corpus(tmp_path, stats=CorpusStats()))) == 2
    (tmp_path / "c.txt").write_bytes("some text in UTF-16, without a mark".encode("utf-16-le"))
    with pytest.raises(CorpusError, match="c.txt: not UTF-8 text"):
        list(read_corpus(tmp_path, stats=CorpusStats()))


def test_generated_corpora_are_read_and_counted_or_named(tmp_path):
    """Idea: a corpus folder of any .txt and .jsonl files is either read, each document yielded
    once as non-blank text and every unit counted once in the stats (a .txt file is one document,
    a non-blank .jsonl line one document, empty or unreadable), or refused with one CorpusError
    naming a .txt file that is UTF-16 or binary (`not_text`). Catches: a RecursionError
    from a line of arrays nested 10,000 deep; a UTF-16 file (NUL bytes, valid UTF-8) read as
    text; a folder named a.txt read as a file."""
    case = tmp_path / "corpus"

    @settings(max_examples=200, **SETTINGS)
    @given(corpus_files(), st.booleans())
    def check(files, folder_named_txt):
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        for name, blob in files.items():
            (case / name).write_bytes(blob)
        if folder_named_txt:
            (case / "z.txt").mkdir()
        stats = CorpusStats()
        try:
            docs = list(read_corpus(case, stats=stats))
        except CorpusError as e:
            named = [name for name, blob in files.items() if str(case / name) in str(e)]
            assert named and named[0].endswith(".txt"), str(e)
            assert not_text(files[named[0]]), f"{named[0]} is text: {files[named[0]]!r}"
            return
        units = sum(1 if name.endswith(".txt") else
                    sum(1 for line in blob.split(b"\n") if line.strip())
                    for name, blob in files.items())
        assert all(isinstance(d, str) and d.strip() for d in docs)
        assert stats["documents"] == len(docs)
        assert stats["documents"] + stats["empty"] + stats["bad_lines"] == units, dict(stats)

    check()


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory, bpe_folder, sentencepiece_blob):
    """A tiny fusion world: a Llama target with the sentencepiece tokenizer, an MPT source with
    the byte-level BPE, a corpus of 6 documents and its data folder (windows of 48 tokens, 2 a
    shard; dists with top-3; the source aligned), all written by the project's own code."""
    root = tmp_path_factory.mktemp("world")
    fusellm.save_model(llama(400, 0), root / "target")
    (root / "target" / "tokenizer.model").write_bytes(sentencepiece_blob)
    fusellm.save_model(mpt(300, 1), root / "source")
    shutil.copy(bpe_folder / "tokenizer.json", root / "source")
    (root / "corpus").mkdir()
    docs = [MIXED_TEXT[i * 70:(i + 1) * 70] for i in range(6)]
    (root / "corpus" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                        for d in docs))
    out = root / "data"
    data.build_windows(root / "corpus", root / "target", [root / "source"], out, seq_len=48,
                       shard_windows=2, quiet=True)
    for name in ("target", "source"):
        data.compute_dists(out, root / name, name, topk=3, batch_size=4, quiet=True)
    data.align_source(out, "source", quiet=True)
    (root / "other").mkdir()                        # another corpus: its windows and manifest
    (root / "other" / "docs.jsonl").write_text(json.dumps({"text": MIXED_TEXT[:150]}) + "\n")
    data.build_windows(root / "other", root / "target", [root / "source"], root / "other_data",
                       seq_len=48, shard_windows=2, quiet=True)
    return root


def test_generated_corpora_come_back_from_their_windows(tiny_world, tmp_path):
    """Idea: any corpus of .jsonl documents (text with every kind of line end: U+2028, U+2029,
    NEL, vertical tab, form feed, \\r) is cut into windows by data.build_windows and read back by
    storage.read_windows with the same text (whitespace aside: blank windows are dropped), or
    refused with one DataError naming the corpus. Catches: read_windows splitting the shard's
    lines with str.splitlines, which also ends a line at U+2028 or NEL, which JSON leaves
    unescaped, so that any corpus holding one could not be read back."""
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "d"
    models = [tiny_world / "target", tiny_world / "source"]

    @settings(max_examples=25, **SETTINGS)
    @given(st.lists(st.text(st.sampled_from("ab \n.é😀" + LINE_BREAKERS), max_size=80),
                    min_size=1, max_size=5))
    def check(docs):
        shutil.rmtree(out, ignore_errors=True)
        corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n"
                                  for d in docs))
        try:
            m = data.build_windows(corpus, models[0], models[1:], out, seq_len=48,
                                   shard_windows=2, quiet=True)
        except data.DataError as e:
            assert str(corpus) in str(e) and not "".join(docs).strip(), str(e)
            return
        back = [w["text"] for s in range(m["shards"]) for w in storage.read_windows(out, s)]
        assert re.sub(r"\s", "", "".join(back)) == re.sub(r"\s", "", "".join(docs))

    check()


# --------------------------------------------------------------------------------------------------
# Data folders

def bad_data_folders(world: Path):
    """Strategies for ways to damage a data folder: (a function that damages a copy of it, what
    the error may name to pass: the damaged file, or for files that disagree, the shard)."""
    out = world / "data"
    shards = sorted(str(p.relative_to(out)) for p in out.rglob("shard-*.*"))
    npz = [s for s in shards if s.endswith(".npz")]
    groups = {}
    for s in shards:
        groups.setdefault(str(Path(s).parent), []).append(s)

    def cut(rel, at):
        def damage(d):
            blob = (d / rel).read_bytes()
            (d / rel).write_bytes(blob[:at % (len(blob) - 1)])   # the last byte: only a "\n"
        return damage, [rel]

    def swap(a, b):
        def damage(d):
            x, y = (d / a).read_bytes(), (d / b).read_bytes()
            (d / a).write_bytes(y)
            (d / b).write_bytes(x)
        numbers = [int(re.search(r"(\d+)\.", n)[1]) for n in (a, b)]
        return damage, [f"shard-{k:05d}" for k in numbers] + [f"shard {k}" for k in numbers]

    def remove(rel):                    # (a windows shard: the manifest names too many)
        return (lambda d: (d / rel).unlink()), [rel, "windows/ holds"]

    def rewrite_npz(rel, key, change):              # one array of a shard changed
        def damage(d):
            arrays = dict(np.load(d / rel))
            arrays[key] = change(arrays[key])
            storage.save_npz(d / rel, **arrays)
        return damage, [rel]

    def checksum(rel, w):
        damage, _ = rewrite_npz(rel, "checksum", lambda c: np.where(np.arange(len(c)) == w % len(c),
                                                                    c ^ 1, c))
        return damage, ["tokens differ"]

    def json_file(rel, content):
        return (lambda d: (d / rel).write_text(json.dumps(content))), [rel]

    manifest = json.loads((out / "manifest.json").read_text())
    counts = ("windows", "shards", "shard_windows", "seq_len", "target_tokenizer")
    pairs = [(a, b) for g in groups.values() for a, b in itertools.combinations(g, 2)
             if (out / a).read_bytes() != (out / b).read_bytes()]
    return st.one_of(
        st.tuples(st.sampled_from(shards), st.integers(0, 2**20)).map(lambda a: cut(*a)),
        st.sampled_from(pairs).map(lambda p: swap(*p)),
        st.sampled_from(shards).map(remove),
        st.tuples(st.sampled_from([s for s in npz if s.startswith("models/target")]),
                  st.integers(0, 100)).map(lambda a: checksum(*a)),
        st.tuples(st.sampled_from(npz), st.sampled_from(["offsets", "ce", "target_offsets",
                                                          "ids", "counts", "topk_ids"]))
        .filter(lambda a: a[1] in np.load(out / a[0]).files and (   # of a source's own, only
            not a[0].startswith("models/source") or a[1] in ("offsets", "ce")))     # these read
        .map(lambda a: rewrite_npz(*a, lambda v: v[:-1])),                           # short
        st.just(((lambda d: shutil.copy(world / "other_data" / "manifest.json", d)),  # another
                 ["manifest.json", "windows"])),                                     # corpus
        st.tuples(st.sampled_from(counts), WRONG_INT | st.none()).filter(            # manifest
            lambda a: a[0] != "target_tokenizer" or not isinstance(a[1], str))
        .map(lambda a: json_file("manifest.json", {**manifest, a[0]: a[1]})),
        ANY_JSON.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: json_file("manifest.json", v)),
        st.tuples(st.sampled_from(["models/target/info.json", "models/source/info.json"]),
                  ANY_JSON.filter(lambda v: not isinstance(v, dict) or "model" not in v))
        .map(lambda a: json_file(*a)),
    )


def test_damaged_data_folders_end_in_one_clear_error(tiny_world, tmp_path):
    """Idea: a data folder with a shard cut anywhere, missing, swapped with another of its kind,
    an array of it a row short, a token checksum changed, the manifest of another corpus, or a
    manifest.json or info.json of the wrong shape, is refused by data.FusionData (read whole, with
    the target's tokenizer) with one DataError naming the file (for a swap or a checksum: the
    shard), never a zipfile, zlib, numpy, JSON or index error. Catches: np.load's errors
    escaping; a missing shard as FileNotFoundError; aligned rows read against another shard's
    target tokens without notice; a manifest whose counts do not fit the shards read as
    IndexError later in training."""
    tok = load_tokenizer(tiny_world / "target")
    case = tmp_path / "d"

    @settings(max_examples=120, **SETTINGS)
    @given(bad_data_folders(tiny_world))
    def check(bad):
        damage, named = bad
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(tiny_world / "data", case)
        damage(case)
        with pytest.raises(data.DataError) as e:
            fd = data.FusionData(case, tokenizer=tok)
            for s in range(fd.manifest["shards"]):
                fd.shard(s)
        assert type(e.value) is data.DataError
        assert any(n in str(e.value) for n in named), (named, str(e.value))

    fd = data.FusionData(tiny_world / "data", tokenizer=tok)              # the start is valid
    assert [len(fd.shard(s)) for s in range(fd.manifest["shards"])] == \
        data.shard_sizes(fd.manifest)
    check()


def test_damaged_data_folder_through_the_cli(tiny_world, tmp_path):
    """Idea: `python data.py dists` on a data folder whose manifest.json was cut short prints one
    `error:` line naming it, no traceback."""
    shutil.copytree(tiny_world / "data", tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text('{"complete": true, "windo')
    said = cli(ROOT / "data.py", "dists", "--data", tmp_path / "d", "--model",
               tiny_world / "target", "--name", "target")
    assert "manifest.json" in said[0]


# --------------------------------------------------------------------------------------------------
# Eval task files

MC_ROWS = [{"context": "The sky is", "choices": ["blue", "green"], "label": 0},
           {"context": "Two and two make", "choices": ["three", "four", "five"], "label": 1}]
GEN_ROWS = [{"input": "2 + 2 =", "target": "4"}, {"input": "Capital of France?", "target": "Paris"}]


def bad_task_rows(rows: list[dict]):
    """Strategies for a task file's lines made wrong: one row's field of the wrong type or
    missing, a row that is not an object, a label that is no index into its choices, a choice
    that is not text."""
    fields = sorted(rows[0])
    kinds = {k: type(v) for k, v in rows[0].items()}

    def set_(n, key, value):
        return [dict(r, **{key: value}) if i == n else r for i, r in enumerate(rows)]

    n = st.integers(0, len(rows) - 1)
    wrong = st.tuples(n, st.sampled_from(fields)).flatmap(lambda a: ANY_JSON.filter(
        lambda v: not isinstance(v, kinds[a[1]]) or (kinds[a[1]] is int and type(v) is bool))
        .map(lambda v: set_(*a, v)))
    out = [wrong,
           st.tuples(n, st.sampled_from(fields)).map(
               lambda a: [{k: v for k, v in r.items() if k != a[1] or i != a[0]}
                          for i, r in enumerate(rows)]),
           st.tuples(n, ANY_JSON.filter(lambda v: not isinstance(v, dict))).map(
               lambda a: [a[1] if i == a[0] else r for i, r in enumerate(rows)])]
    if "label" in fields:
        out += [st.tuples(n, st.integers(-5, 5)).filter(
                    lambda a: not 0 <= a[1] < len(rows[a[0]]["choices"]))
                .map(lambda a: set_(a[0], "label", a[1])),
                st.tuples(n, ANY_JSON.filter(lambda v: not isinstance(v, str))).map(
                    lambda a: set_(a[0], "choices", [a[1], *rows[a[0]]["choices"][1:]]))]
    return st.one_of(*out)


def task_file(rows, bigbench: bool) -> bytes:
    """A task file holding `rows`: JSONL, or a BIG-bench task.json."""
    if not bigbench:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    examples = [{"input": r["context"], "target_scores": {c: float(i == r["label"])
                                                          for i, c in enumerate(r["choices"])}}
                if "choices" in r else {"input": r["input"], "target": [r["target"]]}
                for r in rows]
    return json.dumps({"examples": examples}).encode()


def test_bad_task_files_end_in_one_clear_error(tmp_path):
    """Idea: a multiple-choice or generation task file (JSONL, or BIG-bench task.json) with a
    row of the wrong shape (a field of the wrong type or missing, a row that is not an object, a
    label out of range, a choice that is not text), cut short, or not UTF-8, is refused by
    read_mc / read_gen with one BenchmarkError naming the file; a JSONL file cut at a line end is
    a shorter task, read whole. Catches: TypeError from a row that is a number, UnicodeDecodeError,
    KeyError or IndexError from a task.json example, a choice that is a number passing the
    reader to fail mid-evaluation."""
    readers = {"mc": (read_mc, MC_ROWS), "gen": (read_gen, GEN_ROWS)}

    def bigbench_example(kind):          # task.json examples of the wrong shape
        field = "target_scores" if kind == "mc" else "target"
        return st.one_of(
            ANY_JSON.filter(lambda v: not isinstance(v, dict)),
            st.fixed_dictionaries({"input": ANY_JSON.filter(lambda v: not isinstance(v, str)),
                                   field: st.just({"a": 1.0} if kind == "mc" else "a")}),
            st.fixed_dictionaries({"input": st.just("q"), field: ANY_JSON.filter(
                lambda v: v and not (isinstance(v, str) or isinstance(v, list) and v
                                     and isinstance(v[0], str)) if kind == "gen" else
                not (isinstance(v, dict) and v and all(isinstance(x, (int, float))
                                                       for x in v.values())))}))

    def cases(kind):
        read, rows = readers[kind]
        good = task_file(rows, False)
        return st.one_of(
            bad_task_rows(rows).map(lambda r: (kind, "t.jsonl", task_file(r, False))),
            st.integers(0, len(good) - 1).map(lambda c: (kind, "t.jsonl", good[:c])),
            st.integers(0, len(good) - 1).map(lambda c: (kind, "t.jsonl",
                                                         good[:c] + b"\xff" + good[c:])),
            st.integers(0, 40).map(lambda c: (kind, "task.json",
                                              task_file(rows, True)[:c])),
            bigbench_example(kind).map(lambda ex: (kind, "task.json",
                                                   json.dumps({"examples": [ex]}).encode())))

    @settings(max_examples=200, **SETTINGS)
    @given(cases("mc") | cases("gen"))
    def check(case):
        kind, name, bad = case
        read, rows = readers[kind]
        target = tmp_path / name
        target.write_bytes(bad)
        try:
            got = read(target)
        except BenchmarkError as e:
            assert type(e) is BenchmarkError and str(target) in str(e), str(e)
            return
        full = task_file(rows, False)
        assert name == "t.jsonl" and full.startswith(bad), bad
        assert got == rows[:len(got)]

    check()


def test_bad_task_file_through_the_cli_before_any_model_loads(tmp_path):
    """Idea: `python eval.py` with a task file whose second row is a number prints one `error:`
    line naming it, and does so before loading a model (the model folder given does not exist).
    Catches: task files read only after the models they are scored with have loaded."""
    task = tmp_path / "t.jsonl"
    task.write_bytes(task_file(MC_ROWS[:1], False) + b"3\n")
    said = cli(ROOT / "eval.py", "--models", tmp_path / "no-model", "--mc", task)
    assert str(task) in said[0] and ":2:" in said[0]


@pytest.mark.parametrize("flag", ["--lm", "--humaneval", "--bbh"])
def test_every_kind_of_task_file_is_read_before_any_model_loads(tmp_path, flag):
    """The same for a held-out text with nothing to score, a HumanEval file whose row lacks its
    tests, and a BIG-bench file that is not JSON: one `error:` line naming the file, and the model
    folder (which does not exist) never reached. Catches --lm, --humaneval or --bbh read only
    after a model has loaded and other tasks were scored."""
    bad = {"--lm": ("held-out.txt", b"   \n"),
           "--humaneval": ("problems.jsonl", b'{"task_id": "t/0", "prompt": "def f():"}\n'),
           "--bbh": ("task.json", b"{not json")}[flag]
    task = tmp_path / bad[0]
    task.write_bytes(bad[1])
    said = cli(ROOT / "eval.py", "--models", tmp_path / "no-model", flag, task)
    assert str(task) in said[0] and "no-model" not in said[0], said


def refused_naming(folder: Path, file: Path):
    """load_tokenizer(folder) ends in a TokenizerError, no subclass or other error, naming file."""
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(folder)
    assert type(e.value) is TokenizerError
    assert str(file) in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------------
# Every JSON reader: arrays nested deeper than Python's recursion limit

def test_json_nested_too_deep_is_named_by_every_reader(tiny_world, tmp_path):
    """Idea: a JSON file of arrays nested 100,000 deep (json.loads raises RecursionError, not a
    ValueError) is named by each reader with its own error: config.json and a safetensors header
    (CheckpointError), tokenizer.json (TokenizerError), manifest.json (DataError), a task file
    (BenchmarkError); as a corpus line it is counted as unreadable. Catches: the RecursionError
    escaping every reader that caught only json.JSONDecodeError."""
    deep = b"[" * 100_000
    model = tmp_path / "model"
    shutil.copytree(tiny_world / "target", model)
    (model / "config.json").write_bytes(deep)
    with pytest.raises(CheckpointError, match="config.json"):
        fusellm.load_model(model)
    shutil.copy(tiny_world / "target" / "config.json", model)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        fusellm.load_model(model)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(deep)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tok")
    shutil.copytree(tiny_world / "data", tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_bytes(deep)
    with pytest.raises(data.DataError, match="manifest.json"):
        data.FusionData(tmp_path / "d")
    for name, read in (("t.jsonl", read_mc), ("task.json", read_gen)):
        (tmp_path / name).write_bytes(deep)
        with pytest.raises(BenchmarkError, match=name):
            read(tmp_path / name)
    (tmp_path / "c.jsonl").write_bytes(deep + b'\n{"text": "kept"}\n')
    stats = CorpusStats()
    assert list(read_corpus(tmp_path / "c.jsonl", stats=stats)) == ["kept"]
    assert stats["bad_lines"] == 1
