"""Bad files, generated: a safetensors file or a config.json corrupted in ways hypothesis picks ends
in one CheckpointError that names the file and what is wrong, never in another exception."""
import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusellm
from conftest import randomize_
from fusellm import CheckpointError

ARGS = fusellm.ModelArgs(vocab_size=12, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                         hidden_dim=8, sliding_layers=(False,))
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny Llama folder written by the project's own writer: (folder, config, file bytes)."""
    path = tmp_path_factory.mktemp("good") / "model"
    fusellm.save_model(randomize_(fusellm.Transformer(ARGS)), path)
    fusellm.load_model(path)                                        # the start is valid
    return path, json.loads((path / "config.json").read_text()), \
        (path / "model.safetensors").read_bytes()


def split(blob: bytes):
    """A safetensors file -> (header dict, tensor bytes)."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header, data: bytes, n=None) -> bytes:
    """(header, data) -> a safetensors file; `n` overrides the header length written."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def corruptions(blob: bytes):
    """Strategies for bad files made from the good one, each a different way to be wrong."""
    header, data = split(blob)
    names = sorted(k for k in header if k != "__metadata__")
    name = st.sampled_from(names)
    hlen = len(blob) - len(data) - 8

    def with_entry(k, field, value):
        h = json.loads(json.dumps(header))
        h[k][field] = value
        return join(h, data)

    def offsets(k, pair):
        return with_entry(k, "data_offsets", list(pair))

    def overlap(k, j, shift):          # entry k's range moved onto entry j's, same length
        b, e = header[k]["data_offsets"]
        jb = header[j]["data_offsets"][0] + shift
        return offsets(k, (jb, jb + e - b))

    def shape_off(k, dims):           # a shape whose element count is not the byte length's
        b, e = header[k]["data_offsets"]
        want = (e - b) // 4
        return None if math.prod(dims) == want and min(dims, default=1) >= 0 else \
            with_entry(k, "shape", dims)

    big = st.integers(min_value=-2**70, max_value=2**70)
    return st.one_of(
        st.integers(0, len(blob) - 1).map(lambda cut: blob[:cut]),                  # truncated
        st.integers(hlen + 1, 2**64 - 1).map(lambda n: join(header, data, n)),      # too big
        st.integers(0, hlen - 1).map(lambda n: join(header, data, n)),              # too small
        st.sampled_from([b"[]", b"null", b"3", b'"x"', b"true", b"[{}]"]).map(      # not an object
            lambda text: join(text, data)),
        st.tuples(name, st.tuples(big, big)).map(lambda a: offsets(*a)),            # out of range
        st.tuples(name, name, st.integers(0, 3)).filter(lambda a: a[0] != a[1] or a[2])
        .map(lambda a: overlap(*a)),                                                # overlapping
        st.tuples(name, st.sampled_from(["F31", "float32", "", "f32", "Q4_K", "BF8"]))
        .map(lambda a: with_entry(a[0], "dtype", a[1])),                            # no such dtype
        st.tuples(name, st.one_of(st.none(), st.integers(), st.text(max_size=3),
                                  st.lists(st.text(max_size=2), max_size=3),
                                  st.just(float("inf")), st.just(float("nan"))))
        .map(lambda a: with_entry(a[0], "data_offsets", a[1])),                     # wrong types
        st.tuples(name, st.lists(st.one_of(st.integers(-40, 40), st.just(float("inf"))),
                                 max_size=3))
        .map(lambda a: with_entry(a[0], "shape", a[1]) if float("inf") in a[1]
             else shape_off(*a)).filter(lambda b: b is not None),                  # wrong shape
        name.map(lambda k: with_entry(k, "shape", [-d for d in header[k]["shape"]])),  # negated
    )


def test_corrupt_safetensors_end_in_one_clear_error(good, tmp_path):
    """Idea: every corruption of a valid safetensors file (lying header length, a header that is
    not an object, offsets out of range, overlapping or reversed, unknown dtypes, shapes that do
    not fit their bytes, truncation anywhere) is refused by load_model with one CheckpointError
    naming the file. Catches: a reader that lets struct/json/torch errors escape, or loads a file
    whose tensors share or overrun their bytes."""
    folder, _, blob = good
    case = tmp_path / "model"
    shutil.copytree(folder, case, dirs_exist_ok=True)
    target = case / "model.safetensors"

    @settings(max_examples=200, **SETTINGS)
    @given(corruptions(blob))
    def check(bad):
        target.write_bytes(bad)
        with pytest.raises(CheckpointError) as e:
            fusellm.load_model(case)
        assert type(e.value) is CheckpointError
        assert str(target) in str(e.value)

    check()


def test_corrupt_safetensors_through_the_cli(good, tmp_path):
    """Idea: a user running the CLI on a corrupt checkpoint sees one `error:` line, no traceback.
    Catches: the CheckpointError escaping fusellm.py's main as a traceback."""
    folder, _, blob = good
    case = tmp_path / "model"
    shutil.copytree(folder, case)
    header, data = split(blob)
    header["model.embed_tokens.weight"]["data_offsets"] = [0, 10**9]
    (case / "model.safetensors").write_bytes(join(header, data))
    out = subprocess.run([sys.executable, str(ROOT / "fusellm.py"), str(case), "hi"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    said = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode != 0
    assert len(said) == 1 and said[0].startswith("error:"), said
    assert "Traceback" not in out.stderr and "model.safetensors" in said[0]


SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "intermediate_size", "head_dim", "max_position_embeddings")
OPTIONAL = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null: the default
WRONG = st.one_of(st.text(max_size=4), st.lists(st.integers(1, 4), max_size=2),
                  st.floats(allow_nan=True), st.booleans(), st.integers(-5, 0),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


def bad_configs(cfg):
    """Strategies for config.json dicts made wrong from a valid one: (dict, the key the error
    names)."""
    def set_(key, value):
        return dict(cfg, **{key: value}), key

    def drop(key):
        return {k: v for k, v in cfg.items() if k != key}, key

    required = [k for k in SIZES if k not in OPTIONAL]
    return st.one_of(
        st.tuples(st.sampled_from(SIZES), WRONG).map(lambda a: set_(*a)),           # wrong types
        st.tuples(st.sampled_from(required), st.none()).map(lambda a: set_(*a)),    # null
        st.sampled_from(required).map(drop),                                        # missing
        st.tuples(st.integers(2, 64), st.integers(1, 16)).filter(lambda a: a[0] % a[1])
        .map(lambda a: (dict(cfg, hidden_size=a[0], num_attention_heads=a[1],
                             num_key_value_heads=1, head_dim=None), "hidden_size")),
        st.tuples(st.integers(1, 16), st.integers(1, 16)).filter(lambda a: a[0] % a[1])
        .map(lambda a: (dict(cfg, hidden_size=16 * a[0], num_attention_heads=a[0],
                             num_key_value_heads=a[1]), "num_key_value_heads")),
        st.sampled_from([[], None, 3, "llama", [cfg]]).map(lambda c: (c, "JSON object")),
    )


def test_bad_config_json_is_refused_before_any_weight_is_read(good, tmp_path, monkeypatch):
    """Idea: a config.json with a size of the wrong type (string, list, null, float, bool), zero or
    negative, heads that do not divide the width, key/value heads that do not divide the heads, a
    required key missing, or no object at all, is refused with one CheckpointError naming
    config.json and the key, before any tensor is read (the weights file is absent, and the reader
    is replaced by one that fails the test). Catches: a config whose nonsense surfaces later as a
    TypeError, ZeroDivisionError or torch error, or as a confusing message about the weights."""
    folder, cfg, _ = good
    case = tmp_path / "model"
    case.mkdir()
    from extras import checkpoint_files

    def no_reading(*a, **k):
        raise AssertionError("weights read for a bad config.json")

    monkeypatch.setattr(checkpoint_files, "read_checkpoint_tensors", no_reading)

    @settings(max_examples=200, **SETTINGS)
    @given(bad_configs(cfg))
    def check(bad):
        config, key = bad
        (case / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError) as e:
            fusellm.load_model(case)
        assert type(e.value) is CheckpointError
        assert str(case / "config.json") in str(e.value) and key in str(e.value), str(e.value)

    check()
