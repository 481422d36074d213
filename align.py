"""
align.py: carrying a source model's next-token distributions onto the target's tokens.

Two tokenizers cut the same text differently. To train the target on a source's predictions we
1. write every token as comparable text (`normalize`),
2. align the two token sequences by minimum edit distance (`dtw`, the MinED dynamic program),
3. map the source vocabulary onto the target's (`vocab_map_em`, `vocab_map_mined`), and
4. move each source distribution onto the target position it aligns with (`transfer`).

DESIGN.md section 2 states the method; the docstrings here say exactly what each step decides.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


def vocab_map_em(src_vocab: list[str], tgt_vocab: list[str]) -> np.ndarray:
    """EM: source id -> the target id with the same normalized string, or -1. Several target ids with one
    string (rare: duplicates) resolve to the lowest id. Empty strings (control tokens) map to nothing."""
    index = _string_index(tgt_vocab)
    return np.array([index.get(s, -1) if s else -1 for s in src_vocab], dtype=np.int64)


def _string_index(vocab: list[str]) -> dict[str, int]:
    """Non-empty normalized string -> its lowest id."""
    index: dict[str, int] = {}
    for j, t in enumerate(vocab):
        if t:
            index.setdefault(t, j)
    return index


def vocab_map_mined(src_vocab: list[str], tgt_vocab: list[str], threads: int | None = None,
                    progress=None) -> tuple[np.ndarray, np.ndarray]:
    """MinED: source id -> the target id of minimum edit distance over the whole target vocabulary, and
    that distance. Ties go to the lowest target id. Empty strings map to nothing (-1).

    Exact, but not |Vs| x |Vt| edit distances: distance 0 and 1 come from dictionaries, and for the rest
    the target vocabulary is searched by length, nearest lengths first (|len(s) - len(t)| is a lower bound
    on the distance), stopping once no unsearched length can beat the best found."""
    em = vocab_map_em(src_vocab, tgt_vocab)
    dist = np.where(em >= 0, 0, -1).astype(np.int64)
    best = em.copy()
    # distance 1, by hashing: a substitution shares a key (position, string without it), a deletion from the
    # source lands on a target, an insertion is a deletion from the target. Lowest target id wins.
    wild, dels = {}, {}
    for j, t in enumerate(tgt_vocab):
        for k in range(len(t)):
            wild.setdefault((k, t[:k] + t[k + 1:]), j)
            dels.setdefault(t[:k] + t[k + 1:], j)
    exact = _string_index(tgt_vocab)
    for i, s in enumerate(src_vocab):
        if not s or em[i] >= 0:
            continue
        hits = [wild.get((k, s[:k] + s[k + 1:]), -1) for k in range(len(s))]
        hits += [exact.get(s[:k] + s[k + 1:], -1) for k in range(len(s))]
        hits.append(dels.get(s, -1))
        hits = [h for h in hits if h >= 0 and tgt_vocab[h]]
        if hits:
            best[i], dist[i] = min(hits), 1
    todo = [i for i, s in enumerate(src_vocab) if s and dist[i] < 0]
    tgt_by_len: dict[int, np.ndarray] = {}
    for j, t in enumerate(tgt_vocab):
        if t:
            tgt_by_len.setdefault(len(t), []).append(j)
    tgt_by_len = {k: np.array(v) for k, v in tgt_by_len.items()}
    lengths = sorted(tgt_by_len)
    by_len: dict[int, list[int]] = {}
    for i in todo:
        by_len.setdefault(len(src_vocab[i]), []).append(i)
    chunks = [(L, rows[k:k + 64]) for L, rows in by_len.items() for k in range(0, len(rows), 64)]

    def search(job):
        L, rows = job
        bd = np.full(len(rows), 1 << 30, dtype=np.int64)
        bj = np.full(len(rows), -1, dtype=np.int64)
        for ell in sorted(lengths, key=lambda x: (abs(x - L), x)):
            if abs(ell - L) > bd.max():
                break
            ids = tgt_by_len[ell]
            d = edit_distances([src_vocab[i] for i in rows], [tgt_vocab[j] for j in ids])   # (r, n_ell)
            k = d.argmin(axis=1)                        # first minimum: lowest id within this length
            dk = d[np.arange(len(rows)), k].astype(np.int64)
            jk = ids[k]
            better = (dk < bd) | ((dk == bd) & (jk < bj))
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


def vocab_map(src_tok, tgt_tok, kind: str = "mined", cache_dir=None) -> np.ndarray:
    """The vocab map of two tokenizers (source id -> target id or -1), cached on disk by the two normalized
    vocabularies. BOS and EOS map to the target's BOS and EOS."""
    if kind not in ("em", "mined"):
        raise ValueError(f"vocab map kind {kind!r}; choose 'em' or 'mined'")
    sv, tv = normalized_vocab(src_tok), normalized_vocab(tgt_tok)
    key = hashlib.sha256(json.dumps([kind, sv, tv]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"vocab_map_{kind}_{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        return np.load(path)
    m = vocab_map_em(sv, tv) if kind == "em" else vocab_map_mined(sv, tv)[0]
    for s, t in ((src_tok.bos_id, tgt_tok.bos_id), (src_tok.eos_id, tgt_tok.eos_id)):
        if s is not None and t is not None:
            m[s] = t
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, m)
        os.replace(tmp, path)
    return m


# ----------------------------------------------------------------------------------------------------
# 4. Distribution transfer


@dataclass
class Transferred:
    """Per target position, a sparse distribution over target ids: ids[offsets[j]:offsets[j+1]] with
    log-probs (not renormalized: their probabilities sum to the kept mass). No entries = fall back."""
    offsets: np.ndarray            # (m+1,) int64
    ids: np.ndarray                # (N,) int64 target ids
    logprobs: np.ndarray           # (N,) float32
    fallback: np.ndarray           # (m,) bool: True where position j falls back to a one-hot
    onehot: np.ndarray             # (m,) int64: the fallback's target id (-1: none, e.g. after the last token)
    stats: dict = field(default_factory=dict)


def transfer(alignment: list[list[int]], src_ids, tgt_ids, src_topk_ids: np.ndarray, src_topk_logprobs: np.ndarray,
             vmap: np.ndarray, src_vocab: list[str], tgt_vocab: list[str], mode: str = "mined",
             fallback: str = "next", merge: str = "sum") -> Transferred:
    """Move source distributions onto target positions.

    alignment[j] lists the source positions aligned to target position j (from dtw); src_ids / tgt_ids are
    the two token sequences; src_topk_* (n, K) the source's top-K at each of its positions; vmap the vocab
    map (source id -> target id or -1); src_vocab / tgt_vocab the normalized vocabularies.

    Target position j takes the distribution of source position i when j is aligned to exactly one source
    position (alignment[j] == [i]) and the two tokens match: their normalized strings are equal, or (mode
    "mined") the vocab map sends source token i to target token j. At the first position a leading '▁' is
    ignored in this test, since sentencepiece puts one on its first token (its dummy prefix) where byte-level
    BPE does not. The source's top-K ids go through `vmap`; ids with no target entry are dropped (their mass
    is counted as lost); ids that land on one target id are merged: "sum" adds their probabilities, "first"
    keeps the most probable (the official code).

    Every other position falls back to a one-hot on the next-token label tgt_ids[j+1] ("next": the
    distribution at j predicts token j+1; none after the last token), or on the current token tgt_ids[j]
    ("official": the official code's off-by-one, kept for reproducing the paper)."""
    if fallback not in ("next", "official") or merge not in ("sum", "first") or mode not in ("em", "mined"):
        raise ValueError(f"transfer: mode={mode!r} fallback={fallback!r} merge={merge!r} not understood")
    m = len(tgt_ids)
    if len(alignment) != m:
        raise ValueError(f"transfer: alignment covers {len(alignment)} target positions, the target has {m}")

    def text(vocab, token_id, first):
        return vocab[token_id].removeprefix(SPACE) if first else vocab[token_id]

    def tokens_match(i, j):
        s, t = text(src_vocab, src_ids[i], j == 0), text(tgt_vocab, tgt_ids[j], j == 0)
        if s == t:
            return True
        mapped = vmap[src_ids[i]]
        return mode == "mined" and mapped >= 0 and (mapped == tgt_ids[j] or text(tgt_vocab, mapped, j == 0) == t)

    offsets = np.zeros(m + 1, dtype=np.int64)
    ids_out, lp_out = [], []
    is_fallback = np.ones(m, dtype=bool)
    kept_mass = lost_mass = 0.0
    unmatched: Counter = Counter()
    for j in range(m):
        src = alignment[j]
        if len(src) == 1 and tokens_match(src[0], j):
            i = src[0]
            ids = vmap[src_topk_ids[i]]
            p = np.exp(src_topk_logprobs[i].astype(np.float64))
            keep = ids >= 0
            kept_mass += p[keep].sum()
            lost_mass += p[~keep].sum()
            merged: dict[int, float] = {}
            for tid, pk in zip(ids[keep].tolist(), p[keep].tolist()):
                if tid not in merged:
                    merged[tid] = pk
                elif merge == "sum":
                    merged[tid] += pk
            ids_out += merged.keys()
            lp_out += np.log(list(merged.values())).tolist()
            is_fallback[j] = not merged             # every top-K id unmapped: nothing to carry over
        else:
            pair = (" ".join(display(src_vocab[src_ids[i]]) for i in src), display(tgt_vocab[tgt_ids[j]]))
            unmatched[pair] += 1
        offsets[j + 1] = len(ids_out)
    onehot = np.full(m, -1, dtype=np.int64)
    if fallback == "next":
        onehot[:-1] = np.asarray(tgt_ids[1:], dtype=np.int64)
    else:
        onehot[:] = np.asarray(tgt_ids, dtype=np.int64)
    onehot[~is_fallback] = -1
    stats = {"positions": m, "matched": int((~is_fallback).sum()), "fallback": int(is_fallback.sum()),
             "kept_mass": kept_mass, "lost_mass": lost_mass, "unmatched": unmatched}
    return Transferred(offsets, np.array(ids_out, dtype=np.int64), np.array(lp_out, dtype=np.float32),
                       is_fallback, onehot, stats)
