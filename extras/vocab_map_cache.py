"""
extras/vocab_map_cache.py: vocab maps kept on disk, computed once per pair of tokenizers.

Why it exists: a vocab map depends only on the two tokenizers, yet building one reads every token of
both vocabularies (the MinED map compares each source token with the target's whole vocabulary, a
minute even on the fast path), and data.py asks for it on every rank and every rerun. A real user
wants it computed once; a learner reads align.vocab_map, which builds it.

What it holds: `cache_file` (the file a map is kept in, named by everything it depends on) and
`save` (written whole or not at all).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from extras.atomic_files import atomic_path


def cache_file(cache_dir, kind: str, ties: str, src_tok, tgt_tok, src_vocab: list[str],
               tgt_vocab: list[str]) -> Path:
    """cache_dir/vocab_map_<kind>_<ties>_<key>.npy, the key a hash of the map kind, the tie rule,
    both tokenizers' kinds, their BOS and EOS ids and their normalized vocabularies."""
    ends = [src_tok.bos_id, src_tok.eos_id, tgt_tok.bos_id, tgt_tok.eos_id]
    key = json.dumps([2, kind, ties, src_tok.kind, tgt_tok.kind, ends, src_vocab, tgt_vocab])
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"vocab_map_{kind}_{ties}_{key}.npy"


def save(path: Path, vmap: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.save(tmp, vmap)
