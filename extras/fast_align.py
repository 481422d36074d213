"""
extras/fast_align.py: the fast paths of align.py, with the same answers.

Why it exists: the readable MinED dynamic program in align.py runs at about 60 target tokens a
second, and the readable MinED vocab map compares every source token with every target token
(32,000 x 128,000 edit distances for Mistral onto Llama-3). A real corpus has millions of tokens,
and a real pair of vocabularies needs its map in seconds, not hours. These functions compute exactly
what align.py's references compute (integer costs, the same tie rules), only with whole-array numpy
steps, caches and bounds; tests/parity/test_fast_align.py proves them equal on random and real
inputs.

What it holds:
- `edit_distances(a, b)`: levenshtein for all pairs at once (Wagner-Fischer vectorised over strings
  grouped by length, `_wagner_fischer`);
- `dtw_table(cost)`: the MinED DTW table D, one row at a time with a cumulative minimum
  (align.dtw backtracks through it exactly as align.dtw_reference does);
- `pair_costs(source, target)` and `PairCosts`: the (n, m) cost table of two token sequences,
  computed once per distinct pair of tokens, and remembered across windows;
- `vocab_map_mined(src_vocab, tgt_vocab, ...)`: the MinED vocab map by a bounded, threaded search
  (align.vocab_map_mined_reference is the plain every-pair version).

This module does not import align.py (align.py imports it lazily), so there is no import cycle.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np


# --------------------------------------------------------------------------------------------------
# Edit distances for many pairs at once


def _by_length(strings: list[str]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Group strings by length: length -> (their indices, (n, length) int32 code points)."""
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(strings):
        groups.setdefault(len(x), []).append(i)
    out = {}
    for n, idx in groups.items():
        codes = np.array([[ord(c) for c in strings[i]] for i in idx], dtype=np.int32)
        out[n] = (np.array(idx), codes.reshape(len(idx), n))
    return out


def edit_distances(a: list[str], b: list[str]) -> np.ndarray:
    """levenshtein(a[i], b[j]) for all pairs: (len(a), len(b)) int32.

    Wagner-Fischer run for many pairs at once, one character of the a-strings per step, with both
    sides grouped by length so no step is wasted on padding. Within a row the insertion chain
    R[q] = min(X[q], R[q-1] + 1) unrolls to R[q] = q + min_{k<=q}(X[k] - k), a cumulative minimum,
    so each step is a few whole-array operations."""
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
    """Edit distances of every row of ac (A, la) to every row of bc (B, lb): (A, B). The DP row
    index q comes first, (lb+1, A, B), so every operation runs over contiguous A x B slabs."""
    la, lb = ac.shape[1], bc.shape[1]
    q = np.arange(lb + 1, dtype=np.int16)[:, None, None]                 # (lb+1, 1, 1)
    R = np.broadcast_to(q, (lb + 1, len(ac), len(bc)))                    # '' vs b[:q]: q edits
    X = np.empty((lb + 1, len(ac), len(bc)), dtype=np.int16)
    bt = bc.T[:, None, :]                                                 # (lb, 1, B)
    for p in range(la):
        sub = ac[None, :, p, None] != bt                      # (lb, A, B) substitution costs
        X[0] = p + 1
        np.minimum(R[:-1] + sub, R[1:] + 1, out=X[1:])
        X -= q
        np.minimum.accumulate(X, axis=0, out=X)
        R = X + q
    return R[lb]


# --------------------------------------------------------------------------------------------------
# MinED DTW: the table one row at a time, and the pair costs it reads


def dtw_table(cost: np.ndarray) -> np.ndarray:
    """The MinED DTW table D, (n+1, m+1) int32, of an (n, m) integer cost table: the same numbers as
    align.dtw_reference's D (unreachable cells hold 1 << 29 instead of inf).

    Row i needs D[i,j] = min(A[j], c[i,j] + D[i,j-1])
    with A[j] = c[i,j] + min(D[i-1,j-1], D[i-1,j]). Unrolled with the row's prefix sums
    S[j] = c[i,1] + ... + c[i,j]:
        D[i,j] = S[j] + min_{k<=j}(A[k] - S[k]),
    a cumulative minimum. Costs are integers, so D equals the reference's exactly, and so do the
    ties the backtrack finds in it."""
    INF = np.int32(1 << 29)         # never reached by a real path: n+m steps of short tokens
    c = np.asarray(cost, dtype=np.int32)
    n, m = c.shape
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
    return D


def _unique(tokens: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct tokens, and for each position the index of its token among them."""
    u, inverse = np.unique(np.array(tokens, dtype=object), return_inverse=True)
    return list(u), inverse


def pair_costs(source: list[str], target: list[str]) -> np.ndarray:
    """(n, m) int32 edit distances, computed once per pair of distinct tokens."""
    (us, si), (ut, ti) = _unique(source), _unique(target)
    return edit_distances(us, ut)[si[:, None], ti[None, :]]


class PairCosts:
    """pair_costs that remembers: a corpus repeats its token pairs window after window, so after the
    first windows most edit distances are looked up rather than computed. The first `cap` distinct
    tokens of each side (the frequent ones come early) get a slot in a (cap, cap) uint8 table, 255
    meaning not yet known; tokens beyond the cap are simply computed every time. Results equal
    pair_costs exactly."""

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
        new_rows = np.flatnonzero(missing.all(axis=1))          # tokens never seen: whole rows
        if new_rows.size:
            vals[new_rows] = edit_distances([us[r] for r in new_rows], ut)
            missing[new_rows] = False
        rows, cols = np.flatnonzero(missing.any(axis=1)), np.flatnonzero(missing.any(axis=0))
        if rows.size:                                            # known rows, new or unmet columns
            vals[rows[:, None], cols[None, :]] = edit_distances([us[r] for r in rows],
                                                                [ut[c] for c in cols])
        keep = (rs >= 0)[:, None] & (cs >= 0)[None, :] & (vals < self.UNKNOWN)
        r_idx, c_idx = np.nonzero(keep)
        self.table[rs[r_idx], cs[c_idx]] = vals[r_idx, c_idx]
        return vals[si[:, None], ti[None, :]]


# --------------------------------------------------------------------------------------------------
# The MinED vocab map by a bounded search


def vocab_map_mined(src_vocab: list[str], tgt_vocab: list[str], threads: int | None = None,
                    progress=None, order=None) -> tuple[np.ndarray, np.ndarray]:
    """MinED: source id -> the target id of minimum edit distance over the whole target vocabulary,
    and that distance. Ties go to the first target id in `order` (extras/emitted_tokens.py
    preference_order; default the lowest id). Empty strings map to nothing (-1), and no source maps
    to an empty target string (with no other target string, every source maps to nothing).
    The same map as align.vocab_map_mined_reference.

    Exact, but not |Vs| x |Vt| edit distances: distance 0 and 1 come from dictionaries, and for the
    rest the target vocabulary is searched by length, nearest lengths first (|len(s) - len(t)| is a
    lower bound on the distance), stopping once no unsearched length can beat the best found. Within
    a length, the characters two strings share give a second lower bound, max(len) - common, exact
    when nothing is shared: the DP runs only on targets whose bound could still beat (or tie) the
    best found. progress(done, total), if given, is called as chunks of source tokens finish."""
    order = np.arange(len(tgt_vocab)) if order is None else np.asarray(order)
    rank = np.arange(len(tgt_vocab))                        # rank[id]: its place in the order
    rank[order] = np.arange(len(order))
    exact: dict[str, int] = {}                              # string -> its preferred target id
    for j in order.tolist():
        if tgt_vocab[j]:
            exact.setdefault(tgt_vocab[j], j)
    best = np.array([exact.get(s, -1) if s else -1 for s in src_vocab], dtype=np.int64)
    dist = np.where(best >= 0, 0, -1).astype(np.int64)
    if not exact:                       # no target string to map to: every source maps to nothing
        return best, dist
    # distance 1, by hashing: a substitution shares a key (position, string without it), a deletion
    # from the source lands on a target, an insertion is a deletion from the target. The preferred
    # target id wins.
    wild, dels = {}, {}
    for j in order.tolist():
        t = tgt_vocab[j]
        for k in range(len(t)):
            wild.setdefault((k, t[:k] + t[k + 1:]), j)
            dels.setdefault(t[:k] + t[k + 1:], j)
    for i, s in enumerate(src_vocab):
        if not s or best[i] >= 0:
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
    # which targets of each length hold a character, and how many times: an edit script keeps at
    # most `common` characters in place (the multiset intersection), and every other character of
    # the longer string costs an edit, so distance >= max(len) - common. With no character in common
    # that bound is the distance (every aligned pair a substitution); the DP runs only where the
    # bound could beat the best found so far.
    holding: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for ell, ids in tgt_by_len.items():
        cols_of: dict[str, list[int]] = {}
        counts_of: dict[str, list[int]] = {}
        for col, j in enumerate(ids.tolist()):
            for c, n in Counter(tgt_vocab[j]).items():
                cols_of.setdefault(c, []).append(col)
                counts_of.setdefault(c, []).append(n)
        holding[ell] = {c: (np.array(v), np.array(counts_of[c], dtype=np.int32))
                        for c, v in cols_of.items()}
    codes = {}                                         # each length's targets as code points, once
    for ell, ids in tgt_by_len.items():
        points = np.array([[ord(c) for c in tgt_vocab[j]] for j in ids.tolist()], dtype=np.int32)
        codes[ell] = points.reshape(len(ids), ell)
    by_len: dict[int, list[int]] = {}
    for i in todo:
        by_len.setdefault(len(src_vocab[i]), []).append(i)
    for rows in by_len.values():          # rows of one script together: fewer targets to share with
        rows.sort(key=lambda i: (min(src_vocab[i]), src_vocab[i]))
    chunks = [(L, rows[k:k + 16]) for L, rows in by_len.items() for k in range(0, len(rows), 16)]

    def search(job):
        L, rows = job
        bd = np.full(len(rows), 1 << 30, dtype=np.int64)
        bj = np.full(len(rows), order[0], dtype=np.int64)
        mine = np.array([[ord(c) for c in src_vocab[i]] for i in rows], dtype=np.int32)
        mine = mine.reshape(len(rows), L)
        counts = [Counter(src_vocab[i]) for i in rows]
        held = {c: np.array([n.get(c, 0) for n in counts], dtype=np.int32)          # (r,)
                for c in set().union(*counts)}
        for ell in sorted(lengths, key=lambda x: (abs(x - L), x)):
            if abs(ell - L) > bd.max():
                break
            ids = tgt_by_len[ell]
            common = np.zeros((len(rows), len(ids)), dtype=np.int32)          # (r, n_ell)
            for c, n in held.items():
                if c in holding[ell]:
                    cols, m = holding[ell][c]
                    common[:, cols] += np.minimum(n[:, None], m[None, :])
            d = max(L, ell) - common           # the lower bound; exact where nothing is shared
            cols = np.flatnonzero(((common > 0) & (d <= bd[:, None])).any(axis=0))
            if len(cols):          # the DP over the shorter side (the distance is symmetric)
                if L <= ell:
                    d[:, cols] = _wagner_fischer(mine, codes[ell][cols])
                else:
                    d[:, cols] = _wagner_fischer(codes[ell][cols], mine).T
            k = d.argmin(axis=1)        # first minimum: the preferred id within this length
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
