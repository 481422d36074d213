"""extras/bpe_rules.py: Hugging Face's BPE by its merge rules, where tiktoken alone could differ.

Why it exists: tokenizer.TiktokenBPE runs a byte-level BPE on tiktoken, which joins the adjacent
pair whose concatenation has the lowest rank; Hugging Face applies the merge rule of lowest index.
For most vocabularies the two agree (extras/tokenizer_json.py checks it), and a learner needs no
more. A user whose source model's vocabulary is one of the exceptions needs its exact ids anyway,
from three repairs:
- the exact path: a vocabulary where two tokens make a third without a rule for it (tiktoken would
  join them) runs HF's algorithm itself, `bpe_by_rules`, pre-token by pre-token (cached per
  pre-token);
- the check of whole pre-tokens: without ignore_merges, HF runs the merges even on a pre-token that
  is a token, and may split it; tiktoken takes it whole (`RulesBPE.through_merges`);
- bytes the vocabulary has no token for (`bytes_without_token`): HF drops them, or gives the file's
  unknown token (one for a run of them when the file says fuse_unk).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def bpe_by_rules(piece: bytes, rules: dict[tuple[bytes, bytes], int]) -> list[bytes]:
    """HF's BPE, the readable way: start from single bytes and repeatedly apply the merge rule
    (pair -> rank) of lowest rank among adjacent pairs, the leftmost on ties, until no rule
    applies."""
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        found = [(rules[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in rules]
        if not found:
            break
        _, i = min(found)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


class RulesBPE:
    """A byte-level BPE's ranks by its merge rules. pattern: the pre-tokenizer regex; ranks: token
    bytes -> rank; rules: byte pair -> merge index; merges_only: the file's BPE has ignore_merges
    false (a pre-token that is itself a token still goes through the merges)."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], rules: dict, merges_only: bool):
        self.ranks, self.rules, self.merges_only = ranks, rules, merges_only
        self.pattern = pattern
        self.pre = None                         # compiled for the exact path when first used
        self._piece = lru_cache(maxsize=1 << 16)(self._piece_by_rules)
        self.rank_bytes = None                  # rank -> token bytes, built for through_merges
        # per rank: 0: not checked yet, 1: merges reach it, 2: not
        self.reached = np.zeros(len(ranks), dtype=np.int8)
        self.merged = {}                        # rank -> the ranks the merges give instead

    def ranks_of(self, text: str) -> np.ndarray:
        """The exact path: each pre-token's ranks by HF's merge rules."""
        if self.pre is None:
            import regex
            self.pre = regex.compile(self.pattern)
        pieces = self.pre.findall(text)
        return np.asarray([k for p in pieces for k in self._piece(p.encode())], dtype=np.int64)

    def _piece_by_rules(self, piece: bytes) -> tuple[int, ...]:
        """One pre-token's ranks by HF's merge rules: whole, when ignore_merges allows it."""
        if not self.merges_only and piece in self.ranks:
            return (self.ranks[piece],)
        return tuple(self.ranks[p] for p in bpe_by_rules(piece, self.rules))

    def through_merges(self, r: np.ndarray) -> np.ndarray:
        """tiktoken takes a pre-token that is a whole token as that token. HF without ignore_merges
        runs the merges on it anyway, which give the same token unless some higher-priority merge
        inside it gets in the way. Such a token is never made by merges inside a longer pre-token
        either (the merges inside its span happen in the same order, or one crosses its edge), so it
        appears in tiktoken's output (ranks `r`) only as a whole pre-token: replace it by what the
        merges give. Each rank is checked once, when first seen."""
        if self.rank_bytes is None:
            self.rank_bytes = [b""] * len(self.ranks)
            for b, k in self.ranks.items():
                self.rank_bytes[k] = b
        for k in np.unique(r[self.reached[r] == 0]).tolist():
            parts = bpe_by_rules(self.rank_bytes[k], self.rules)
            self.reached[k] = 1 if len(parts) == 1 else 2
            if len(parts) > 1:
                self.merged[k] = [self.ranks[p] for p in parts]
        if not (self.reached[r] == 2).any():
            return r
        return np.asarray([x for k in r.tolist() for x in self.merged.get(k, (k,))],
                          dtype=np.int64)


def bytes_without_token(ids: np.ndarray, unk_id: int | None, fuse_unk: bool) -> np.ndarray:
    """A text's ids where some bytes have no token (id -1), as HF gives them: dropped when the file
    names no unknown token, else its unknown token (`unk_id`)."""
    if unk_id is None:
        return ids[ids >= 0]
    hole = ids < 0
    if fuse_unk:                            # a run of unknown bytes is one unknown token
        keep = ~(hole & np.concatenate([[False], hole[:-1]]))
        ids, hole = ids[keep], hole[keep]
    return np.where(hole, unk_id, ids)
