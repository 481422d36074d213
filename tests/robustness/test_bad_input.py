"""Bad checkpoints and tokenizer files get one clear error that names the file and the fix."""
import json

import pytest
import torch

import fusellm
from conftest import llama, randomize_
from extras.checkpoint_files import read_safetensors, write_safetensors
from fusellm import CheckpointError
from tokenizer import TokenizerError, load_tokenizer
from extras.cached_generation import KVCache

ARGS = fusellm.ModelArgs(vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8,
                         hidden_dim=24, sliding_layers=(False, False))


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model"
    fusellm.save_model(randomize_(fusellm.Transformer(ARGS)), path)
    return path


def test_folder_without_config_json(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        fusellm.load_model(ckpt)


def test_unknown_model_type_lists_the_supported_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    says = (r"'gpt2' is not supported; nanofuse loads llama, mistral, qwen2, qwen3, phi3, olmo2, "
            r"gemma2, gemma3_text, mpt")
    with pytest.raises(CheckpointError, match=says):
        fusellm.load_model(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    says = r"model\.safetensors: tensor .* truncated or corrupt; re-download"
    with pytest.raises(CheckpointError, match=says):
        fusellm.load_model(ckpt)


def test_file_shorter_than_its_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header claims \d+ bytes"):
        fusellm.load_model(ckpt)


def test_corrupt_safetensors_header(ckpt):
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe!!garb"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        fusellm.load_model(ckpt)


def test_missing_shard_is_named(tmp_path):
    fusellm.save_model(randomize_(fusellm.Transformer(ARGS)), tmp_path / "m", max_shard_bytes=4000)
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists shard\\(s\\) {shard.name} that are not in"):
        fusellm.load_model(tmp_path / "m")


def test_shape_mismatch_names_the_tensor_and_both_shapes(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=32)))
    says = (r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[24, 16\], "
            r"config\.json implies \[32, 16\]")
    with pytest.raises(CheckpointError, match=says):
        fusellm.load_model(ckpt)


def test_missing_and_unexpected_tensors_are_named(ckpt):
    st = {k: v.clone() for k, v in read_safetensors(ckpt / "model.safetensors").items()}
    st.pop("model.norm.weight")
    st["model.layers.7.mlp.extra.weight"] = torch.zeros(2)
    write_safetensors(st, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        fusellm.load_model(ckpt)
    assert "missing tensor model.norm.weight" in str(e.value)
    assert "unexpected tensor model.layers.7.mlp.extra.weight" in str(e.value)


def test_a_file_that_is_not_gguf_is_named_as_a_checkpoint_error(tmp_path):
    """A .gguf path is read by extras/gguf.py, whose FormatError reaches the caller as
    CheckpointError (a TokenizerError when the tokenizer is read from it)."""
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a GGUF file"):
        fusellm.load_model(tmp_path / "m.gguf")
    with pytest.raises(TokenizerError, match=r"m\.gguf: not a GGUF file"):
        load_tokenizer(tmp_path / "m.gguf")


def test_folder_without_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found; expected model.safetensors"):
        fusellm.load_model(ckpt)


def test_tokenizer_file_of_unknown_kind(tmp_path):
    (tmp_path / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(TokenizerError, match=r"vocab\.txt: unknown tokenizer file kind"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_tokenizer_json_that_cannot_run_exactly(tmp_path):
    spec = {"model": {"type": "WordPiece", "vocab": {}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: model type 'WordPiece' is not BPE"):
        load_tokenizer(tmp_path)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_broken_sentencepiece_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 this is not a protobuf \xff" * 10)
    with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a sentencepiece model"):
        load_tokenizer(tmp_path)


def test_tokenizer_larger_than_the_embedding(ckpt):
    """The 50-row model gets a byte-level tokenizer of 256+ tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(ckpt / "tokenizer.json"))
    says = "the tokenizer has 256 tokens but the model's embedding has only 50 rows"
    with pytest.raises(CheckpointError, match=says):
        fusellm.load(ckpt)


def test_smaller_tokenizer_than_embedding_is_fine(ckpt):
    """MPT has 50432 embedding rows for about 50277 tokens; downstream code uses the first
    vocab_size logits."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    cfg = json.loads((ckpt / "config.json").read_text())
    big = fusellm.ModelArgs.from_hf(dict(cfg, vocab_size=300))
    fusellm.save_model(randomize_(fusellm.Transformer(big)), ckpt)
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(ckpt / "tokenizer.json"))
    model, t = fusellm.load(ckpt)
    assert (t.vocab_size, model.args.vocab_size) == (256, 300)


def test_a_full_cache_is_a_clear_error():
    model = llama(50, 0).eval()
    cache = KVCache(model.args, 1, 4, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="holds 4 positions; 5 were asked for"):
            model(torch.tensor([[4, 5]]), cache=cache)


def test_command_line_reports_one_line_not_a_traceback(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = subprocess.run([sys.executable, str(ROOT / "fusellm.py"), str(tmp_path / "nope"), "hi"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    expected = (f"error: {tmp_path / 'nope'}: not a folder; point to a Hugging Face model folder "
                f"holding config.json")
    assert out.stderr.strip().splitlines() == [expected]
