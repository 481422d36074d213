"""Alignment carries a source's predictions onto the target's tokens: hand-worked lessons on small
inputs. The fast paths are checked against the readable references in
tests/parity/test_fast_align.py."""
import numpy as np
import pytest

import align
from extras import fast_align
from extras.emitted_tokens import CONTEXTS, preference_order, vocab_map_next
from align import normalize
from extras.align_stats import display, window_stats

B = lambda b: chr(align.BYTE_BASE + b)  # noqa: E731  a stray byte as normalize() writes it


# --- normalisation ------------------------------------------------------------------------------

def test_both_conventions_normalize_to_one_form():
    # sentencepiece '▁the' and byte-level 'Ġthe' are both the bytes b" the"
    assert normalize(b" the") == "\u2581the"
    # '<0x0A>' (sentencepiece byte piece) and 'Ċ' (byte-level) are both b"\n"
    assert normalize(b"\n") == "\n"
    # a whole multi-byte character is one character
    assert normalize("日".encode()) == "日"
    # a character split across tokens: each stray byte is one private-use character
    assert normalize(b"\xe6\x97") == B(0xE6) + B(0x97)
    assert normalize(b"a\xa5") == "a" + B(0xA5)
    # control tokens (<s>) have no bytes
    assert normalize(b"") == ""
    assert display(normalize(b"\xe6\x97")) == "<0xE6><0x97>"


# --- hand-worked lessons ------------------------------------------------------------------------

def test_lesson_same_tokens_except_the_leading_space_of_the_first():
    """Sentencepiece writes its first token with a '▁' (the dummy prefix), byte-level BPE does
    not. DTW pairs them (cost 1), and transfer ignores a leading '▁' at the first position."""
    src, tgt = ["The", "▁cat"], ["▁The", "▁cat"]
    alignment = align.dtw(src, tgt)
    assert alignment == [[0], [1]]
    vocab_s, vocab_t = src, tgt                     # token i of each sequence is vocabulary id i
    # byte ends count back from the text's end, so the dummy prefix does not shift them either
    ends_s, ends_t = align.byte_ends([0, 1], vocab_s), align.byte_ends([0, 1], vocab_t)
    assert ends_s.tolist() == ends_t.tolist() == [-4, 0]
    for positions in align.POSITIONS:
        assert align.matched_positions(alignment, [0, 1], [0, 1], np.array([0, 1]), vocab_s,
                                       vocab_t, positions).tolist() == [0, 1]
    topk_ids = np.array([[1, 0], [0, 1]])
    topk_lp = np.log(np.array([[0.75, 0.25], [0.5, 0.5]]))
    out = align.transfer(np.array([0, 1]), [0, 1], [0, 1], topk_ids, topk_lp, np.array([0, 1]))
    assert not out.fallback.any()
    assert out.ids[out.offsets[0]:out.offsets[1]].tolist() == [1, 0]
    assert np.allclose(np.exp(out.logprobs[:2]), [0.75, 0.25])


def test_lesson_one_target_token_made_of_two_source_tokens_falls_back_to_the_next_token():
    """'▁unbeliev' covers '▁un' + 'believ': target position 0 is aligned to two source
    positions, so it falls back to a one-hot on the next target token (id 1, 'able'), not on itself
    (the official off-by-one)."""
    src, tgt = ["▁un", "believ", "able"], ["▁unbeliev", "able"]
    alignment = align.dtw(src, tgt)
    assert alignment == [[0, 1], [2]]
    topk = np.array([[1], [2], [2]])    # source 'able' predicts 'able' (source 2 -> target 1)
    lp = np.zeros((3, 1))
    vmap = np.array([-1, -1, 1])
    matched = align.matched_positions(alignment, [0, 1, 2], [0, 1], vmap, src, tgt, "paper")
    assert matched.tolist() == [-1, 2]
    out = align.transfer(matched, [0, 1, 2], [0, 1], topk, lp, vmap)
    assert out.fallback.tolist() == [True, False]
    assert out.onehot.tolist() == [1, -1]
    # nothing stored at position 0: training puts the label there
    assert out.offsets.tolist() == [0, 0, 1]


def test_lesson_official_fallback_is_stored_on_the_current_token():
    """The official code's fallback is a one-hot on the CURRENT token ('▁unbeliev' at position 0),
    an off-by-one. With fallback="official" that one-hot is stored as position 0's distribution, so
    training really uses it (the training loop's own fallback is always the next-token label)."""
    matched = np.array([-1, 2])      # source '▁un' 'believ' 'able', target '▁unbeliev' 'able'
    out = align.transfer(matched, [0, 1, 2], [0, 1], np.array([[1], [2], [2]]), np.zeros((3, 1)),
                         np.array([-1, -1, 1]), fallback="official")
    assert out.onehot.tolist() == [0, -1]
    # position 0: target id 0 itself
    assert out.offsets.tolist() == [0, 1, 2] and out.ids.tolist() == [0, 1]
    assert out.fallback.tolist() == [True, False] and out.logprobs[0] == 0.0


def test_lesson_byte_fallback_pieces_against_one_character():
    """Sentencepiece's byte fallback writes 日 as three pieces <0xE6><0x97><0xA5>; a byte-level
    tokenizer has it as one token. Each piece costs 1 against '日', all three align to it, and the
    position falls back."""
    src, tgt = [B(0xE6), B(0x97), B(0xA5)], ["日"]
    assert align.dtw(src, tgt) == [[0, 1, 2]]


def test_lesson_character_split_differently_on_each_side():
    """Bytes E6 97 | A5 (byte-level BPE) against E6 | 97 | A5 (byte fallback). Costs: the two-byte
    token is 1 away from each single byte; A5 = A5 costs 0. The path pairs the two-byte token with
    the first two pieces and A5 with A5, so only the last target position is 1:1 with an equal
    token."""
    src, tgt = [B(0xE6) + B(0x97), B(0xA5)], [B(0xE6), B(0x97), B(0xA5)]
    assert align.dtw(src, tgt) == [[0], [0], [1]]
    matched = align.matched_positions(align.dtw(src, tgt), [0, 1], [0, 1, 2], np.array([-1, 2]),
                                      src, tgt, "paper")
    assert matched.tolist() == [-1, -1, 1]
    # exact positions read the same from the bytes: target tokens end at -2, -1, 0, source tokens
    # at -1, 0
    assert align.byte_alignment([0, 1], [0, 1, 2], src, tgt) == [[0], [0], [1]]
    assert align.matched_positions(align.byte_alignment([0, 1], [0, 1, 2], src, tgt), [0, 1],
                                   [0, 1, 2], np.array([-1, 2]), src, tgt).tolist() == [-1, 0, 1]


def test_lesson_bos_on_one_side_only_is_why_text_tokens_are_aligned():
    """A BOS normalizes to '' and DTW pairs it with the first token, making position 0 a 1:2
    fallback. The pipeline therefore aligns the text tokens only, without BOS."""
    assert align.dtw(["", "▁Hello", "▁world"], ["▁Hello", "▁world"]) == [[0, 1], [2]]
    assert align.dtw(["▁Hello", "▁world"], ["▁Hello", "▁world"]) == [[0], [1]]


def test_lesson_tie_rules_official_and_closest():
    """Source '▁in ▁it', target '▁in ▁i t'. Costs to the last cell tie between the diagonal
    and the target step. The official order takes the diagonal and pairs '▁i' with '▁in';
    'closest' takes the step whose tokens end nearest in the text ('▁it' ends at 6, '▁i' at 5),
    pairing '▁i' and 't' with '▁it'."""
    src, tgt = ["▁in", "▁it"], ["▁in", "▁i", "t"]
    assert align.dtw(src, tgt, ties="official") == [[0], [0], [1]]
    assert align.dtw(src, tgt, ties="closest") == [[0], [1], [1]]
    assert align.dtw_reference(src, tgt, ties="official") == [[0], [0], [1]]


def test_lesson_transfer_maps_merges_and_counts_lost_mass():
    """Source predicts {'▁sat': 0.6, '▁sit': 0.3, '▁zz': 0.1}. The vocab map sends '▁sat'
    and '▁sit' to the same target id 5 and has no entry for '▁zz'. "sum" gives {5: 0.9}, "first"
    {5: 0.6}; 0.1 is lost."""
    # source ids '▁cat' '▁sat' '▁sit' '▁zz'; target id 0 '▁cat', 5 '▁sat'
    vmap = np.array([0, 5, 5, -1])
    topk = np.array([[1, 2, 3]])
    lp = np.log(np.array([[0.6, 0.3, 0.1]]))
    out = align.transfer(np.array([0]), [0], [0], topk, lp, vmap, merge="sum")
    assert out.ids.tolist() == [5] and np.allclose(np.exp(out.logprobs), [0.9])
    stats = window_stats(out, [0], [0], topk, lp, vmap)
    assert np.isclose(stats["lost_mass"], 0.1) and np.isclose(stats["kept_mass"], 0.9)
    first = align.transfer(np.array([0]), [0], [0], topk, lp, vmap, merge="first")
    assert np.allclose(np.exp(first.logprobs), [0.6])


def test_matched_position_whose_predictions_all_leave_the_vocabulary_falls_back():
    """Tokens match 1:1, but every top-K id has no target entry: nothing to carry over, so a
    one-hot."""
    topk, lp, vmap = np.array([[2], [2]]), np.zeros((2, 1)), np.array([0, 1, -1])
    out = align.transfer(np.array([0, 1]), [0, 1], [0, 1], topk, lp, vmap)
    assert out.fallback.tolist() == [True, True]
    assert np.isclose(window_stats(out, [0, 1], [0, 1], topk, lp, vmap)["lost_mass"], 2.0)
    assert out.onehot.tolist() == [1, -1]


def test_paper_positions_accept_a_mined_vocab_map_match_that_em_refuses():
    """Source '▁colour' vs target '▁color': not equal (EM falls back), but MinED maps one to the
    other."""
    src_vocab, tgt_vocab = ["▁colour"], ["▁color"]
    args = ([[0]], [0], [0], np.array([0]), src_vocab, tgt_vocab, "paper")
    assert align.matched_positions(*args, mode="mined").tolist() == [0]
    assert align.matched_positions(*args, mode="em").tolist() == [-1]


def test_lesson_same_end_byte_rule_refuses_a_token_that_ends_elsewhere():
    """Source '▁hello' against target '▁hel' 'lo'. The source's distribution after '▁hello'
    predicts what follows 'hello'. The paper's rule accepts it at '▁hel' when the vocab map sends
    '▁hello' to '▁hel' (a 1:1 pair that "matches"), teaching the target, after '▁hel', what
    follows 'hello'. Exact positions give it to 'lo', the target token that ends where '▁hello'
    ends (byte -0), and to nothing else."""
    src_vocab, tgt_vocab = ["▁hello", "▁world"], ["▁hel", "lo", "▁world"]
    src, tgt = [0, 1], [0, 1, 2]
    vmap = np.array([0, 2])                              # MinED-style: '▁hello' -> '▁hel'
    alignment = align.dtw(src_vocab, tgt_vocab)
    assert alignment == [[0], [0], [1]]       # '▁hel' and 'lo' each aligned to '▁hello' alone
    paper = align.matched_positions(alignment, src, tgt, vmap, src_vocab, tgt_vocab, "paper")
    assert paper.tolist() == [0, -1, 1]                  # '▁hel' takes what follows 'hello'
    exact = align.matched_positions(align.byte_alignment(src, tgt, src_vocab, tgt_vocab), src, tgt,
                                    vmap, src_vocab, tgt_vocab)
    assert exact.tolist() == [-1, 0, 1]
    # the oracle figure sees the difference: with paper positions, the source's next token
    # '▁world' is not what follows '▁hel'
    oracle, lp = np.array([[1], [1]]), np.zeros((2, 1))
    for matched, right in ((paper, 0), (exact, 1)):
        tr = align.transfer(matched, src, tgt, oracle, lp, vmap)
        assert window_stats(tr, src, tgt, oracle, lp, vmap)["oracle_mass"] == right


def test_lesson_positions_before_a_character_a_tokenizer_changed_are_not_trusted():
    """The source tokenizer composes 'é' (NFC: 2 bytes), the target keeps 'e' + U+0301 (3 bytes).
    Counted back from the end, the target's '▁ab' seems to end where the source's '▁a' ends: one
    byte off, a label in the wrong place. common_tail sees the two spellings differ from that
    character back, so no position before it takes a distribution; the last one, inside the common
    tail, still does."""
    src_vocab, tgt_vocab = ["▁a", "b", "é"], ["▁ab", "e\u0301"]
    src, tgt = [0, 1, 2], [0, 1]
    assert align.byte_ends(src, src_vocab).tolist() == [-3, -2, 0]
    assert align.byte_ends(tgt, tgt_vocab).tolist() == [-3, 0]
    assert align.common_tail(src, tgt, src_vocab, tgt_vocab) == 0
    alignment = align.byte_alignment(src, tgt, src_vocab, tgt_vocab)
    assert alignment == [[0], [1, 2]]
    vmap = np.array([0, 0, 1])
    matched = align.matched_positions(alignment, src, tgt, vmap, src_vocab, tgt_vocab)
    assert matched.tolist() == [-1, 2]
    # the same text spelled alike (but for the dummy prefix) is trusted from its first token
    assert align.common_tail([0, 1], [0], ["The", "▁cat"], ["▁The▁cat"]) == 7


class GreedyTokenizer:
    """A hand-checkable tokenizer: longest vocabulary match from the left. Enough interface for
    vocab maps."""

    def __init__(self, pieces):
        self.piece_bytes = [p.encode() for p in pieces]
        self.vocab_size = len(pieces)
        self.kind = "greedy"
        self.bos_id = self.eos_id = None

    def token_bytes(self, i):
        return self.piece_bytes[i]

    def encode(self, text):
        b, out = text.encode(), []
        while b:
            i = max((i for i, p in enumerate(self.piece_bytes) if p and b.startswith(p)),
                    key=lambda i: len(self.piece_bytes[i]))
            out.append(i)
            b = b[len(self.piece_bytes[i]):]
        return out


def test_lesson_next_token_map_sends_a_long_source_token_to_the_targets_first_piece():
    """The target writes ' python' as ' py' + 'thon'. A source predicting ' python' says the
    target's next token is ' py'. MinED maps ' python' to the nearest string, 'ython' (2 edits), a
    token the target would not produce there; the next-token map asks the target's encoder and gets
    ' py'."""
    tgt = GreedyTokenizer(["\n", " ", "p", "y", "t", "h", "o", "n", " py", "thon", "ython"])
    src = GreedyTokenizer(["\n", " python", "thon", "py"])
    assert tgt.encode(" python") == [8, 9]
    nxt = vocab_map_next(src, tgt)
    assert nxt.tolist() == [0, 8, 9, 2]                  # 'py' as a continuation: 'p', then 'y'
    mined = fast_align.vocab_map_mined(align.normalized_vocab(src), align.normalized_vocab(tgt))[0]
    assert mined[1] == 10                                # ' python' -> 'ython'
    # the readable MinED: ' python' against every target string, 'ython' the first at 2 edits
    reference, dist = align.vocab_map_mined_reference(align.normalized_vocab(src),
                                                      align.normalized_vocab(tgt))
    assert reference[1] == 10 and dist[1] == 2


def test_lesson_ties_go_to_the_piece_the_encoder_emits_not_the_byte_piece(tmp_path):
    """In a sentencepiece vocabulary with byte fallback, '<0x65>' and 'e' are both the text "e".
    Byte pieces have the lower ids, so a lowest-id rule sends every source 'e' to '<0x65>', a token
    the encoder never emits (it only falls back to bytes for characters it has no piece for). The
    preference order puts the emitted piece first, and every vocab map follows it."""
    import sentencepiece as spm
    from conftest import sentencepiece_model, stdlib_texts
    from tokenizer import load_tokenizer
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(stdlib_texts(6), 400))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = align.normalized_vocab(tok)
    byte_e, piece_e = sp.piece_to_id("<0x65>"), sp.piece_to_id("e")
    assert vocab[byte_e] == vocab[piece_e] == "e" and byte_e < piece_e
    assert sp.encode("\ne")[-1] == piece_e       # what the encoder emits for "e" in running text
    order = preference_order(tok, align.normalized_vocab(tok))
    assert align.vocab_map_em(["e"], vocab).tolist() == [byte_e]        # lowest id: the byte piece
    assert align.vocab_map_em(["e"], vocab, order).tolist() == [piece_e]
    assert fast_align.vocab_map_mined(["e", "eé"], vocab, order=order)[0][0] == piece_e
    # every byte piece that shadows a regular piece loses the tie, for every kind of map
    shadowed = [i for i in range(tok.vocab_size) if sp.is_byte(i) and vocab[i] and
                sum(v == vocab[i] for v in vocab) > 1]
    assert len(shadowed) > 20
    rank = np.argsort(order)
    for i in shadowed:
        regular = [j for j, v in enumerate(vocab) if v == vocab[i] and j != i]
        assert all(rank[j] < rank[i] for j in regular)
    src = GreedyTokenizer(["e", "t", " a"])
    for kind in align.VOCAB_MAPS:
        m = align.vocab_map(src, tok, kind)
        assert not any(sp.is_byte(int(t)) for t in m if t >= 0), kind
    assert align.vocab_map(src, tok, "em", ties="lowest")[0] == byte_e   # the official code's rule


def test_em_vocab_map_needs_equal_strings():
    assert align.vocab_map_em(["▁a", "b", "", "c"], ["b", "▁a", ""]).tolist() == [1, 0, -1, -1]


def test_lesson_three_presets_choose_the_six_settings_together():
    """Six choices (positions, vocab map, map ties, path ties, fallback, merge) come in three
    presets: ours, the paper's and the official code's; ours adds a seventh, labels in context
    (tests/lessons/test_context_labels.py). The paper's EM ablation is its preset with the EM map;
    anything else is refused with the choices named."""
    assert align.alignment_settings() == align.PRESETS["nanofuse"]
    assert align.alignment_settings()["positions"] == "exact"
    official = align.alignment_settings("official")
    assert official["fallback"] == "official" and official["map_ties"] == "lowest"
    ablation = align.alignment_settings("paper", vocab_map="em")
    assert ablation == dict(align.PRESETS["paper"], vocab_map="em")
    choices = {"positions": align.POSITIONS, "vocab_map": align.VOCAB_MAPS,
               "map_ties": align.MAP_TIES, "ties": align.TIES, "fallback": align.FALLBACKS,
               "merge": align.MERGES}
    assert align.PRESETS["nanofuse"]["context"] in CONTEXTS
    for preset in align.PRESETS:
        settings = {k: v for k, v in align.alignment_settings(preset).items() if k != "context"}
        assert settings.keys() == choices.keys()
        assert all(settings[k] in choices[k] for k in choices), preset
    with pytest.raises(ValueError, match="nanofuse"):
        align.alignment_settings("fast")
    with pytest.raises(ValueError, match="mined"):
        align.alignment_settings("paper", vocab_map="minED")


def test_lesson_official_ties_take_the_diagonal_before_a_source_step():
    """The official order is diagonal, then source step (i-1, j), then target step (i, j-1).
    Catches: the source step tried before the diagonal (the fast and the reference DTW share one
    backtrack, so their comparison cannot see it).
    Source '▁in ▁i t', target '▁in ▁it' (the mirror of the lesson above). Costs:
        '▁in'/'▁in' 0, '▁in'/'▁it' 1, '▁i'/'▁in' 1, '▁i'/'▁it' 1, 't'/'▁in' 3, 't'/'▁it' 2
    D[1,1] = 0, D[1,2] = 1, D[2,1] = 1, D[2,2] = 1 + 0 = 1, D[3,1] = 4, D[3,2] = 2 + 1 = 3.
    From (3,2) the diagonal (2,1) and the source step (2,2) tie at 1. The diagonal pairs '▁i'
    with '▁in' and 't' alone with '▁it'; the source step pairs '▁i' and 't' with '▁it'.
    'closest' takes the source step: '▁i' ends at 5, '▁it' at 6 (1 apart), '▁in' at 3 (2 apart)."""
    src, tgt = ["▁in", "▁i", "t"], ["▁in", "▁it"]
    for dtw in (align.dtw, align.dtw_reference):
        assert dtw(src, tgt, ties="official") == [[0, 1], [2]]
        assert dtw(src, tgt, ties="closest") == [[0], [1, 2]]
    # source step before target step: 'a b a' against 'b a b' (cost 1 unless equal)
    #   D row 1: 1 1 2;  row 2: 1 2 1;  row 3: 2 1 2.  At (3,3): diagonal 2, source step (2,3) 1,
    #   target step (3,2) 1. The source step, then the diagonal (1,2), then (1,1).
    assert align.dtw_reference(list("aba"), list("bab"), ties="official") == [[0], [0], [1, 2]]


def test_lesson_closest_ties_at_equal_distance_fall_back_to_the_official_order():
    """With ties="closest", predecessors of equal cost go by how close their two tokens' ends are
    in the text, and where those distances tie too, by the official order (diagonal, source step,
    target step). Catches: that second order reversed (target step first).
    1. Source 'a ▁b', target '▁b a': costs a/▁b 2, a/a 0, ▁b/▁b 0, ▁b/a 2, so D[1,1] = 2,
       D[1,2] = 2, D[2,1] = 2 and all three predecessors of (2,2) tie. Ends: source 1 3, target 2 3;
       diagonal (1,1) |1-2| = 1, source step (1,2) |1-3| = 2, target step (2,1) |3-2| = 1. Diagonal
       and target step tie at 1: the diagonal, pairing 1:1 ([[0], [1]]); the target step would
       give [[0, 1], [1]].
    2. Source 'a b a', target 'b a b' (D as in the lesson above): at (3,3) the source step (2,3)
       and the target step (3,2) tie at 1, their ends 1 apart each (2 vs 3, 3 vs 2). The source step
       gives [[0], [0], [1, 2]]; the target step would give [[0, 1], [2], [2]]."""
    for dtw in (align.dtw, align.dtw_reference):
        assert dtw(["a", "▁b"], ["▁b", "a"], ties="closest") == [[0], [1]]
        assert dtw(list("aba"), list("bab"), ties="closest") == [[0], [0], [1, 2]]


def test_lesson_exact_positions_take_the_last_of_two_source_tokens_ending_at_one_byte():
    """A control token has no bytes (it normalizes to ''), so it ends where the token before it
    ends. Source '▁hello <ctrl> ▁world', target '▁hello ▁world': source positions 0 and 1 both
    end at byte -6, where the target's '▁hello' ends. The distribution that predicts what follows
    that byte is the last one's, at <ctrl> (it predicts '▁world'); the one at '▁hello' predicts
    <ctrl>. Catches: exact positions taking the first of the source tokens that end at one byte.
    DTW pairs <ctrl> with '▁hello' (as it pairs a BOS): costs 6 from <ctrl> to either target token,
    and at (3,2) the diagonal (2,1) and the source step (2,2) tie at 6; their ends are 0 and 6
    bytes apart, so the diagonal."""
    src_vocab, tgt_vocab = ["▁hello", "", "▁world"], ["▁hello", "▁world"]
    src, tgt = [0, 1, 2], [0, 1]
    assert align.byte_ends(src, src_vocab).tolist() == [-6, -6, 0]
    alignment = align.dtw(src_vocab, tgt_vocab)
    assert alignment == [[0, 1], [2]]
    vmap = np.array([0, -1, 1])
    matched = align.matched_positions(alignment, src, tgt, vmap, src_vocab, tgt_vocab, "exact")
    assert matched.tolist() == [1, 2]


def test_lesson_bos_and_eos_map_to_the_targets_bos_and_eos():
    """Control tokens have no bytes, so no string map (EM here) can send them anywhere: the source's
    <s> (id 0) and </s> (id 1) map to -1 by their strings, then vocab_map sends BOS to the target's
    BOS (id 2) and EOS to its EOS (id 1); 'a' (source id 2) goes to the target's 'a' (id 0). A
    source that predicts the end of a document teaches the target its own EOS. Catches EOS sent to
    the target's BOS (or the two swapped)."""
    src, tgt = GreedyTokenizer(["", "", "a"]), GreedyTokenizer(["a", "", ""])
    (src.bos_id, src.eos_id), (tgt.bos_id, tgt.eos_id) = (0, 1), (2, 1)
    assert align.vocab_map_em(align.normalized_vocab(src), align.normalized_vocab(tgt)).tolist() \
        == [-1, -1, 0]
    assert align.vocab_map(src, tgt, "em", ties="lowest").tolist() == [2, 1, 0]


def test_lesson_paper_positions_refuse_a_target_token_aligned_to_two_source_tokens():
    """The paper's rule takes a distribution only at a 1:1 pair. Text 'ab': source 'a' 'b', target
    'ab'. DTW: D[1,1] = lev('a', 'ab') = 1, D[2,1] = lev('b', 'ab') + D[1,1] = 2; the path back
    from (2, 1) steps to (1, 1), so 'ab' is aligned to both source tokens: [[0, 1]]. Even with a
    vocab map sending 'a' to 'ab' (MinED's nearest: the target has no 'a'), position 0 takes
    nothing: the distribution after 'a' predicts 'b', not what follows 'ab'. The same pair alone,
    [[0]], is a match. Catches the 1:1 test dropped (the first aligned source token taken)."""
    src_vocab, tgt_vocab, vmap = ["a", "b"], ["ab"], np.array([0, -1])
    alignment = align.dtw(src_vocab, tgt_vocab)
    assert alignment == [[0, 1]]
    args = ([0, 1], [0], vmap, src_vocab, tgt_vocab, "paper")
    assert align.matched_positions(alignment, *args).tolist() == [-1]
    assert align.matched_positions([[0]], *args).tolist() == [0]


def test_lesson_paper_positions_forgive_a_leading_space_only_at_the_first_position():
    """Sentencepiece's dummy prefix puts a '▁' before the first token only, so the paper's match
    ignores a leading '▁' there and nowhere else. Text 'a the': source 'a' '▁the', target 'a▁'
    'the', paired 1:1. At position 0 'a' and 'a▁' differ; at position 1 '▁the' and 'the' differ
    too (different tokens: the space is on another side), so no position matches by string (EM).
    Catches the '▁' stripped at every position, which matches '▁the' with 'the'."""
    src_vocab, tgt_vocab = ["a", "▁the"], ["a▁", "the"]
    got = align.matched_positions([[0], [1]], [0, 1], [0, 1], np.array([-1, -1]), src_vocab,
                                  tgt_vocab, "paper", mode="em")
    assert got.tolist() == [-1, -1]
    first = align.matched_positions([[0]], [0], [0], np.array([-1]), ["▁the"], ["the"], "paper",
                                    mode="em")
    assert first.tolist() == [0]                        # at the first position it is forgiven


def test_lesson_a_target_token_with_no_bytes_gets_the_source_token_ending_where_it_sits():
    """A token with no bytes (a control or unknown piece) sits at one byte and gets the source
    token that ends at or after it. Source '▁a' 'b', target '▁a' '' 'b': byte ends counted back
    from the text's end are [-1, 0] and [-1, -1, 0]; the empty target token sits at -1, where '▁a'
    ends, so byte_alignment gives [[0], [0], [1]], and exact positions give it '▁a''s
    distribution (both predict 'b' next): [0, 0, 1]. Catches the source index moved past a token
    that ends exactly where the empty token sits ([[0], [1], [1]]: position 1 then falls back)."""
    src_vocab, tgt_vocab = ["▁a", "b"], ["▁a", "", "b"]
    src, tgt = [0, 1], [0, 1, 2]
    assert align.byte_ends(src, src_vocab).tolist() == [-1, 0]
    assert align.byte_ends(tgt, tgt_vocab).tolist() == [-1, -1, 0]
    alignment = align.byte_alignment(src, tgt, src_vocab, tgt_vocab)
    assert alignment == [[0], [0], [1]]
    assert align.matched_positions(alignment, src, tgt, np.array([-1, -1]), src_vocab,
                                   tgt_vocab).tolist() == [0, 0, 1]


def test_lesson_the_common_tail_is_counted_in_bytes():
    """common_tail is compared with byte ends, so it counts bytes, not characters. Source '▁a' 'é'
    'ü' (é composed: 2 bytes), target '▁a' 'e' + U+0301 'ü' (3 bytes): byte ends [-4, -2, 0] and
    [-5, -2, 0]. Read from the end, the spellings agree on 'ü' alone: a tail of 2 bytes (1
    character). The target's 'é' ends 2 bytes before the end, inside the tail, where the source's
    'é' ends too, and both predict 'ü': it takes that distribution; the first position, before the
    changed character, takes none: [-1, 1, 2]. Catches the tail counted in characters (1: the 'é'
    position refused)."""
    src_vocab, tgt_vocab = ["▁a", "é", "ü"], ["▁a", "e\u0301", "ü"]
    ids = [0, 1, 2]
    assert align.byte_ends(ids, src_vocab).tolist() == [-4, -2, 0]
    assert align.byte_ends(ids, tgt_vocab).tolist() == [-5, -2, 0]
    assert align.common_tail(ids, ids, src_vocab, tgt_vocab) == 2
    alignment = align.byte_alignment(ids, ids, src_vocab, tgt_vocab)
    assert align.matched_positions(alignment, ids, ids, np.array([-1, -1, -1]), src_vocab,
                                   tgt_vocab).tolist() == [-1, 1, 2]
