"""save_model writes a folder that both this project and `transformers` load with the same logits,
atomically."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

import fusellm  # noqa: E402
from extras import checkpoint_files  # noqa: E402
from conftest import randomize_  # noqa: E402

IDS = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(0))


def fresh(args: fusellm.ModelArgs, seed=0):
    return randomize_(fusellm.Transformer(args), seed).eval()


def logits(m):
    with torch.no_grad():
        out = m(IDS)
    return out.logits if hasattr(out, "logits") else out


LLAMA = fusellm.ModelArgs(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                          hidden_dim=48, sliding_layers=(False, False), max_seq_len=64)
MPT = fusellm.ModelArgs(model_type="mpt", vocab_size=61, dim=36, n_layers=2, n_heads=6,
                        n_kv_heads=6, head_dim=6, hidden_dim=144, norm="layer", mlp="gelu",
                        tie_embeddings=True, pos="alibi", norm_eps=1e-5,
                        sliding_layers=(False, False), max_seq_len=64)


@pytest.mark.parametrize("args", [LLAMA, MPT], ids=["llama", "mpt"])
def test_saved_model_loads_in_both_with_identical_logits(tmp_path, args):
    model = fresh(args)
    fusellm.save_model(model, tmp_path / "out")
    ours = fusellm.load_model(tmp_path / "out")
    assert torch.equal(logits(ours), logits(model))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(theirs) - logits(model)).abs().max().item() < 1e-4


def test_large_model_is_sharded_with_an_index(tmp_path):
    model = fresh(LLAMA)
    fusellm.save_model(model, tmp_path / "out", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert torch.equal(logits(fusellm.load_model(tmp_path / "out")), logits(model))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (logits(theirs) - logits(model)).abs().max().item() < 1e-4


def test_round_trip_keeps_the_original_config(tmp_path):
    """A loaded checkpoint saves back its own config.json (every field, not a rebuilt one)."""
    model = fresh(LLAMA)
    fusellm.save_model(model, tmp_path / "a")
    loaded = fusellm.load_model(tmp_path / "a")
    fusellm.save_model(loaded, tmp_path / "b")
    first, again = (tmp_path / "a" / "config.json"), (tmp_path / "b" / "config.json")
    assert first.read_text() == again.read_text()


def test_failed_save_leaves_the_old_folder_untouched(tmp_path, monkeypatch):
    out = tmp_path / "out"
    fusellm.save_model(fresh(LLAMA, seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def crash_on_second_shard(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(tensors, path, metadata)

    real = checkpoint_files.write_safetensors
    monkeypatch.setattr(checkpoint_files, "write_safetensors", crash_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        fusellm.save_model(fresh(LLAMA, seed=2), out, max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["out"], "no temporary folder is left behind"


def test_extra_files_are_copied_in(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    fusellm.save_model(fresh(LLAMA), tmp_path / "out", extra_files=[tmp_path / "tokenizer.json"])
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def test_command_line_prints_the_models_top_k(tmp_path):
    """`python fusellm.py FOLDER TEXT --k 3` lists the three most likely next tokens, most likely
    first."""
    import subprocess
    import sys
    from tokenizers import Tokenizer, models, pre_tokenizers
    from conftest import ROOT
    from tokenizer import load_tokenizer
    import dataclasses
    model = fresh(dataclasses.replace(LLAMA, vocab_size=256))
    fusellm.save_model(model, tmp_path / "m")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(tmp_path / "m" / "tokenizer.json"))
    ids = load_tokenizer(tmp_path / "m").encode(alphabet[3] + alphabet[7])
    command = [sys.executable, str(ROOT / "fusellm.py"), str(tmp_path / "m"),
               alphabet[3] + alphabet[7], "--k", "3", "--device", "cpu"]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    printed = [int(line.split()[1]) for line in out.stdout.strip().splitlines()]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0, -1].topk(3).indices.tolist()
    assert printed == expected


def test_shards_carry_hugging_faces_names_and_the_index_names_them(tmp_path):
    """A sharded save names its N shards as Hugging Face does, numbered from 1:
    model-00001-of-0000N.safetensors ... model-0000N-of-0000N.safetensors (transformers'
    save_pretrained of the same model, sharded here too, is checked to follow the same rule), and
    the index's weight_map sends each weight to the shard that holds it; transformers loads the
    folder with the same logits. Catches shards numbered from 0 (model-00000-of-0000N, ...), which
    transformers would still load through the index but which is not Hugging Face's layout."""
    import json
    from safetensors import safe_open

    def hf_names(n):
        return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    model = fresh(LLAMA)
    out = tmp_path / "out"
    fusellm.save_model(model, out, max_shard_bytes=20_000)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(names) > 2 and names == hf_names(len(names))
    held = {}
    for name in names:
        with safe_open(str(out / name), "pt") as f:
            held.update({k: name for k in f.keys()})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == held
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(theirs) - logits(model)).abs().max().item() < 1e-4
    theirs.save_pretrained(tmp_path / "hf", max_shard_size=20_000)
    their_names = sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert len(their_names) > 2 and their_names == hf_names(len(their_names))
