"""
align.py: carrying a source model's next-token distributions onto the target's tokens.

Two tokenizers cut the same text differently. To train the target on a source's predictions we
1. write every token as comparable text (`normalize`, in tokenizer.py),
2. align the two token sequences: exactly, from where each token sits in the text
   (`byte_alignment`), or by the paper's minimum edit distance (`dtw`, the MinED dynamic program),
3. map the source vocabulary onto the target's (`vocab_map`: EM and MinED from the paper, and our
   next-token map), ties going to the token the target's encoder really emits,
4. choose the target positions that take a source distribution (`matched_positions`: tokens that
   end at the same byte by default, the paper's 1:1 rule as an option) and move the distributions
   there (`transfer`). `carry` runs steps 2 to 4 on one sequence.
The choices these steps make come in three presets (`PRESETS`, at the end): ours ("nanofuse"),
the paper's, and the official code's.

The fast paths (edit distances for many pairs at once, the DTW one row at a time, the bounded MinED
search) live in extras/fast_align.py; their readable references are here (`levenshtein`,
`dtw_reference`, `vocab_map_mined_reference`), and tests/parity/test_fast_align.py proves them
equal. docs/data-and-alignment.md walks through an example.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from tokenizer import BYTE_BASE, SPACE, normalize, normalized_vocab  # noqa: F401 (align.normalize)


# --------------------------------------------------------------------------------------------------
# 1. Edit distance between normalized tokens (tokenizer.py `normalize`: one form for every
# tokenizer, '▁the' and 'Ġthe' both '▁the')


def levenshtein(a: str, b: str) -> int:
    """Edit distance: insertions, deletions and substitutions, each costing 1 (Wagner-Fischer, one
    row at a time). extras/fast_align.py `edit_distances` computes it for many pairs at once."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (ca != cb), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


# --------------------------------------------------------------------------------------------------
# 2. Sequence alignment (MinED): dynamic time warping over edit distances

TIES = ("closest", "official")


def dtw_reference(source: list[str], target: list[str], ties: str = "closest") -> list[list[int]]:
    """MinED alignment of two normalized token sequences, the readable way.

    Recurrence, with cost(a, b) = levenshtein(a, b), 1-based i over source and j over target:
        D[0,0] = 0,  D[i,0] = D[0,j] = inf
        D[i,j] = cost(s_i, t_j) + min(D[i-1,j-1], D[i-1,j], D[i,j-1])
    Backtrack from (n, m) to (1, 1), at each cell stepping to the predecessor of smallest D. Every
    cell on the path pairs s_i with t_j; the result lists, for each target position j (0-based), the
    sorted source positions paired with it.

    Ties between predecessors of equal D:
    - "official": diagonal, then a source step (i-1, j), then a target step (i, j-1), the order of
      the official FuseLLM code, so its alignments can be reproduced;
    - "closest" (default): the predecessor whose two tokens end closest together in the text (by the
      character offsets of the normalized tokens), then the official order. Equal-cost paths are
      then told apart by where the tokens actually sit."""
    n, m = _check_dtw(source, target, ties)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = levenshtein(source[i - 1], target[j - 1])
            D[i][j] = cost + min(D[i - 1][j - 1], D[i - 1][j], D[i][j - 1])
    return _backtrack(np.array(D), source, target, ties)


def dtw(source: list[str], target: list[str], ties: str = "closest",
        cost: np.ndarray | None = None) -> list[list[int]]:
    """The same alignment as dtw_reference, fast: the (n, m) costs for all pairs at once (`cost` if
    given, else extras/fast_align.py pair_costs), the table D one row at a time with a cumulative
    minimum (fast_align.dtw_table: integer costs, so D is exactly the reference's), and the same
    backtrack, so the same ties."""
    from extras.fast_align import dtw_table, pair_costs
    _check_dtw(source, target, ties)
    D = dtw_table(pair_costs(source, target) if cost is None else cost)
    return _backtrack(D, source, target, ties)


def _check_dtw(source, target, ties) -> tuple[int, int]:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}; choose one of {TIES}")
    if not source or not target:
        raise ValueError("dtw needs two non-empty token sequences")
    return len(source), len(target)


def _backtrack(D, source, target, ties):
    """Walk back from (n, m) to (1, 1) through the cheapest predecessors (ties: dtw_reference)."""
    n, m = len(source), len(target)
    end_s = np.cumsum([len(s) for s in source]).tolist()
    end_t = np.cumsum([len(t) for t in target]).tolist()
    inf = float("inf")
    out = [[] for _ in range(m)]
    i, j = n, m
    while True:
        out[j - 1].append(i - 1)
        if i == 1 and j == 1:
            break
        # predecessors in the official order: diagonal, source step, target step
        cand = ((i - 1, j - 1), (i - 1, j), (i, j - 1))
        vals = [D[a, b] if a >= 1 and b >= 1 else inf for a, b in cand]
        best = min(vals)
        tied = [k for k in range(3) if vals[k] == best]
        k = tied[0]
        if ties == "closest" and len(tied) > 1:
            k = min(tied, key=lambda k: (abs(end_s[cand[k][0] - 1] - end_t[cand[k][1] - 1]), k))
        i, j = cand[k]
    return [x[::-1] for x in out]   # i never grows on the way back: each list was built descending


# --------------------------------------------------------------------------------------------------
# 3. Vocabulary maps
#
# A vocab map sends every source id to a target id (or -1: no entry). Three kinds:
# - "em" (paper): the target token with the same normalized string;
# - "mined" (paper): the target token of minimum edit distance over the whole target vocabulary;
# - "next" (ours, the default): the token the target's own encoder emits first for the source
#   token's text. A source predicting '▁python' then teaches a target that writes '▁py|thon' its
#   '▁py', the token it must produce next, not the nearest string ('ython', MinED).
# Where several target ids tie, the one the target's encoder really produces for that text wins:
# sentencepiece with byte fallback has both '<0x65>' and 'e' for the text "e", and its encoder only
# ever emits 'e'; a label on '<0x65>' would teach the target a token it never sees. Asking the
# encoder (the next-token map, the tie order) is extras/emitted_tokens.py's work.

VOCAB_MAPS = ("em", "mined", "next")
MAP_TIES = ("emitted", "lowest")


def vocab_map_em(src_vocab: list[str], tgt_vocab: list[str], order=None) -> np.ndarray:
    """EM: source id -> the target id with the same normalized string, or -1. Several target ids
    with one string resolve to the first in `order` (preference_order; default the lowest id). Empty
    strings (control tokens) map to nothing."""
    index: dict[str, int] = {}                   # non-empty string -> its first id in the order
    for j in (range(len(tgt_vocab)) if order is None else order):
        if tgt_vocab[j]:
            index.setdefault(tgt_vocab[j], int(j))
    return np.array([index.get(s, -1) if s else -1 for s in src_vocab], dtype=np.int64)


def vocab_map_mined_reference(src_vocab: list[str], tgt_vocab: list[str],
                              order=None) -> tuple[np.ndarray, np.ndarray]:
    """MinED, the readable way: source id -> the target id of minimum edit distance over the whole
    target vocabulary, and that distance. Every source string is compared with every non-empty
    target string, in `order` (preference_order; default the lowest id first), and the first
    minimum wins the ties. Empty source strings (all, if no target is non-empty) map to -1."""
    targets = [int(j) for j in (range(len(tgt_vocab)) if order is None else order) if tgt_vocab[j]]
    out = np.full(len(src_vocab), -1, dtype=np.int64)
    dist = np.full(len(src_vocab), -1, dtype=np.int64)
    for i, s in enumerate(src_vocab):
        if s and targets:                        # no target string: it maps to nothing
            d = [levenshtein(s, tgt_vocab[j]) for j in targets]
            k = d.index(min(d))                  # the first minimum: the preferred id
            out[i], dist[i] = targets[k], d[k]
    return out, dist


def vocab_map(src_tok, tgt_tok, kind: str = "next", cache_dir=None,
              ties: str = "emitted") -> np.ndarray:
    """The vocab map of two tokenizers (source id -> target id or -1), cached on disk by the kind,
    the tie rule and the two tokenizers' vocabularies. Ties between target ids: "emitted" (default)
    follows the target's preference_order; "lowest" takes the lowest id, as the official code does.
    "mined" runs extras/fast_align.py's bounded search, which gives vocab_map_mined_reference's map
    in seconds instead of hours. BOS and EOS map to the target's BOS and EOS."""
    if kind not in VOCAB_MAPS or ties not in MAP_TIES:
        raise ValueError(f"vocab map kind {kind!r}, ties {ties!r}; "
                         f"choose from {VOCAB_MAPS} and {MAP_TIES}")
    sv, tv = normalized_vocab(src_tok), normalized_vocab(tgt_tok)
    if cache_dir:                   # it depends only on the two tokenizers: computed once
        from extras import vocab_map_cache
        path = vocab_map_cache.cache_file(cache_dir, kind, ties, src_tok, tgt_tok, sv, tv)
        if path.is_file():
            return np.load(path)
    order = None                                 # "lowest": the lowest id first
    if ties == "emitted":
        from extras.emitted_tokens import preference_order
        order = preference_order(tgt_tok, tv)
    if kind == "em":
        m = vocab_map_em(sv, tv, order)
    elif kind == "mined":
        from extras.fast_align import vocab_map_mined     # = vocab_map_mined_reference, fast
        m = vocab_map_mined(sv, tv, order=order)[0]
    else:
        from extras.emitted_tokens import vocab_map_next
        m = vocab_map_next(src_tok, tgt_tok, order)
    for s, t in ((src_tok.bos_id, tgt_tok.bos_id), (src_tok.eos_id, tgt_tok.eos_id)):
        if s is not None and t is not None:
            m[s] = t
    if cache_dir:
        vocab_map_cache.save(path, m)
    return m


# --------------------------------------------------------------------------------------------------
# 4. Which target positions take a source distribution, and the transfer
#
# The distribution at a token predicts what follows it. A target position can therefore take a
# source distribution only where the two tokens end at the same byte of the text ("exact", the
# default): otherwise the source predicts the continuation of a different prefix. The paper's rule
# (a 1:1 MinED-aligned pair whose tokens match) also accepts '▁hello' aligned to '▁hel', and then
# teaches the target, at '▁hel', what follows 'hello'.

POSITIONS = ("exact", "paper")
FALLBACKS = ("next", "official")   # unmatched positions: a one-hot on the next token or current one
MERGES = ("sum", "first")          # top-K ids landing on one target id: add them, or keep the first


@lru_cache(maxsize=1 << 18)
def _nbytes(norm: str) -> int:
    """Bytes of the text a normalized token stands for: '▁' and each stray byte are one byte."""
    return sum(1 if c == SPACE or BYTE_BASE <= ord(c) < BYTE_BASE + 256 else len(c.encode())
               for c in norm)


def byte_ends(ids, vocab: list[str]) -> np.ndarray:
    """(n,) where each token ends, in bytes, counted so that the text's last byte is at 0 (ends are
    <= 0). Counting back from the end makes two tokenizations of one text agree even though
    sentencepiece puts a space (its dummy prefix) before the first token."""
    n = np.array([_nbytes(vocab[i]) for i in ids], dtype=np.int64)
    return np.cumsum(n) - n.sum()


def common_tail(src_ids, tgt_ids, src_vocab: list[str], tgt_vocab: list[str]) -> int:
    """How many bytes at the end of the text both tokenizations spell alike. All of it, but for
    sentencepiece's dummy prefix, unless a tokenizer changed the text (NFC/NFKC normalisation,
    collapsed spaces, an unknown piece): byte ends counted back from the end are exact only inside
    this tail."""
    s = "".join(src_vocab[i] for i in src_ids)
    t = "".join(tgt_vocab[j] for j in tgt_ids)
    tail = os.path.commonprefix([s[::-1], t[::-1]])
    return _nbytes(tail[::-1])


def byte_alignment(src_ids, tgt_ids, src_vocab: list[str],
                   tgt_vocab: list[str]) -> list[list[int]]:
    """The exact alignment, from where each token sits in the text (no edit distances): for each
    target position, the source positions whose bytes overlap its bytes; a token with no bytes gets
    the source token that ends at or after it. Same form as dtw()'s result."""
    s_end, t_end = byte_ends(src_ids, src_vocab), byte_ends(tgt_ids, tgt_vocab)
    s_start = s_end - np.array([_nbytes(src_vocab[i]) for i in src_ids])
    t_start = t_end - np.array([_nbytes(tgt_vocab[j]) for j in tgt_ids])
    out, i, n = [], 0, len(src_ids)
    for j in range(len(tgt_ids)):
        while i < n - 1 and s_end[i] <= t_start[j] and s_end[i] < t_end[j]:
            i += 1                          # source token i ends before target token j starts
        k, hits = i, []
        while k < n and s_start[k] < t_end[j]:
            if s_end[k] > t_start[j] or s_end[k] == t_end[j]:
                hits.append(k)
            k += 1
        out.append(hits or [i])
    return out


def matched_positions(alignment, src_ids, tgt_ids, vmap, src_vocab, tgt_vocab, positions="exact",
                      mode="mined") -> np.ndarray:
    """(m,) for each target position the source position whose distribution it takes, or -1.

    "exact": the source position i among alignment[j] whose token ends at the same byte as target
    token j, where also the target's next token ends no later than the source's next token: the
    source's distribution at i is over tokens like its own next one, and a target token longer than
    that is beyond what it says. Only positions inside the common_tail of the two tokenizations
    count: before a place where a tokenizer changed the text, byte counts no longer correspond.
    "paper": alignment[j] == [i] (1:1) and the two tokens match: their normalized strings are equal,
    or (mode "mined"/"next") the vocab map sends source token i to target token j. At the first
    position a leading '▁' is ignored in this test, since sentencepiece puts one on its first
    token."""
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; choose one of {POSITIONS}")
    m = len(tgt_ids)
    if len(alignment) != m:
        raise ValueError(f"alignment covers {len(alignment)} target positions, the target has {m}")
    out = np.full(m, -1, dtype=np.int64)
    if positions == "exact":
        s_end, t_end = byte_ends(src_ids, src_vocab), byte_ends(tgt_ids, tgt_vocab)
        tail = common_tail(src_ids, tgt_ids, src_vocab, tgt_vocab)
        n = len(src_ids)
        for j, src in enumerate(alignment):
            same = [i for i in src if s_end[i] == t_end[j] and -t_end[j] <= tail]
            # the target's next token must end within the source's next one: a source that writes
            # ' un' next says nothing about a target whose next token is ' unbelievable'
            if same and (j + 1 == m or same[-1] + 1 == n or t_end[j + 1] <= s_end[same[-1] + 1]):
                out[j] = same[-1]
        return out

    def text(vocab, token_id, first):
        return vocab[token_id].removeprefix(SPACE) if first else vocab[token_id]

    for j, src in enumerate(alignment):
        if len(src) != 1:
            continue
        i = src[0]
        s, t = text(src_vocab, src_ids[i], j == 0), text(tgt_vocab, tgt_ids[j], j == 0)
        mapped = vmap[src_ids[i]]
        by_map = mode != "em" and mapped >= 0 and (mapped == tgt_ids[j]
                                                   or text(tgt_vocab, mapped, j == 0) == t)
        if s == t or by_map:
            out[j] = i
    return out


@dataclass
class Transferred:
    """Per target position, a sparse distribution over target ids: ids[offsets[j]:offsets[j+1]] with
    log-probs (not renormalized: their probabilities sum to the kept mass). No entries = fall back
    to a one-hot on the next-token label (with fallback "official" the one-hot on the current token
    is stored as the position's entry instead, since that is what the official code trains on)."""
    offsets: np.ndarray            # (m+1,) int64
    ids: np.ndarray                # (N,) int64 target ids
    logprobs: np.ndarray           # (N,) float32
    fallback: np.ndarray           # (m,) bool: True where position j falls back to a one-hot
    onehot: np.ndarray             # (m,) int64: the fallback's target id (-1: none, e.g. at the
                                   # last position, which has no next token)
    matched: np.ndarray            # (m,) int64: the source position each target position took, -1
    alignment: list | None = None  # carry's alignment (for each target position, its source
                                   # positions), kept for the diagnostics


def transfer(matched, src_ids, tgt_ids, src_topk_ids: np.ndarray, src_topk_logprobs: np.ndarray,
             vmap: np.ndarray, fallback: str = "next", merge: str = "sum",
             labels=None) -> Transferred:
    """Move source distributions onto target positions.

    matched (m,): the source position each target position takes (matched_positions), -1 for none;
    src_ids / tgt_ids: the two token sequences; src_topk_* (n, K): the source's top-K at each of its
    positions; vmap: the vocab map (source id -> target id or -1).

    At a matched position i the source's top-K ids go through `vmap`, or through labels(src_ids, i,
    ids) that read the text around (nanofuse's "context", extras/emitted_tokens.py ContextLabels:
    GPT-NeoX's '    ' before "def" gets Llama-2's '▁▁▁' of '▁▁▁' '▁def', not the map's '▁▁▁▁'). Ids
    with no target entry are dropped (their mass is lost); ids that land on one target id are
    merged: "sum" adds their probabilities, "first" keeps the most probable (the official code).
    Every other position falls back to a one-hot on the next-token label tgt_ids[j+1] ("next": the
    distribution at j predicts token j+1; none after the last token), or on the current token
    tgt_ids[j] ("official": the official code's off-by-one, kept for reproducing it).

    How good the carried labels are (mass lost in the map, mass on the target's true next token, an
    oracle source's score) is measured from the result by extras/align_stats.py `window_stats`."""
    if fallback not in FALLBACKS or merge not in MERGES:
        raise ValueError(f"transfer: fallback={fallback!r} merge={merge!r} not understood")
    m = len(tgt_ids)
    if len(matched) != m:
        raise ValueError(f"transfer: {len(matched)} matches for {m} target positions")
    offsets = np.zeros(m + 1, dtype=np.int64)
    ids_out, lp_out = [], []
    is_fallback = np.ones(m, dtype=bool)
    onehot = np.full(m, -1, dtype=np.int64)
    if fallback == "next":
        onehot[:-1] = np.asarray(tgt_ids[1:], dtype=np.int64)
    else:
        onehot[:] = np.asarray(tgt_ids, dtype=np.int64)
    for j in range(m):
        i = int(matched[j])
        merged: dict[int, float] = {}
        if i >= 0:
            ids = vmap[src_topk_ids[i]] if labels is None else labels(src_ids, i, src_topk_ids[i])
            p = np.exp(src_topk_logprobs[i].astype(np.float64))          # (K,) probabilities
            keep = ids >= 0
            for tid, pk in zip(ids[keep].tolist(), p[keep].tolist()):
                if tid not in merged:
                    merged[tid] = pk
                elif merge == "sum":
                    merged[tid] += pk
        if merged:                                  # empty: unmatched, or every top-K id unmapped
            is_fallback[j] = False
            ids_out += merged.keys()
            lp_out += np.log(list(merged.values())).tolist()
        elif fallback == "official" and onehot[j] >= 0:
            ids_out.append(int(onehot[j]))          # stored, so training uses it
            lp_out.append(0.0)
        offsets[j + 1] = len(ids_out)
    onehot[~is_fallback] = -1
    return Transferred(offsets, np.array(ids_out, dtype=np.int64),
                       np.array(lp_out, dtype=np.float32), is_fallback, onehot,
                       np.asarray(matched, dtype=np.int64))


def carry(src_ids, tgt_ids, src_topk_ids, src_topk_logprobs, vmap, src_vocab, tgt_vocab,
          positions="exact", vocab_kind="next", ties="closest", fallback="next", merge="sum",
          costs=None, labels=None) -> Transferred:
    """One sequence, every step: the alignment (byte_alignment for exact positions, MinED dtw for
    the paper's), the matched positions, and the transfer. costs: a pair-cost function for dtw
    (e.g. extras/fast_align.py PairCosts, which keeps them across windows); labels: transfer's."""
    if positions == "exact":
        alignment = byte_alignment(src_ids, tgt_ids, src_vocab, tgt_vocab)
    else:
        s_norm, t_norm = [src_vocab[i] for i in src_ids], [tgt_vocab[j] for j in tgt_ids]
        alignment = dtw(s_norm, t_norm, ties=ties,
                        cost=costs(s_norm, t_norm) if costs is not None else None)
    matched = matched_positions(alignment, src_ids, tgt_ids, vmap, src_vocab, tgt_vocab, positions,
                                vocab_kind)
    tr = transfer(matched, src_ids, tgt_ids, src_topk_ids, src_topk_logprobs, vmap, fallback, merge,
                  labels)
    tr.alignment = alignment
    return tr


# --------------------------------------------------------------------------------------------------
# 5. Presets: the choices above (positions: matched_positions; vocab_map, map_ties: vocab_map;
# ties: dtw; fallback, merge and nanofuse's context: transfer), chosen together.
#
# "nanofuse" (default, ours): a position takes a distribution only where both tokens end at the
#   same byte, so the source predicts what follows the same text, and the label is the token the
#   target itself emits next there, in context (a run of spaces cut as the target cuts it before
#   what follows), never a byte piece it never sees; no DTW. Oracle labels are right at 0.998 from
#   Llama-3 onto Mistral v1 (0.779 "paper"), 0.995 from GPT-NeoX onto Llama-2 (0.922 context-free).
# "paper": MinED alignment, the 1:1 match rule and the MinED vocab map, with what the paper leaves
#   open decided as nanofuse decides it. Its EM ablation is "paper" with vocab_map="em".
# "official": the official FuseLLM code's choices, mistakes included: lowest-id map ties, argmin
#   order for path ties, the one-hot on the current token, the first duplicate kept.

PRESETS = {
    "nanofuse": dict(positions="exact", vocab_map="next", map_ties="emitted", ties="closest",
                     fallback="next", merge="sum", context="whitespace-token"),
    "paper": dict(positions="paper", vocab_map="mined", map_ties="emitted", ties="closest",
                  fallback="next", merge="sum"),
    "official": dict(positions="paper", vocab_map="mined", map_ties="lowest", ties="official",
                     fallback="official", merge="first"),
}


def alignment_settings(preset: str = "nanofuse", vocab_map: str | None = None) -> dict:
    """The settings of a preset, its vocab map replaced by `vocab_map` if given (the paper's own
    ablation is preset "paper" with vocab_map "em"). A preset or map not in the tables: ValueError
    naming the choices."""
    if preset not in PRESETS:
        raise ValueError(f"alignment preset {preset!r}; choose one of {tuple(PRESETS)}")
    if vocab_map is not None and vocab_map not in VOCAB_MAPS:
        raise ValueError(f"vocab map {vocab_map!r}; choose one of {VOCAB_MAPS}")
    settings = dict(PRESETS[preset])
    if vocab_map is not None:
        settings["vocab_map"] = vocab_map
    return settings

