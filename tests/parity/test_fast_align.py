"""The fast paths of extras/fast_align.py give exactly what align.py's readable references give: the
MinED DTW (checked itself against brute force), the edit distances (against an independent
library), the pair-cost cache, and the MinED vocab map (on random and on real vocabularies, ties in
the preference order included)."""
import itertools
import random

import pytest

import align
from extras.emitted_tokens import preference_order
from conftest import package_file
from extras import fast_align
from tokenizer import load_tokenizer


def brute_force_cost(source, target):
    """The cheapest monotone path from (1,1) to (n,m) with diagonal, source and target steps, by
    enumeration."""
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
    return sum(align.levenshtein(source[i], target[j])
               for j, src in enumerate(alignment) for i in src)


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


@pytest.mark.parametrize("case", ["all_equal", "all_empty", "one_long_vs_many", "repeats",
                                  "reversed"])
def test_fast_dtw_equals_reference_on_adversarial_pairs(case):
    """Inputs made of ties: identical tokens everywhere, empty tokens, one token against many, long
    repeats."""
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
    d = fast_align.edit_distances(a, b)
    assert all(d[i, j] == editdistance.eval(x, y) == align.levenshtein(x, y)
               for i, x in enumerate(a) for j, y in enumerate(b))


def test_pair_cost_cache_equals_direct_computation_across_calls():
    rng = random.Random(3)
    cache = fast_align.PairCosts(cap=12)                 # small cap: some tokens get no slot
    for _ in range(20):
        s, t = random_tokens(rng, rng.randint(1, 15)), random_tokens(rng, rng.randint(1, 15))
        assert (cache(s, t) == fast_align.pair_costs(s, t)).all()


@pytest.mark.parametrize("shuffled", [False, True])
def test_mined_vocab_map_equals_brute_force_with_ties_in_preference_order(shuffled):
    """Minimum distance, and among equals the first target id in the order (the lowest id without
    one)."""
    rng = random.Random(4)
    src = random_tokens(rng, 80, "abcd▁") + ["", "abcdabcd"]
    tgt = random_tokens(rng, 40, "abcd▁") + ["dddddd", ""]
    order = list(range(len(tgt)))
    if shuffled:
        rng.shuffle(order)
    got, dist = fast_align.vocab_map_mined(src, tgt, threads=2, order=order if shuffled else None)
    for i, s in enumerate(src):
        if not s:
            assert got[i] == -1
            continue
        ds = [align.levenshtein(s, tgt[j]) if tgt[j] else 10**9 for j in order]
        assert dist[i] == min(ds) and got[i] == order[ds.index(min(ds))], (s, got[i], dist[i])


def test_mined_vocab_map_keeps_searching_for_a_preferred_tie_the_bounds_allow():
    """'abc' is 3 edits from 'xyz' (same length, searched first, nothing shared) and 3 from 'abcxxx'
    (three insertions), which comes first in the order. Both lower bounds of 'abcxxx' (length 6 - 3,
    and max(len) - shared characters = 6 - 3) equal the best found, so it must still be searched and
    win the tie. 'cbaxxx' has the same bounds but is 5 edits away, so it must lose to 'xyz'. Catches
    a bound compared with < instead of <= (a target at the bound then never searched, and its bound
    taken for its distance), and the search stopping at a length whose bound equals the best."""
    got, dist = fast_align.vocab_map_mined(["abc"], ["abcxxx", "xyz"], threads=1)
    assert got.tolist() == [0] and dist.tolist() == [3]
    got, dist = fast_align.vocab_map_mined(["abc"], ["cbaxxx", "xyz"], threads=1)
    assert got.tolist() == [1] and dist.tolist() == [3]


def assert_same_mined_map(src, tgt, order=None, threads=2):
    """The fast search (extras/fast_align.py) gives the reference's map and distances exactly."""
    fast_map, fast_dist = fast_align.vocab_map_mined(src, tgt, threads=threads, order=order)
    ref_map, ref_dist = align.vocab_map_mined_reference(src, tgt, order=order)
    assert fast_dist.tolist() == ref_dist.tolist()
    assert fast_map.tolist() == ref_map.tolist()
    return ref_map, ref_dist


@pytest.mark.parametrize("seed", range(5))
def test_fast_mined_vocab_map_equals_the_reference_on_random_vocabularies(seed):
    """Small alphabets make many ties (equal strings, equal distances); a shuffled preference order
    decides them differently from the lowest id. Long strings send the search far from distance 1,
    where the bounds decide which targets the DP skips."""
    rng = random.Random(100 + seed)
    alphabet = "abc▁日" if seed % 2 else "ab"

    def vocab(n):
        short = random_tokens(rng, n, alphabet)
        long = ["".join(rng.choice(alphabet + "xyz") for _ in range(rng.randint(4, 9)))
                for _ in range(n // 4)]
        return short + long + ["", "zzzzzzzzzzzz"]
    src, tgt = vocab(120), vocab(60)
    tgt += tgt[:10]                                     # duplicate strings: ties at distance 0
    src += [t[1:] + "x" for t in tgt if len(t) > 4]     # a target string one or two edits away
    assert_same_mined_map(src, tgt)
    order = list(range(len(tgt)))
    rng.shuffle(order)
    _, dist = assert_same_mined_map(src, tgt, order=order, threads=1 + seed % 3)
    assert (dist == 0).any() and (dist == 1).any() and (dist >= 3).any()   # every stage searched


@pytest.fixture(scope="module")
def real_vocabs(tmp_path_factory):
    """Mistral v1 (sentencepiece with byte fallback) and Llama-3 (tiktoken), from registry packages,
    as tokenizers and normalized vocabularies."""
    d = tmp_path_factory.mktemp("mistral_v1")
    (d / "tokenizer.model").write_bytes(package_file("mistral_common", "data",
                                                     "tokenizer.model.v1").read_bytes())
    mistral = load_tokenizer(d)
    llama3 = load_tokenizer(package_file("llama_models", "llama3", "tokenizer.model"))
    return {name: (tok, align.normalized_vocab(tok))
            for name, tok in (("mistral", mistral), ("llama3", llama3))}


@pytest.mark.slow
def test_fast_mined_vocab_map_equals_the_reference_on_a_real_pair(real_vocabs):
    """Mistral's first 300 tokens (byte pieces and its first merges) and 100 whole words from the
    middle of its vocabulary, onto Llama-3's first 2000 tokens; in id order and in a shuffled
    one."""
    (_, mv), (_, lv) = real_vocabs["mistral"], real_vocabs["llama3"]
    src, tgt = mv[:300] + mv[20000:20100], lv[:2000]
    _, dist = assert_same_mined_map(src, tgt)
    assert (dist >= 2).sum() > 50                       # the length search really ran
    order = list(range(len(tgt)))
    random.Random(5).shuffle(order)
    assert_same_mined_map(src, tgt, order=order)


@pytest.mark.slow
def test_fast_mined_vocab_map_equals_the_reference_with_real_byte_piece_ties(real_vocabs):
    """Llama-3's first 300 tokens onto a Mistral slice that holds both its byte pieces ('<0x65>')
    and the regular single-character pieces ('e') of the same text: the preference order (the
    emitted piece first) breaks those ties, the same way in both implementations."""
    (_, lv), (mistral, mv) = real_vocabs["llama3"], real_vocabs["mistral"]
    ids = list(range(1000)) + list(range(28700, 29700))
    tgt = [mv[j] for j in ids]
    position = {j: k for k, j in enumerate(ids)}
    order = [position[j] for j in preference_order(mistral, mv).tolist() if j in position]
    got, _ = assert_same_mined_map(lv[:300], tgt, order=order)
    e = lv.index("e")
    assert ids[got[e]] == 28706 and tgt[position[104]] == "e"     # 'e', not the byte piece <0x65>
    lowest, _ = assert_same_mined_map(lv[:300], tgt)
    assert ids[lowest[e]] == 104                        # by lowest id: the byte piece


def official_style_dtw(source, target):
    """The official FuseLLM DTW, written again here: the full (n+1, m+1) table filled cell by cell
    with min(up, left, diagonal) + edit distance, then a walk back from (n, m) that takes np.argmin
    over [diagonal, up (i-1, j), left (i, j-1)] (the first of equal values), off-table cells
    infinite. Its own edit distance (the full Wagner-Fischer table)."""
    import numpy as np

    def edit(a, b):
        t = np.zeros((len(a) + 1, len(b) + 1), dtype=np.int64)
        t[:, 0], t[0, :] = np.arange(len(a) + 1), np.arange(len(b) + 1)
        for x in range(1, len(a) + 1):
            for y in range(1, len(b) + 1):
                t[x, y] = min(t[x - 1, y] + 1, t[x, y - 1] + 1,
                              t[x - 1, y - 1] + (a[x - 1] != b[y - 1]))
        return int(t[-1, -1])

    n, m = len(source), len(target)
    table = np.full((n + 1, m + 1), np.inf)
    table[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            table[i, j] = edit(source[i - 1], target[j - 1]) + min(
                table[i - 1, j], table[i, j - 1], table[i - 1, j - 1])
    pairs = {j: set() for j in range(m)}
    i, j = n, m
    while True:
        pairs[j - 1].add(i - 1)
        if (i, j) == (1, 1):
            break
        diag, up, left = table[i - 1, j - 1], table[i - 1, j], table[i, j - 1]
        move = int(np.argmin([diag, up, left]))
        i, j = [(i - 1, j - 1), (i - 1, j), (i, j - 1)][move]
    return [sorted(pairs[j]) for j in range(m)]


def test_official_ties_reproduce_an_official_style_dtw_on_inputs_full_of_ties():
    """ties="official" must give the official code's alignment, tie for tie. Catches: the official
    tie order (diagonal, source step, target step) changed in the shared backtrack, which the
    fast/reference comparison cannot see. Small alphabets and short tokens make ties everywhere."""
    rng = random.Random(7)
    differs = 0
    for _ in range(300):
        alphabet = rng.choice(["ab", "a▁", "abc"])
        s = random_tokens(rng, rng.randint(1, 9), alphabet)
        t = random_tokens(rng, rng.randint(1, 9), alphabet)
        want = official_style_dtw(s, t)
        assert align.dtw_reference(s, t, ties="official") == want, (s, t)
        assert align.dtw(s, t, ties="official") == want, (s, t)
        differs += align.dtw(s, t, ties="closest") != want
    assert differs > 30            # the inputs hold ties the two rules break differently
