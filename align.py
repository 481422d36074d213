"""
align.py: carrying a source model's next-token distributions onto the target's tokens.

Two tokenizers cut the same text differently. To train the target on a source's predictions we
1. write every token as comparable text (`normalize`),
2. align the two token sequences: exactly, from where each token sits in the text (`byte_alignment`), or by
   the paper's minimum edit distance (`dtw`, the MinED dynamic program),
3. map the source vocabulary onto the target's (`vocab_map`: EM and MinED from the paper, and our
   next-token map), ties going to the token the target's encoder really emits (`preference_order`),
4. choose the target positions that take a source distribution (`matched_positions`: tokens that end at the
   same byte by default, the paper's 1:1 rule as an option) and move the distributions there (`transfer`),
   measuring how much of the carried probability lands on the target's true next token.

The docstrings say exactly what each step decides; README.md "Alignment" walks through an example.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from common import atomic_path

SPACE = "\u2581"          # '▁': how a normalized token writes a space
BYTE_BASE = 0xF700        # a stray byte b is written as chr(BYTE_BASE + b), a private-use character


# ----------------------------------------------------------------------------------------------------
# 1. Token normalisation


def normalize(token_bytes: bytes) -> str:
    """The text of a token in one form for every tokenizer: the UTF-8 text of its bytes with each space
    written as '▁'. Sentencepiece's '▁the' and byte-level BPE's 'Ġthe' both become '▁the'; '<0x0A>' and 'Ċ'
    both become '\\n'. A byte that is not part of a complete UTF-8 character inside this token (a byte-fallback
    piece, or a multi-byte character split across tokens) becomes one private-use character chr(0xF700 + byte),
    so it counts as one character in edit distances and equals only the same byte. Tokens with no bytes
    (control tokens such as <s>) normalize to ''."""
    out, i = [], 0
    while i < len(token_bytes):
        for n in (4, 3, 2, 1):                     # the longest valid UTF-8 character starting here
            try:
                ch = token_bytes[i:i + n].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if len(ch) == 1:
                out.append(SPACE if ch == " " else ch)
                i += n
                break
        else:
            out.append(chr(BYTE_BASE + token_bytes[i]))
            i += 1
    return "".join(out)


def display(norm: str) -> str:
    """A normalized token for people: stray bytes shown as <0xNN>."""
    return "".join(f"<0x{ord(c) - BYTE_BASE:02X}>" if BYTE_BASE <= ord(c) < BYTE_BASE + 256 else c for c in norm)


def normalized_vocab(tok) -> list[str]:
    """normalize() of every id of a tokenizer (see tokenizer.py)."""
    return [normalize(tok.token_bytes(i)) for i in range(tok.vocab_size)]


# ----------------------------------------------------------------------------------------------------
# Edit distance: one readable reference, one vectorised version for many pairs at once


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions, each costing 1 (Wagner-Fischer, one row at a time)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j - 1] + (ca != cb), prev[j] + 1, cur[j - 1] + 1))
        prev = cur
    return prev[-1]


def _by_length(strings: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Group strings by length: length -> (their indices, (n, length) int32 array of code points)."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(strings):
        groups.setdefault(len(x), []).append(i)
    return {n: (np.array(idx), np.array([[ord(c) for c in strings[i]] for i in idx], dtype=np.int32).reshape(len(idx), n))
            for n, idx in groups.items()}


def edit_distances(a: list[str], b: list[str]) -> np.ndarray:
    """levenshtein(a[i], b[j]) for all pairs: (len(a), len(b)) int32.

    Wagner-Fischer run for many pairs at once, one character of the a-strings per step, with both sides
    grouped by length so no step is wasted on padding. Within a row the insertion chain
    R[q] = min(X[q], R[q-1] + 1) unrolls to R[q] = q + min_{k<=q}(X[k] - k), a cumulative minimum, so each
    step is a few whole-array operations."""
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    b_groups = _by_length(b)
    for la, (rows, ac) in _by_length(a).items():
        for lb, (cols, bc) in b_groups.items():
            if la == 0 or lb == 0:
                out[rows[:, None], cols[None, :]] = la + lb
                continue
            if la <= lb:                    # step over the shorter side (the distance is symmetric)
                out[rows[:, None], cols[None, :]] = _wagner_fischer(ac, bc)
            else:
                out[rows[:, None], cols[None, :]] = _wagner_fischer(bc, ac).T
    return out


def _wagner_fischer(ac: np.ndarray, bc: np.ndarray) -> np.ndarray:
    """Edit distances of every row of ac (A, la) to every row of bc (B, lb): (A, B). The DP row index q
    comes first, (lb+1, A, B), so every operation runs over contiguous A x B slabs."""
    la, lb = ac.shape[1], bc.shape[1]
    q = np.arange(lb + 1, dtype=np.int16)[:, None, None]                 # (lb+1, 1, 1)
    R = np.broadcast_to(q, (lb + 1, len(ac), len(bc)))                    # '' vs b[:q]: q edits
    X = np.empty((lb + 1, len(ac), len(bc)), dtype=np.int16)
    bt = bc.T[:, None, :]                                                 # (lb, 1, B)
    for p in range(la):
        sub = ac[None, :, p, None] != bt                                  # (lb, A, B) substitution costs
        X[0] = p + 1
        np.minimum(R[:-1] + sub, R[1:] + 1, out=X[1:])
        X -= q
        np.minimum.accumulate(X, axis=0, out=X)
        R = X + q
    return R[lb]


# ----------------------------------------------------------------------------------------------------
# 2. Sequence alignment (MinED): dynamic time warping over edit distances

TIES = ("closest", "official")


def dtw_reference(source: list[str], target: list[str], ties: str = "closest") -> list[list[int]]:
    """MinED alignment of two normalized token sequences, the readable way.

    Recurrence, with cost(a, b) = levenshtein(a, b), 1-based i over source and j over target:
        D[0,0] = 0,  D[i,0] = D[0,j] = inf
        D[i,j] = cost(s_i, t_j) + min(D[i-1,j-1], D[i-1,j], D[i,j-1])
    Backtrack from (n, m) to (1, 1), at each cell stepping to the predecessor of smallest D. Every cell on
    the path pairs s_i with t_j; the result lists, for each target position j (0-based), the sorted source
    positions paired with it.

    Ties between predecessors of equal D:
    - "official": diagonal, then a source step (i-1, j), then a target step (i, j-1), the order of the
      official FuseLLM code, so its alignments can be reproduced;
    - "closest" (default): the predecessor whose two tokens end closest together in the text (by the
      character offsets of the normalized tokens), then the official order. Equal-cost paths are then
      told apart by where the tokens actually sit."""
    n, m = _check_dtw(source, target, ties)
    inf = float("inf")
    D = [[inf] * (m + 1) for _ in range(n + 1)]
    D[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            D[i][j] = levenshtein(source[i - 1], target[j - 1]) + min(D[i - 1][j - 1], D[i - 1][j], D[i][j - 1])
    return _backtrack(np.array(D), source, target, ties)


def _check_dtw(source, target, ties) -> tuple[int, int]:
    if ties not in TIES:
        raise ValueError(f"ties={ties!r}; choose one of {TIES}")
    if not source or not target:
        raise ValueError("dtw needs two non-empty token sequences")
    return len(source), len(target)


def _backtrack(D, source, target, ties):
    """Walk back from (n, m) to (1, 1) through the cheapest predecessors (see dtw_reference for the ties)."""
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
    return [x[::-1] for x in out]          # i never grows on the way back: each list was built descending


def dtw(source: list[str], target: list[str], ties: str = "closest", cost: np.ndarray | None = None) -> list[list[int]]:
    """The same alignment as dtw_reference, fast: costs for all pairs at once (edit_distances over the
    unique tokens, or `cost` given as an (n, m) array), and the DP one row at a time.

    Row i needs D[i,j] = min(A[j], c[i,j] + D[i,j-1]) with A[j] = c[i,j] + min(D[i-1,j-1], D[i-1,j]).
    Unrolled with the row's prefix sums S[j] = c[i,1] + ... + c[i,j]:  D[i,j] = S[j] + min_{k<=j}(A[k] - S[k]),
    a cumulative minimum. Costs are integers, so D equals the reference's exactly, and so do its ties."""
    n, m = _check_dtw(source, target, ties)
    if cost is None:
        cost = pair_costs(source, target)
    INF = np.int32(1 << 29)                  # never reached by a real path: n+m steps of short tokens
    c = np.asarray(cost, dtype=np.int32)
    S = np.cumsum(c, axis=1, dtype=np.int32)                              # (n, m) row prefix sums
    D = np.empty((n + 1, m + 1), dtype=np.int32)
    D[0] = INF
    D[:, 0] = INF
    D[0, 0] = 0
    A = np.empty(m, dtype=np.int32)
    for i in range(1, n + 1):
        np.minimum(D[i - 1, :-1], D[i - 1, 1:], out=A)                   # min(D[i-1,j-1], D[i-1,j])
        A += c[i - 1]
        A -= S[i - 1]
        np.minimum.accumulate(A, out=A)
        np.add(A, S[i - 1], out=D[i, 1:])
    return _backtrack(D, source, target, ties)


def _unique(tokens: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct tokens, and for each position the index of its token among them."""
    u, inverse = np.unique(np.array(tokens, dtype=object), return_inverse=True)
    return list(u), inverse


def pair_costs(source: list[str], target: list[str]) -> np.ndarray:
    """(n, m) int32 edit distances, computed once per pair of distinct tokens."""
    (us, si), (ut, ti) = _unique(source), _unique(target)
    return edit_distances(us, ut)[si[:, None], ti[None, :]]


class PairCosts:
    """pair_costs that remembers: a corpus repeats its token pairs window after window, so after the first
    windows most edit distances are looked up rather than computed. The first `cap` distinct tokens of each
    side (the frequent ones come early) get a slot in a (cap, cap) uint8 table, 255 meaning not yet known;
    tokens beyond the cap are simply computed every time. Results equal pair_costs exactly."""

    UNKNOWN = 255

    def __init__(self, cap: int = 8192):
        self.cap = cap
        self.slots: tuple[dict, dict] = ({}, {})
        self.table = np.full((cap, cap), self.UNKNOWN, dtype=np.uint8)

    def _slot(self, side: int, token: str) -> int:
        slots = self.slots[side]
        if token not in slots:
            if len(slots) >= self.cap:
                return -1
            slots[token] = len(slots)
        return slots[token]

    def __call__(self, source: list[str], target: list[str]) -> np.ndarray:
        (us, si), (ut, ti) = _unique(source), _unique(target)
        rs = np.array([self._slot(0, x) for x in us])
        cs = np.array([self._slot(1, x) for x in ut])
        vals = self.table[np.maximum(rs, 0)[:, None], np.maximum(cs, 0)[None, :]].astype(np.int32)
        vals[rs < 0, :] = self.UNKNOWN
        vals[:, cs < 0] = self.UNKNOWN
        missing = vals == self.UNKNOWN
        new_rows = np.flatnonzero(missing.all(axis=1))                 # tokens never seen: whole rows
        if new_rows.size:
            vals[new_rows] = edit_distances([us[r] for r in new_rows], ut)
            missing[new_rows] = False
        rows, cols = np.flatnonzero(missing.any(axis=1)), np.flatnonzero(missing.any(axis=0))
        if rows.size:                                                   # known rows, new or unmet columns
            vals[rows[:, None], cols[None, :]] = edit_distances([us[r] for r in rows], [ut[c] for c in cols])
        keep = (rs >= 0)[:, None] & (cs >= 0)[None, :] & (vals < self.UNKNOWN)
        r_idx, c_idx = np.nonzero(keep)
        self.table[rs[r_idx], cs[c_idx]] = vals[r_idx, c_idx]
        return vals[si[:, None], ti[None, :]]


# ----------------------------------------------------------------------------------------------------
# 3. Vocabulary maps
#
# A vocab map sends every source id to a target id (or -1: no entry). Three kinds:
# - "em" (paper): the target token with the same normalized string;
# - "mined" (paper): the target token of minimum edit distance over the whole target vocabulary;
# - "next" (ours): the target token the target's own encoder emits first for the source token's text.
# Where several target ids tie, the one the target's encoder really produces for that text wins
# (`preference_order`). Sentencepiece with byte fallback has both '<0x65>' and 'e' for the text "e", and its
# encoder only ever emits 'e'; a label on '<0x65>' would teach the target a token it never sees.

VOCAB_MAPS = ("em", "mined", "next")
ANCHOR = "\n"           # what continuation() puts before a text so that it is encoded as a continuation


def continuation(tok, text: str) -> list[int] | None:
    """The tokens a tokenizer gives `text` where the text continues other text: encode ANCHOR + text and
    keep the tokens after the anchor. A newline is a boundary tokenizers keep: sentencepiece puts its dummy
    prefix '▁' before the newline, not before the text, and byte-level pre-tokenizers split there. None when
    the tokens after the anchor do not spell exactly the text (a token joins the newline to the text, or the
    tokenizer normalised the text)."""
    ids = tok.encode(ANCHOR + text)
    want, got = text.encode("utf-8"), b""
    for k in range(len(ids) - 1, -1, -1):
        got = tok.token_bytes(ids[k]) + got
        if got == want:
            return ids[k:]
        if not want.endswith(got):
            return None
    return None


def preference_order(tok, vocab: list[str] | None = None) -> np.ndarray:
    """Every id of a (target) tokenizer, preferred ids first. Where several ids share one normalized string,
    the id the encoder emits for that text (continuation(text) == [id]) comes first; otherwise lower ids
    first. Every vocab map breaks its ties by this order."""
    vocab = normalized_vocab(tok) if vocab is None else vocab
    groups: dict[str, list[int]] = {}
    for j, t in enumerate(vocab):
        if t:
            groups.setdefault(t, []).append(j)
    rank = np.zeros(len(vocab), dtype=np.int64)
    for ids in groups.values():
        if len(ids) < 2:
            continue
        for j in ids:
            try:
                emitted = continuation(tok, tok.token_bytes(j).decode("utf-8")) == [j]
            except UnicodeDecodeError:                 # a lone byte: no text to encode
                emitted = False
            rank[j] = 0 if emitted else 1
    return np.lexsort((np.arange(len(vocab)), rank))


def _ranks(order, n: int) -> np.ndarray:
    """The inverse of a preference order: rank[id] = its place in the order (identity order if None)."""
    rank = np.arange(n)
    if order is not None:
        rank[np.asarray(order)] = np.arange(n)
    return rank


def _string_index(vocab: list[str], order=None) -> dict[str, int]:
    """Non-empty normalized string -> its first id in `order` (default: its lowest id)."""
    index: dict[str, int] = {}
    for j in (range(len(vocab)) if order is None else order):
        if vocab[j]:
            index.setdefault(vocab[j], int(j))
    return index


def vocab_map_em(src_vocab: list[str], tgt_vocab: list[str], order=None) -> np.ndarray:
    """EM: source id -> the target id with the same normalized string, or -1. Several target ids with one
    string resolve to the first in `order` (preference_order; default the lowest id). Empty strings (control
    tokens) map to nothing."""
    index = _string_index(tgt_vocab, order)
    return np.array([index.get(s, -1) if s else -1 for s in src_vocab], dtype=np.int64)


def vocab_map_mined(src_vocab: list[str], tgt_vocab: list[str], threads: int | None = None,
                    progress=None, order=None) -> tuple[np.ndarray, np.ndarray]:
    """MinED: source id -> the target id of minimum edit distance over the whole target vocabulary, and
    that distance. Ties go to the first target id in `order` (preference_order; default the lowest id).
    Empty strings map to nothing (-1).

    Exact, but not |Vs| x |Vt| edit distances: distance 0 and 1 come from dictionaries, and for the rest
    the target vocabulary is searched by length, nearest lengths first (|len(s) - len(t)| is a lower bound
    on the distance), stopping once no unsearched length can beat the best found. Within a length, the
    characters two strings share give a second lower bound, max(len) - common, exact when nothing is shared:
    the DP runs only on targets whose bound could still beat (or tie) the best found."""
    order = np.arange(len(tgt_vocab)) if order is None else np.asarray(order)
    rank = _ranks(order, len(tgt_vocab))
    em = vocab_map_em(src_vocab, tgt_vocab, order)
    dist = np.where(em >= 0, 0, -1).astype(np.int64)
    best = em.copy()
    # distance 1, by hashing: a substitution shares a key (position, string without it), a deletion from the
    # source lands on a target, an insertion is a deletion from the target. The preferred target id wins.
    wild, dels = {}, {}
    for j in order.tolist():
        t = tgt_vocab[j]
        for k in range(len(t)):
            wild.setdefault((k, t[:k] + t[k + 1:]), j)
            dels.setdefault(t[:k] + t[k + 1:], j)
    exact = _string_index(tgt_vocab, order.tolist())
    for i, s in enumerate(src_vocab):
        if not s or em[i] >= 0:
            continue
        hits = [wild.get((k, s[:k] + s[k + 1:]), -1) for k in range(len(s))]
        hits += [exact.get(s[:k] + s[k + 1:], -1) for k in range(len(s))]
        hits.append(dels.get(s, -1))
        hits = [h for h in hits if h >= 0 and tgt_vocab[h]]
        if hits:
            best[i], dist[i] = min(hits, key=rank.__getitem__), 1
    todo = [i for i, s in enumerate(src_vocab) if s and dist[i] < 0]
    tgt_by_len: dict[int, np.ndarray] = {}
    for j in order.tolist():                           # within one length, preferred ids first
        if tgt_vocab[j]:
            tgt_by_len.setdefault(len(tgt_vocab[j]), []).append(j)
    tgt_by_len = {k: np.array(v) for k, v in tgt_by_len.items()}
    lengths = sorted(tgt_by_len)
    # which targets of each length hold a character, and how many times: an edit script keeps at most
    # `common` characters in place (the multiset intersection), and every other character of the longer string
    # costs an edit, so distance >= max(len) - common. With no character in common that bound is the distance
    # (every aligned pair a substitution); the DP runs only where the bound could beat the best found so far.
    holding: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for ell, ids in tgt_by_len.items():
        cols_of: dict[str, list[int]] = {}
        counts_of: dict[str, list[int]] = {}
        for col, j in enumerate(ids.tolist()):
            for c, n in Counter(tgt_vocab[j]).items():
                cols_of.setdefault(c, []).append(col)
                counts_of.setdefault(c, []).append(n)
        holding[ell] = {c: (np.array(v), np.array(counts_of[c], dtype=np.int32)) for c, v in cols_of.items()}
    codes = {ell: np.array([[ord(c) for c in tgt_vocab[j]] for j in ids.tolist()], dtype=np.int32).reshape(len(ids), ell)
             for ell, ids in tgt_by_len.items()}                # each length's targets as code points, once
    by_len: dict[int, list[int]] = {}
    for i in todo:
        by_len.setdefault(len(src_vocab[i]), []).append(i)
    for rows in by_len.values():                       # rows of one script together: fewer targets to share with
        rows.sort(key=lambda i: (min(src_vocab[i]), src_vocab[i]))
    chunks = [(L, rows[k:k + 16]) for L, rows in by_len.items() for k in range(0, len(rows), 16)]

    def search(job):
        L, rows = job
        bd = np.full(len(rows), 1 << 30, dtype=np.int64)
        bj = np.full(len(rows), order[0], dtype=np.int64)
        mine = np.array([[ord(c) for c in src_vocab[i]] for i in rows], dtype=np.int32).reshape(len(rows), L)
        counts = [Counter(src_vocab[i]) for i in rows]
        held = {c: np.array([n.get(c, 0) for n in counts], dtype=np.int32) for c in set().union(*counts)}  # (r,)
        for ell in sorted(lengths, key=lambda x: (abs(x - L), x)):
            if abs(ell - L) > bd.max():
                break
            ids = tgt_by_len[ell]
            common = np.zeros((len(rows), len(ids)), dtype=np.int32)                           # (r, n_ell)
            for c, n in held.items():
                if c in holding[ell]:
                    cols, m = holding[ell][c]
                    common[:, cols] += np.minimum(n[:, None], m[None, :])
            d = max(L, ell) - common                   # the lower bound; exact where nothing is shared
            cols = np.flatnonzero(((common > 0) & (d <= bd[:, None])).any(axis=0))
            if len(cols):                              # the DP over the shorter side (the distance is symmetric)
                d[:, cols] = _wagner_fischer(mine, codes[ell][cols]) if L <= ell else \
                    _wagner_fischer(codes[ell][cols], mine).T
            k = d.argmin(axis=1)                        # first minimum: the preferred id within this length
            dk = d[np.arange(len(rows)), k].astype(np.int64)
            jk = ids[k]
            better = (dk < bd) | ((dk == bd) & (rank[jk] < rank[bj]))
            bd, bj = np.where(better, dk, bd), np.where(better, jk, bj)
        return rows, bd, bj

    done = 0
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:   # numpy releases the GIL
        for rows, bd, bj in pool.map(search, chunks):
            best[rows], dist[rows] = bj, bd
            done += len(rows)
            if progress:
                progress(done, len(todo))
    return best, dist


def vocab_map_next(src_tok, tgt_tok, order=None) -> np.ndarray:
    """Next-token map (ours): source id -> the first token the target's encoder emits for the source token's
    text as a continuation (`continuation`). A source predicting '▁python' teaches a target that writes
    '▁py|thon' its '▁py': the token the target must produce next, not the nearest string ('ython', MinED).
    Where the encoder cannot be asked (a partial UTF-8 character, a text the target normalises), the longest
    target token whose bytes begin the source token's bytes, the first in `order` among equal bytes.
    Tokens with no bytes map to nothing (-1)."""
    by_bytes: dict[bytes, int] = {}
    for j in (range(tgt_tok.vocab_size) if order is None else np.asarray(order).tolist()):
        b = tgt_tok.token_bytes(j)
        if b:
            by_bytes.setdefault(b, int(j))
    longest = max(map(len, by_bytes))
    out = np.full(src_tok.vocab_size, -1, dtype=np.int64)
    for i in range(src_tok.vocab_size):
        b = src_tok.token_bytes(i)
        if not b:
            continue
        try:
            ids = continuation(tgt_tok, b.decode("utf-8"))
        except UnicodeDecodeError:
            ids = None
        if ids:
            out[i] = ids[0]
            continue
        for n in range(min(len(b), longest), 0, -1):
            if b[:n] in by_bytes:
                out[i] = by_bytes[b[:n]]
                break
    return out


MAP_TIES = ("emitted", "lowest")


def vocab_map(src_tok, tgt_tok, kind: str = "next", cache_dir=None, ties: str = "emitted") -> np.ndarray:
    """The vocab map of two tokenizers (source id -> target id or -1), cached on disk by the kind, the tie
    rule and the two tokenizers' vocabularies. Ties between target ids: "emitted" (default) follows the
    target's preference_order; "lowest" takes the lowest id, as the official code does. BOS and EOS map to
    the target's BOS and EOS."""
    if kind not in VOCAB_MAPS or ties not in MAP_TIES:
        raise ValueError(f"vocab map kind {kind!r}, ties {ties!r}; choose from {VOCAB_MAPS} and {MAP_TIES}")
    sv, tv = normalized_vocab(src_tok), normalized_vocab(tgt_tok)
    ends = [src_tok.bos_id, src_tok.eos_id, tgt_tok.bos_id, tgt_tok.eos_id]
    key = hashlib.sha256(json.dumps([2, kind, ties, src_tok.kind, tgt_tok.kind, ends, sv, tv]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"vocab_map_{kind}_{ties}_{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    order = preference_order(tgt_tok, tv) if ties == "emitted" else None
    if kind == "em":
        m = vocab_map_em(sv, tv, order)
    elif kind == "mined":
        m = vocab_map_mined(sv, tv, order=order)[0]
    else:
        m = vocab_map_next(src_tok, tgt_tok, order)
    for s, t in ((src_tok.bos_id, tgt_tok.bos_id), (src_tok.eos_id, tgt_tok.eos_id)):
        if s is not None and t is not None:
            m[s] = t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.save(tmp, m)
    return m


# ----------------------------------------------------------------------------------------------------
# 4. Which target positions take a source distribution, and the transfer
#
# The distribution at a token predicts what follows it. A target position can therefore take a source
# distribution only where the two tokens end at the same byte of the text: otherwise the source predicts
# the continuation of a different prefix. "exact" positions (default) check exactly that; "paper" positions
# are the paper's rule (a 1:1 MinED-aligned pair whose tokens match), which also accepts '▁hello' aligned to
# '▁hel' and then teaches the target, at '▁hel', what follows 'hello'.

POSITIONS = ("exact", "paper")
FALLBACKS = ("next", "official")     # unmatched positions: one-hot on the next token, or on the current one
MERGES = ("sum", "first")            # top-K ids landing on one target id: add them, or keep the first


@lru_cache(maxsize=1 << 18)
def _nbytes(norm: str) -> int:
    """Bytes of the text a normalized token stands for: '▁' and each stray byte are one byte."""
    return sum(1 if c == SPACE or BYTE_BASE <= ord(c) < BYTE_BASE + 256 else len(c.encode()) for c in norm)


def byte_ends(ids, vocab: list[str]) -> np.ndarray:
    """(n,) where each token ends, in bytes, counted so that the text's last byte is at 0 (ends are <= 0).
    Counting back from the end makes two tokenizations of one text agree even though sentencepiece puts a
    space (its dummy prefix) before the first token."""
    n = np.array([_nbytes(vocab[i]) for i in ids], dtype=np.int64)
    return np.cumsum(n) - n.sum()


def common_tail(src_ids, tgt_ids, src_vocab: list[str], tgt_vocab: list[str]) -> int:
    """How many bytes at the end of the text both tokenizations spell alike. All of it, but for
    sentencepiece's dummy prefix, unless a tokenizer changed the text (NFC/NFKC normalisation, collapsed
    spaces, an unknown piece): byte ends counted back from the end are exact only inside this tail."""
    s = "".join(src_vocab[i] for i in src_ids)
    t = "".join(tgt_vocab[j] for j in tgt_ids)
    tail = os.path.commonprefix([s[::-1], t[::-1]])
    return _nbytes(tail[::-1])


def byte_alignment(src_ids, tgt_ids, src_vocab: list[str], tgt_vocab: list[str]) -> list[list[int]]:
    """The exact alignment, from where each token sits in the text (no edit distances): for each target
    position, the source positions whose bytes overlap its bytes; a token with no bytes gets the source
    token that ends at or after it. Same form as dtw()'s result."""
    s_end, t_end = byte_ends(src_ids, src_vocab), byte_ends(tgt_ids, tgt_vocab)
    s_start = s_end - np.array([_nbytes(src_vocab[i]) for i in src_ids])
    t_start = t_end - np.array([_nbytes(tgt_vocab[j]) for j in tgt_ids])
    out, i, n = [], 0, len(src_ids)
    for j in range(len(tgt_ids)):
        while i < n - 1 and s_end[i] <= t_start[j] and s_end[i] < t_end[j]:
            i += 1                                  # source token i ends before target token j starts
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

    "exact": the source position i among alignment[j] whose token ends at the same byte as target token j,
    where also the target's next token ends no later than the source's next token: the source's distribution
    at i is over tokens like its own next one, and a target token longer than that is beyond what it says.
    Only positions inside the common_tail of the two tokenizations count: before a place where a tokenizer
    changed the text, byte counts no longer correspond.
    "paper": alignment[j] == [i] (1:1) and the two tokens match: their normalized strings are equal, or
    (mode "mined"/"next") the vocab map sends source token i to target token j. At the first position a
    leading '▁' is ignored in this test, since sentencepiece puts one on its first token."""
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
            # the target's next token must end within the source's next one: a source that writes ' un'
            # next says nothing about a target whose next token is ' unbelievable'
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
        if s == t or (mode != "em" and mapped >= 0 and (mapped == tgt_ids[j] or text(tgt_vocab, mapped, j == 0) == t)):
            out[j] = i
    return out


@dataclass
class Transferred:
    """Per target position, a sparse distribution over target ids: ids[offsets[j]:offsets[j+1]] with
    log-probs (not renormalized: their probabilities sum to the kept mass). No entries = fall back to a
    one-hot on the next-token label (with fallback "official" the one-hot on the current token is stored
    as the position's entry instead, since that is what the official code trains on)."""
    offsets: np.ndarray            # (m+1,) int64
    ids: np.ndarray                # (N,) int64 target ids
    logprobs: np.ndarray           # (N,) float32
    fallback: np.ndarray           # (m,) bool: True where position j falls back to a one-hot
    onehot: np.ndarray             # (m,) int64: the fallback's target id (-1: none, e.g. after the last token)
    stats: dict = field(default_factory=dict)


def transfer(matched, src_ids, tgt_ids, src_topk_ids: np.ndarray, src_topk_logprobs: np.ndarray,
             vmap: np.ndarray, fallback: str = "next", merge: str = "sum", shown=None, src_vocab=None,
             tgt_vocab=None) -> Transferred:
    """Move source distributions onto target positions.

    matched (m,): the source position each target position takes (matched_positions), -1 for none;
    src_ids / tgt_ids: the two token sequences; src_topk_* (n, K): the source's top-K at each of its
    positions; vmap: the vocab map (source id -> target id or -1).

    At a matched position the source's top-K ids go through `vmap`; ids with no target entry are dropped
    (their mass is counted as lost); ids that land on one target id are merged: "sum" adds their
    probabilities, "first" keeps the most probable (the official code). Every other position falls back to
    a one-hot on the next-token label tgt_ids[j+1] ("next": the distribution at j predicts token j+1; none
    after the last token), or on the current token tgt_ids[j] ("official": the official code's off-by-one,
    kept for reproducing it).

    Label quality, in stats, over the positions that carry a distribution and where both sides have a next
    token ("scored"):
    "label_mass" adds the probability the renormalised transferred distribution puts on the target's true
    next token; "oracle_mass" counts where an oracle source, whose top-1 is always its own true next token
    src_ids[i+1], would land on the target's true next token through the vocab map. A perfect transfer gives
    oracle_mass == scored. shown/src_vocab/tgt_vocab (optional): the alignment and vocabularies, to list
    the most frequent unmatched token pairs."""
    if fallback not in FALLBACKS or merge not in MERGES:
        raise ValueError(f"transfer: fallback={fallback!r} merge={merge!r} not understood")
    m, n = len(tgt_ids), len(src_ids)
    if len(matched) != m:
        raise ValueError(f"transfer: {len(matched)} matches for {m} target positions")
    offsets = np.zeros(m + 1, dtype=np.int64)
    ids_out, lp_out = [], []
    is_fallback = np.ones(m, dtype=bool)
    kept_mass = lost_mass = label_mass = 0.0
    scored = oracle = 0
    unmatched: Counter = Counter()
    onehot = np.full(m, -1, dtype=np.int64)
    if fallback == "next":
        onehot[:-1] = np.asarray(tgt_ids[1:], dtype=np.int64)
    else:
        onehot[:] = np.asarray(tgt_ids, dtype=np.int64)
    for j in range(m):
        i = int(matched[j])
        merged: dict[int, float] = {}
        if i >= 0:
            ids = vmap[src_topk_ids[i]]
            p = np.exp(src_topk_logprobs[i].astype(np.float64))
            keep = ids >= 0
            kept_mass += p[keep].sum()
            lost_mass += p[~keep].sum()
            for tid, pk in zip(ids[keep].tolist(), p[keep].tolist()):
                if tid not in merged:
                    merged[tid] = pk
                elif merge == "sum":
                    merged[tid] += pk
            if merged and j + 1 < m and i + 1 < n:
                scored += 1
                oracle += int(vmap[src_ids[i + 1]] == tgt_ids[j + 1])
                label_mass += merged.get(int(tgt_ids[j + 1]), 0.0) / sum(merged.values())
        elif shown is not None:
            pair = (" ".join(display(src_vocab[src_ids[k]]) for k in shown[j]), display(tgt_vocab[tgt_ids[j]]))
            unmatched[pair] += 1
        if merged:                                  # empty: unmatched, or every top-K id unmapped
            is_fallback[j] = False
            ids_out += merged.keys()
            lp_out += np.log(list(merged.values())).tolist()
        elif fallback == "official" and onehot[j] >= 0:
            ids_out.append(int(onehot[j]))          # stored, so training uses it
            lp_out.append(0.0)
        offsets[j + 1] = len(ids_out)
    onehot[~is_fallback] = -1
    stats = {"positions": m, "matched": int((~is_fallback).sum()), "fallback": int(is_fallback.sum()),
             "kept_mass": kept_mass, "lost_mass": lost_mass, "scored": scored, "label_mass": label_mass,
             "oracle_mass": oracle, "unmatched": unmatched}
    return Transferred(offsets, np.array(ids_out, dtype=np.int64), np.array(lp_out, dtype=np.float32),
                       is_fallback, onehot, stats)


def carry(src_ids, tgt_ids, src_topk_ids, src_topk_logprobs, vmap, src_vocab, tgt_vocab, positions="exact",
          vocab_kind="next", ties="closest", fallback="next", merge="sum", costs=None) -> Transferred:
    """One sequence, every step: the alignment (byte_alignment for exact positions, MinED dtw for the paper's),
    the matched positions, and the transfer. costs: a pair-cost function for dtw (e.g. a PairCosts)."""
    if positions == "exact":
        alignment = byte_alignment(src_ids, tgt_ids, src_vocab, tgt_vocab)
    else:
        s_norm, t_norm = [src_vocab[i] for i in src_ids], [tgt_vocab[j] for j in tgt_ids]
        alignment = dtw(s_norm, t_norm, ties=ties, cost=(costs or pair_costs)(s_norm, t_norm))
    matched = matched_positions(alignment, src_ids, tgt_ids, vmap, src_vocab, tgt_vocab, positions, vocab_kind)
    return transfer(matched, src_ids, tgt_ids, src_topk_ids, src_topk_logprobs, vmap, fallback, merge,
                    shown=alignment, src_vocab=src_vocab, tgt_vocab=tgt_vocab)


def oracle_quality(src_tok, tgt_tok, vmap, texts, positions="exact") -> tuple[float, float]:
    """Label quality of one vocab map and position rule on real text: (matched share, oracle label mass).
    The oracle source's top-1 at each token is its own true next token; the mass is the share of scored
    positions (transfer's stats) where that label, carried over, is the target's true next token."""
    sv, tv = normalized_vocab(src_tok), normalized_vocab(tgt_tok)
    totals = Counter()
    for text in texts:
        s_ids, t_ids = src_tok.encode(text), tgt_tok.encode(text)
        oracle = np.array(s_ids[1:] + s_ids[-1:], dtype=np.int64)[:, None]       # (n, 1) the true next token
        stats = carry(s_ids, t_ids, oracle, np.zeros(oracle.shape, np.float32), vmap, sv, tv, positions=positions).stats
        totals.update({k: v for k, v in stats.items() if k != "unmatched"})
    return totals["matched"] / totals["positions"], totals["oracle_mass"] / max(totals["scored"], 1)
