"""Training against other implementations: the exported model gives transformers' logits, and the
online candidates (extras/online.py: the models run inside the loop) equal the stored ones data.py
wrote."""

import json
import shutil

import numpy as np
import pytest
import torch

import align
import fusellm
import train
from extras.online import OnlineCandidates
from extras.stored_candidates import StoredCandidates
from tokenizer import load_tokenizer


def test_exported_model_loads_here_and_in_transformers(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"),
                              "--out", str(tmp_path / "a"), "--batch-size", "4", "--max-steps",
                              "2"])
    train.train(cfg)
    model, tok = fusellm.load(tmp_path / "a" / "final")
    assert tok.vocab_size == load_tokenizer(world / "target").vocab_size
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").eval()
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() < 1e-4
    trained = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    assert torch.equal(model.tok_embeddings.weight, trained["tok_embeddings.weight"])


def test_online_candidates_equal_the_stored_ones(world):
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"),
                              "--online", "--sources", str(world / "source"), "--topk", "5"])
    tok = load_tokenizer(world / "target")
    online = OnlineCandidates(cfg, tok, "cpu").items([(0, 0), (1, 2)])
    stored = StoredCandidates(cfg, tok).items([(0, 0), (1, 2)])
    for a, b in zip(online, stored):
        assert a["tokens"] == b["tokens"]
        assert (a["target"]["topk_ids"] == b["target"]["topk_ids"]).all()
        sa, sb = a["sources"]["source"], b["sources"]["source"]
        assert (np.asarray(sa["counts"]) == sb["counts"]).all() and (sa["ids"] == sb["ids"]).all()
        # stored log-probs are rounded twice, each time by at most half a step of 1/16 nat: the
        # source's top-K when data.py stores it, then the carried distribution, where ids the vocab
        # map sends to one target id have been summed (a sum of values each off by a factor
        # e^(+-1/32) is off by at most that factor)
        assert np.abs(sa["logprobs"] - sb["logprobs"]).max() <= 2 / 32 + 1e-5
        # each model's CE per byte (the weights of fusions that pick by it), with its own BOS: the
        # target's sentencepiece has one, the source's BPE none
        for x, y in ((a["target"], b["target"]), (sa, sb)):
            assert (x["ce"], x["ce_per_byte"]) == pytest.approx((y["ce"], y["ce_per_byte"]),
                                                                rel=1e-4)


def test_online_candidates_align_with_the_settings_the_folder_was_aligned_with(world, tmp_path):
    """--online on a folder whose source was aligned with the official preset aligns the same way
    (aligned/<name>/settings.json), not with the nanofuse preset. Catches OnlineCandidates
    ignoring the stored settings: its labels would differ from the stored ones it stands in for."""
    shutil.copytree(world / "data", tmp_path / "d")
    official = align.alignment_settings("official")
    (tmp_path / "d" / "aligned" / "source" / "settings.json").write_text(json.dumps(official))
    cfg = train.parse_config(["--data", str(tmp_path / "d"), "--target", str(world / "target"),
                              "--online", "--sources", str(world / "source"), "--topk", "5"])
    online = OnlineCandidates(cfg, load_tokenizer(world / "target"), "cpu")
    assert official != align.alignment_settings("nanofuse")
    assert online.settings["source"] == official
