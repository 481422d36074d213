"""Labels in context: a run of spaces is cut differently by each tokenizer, and where it is cut
depends on what follows it. Hand-worked on two tokenizers built here as the real ones are: a
GPT-NeoX-style byte-level BPE whose runs of spaces are added tokens, matched before
pre-tokenization (GPT-NeoX's ids 50254-50276), and a Llama-2-style sentencepiece BPE that glues one
space to the word after it ("    def" is '▁▁▁' '▁def')."""
import json

import numpy as np
import pytest

import align
import data
from extras import storage
from extras.emitted_tokens import (CONTEXTS, ContextLabels, context_labels, following_text,
                                   vocab_map_next)
from extras.label_quality import oracle_quality
from extras.gguf import sentencepiece_model_bytes
from extras.tokenizer_json import GPT2_PATTERN
from tokenizer import SentencePieceTokenizer, TiktokenBPE

SP = "\u2581"
TEXT = "a\n    def"


@pytest.fixture(scope="module")
def neox():
    """Byte-level BPE: every byte (ids 0-255), the merges 'de' (256) and 'def' (257), and the runs
    of 2, 3 and 4 spaces as added tokens (258, 259, 260), cut out of the text before the BPE."""
    ranks = {bytes([b]): b for b in range(256)} | {b"de": 256, b"def": 257}
    added = {"  ": 258, "   ": 259, "    ": 260}
    return TiktokenBPE("bpe", "neox-like", GPT2_PATTERN, ranks, np.arange(len(ranks)), added,
                       set(), None, None)


@pytest.fixture(scope="module")
def llama2():
    """Sentencepiece BPE with byte fallback: <unk> <s> </s>, the 256 byte pieces (ids 3-258), then
    the pieces below, merged in the order of their scores (highest first): '▁d' before '▁de'
    before '▁def', all three before the runs '▁▁', '▁▁▁', '▁▁▁▁', and 'ed' before 'de'."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    normal = [("▁d", -1), ("▁de", -2), ("▁def", -3), ("▁▁", -4), ("▁▁▁", -5), ("▁▁▁▁", -6),
              ("ed", -6.5), ("de", -7), ("▁", -8), ("a", -9), ("d", -10), ("e", -11), ("f", -12)]
    pieces += [(p.replace("▁", SP), score, 1) for p, score in normal]
    proto = sentencepiece_model_bytes(pieces, bpe=True, byte_fallback=True,
                                      add_dummy_prefix=True, unk_id=0)
    return SentencePieceTokenizer(None, model_proto=proto, bos_id=1, eos_id=2)


def src_ids_of(*texts):
    """NeoX-like ids by their text: bytes are their own ids, then the merges and the runs."""
    table = {"de": 256, "def": 257, "  ": 258, "   ": 259, "    ": 260}
    return [table.get(t, ord(t[0])) for t in texts]


def tgt_ids_of(tok, *texts):
    """Llama-2-like ids of pieces by their text (spaces written as spaces): the regular piece,
    never the byte piece of the same text ('▁', not '<0x20>')."""
    return [tok.pieces.index(t.replace(" ", SP)) for t in texts]


def test_lesson_a_run_of_spaces_is_cut_where_what_follows_decides(neox, llama2):
    """GPT-NeoX writes TEXT as 'a' '\\n' '    ' 'def', Llama-2 as '▁' 'a' '\\n' '▁▁▁' '▁def' (the
    first '▁' its dummy prefix). Both end a token after '\\n', so target position 2 takes source
    position 1, whose next token is '    '. Alone, Llama-2 writes 4 spaces '▁▁▁▁' (the vocab map's
    label); in TEXT its next token is '▁▁▁'. The rule asks the target how it writes the candidate
    followed by the text that really comes next, the source token 'def': '▁▁▁' '▁def', so the
    label is '▁▁▁'. Candidates at that position: '    ' (p 0.5), '  ' (0.2), ' ' (0.2), 'de' (0.1).
    - '  ' + 'def' is '▁' '▁def': '▁', not the map's '▁▁' (spaces again);
    - ' ' + 'def' is '▁def', which runs past ' ' into what follows: it keeps the map's label '▁';
    - 'de' does not end in whitespace: it keeps the map's label, 'de' (text after a word can re-cut
      it: 'de' + 'd' is 'd' 'ed' here, and on real tokenizers such labels are worse);
    so '▁' takes 0.2 + 0.2 (merged) and the carried distribution is '▁▁▁' 0.5, '▁' 0.4, 'de' 0.1.
    Catches: the context rule missing (the label '▁▁▁▁', which the target does not write here), a
    label that runs past the candidate's text (' ' labelled '▁def'), the rule re-cutting words ('de'
    labelled 'd'), or the rule reading the wrong text (the candidate's own, not what follows)."""
    s_ids, t_ids = neox.encode(TEXT), llama2.encode(TEXT)
    assert [neox.token_bytes(i) for i in s_ids] == [b"a", b"\n", b"    ", b"def"]
    assert [llama2.token_str(i) for i in t_ids] == ["▁", "a", "<0x0A>", "▁▁▁", "▁def"]
    four, two, one, de = src_ids_of("    ", "  ", " ", "de")
    t_three, t_one, t_de, t_two, t_four = tgt_ids_of(llama2, "   ", " ", "de", "  ", "    ")
    vmap = vocab_map_next(neox, llama2)
    assert vmap[[four, two, one, de]].tolist() == [t_four, t_two, t_one, t_de]   # context-free
    topk = np.zeros((len(s_ids), 4), dtype=np.int64)
    topk[1] = [four, two, one, de]
    logprobs = np.log(np.tile([0.5, 0.2, 0.2, 0.1], (len(s_ids), 1))).astype(np.float32)
    sv, tv = align.normalized_vocab(neox), align.normalized_vocab(llama2)

    def carried(labels):
        tr = align.carry(s_ids, t_ids, topk, logprobs, vmap, sv, tv, labels=labels)
        assert tr.matched.tolist() == [-1, 0, 1, -1, 3]
        a, b = tr.offsets[2], tr.offsets[3]
        p = np.exp(tr.logprobs[a:b].astype(float)).round(6)              # (entries,)
        return dict(zip(tr.ids[a:b].tolist(), p.tolist()))

    assert carried(None) == {t_four: 0.5, t_two: 0.2, t_one: 0.2, t_de: 0.1}          # before
    assert carried(ContextLabels(neox, llama2, vmap)) == {t_three: 0.5, t_one: 0.4, t_de: 0.1}
    assert t_ids[3] == t_three                       # the label is the target's true next token


def test_lesson_the_oracle_lands_on_the_targets_next_token_with_the_rule(neox, llama2):
    """An oracle source (top-1: its own true next token) over TEXT: 3 of the 5 target positions
    take a distribution (the table above: 'a', '\\n', '▁def'); '▁def' is the last, with no next
    token, so 2 are scored. After 'a' the oracle's '\\n' lands on '<0x0A>' either way; after
    '\\n' its '    ' lands on '▁▁▁' only with the rule: oracle label mass 1/2 without, 2/2 with.
    Catches: oracle_quality (docs/benchmarks.md "Label quality") measuring the map alone when
    asked for the rule."""
    vmap = vocab_map_next(neox, llama2)
    assert oracle_quality(neox, llama2, vmap, [TEXT], "exact") == (0.6, 0.5)
    assert oracle_quality(neox, llama2, vmap, [TEXT], "exact", "next-char") == (0.6, 1.0)
    assert oracle_quality(neox, llama2, vmap, [TEXT], "exact", "whitespace-run") == (0.6, 1.0)
    assert oracle_quality(neox, llama2, vmap, [TEXT], "exact", "whitespace-token") == (0.6, 1.0)


def test_lesson_the_rule_reads_the_whole_whitespace_run(neox, llama2):
    """How a target cuts whitespace depends on the whole run. GPT-NeoX writes "a\n     def" (5
    spaces) as 'a' '\n' '    ' ' ' 'def', Llama-2 as '▁' 'a' '<0x0A>' '▁▁▁▁' '▁def': after '\n' the
    target's next token is '▁▁▁▁', which the map's label (4 spaces alone) has right. One character
    after the source's next token ('    ', then ' ') asks how Llama-2 writes 5 spaces alone: '▁▁'
    '▁▁▁', so '▁▁', wrong. The rest of the run and the first character after it ('    ' + ' d') ask
    how it writes "     d": '▁▁▁▁' '▁d', so '▁▁▁▁', right. Oracle label mass over the text's 2
    scored positions: the map 2/2, one character 1/2, the whole run 2/2.
    following_text, hand-worked on "  éx" ('  ' '\xc3' '\xa9' 'x'): the whole run "  é" (a
    character split over two tokens read whole), one character " ", nothing where the text begins
    inside a character, and only whitespace where no other character follows.
    Catches: the rule reading one character where the setting asks for the run (the label '▁▁'),
    a run that stops at the first token, or a character split over byte tokens read as two."""
    text = "a\n     def"
    assert [neox.token_bytes(i) for i in neox.encode(text)] == [b"a", b"\n", b"    ", b" ", b"def"]
    assert [llama2.token_str(i) for i in llama2.encode(text)] == ["▁", "a", "<0x0A>", "▁▁▁▁",
                                                                   "▁def"]
    vmap = vocab_map_next(neox, llama2)
    got = {c: oracle_quality(neox, llama2, vmap, [text], "exact", c) for c in (None, *CONTEXTS)}
    assert got == {None: (0.6, 1.0), "next-char": (0.6, 0.5), "whitespace-run": (0.6, 1.0),
                   "whitespace-token": (0.6, 1.0)}
    s_ids = neox.encode(text)
    assert ContextLabels(neox, llama2, vmap, "whitespace-run")(
        s_ids, 1, src_ids_of("    ")).tolist() == tgt_ids_of(llama2, "    ")
    assert ContextLabels(neox, llama2, vmap, "next-char")(
        s_ids, 1, src_ids_of("    ")).tolist() == tgt_ids_of(llama2, "  ")
    ids = neox.encode("  \u00e9x")
    assert [neox.token_bytes(i) for i in ids] == [b"  ", b"\xc3", b"\xa9", b"x"]
    for context in ("whitespace-token", "whitespace-run"):
        assert following_text(neox, ids, context) == "  \u00e9"
        assert following_text(neox, ids[2:], context) is None     # begins inside a character
        assert following_text(neox, ids[:1], context) == "  "     # whitespace to the end
    assert following_text(neox, ids, "next-char") == " "


@pytest.fixture(scope="module")
def dashes():
    """A source and a target cut as GPT-NeoX and Mistral v1 cut "        ----------": the source
    with the merge '--' (256) and the runs of 2 to 4 spaces (257-259); the target (sentencepiece
    BPE, byte fallback) with '--' merged before '▁-', before the runs '▁▁', '▁▁▁', '▁▁▁▁'."""
    ranks = {bytes([b]): b for b in range(256)} | {b"--": 256}
    src = TiktokenBPE("bpe", "dashes", GPT2_PATTERN, ranks, np.arange(len(ranks)),
                      {"  ": 257, "   ": 258, "    ": 259}, set(), None, None)
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)]
    pieces += [(f"<0x{b:02X}>", 0.0, 6) for b in range(256)]
    normal = [("--", -1), ("▁-", -2), ("▁▁", -3), ("▁▁▁", -4), ("▁▁▁▁", -5), ("▁", -8), ("a", -9),
              ("-", -10)]
    pieces += [(p.replace("▁", SP), score, 1) for p, score in normal]
    proto = sentencepiece_model_bytes(pieces, bpe=True, byte_fallback=True,
                                      add_dummy_prefix=True, unk_id=0)
    return src, SentencePieceTokenizer(None, model_proto=proto, bos_id=1, eos_id=2)


def test_lesson_the_rule_reads_the_whole_token_after_the_run(dashes):
    """What follows a run of spaces decides its cut too, and one character of it can mislead. The
    source writes "a\n    --" as 'a' '\n' '    ' '--', the target as '▁' 'a' '<0x0A>' '▁▁▁▁' '--':
    '--' merges first, then the spaces. After '\n' the source's next token is '    ', and the
    target's '▁▁▁▁', which the map's label (4 spaces alone) has right. The run and one character
    after it ("    -") ask how the target cuts 4 spaces before a lone dash: '▁-' merges first, so
    '▁▁▁' '▁-', and the label '▁▁▁' is wrong. The run and the whole source token after it ("    --")
    give '▁▁▁▁' '--': right. Every target token but the first ends where a source token ends: 4 of
    5 positions matched, 3 with a next token scored. Oracle label mass: the map 3/3, one character
    2/3, the run and one character 2/3, the run and the token 3/3. (Real: Mistral v1 writes 8 spaces
    and "----------" as 8 spaces and '----------', but 8 spaces before "-" as 7 and '▁-'.)
    following_text on "    --x": the run and the token "    --", the run and a character "    -",
    one character " ". Catches the rule reading one character after the run where the setting asks
    for the token, or the token read past its end."""
    src, tgt = dashes
    text = "a\n    --"
    assert [src.token_bytes(i) for i in src.encode(text)] == [b"a", b"\n", b"    ", b"--"]
    assert [tgt.token_str(i) for i in tgt.encode(text)] == ["▁", "a", "<0x0A>", "▁▁▁▁", "--"]
    vmap = vocab_map_next(src, tgt)
    got = {c: oracle_quality(src, tgt, vmap, [text], "exact", c) for c in (None, *CONTEXTS)}
    assert got == {None: (0.8, 1.0), "next-char": (0.8, 2 / 3), "whitespace-run": (0.8, 2 / 3),
                   "whitespace-token": (0.8, 1.0)}
    ids = src.encode("    --x")
    assert [following_text(src, ids, c) for c in CONTEXTS] == ["    --", "    -", " "]
    four = src.encode("    ")
    assert ContextLabels(src, tgt, vmap)(src.encode(text), 1, four).tolist() == tgt_ids_of(
        tgt, "    ")


def test_the_default_preset_labels_in_context_and_the_paper_presets_do_not(neox, llama2, tmp_path):
    """nanofuse stores "context": "whitespace-token" with its settings (data.align_window takes
    the labels its settings name), "paper" and "official" have no such setting and are unchanged. A
    folder aligned by nanofuse before the rule has no "context" in its settings.json: aligning more
    shards into it is refused, naming the fix, so old and new labels never mix. A folder aligned
    with an older rule ("next-char", "whitespace-run") is refused the same way, and its settings
    still give that rule (for train.py --online). Catches: the rule missing from the default
    preset, or added to the paper's, or old folders silently extended."""
    assert align.PRESETS["nanofuse"]["context"] == "whitespace-token"
    assert {"whitespace-run", "next-char"} < set(CONTEXTS)
    assert not {"context"} & (align.PRESETS["paper"].keys() | align.PRESETS["official"].keys())
    vmap = vocab_map_next(neox, llama2)
    assert context_labels(neox, llama2, vmap, align.alignment_settings("paper")) is None
    labels = context_labels(neox, llama2, vmap, align.alignment_settings())
    s_ids, t_ids = neox.encode(TEXT), llama2.encode(TEXT)
    oracle = np.array(s_ids[1:] + s_ids[-1:])[:, None]                     # (n, 1) the next token
    tr = data.align_window(s_ids, t_ids, oracle, np.zeros(oracle.shape, np.float32), vmap,
                           align.normalized_vocab(neox), align.normalized_vocab(llama2), None,
                           align.alignment_settings(), labels)
    assert tr.ids[tr.offsets[2]:tr.offsets[3]].tolist() == [t_ids[3]]        # '▁▁▁'
    with pytest.raises(ValueError, match="context='next-word'; choose one of"):
        context_labels(neox, llama2, vmap, {"context": "next-word"})
    old = {k: v for k, v in align.PRESETS["nanofuse"].items() if k != "context"}
    (tmp_path / "settings.json").write_text(json.dumps(old))
    conflict = storage.settings_conflict(tmp_path, align.alignment_settings())
    assert "aligned with other settings" in conflict and "delete it" in conflict
    for older in ("next-char", "whitespace-run"):
        (tmp_path / "settings.json").write_text(json.dumps({**old, "context": older}))
        assert "aligned with other settings" in storage.settings_conflict(
            tmp_path, align.alignment_settings())
        stored = storage.read_align_settings(tmp_path / "settings.json")
        assert context_labels(neox, llama2, vmap, stored).context == older
    assert labels.context == "whitespace-token"
