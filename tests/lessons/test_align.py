"""Alignment carries a source's predictions onto the target's tokens: hand-worked lessons, then the fast paths
checked against the readable references and brute force."""
import itertools
import random

import numpy as np
import pytest

import align
from align import normalize

B = lambda b: chr(align.BYTE_BASE + b)  # noqa: E731  a stray byte as normalize() writes it


# --- normalisation -----------------------------------------------------------------------------------

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
    assert align.display(normalize(b"\xe6\x97")) == "<0xE6><0x97>"


# --- hand-worked lessons -----------------------------------------------------------------------------

def test_lesson_same_tokens_except_the_leading_space_of_the_first():
    """Sentencepiece writes its first token with a '▁' (the dummy prefix), byte-level BPE does not.
    DTW pairs them (cost 1), and transfer ignores a leading '▁' at the first position."""
    src, tgt = ["The", "▁cat"], ["▁The", "▁cat"]
    alignment = align.dtw(src, tgt)
    assert alignment == [[0], [1]]
    vocab_s, vocab_t = src, tgt                     # token i of each sequence is vocabulary id i
    # byte ends count back from the text's end, so the dummy prefix does not shift them either
    assert align.byte_ends([0, 1], vocab_s).tolist() == align.byte_ends([0, 1], vocab_t).tolist() == [-4, 0]
    for positions in align.POSITIONS:
        assert align.matched_positions(alignment, [0, 1], [0, 1], np.array([0, 1]), vocab_s, vocab_t,
                                       positions).tolist() == [0, 1]
    topk_ids = np.array([[1, 0], [0, 1]])
    topk_lp = np.log(np.array([[0.75, 0.25], [0.5, 0.5]]))
    out = align.transfer(np.array([0, 1]), [0, 1], [0, 1], topk_ids, topk_lp, np.array([0, 1]))
    assert not out.fallback.any()
    assert out.ids[out.offsets[0]:out.offsets[1]].tolist() == [1, 0]
    assert np.allclose(np.exp(out.logprobs[:2]), [0.75, 0.25])


def test_lesson_one_target_token_made_of_two_source_tokens_falls_back_to_the_next_token():
    """'▁unbeliev' covers '▁un' + 'believ': target position 0 is aligned to two source positions, so it
    falls back to a one-hot on the next target token (id 1, 'able'), not on itself (the official off-by-one)."""
    src, tgt = ["▁un", "believ", "able"], ["▁unbeliev", "able"]
    alignment = align.dtw(src, tgt)
    assert alignment == [[0, 1], [2]]
    topk = np.array([[1], [2], [2]])                # source 'able' predicts 'able' (source id 2 -> target id 1)
    lp = np.zeros((3, 1))
    vmap = np.array([-1, -1, 1])
    matched = align.matched_positions(alignment, [0, 1, 2], [0, 1], vmap, src, tgt, "paper")
    assert matched.tolist() == [-1, 2]
    out = align.transfer(matched, [0, 1, 2], [0, 1], topk, lp, vmap)
    assert out.fallback.tolist() == [True, False]
    assert out.onehot.tolist() == [1, -1]
    assert out.offsets.tolist() == [0, 0, 1]       # nothing stored at position 0: training puts the label there


def test_lesson_official_fallback_is_stored_on_the_current_token():
    """The official code's fallback is a one-hot on the CURRENT token ('▁unbeliev' at position 0), an
    off-by-one. With fallback="official" that one-hot is stored as position 0's distribution, so training
    really uses it (the training loop's own fallback is always the next-token label)."""
    matched = np.array([-1, 2])                     # source '▁un' 'believ' 'able', target '▁unbeliev' 'able'
    out = align.transfer(matched, [0, 1, 2], [0, 1], np.array([[1], [2], [2]]), np.zeros((3, 1)),
                         np.array([-1, -1, 1]), fallback="official")
    assert out.onehot.tolist() == [0, -1]
    assert out.offsets.tolist() == [0, 1, 2] and out.ids.tolist() == [0, 1]     # position 0: target id 0 itself
    assert out.fallback.tolist() == [True, False] and out.logprobs[0] == 0.0


def test_lesson_byte_fallback_pieces_against_one_character():
    """Sentencepiece's byte fallback writes 日 as three pieces <0xE6><0x97><0xA5>; a byte-level tokenizer has
    it as one token. Each piece costs 1 against '日', all three align to it, and the position falls back."""
    src, tgt = [B(0xE6), B(0x97), B(0xA5)], ["日"]
    assert align.dtw(src, tgt) == [[0, 1, 2]]


def test_lesson_character_split_differently_on_each_side():
    """Bytes E6 97 | A5 (byte-level BPE) against E6 | 97 | A5 (byte fallback). Costs: the two-byte token is
    1 away from each single byte; A5 = A5 costs 0. The path pairs the two-byte token with the first two
    pieces and A5 with A5, so only the last target position is 1:1 with an equal token."""
    src, tgt = [B(0xE6) + B(0x97), B(0xA5)], [B(0xE6), B(0x97), B(0xA5)]
    assert align.dtw(src, tgt) == [[0], [0], [1]]
    matched = align.matched_positions(align.dtw(src, tgt), [0, 1], [0, 1, 2], np.array([-1, 2]), src, tgt, "paper")
    assert matched.tolist() == [-1, -1, 1]
    # exact positions read the same from the bytes: target tokens end at -2, -1, 0, source tokens at -1, 0
    assert align.byte_alignment([0, 1], [0, 1, 2], src, tgt) == [[0], [0], [1]]
    assert align.matched_positions(align.byte_alignment([0, 1], [0, 1, 2], src, tgt), [0, 1], [0, 1, 2],
                                   np.array([-1, 2]), src, tgt).tolist() == [-1, 0, 1]


def test_lesson_bos_on_one_side_only_is_why_text_tokens_are_aligned():
    """A BOS normalizes to '' and DTW pairs it with the first token, making position 0 a 1:2 fallback.
    The pipeline therefore aligns the text tokens only, without BOS."""
    assert align.dtw(["", "▁Hello", "▁world"], ["▁Hello", "▁world"]) == [[0, 1], [2]]
    assert align.dtw(["▁Hello", "▁world"], ["▁Hello", "▁world"]) == [[0], [1]]


def test_lesson_tie_rules_official_and_closest():
    """Source '▁in ▁it', target '▁in ▁i t'. Costs to the last cell tie between the diagonal and the target
    step. The official order takes the diagonal and pairs '▁i' with '▁in'; 'closest' takes the step whose
    tokens end nearest in the text ('▁it' ends at 6, '▁i' at 5), pairing '▁i' and 't' with '▁it'."""
    src, tgt = ["▁in", "▁it"], ["▁in", "▁i", "t"]
    assert align.dtw(src, tgt, ties="official") == [[0], [0], [1]]
    assert align.dtw(src, tgt, ties="closest") == [[0], [1], [1]]
    assert align.dtw_reference(src, tgt, ties="official") == [[0], [0], [1]]


def test_lesson_transfer_maps_merges_and_counts_lost_mass():
    """Source predicts {'▁sat': 0.6, '▁sit': 0.3, '▁zz': 0.1}. The vocab map sends '▁sat' and '▁sit' to the
    same target id 5 and has no entry for '▁zz'. "sum" gives {5: 0.9}, "first" {5: 0.6}; 0.1 is lost."""
    vmap = np.array([0, 5, 5, -1])      # source ids '▁cat' '▁sat' '▁sit' '▁zz'; target id 0 '▁cat', 5 '▁sat'
    topk = np.array([[1, 2, 3]])
    lp = np.log(np.array([[0.6, 0.3, 0.1]]))
    out = align.transfer(np.array([0]), [0], [0], topk, lp, vmap, merge="sum")
    assert out.ids.tolist() == [5] and np.allclose(np.exp(out.logprobs), [0.9])
    assert np.isclose(out.stats["lost_mass"], 0.1) and np.isclose(out.stats["kept_mass"], 0.9)
    first = align.transfer(np.array([0]), [0], [0], topk, lp, vmap, merge="first")
    assert np.allclose(np.exp(first.logprobs), [0.6])


def test_matched_position_whose_predictions_all_leave_the_vocabulary_falls_back():
    """Tokens match 1:1, but every top-K id has no target entry: nothing to carry over, so a one-hot."""
    out = align.transfer(np.array([0, 1]), [0, 1], [0, 1], np.array([[2], [2]]), np.zeros((2, 1)), np.array([0, 1, -1]))
    assert out.fallback.tolist() == [True, True] and np.isclose(out.stats["lost_mass"], 2.0)
    assert out.onehot.tolist() == [1, -1]


def test_paper_positions_accept_a_mined_vocab_map_match_that_em_refuses():
    """Source '▁colour' vs target '▁color': not equal (EM falls back), but MinED maps one to the other."""
    src_vocab, tgt_vocab = ["▁colour"], ["▁color"]
    args = ([[0]], [0], [0], np.array([0]), src_vocab, tgt_vocab, "paper")
    assert align.matched_positions(*args, mode="mined").tolist() == [0]
    assert align.matched_positions(*args, mode="em").tolist() == [-1]


def test_lesson_same_end_byte_rule_refuses_a_token_that_ends_elsewhere():
    """Source '▁hello' against target '▁hel' 'lo'. The source's distribution after '▁hello' predicts what
    follows 'hello'. The paper's rule accepts it at '▁hel' when the vocab map sends '▁hello' to '▁hel' (a
    1:1 pair that "matches"), teaching the target, after '▁hel', what follows 'hello'. Exact positions give
    it to 'lo', the target token that ends where '▁hello' ends (byte -0), and to nothing else."""
    src_vocab, tgt_vocab = ["▁hello", "▁world"], ["▁hel", "lo", "▁world"]
    src, tgt = [0, 1], [0, 1, 2]
    vmap = np.array([0, 2])                              # MinED-style: '▁hello' -> '▁hel'
    alignment = align.dtw(src_vocab, tgt_vocab)
    assert alignment == [[0], [0], [1]]                  # '▁hel' and 'lo' each aligned to '▁hello' alone
    paper = align.matched_positions(alignment, src, tgt, vmap, src_vocab, tgt_vocab, "paper")
    assert paper.tolist() == [0, -1, 1]                  # '▁hel' takes what follows 'hello'
    exact = align.matched_positions(align.byte_alignment(src, tgt, src_vocab, tgt_vocab), src, tgt, vmap,
                                    src_vocab, tgt_vocab)
    assert exact.tolist() == [-1, 0, 1]
    # the oracle figure sees the difference: with paper positions, the source's next token '▁world' is
    # not what follows '▁hel'
    oracle = np.array([[1], [1]])
    assert align.transfer(paper, src, tgt, oracle, np.zeros((2, 1)), vmap).stats["oracle_mass"] == 0
    assert align.transfer(exact, src, tgt, oracle, np.zeros((2, 1)), vmap).stats["oracle_mass"] == 1


def test_lesson_positions_before_a_character_a_tokenizer_changed_are_not_trusted():
    """The source tokenizer composes 'é' (NFC: 2 bytes), the target keeps 'e' + U+0301 (3 bytes). Counted
    back from the end, the target's '▁ab' seems to end where the source's '▁a' ends: one byte off, a label
    in the wrong place. common_tail sees the two spellings differ from that character back, so no position
    before it takes a distribution; the last one, inside the common tail, still does."""
    src_vocab, tgt_vocab = ["▁a", "b", "é"], ["▁ab", "e\u0301"]
    src, tgt = [0, 1, 2], [0, 1]
    assert align.byte_ends(src, src_vocab).tolist() == [-3, -2, 0]
    assert align.byte_ends(tgt, tgt_vocab).tolist() == [-3, 0]
    assert align.common_tail(src, tgt, src_vocab, tgt_vocab) == 0
    alignment = align.byte_alignment(src, tgt, src_vocab, tgt_vocab)
    assert alignment == [[0], [1, 2]]
    vmap = np.array([0, 0, 1])
    assert align.matched_positions(alignment, src, tgt, vmap, src_vocab, tgt_vocab).tolist() == [-1, 2]
    # the same text spelled alike (but for the dummy prefix) is trusted from its first token
    assert align.common_tail([0, 1], [0], ["The", "▁cat"], ["▁The▁cat"]) == 7


class GreedyTokenizer:
    """A hand-checkable tokenizer: longest vocabulary match from the left. Enough interface for vocab maps."""

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
    """The target writes ' python' as ' py' + 'thon'. A source predicting ' python' says the target's next
    token is ' py'. MinED maps ' python' to the nearest string, 'ython' (2 edits), a token the target would
    not produce there; the next-token map asks the target's encoder and gets ' py'."""
    tgt = GreedyTokenizer(["\n", " ", "p", "y", "t", "h", "o", "n", " py", "thon", "ython"])
    src = GreedyTokenizer(["\n", " python", "thon", "py"])
    assert tgt.encode(" python") == [8, 9]
    nxt = align.vocab_map_next(src, tgt)
    assert nxt.tolist() == [0, 8, 9, 2]                  # 'py' as a continuation: 'p', then 'y'
    mined = align.vocab_map_mined(align.normalized_vocab(src), align.normalized_vocab(tgt))[0]
    assert mined[1] == 10                                # ' python' -> 'ython'


def test_lesson_ties_go_to_the_piece_the_encoder_emits_not_the_byte_piece(tmp_path):
    """In a sentencepiece vocabulary with byte fallback, '<0x65>' and 'e' are both the text "e". Byte pieces
    have the lower ids, so a lowest-id rule sends every source 'e' to '<0x65>', a token the encoder never
    emits (it only falls back to bytes for characters it has no piece for). The preference order puts
    the emitted piece first, and every vocab map follows it."""
    import sentencepiece as spm
    from conftest import sentencepiece_model, stdlib_texts
    from tokenizer import load_tokenizer
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model(stdlib_texts(6), 400))
    tok = load_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = align.normalized_vocab(tok)
    byte_e, piece_e = sp.piece_to_id("<0x65>"), sp.piece_to_id("e")
    assert vocab[byte_e] == vocab[piece_e] == "e" and byte_e < piece_e
    assert sp.encode("\ne")[-1] == piece_e                # what the encoder emits for "e" in running text
    order = align.preference_order(tok)
    assert align.vocab_map_em(["e"], vocab).tolist() == [byte_e]              # lowest id: the byte piece
    assert align.vocab_map_em(["e"], vocab, order).tolist() == [piece_e]
    assert align.vocab_map_mined(["e", "eé"], vocab, order=order)[0][0] == piece_e
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
    assert align.vocab_map(src, tok, "em", ties="lowest")[0] == byte_e       # the official code's rule


# --- the fast paths equal the references ----------------------------------------------------------------

def brute_force_cost(source, target):
    """The cheapest monotone path from (1,1) to (n,m) with diagonal, source and target steps, by enumeration."""
    n, m = len(source), len(target)
    best = float("inf")
    for moves in itertools.product(range(3), repeat=n + m):
        i = j = 1
        cost = align.levenshtein(source[0], target[0])
        for mv in moves:
            if (i, j) == (n, m):
                break
            i, j = (i + 1, j + 1) if mv == 0 else (i + 1, j) if mv == 1 else (i, j + 1)
            if i > n or j > m:
                cost = float("inf")
                break
            cost += align.levenshtein(source[i - 1], target[j - 1])
        if (i, j) == (n, m):
            best = min(best, cost)
    return best


def path_cost(alignment, source, target):
    return sum(align.levenshtein(source[i], target[j]) for j, src in enumerate(alignment) for i in src)


def random_tokens(rng, n, alphabet="ab▁"):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(n)]


def test_reference_dtw_finds_a_cheapest_path_by_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        s, t = random_tokens(rng, rng.randint(1, 4)), random_tokens(rng, rng.randint(1, 4))
        for ties in align.TIES:
            assert path_cost(align.dtw_reference(s, t, ties), s, t) == brute_force_cost(s, t)


def test_fast_dtw_equals_reference_on_random_pairs():
    rng = random.Random(1)
    for _ in range(300):
        s, t = random_tokens(rng, rng.randint(1, 12)), random_tokens(rng, rng.randint(1, 12))
        for ties in align.TIES:
            assert align.dtw(s, t, ties) == align.dtw_reference(s, t, ties)


@pytest.mark.parametrize("case", ["all_equal", "all_empty", "one_long_vs_many", "repeats", "reversed"])
def test_fast_dtw_equals_reference_on_adversarial_pairs(case):
    """Inputs made of ties: identical tokens everywhere, empty tokens, one token against many, long repeats."""
    s, t = {
        "all_equal": (["a"] * 9, ["a"] * 6),
        "all_empty": ([""] * 5, [""] * 7),
        "one_long_vs_many": (["▁" * 12], ["▁"] * 12),
        "repeats": (["ab", "a", "b"] * 4, ["a", "ba", "b"] * 4),
        "reversed": (list("abcdefg"), list("gfedcba")),
    }[case]
    for ties in align.TIES:
        assert align.dtw(s, t, ties) == align.dtw_reference(s, t, ties)
        assert align.dtw(t, s, ties) == align.dtw_reference(t, s, ties)


def test_vectorised_edit_distances_equal_an_independent_implementation():
    editdistance = pytest.importorskip("editdistance")
    rng = random.Random(2)
    a = random_tokens(rng, 60, "abc▁日") + ["", "▁" * 20]
    b = random_tokens(rng, 50, "abc▁日") + ["", "x" * 7]
    d = align.edit_distances(a, b)
    assert all(d[i, j] == editdistance.eval(x, y) == align.levenshtein(x, y)
               for i, x in enumerate(a) for j, y in enumerate(b))


def test_pair_cost_cache_equals_direct_computation_across_calls():
    rng = random.Random(3)
    cache = align.PairCosts(cap=12)                 # small cap: some tokens get no slot
    for _ in range(20):
        s, t = random_tokens(rng, rng.randint(1, 15)), random_tokens(rng, rng.randint(1, 15))
        assert (cache(s, t) == align.pair_costs(s, t)).all()


@pytest.mark.parametrize("shuffled", [False, True])
def test_mined_vocab_map_equals_brute_force_with_ties_in_preference_order(shuffled):
    """Minimum distance, and among equals the first target id in the order (the lowest id without one)."""
    rng = random.Random(4)
    src = random_tokens(rng, 80, "abcd▁") + ["", "abcdabcd"]
    tgt = random_tokens(rng, 40, "abcd▁") + ["dddddd", ""]
    order = list(range(len(tgt)))
    if shuffled:
        rng.shuffle(order)
    got, dist = align.vocab_map_mined(src, tgt, threads=2, order=order if shuffled else None)
    for i, s in enumerate(src):
        if not s:
            assert got[i] == -1
            continue
        ds = [align.levenshtein(s, tgt[j]) if tgt[j] else 10**9 for j in order]
        assert dist[i] == min(ds) and got[i] == order[ds.index(min(ds))], (s, got[i], dist[i])


def test_mined_vocab_map_keeps_searching_for_a_preferred_tie_the_bounds_allow():
    """'abc' is 3 edits from 'xyz' (same length, searched first, nothing shared) and 3 from 'abcxxx' (three
    insertions), which comes first in the order. Both lower bounds of 'abcxxx' (length 6 - 3, and
    max(len) - shared characters = 6 - 3) equal the best found, so it must still be searched and win the tie.
    'cbaxxx' has the same bounds but is 5 edits away, so it must lose to 'xyz'. Catches a bound compared with
    < instead of <= (a target at the bound then never searched, and its bound taken for its distance), and the
    search stopping at a length whose bound equals the best."""
    got, dist = align.vocab_map_mined(["abc"], ["abcxxx", "xyz"], threads=1)
    assert got.tolist() == [0] and dist.tolist() == [3]
    got, dist = align.vocab_map_mined(["abc"], ["cbaxxx", "xyz"], threads=1)
    assert got.tolist() == [1] and dist.tolist() == [3]


def test_em_vocab_map_needs_equal_strings():
    assert align.vocab_map_em(["▁a", "b", "", "c"], ["b", "▁a", ""]).tolist() == [1, 0, -1, -1]
