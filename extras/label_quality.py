"""
extras/label_quality.py: how good the labels are that training reads, measured on real text.

Why it exists: before spending a training run on a set of sources, a real user wants to know whether
the carried distributions say anything about the target's next token: `label_mass` measures it on a
data.py folder (each candidate, and the fused P_t training fits), `oracle_quality` measures a vocab
map and position rule alone, with an oracle source whose prediction is always right
(docs/benchmarks.md "Label quality", `python tools/bench.py labels`, demo.py). A learner does
not need them to follow the method.

What it holds: `label_mass` and `oracle_quality`.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

import align
import data
import fusellm
from extras.align_stats import window_stats
from extras.emitted_tokens import context_labels
from tokenizer import load_tokenizer


def label_mass(data_dir, fusion: str = "mince") -> dict:
    """On a data.py folder (real sources of a run): the mean probability each candidate's
    renormalised top-K puts on the target's true next token where it carries a distribution, the
    share of positions it carries, and the same mass for the fused P_t (fusellm.fuse) over every
    position training fuses."""
    tok = load_tokenizer(data.model_info(data_dir, "target")["model"])
    fd = data.FusionData(data_dir, tokenizer=tok)
    names, K = ["target"] + fd.sources, data.model_info(data_dir, "target")["topk"]
    sums, carried, fused_sum, n = np.zeros(len(names)), np.zeros(len(names)), 0.0, 0
    for s, size in enumerate(data.shard_sizes(data.load_manifest(data_dir))):
        b = fusellm.collate(fd.shard(s)[:size], names, tok.bos_id, K)
        mask, labels = b.fusion_mask, b.labels
        p = torch.softmax(b.cand_logprobs, dim=-1).nan_to_num(0.0)                  # (C, B, T, K)
        on_label = (p * (b.cand_ids == labels[None, ..., None])).sum(-1)            # (C, B, T)
        carries = ~b.cand_fallback & mask                                           # (C, B, T)
        ids, probs = fusellm.fuse(b, fusion)
        fused_sum += float(((probs * (ids == labels[..., None])).sum(-1) * mask).sum())
        sums += (on_label * carries).sum(dim=(1, 2)).numpy()
        carried += carries.sum(dim=(1, 2)).numpy()
        n += int(mask.sum())
    out = {f"candidate: {name}": {"mass on the true next token": sums[c] / max(carried[c], 1),
                                  "share of positions carried": carried[c] / n}
           for c, name in enumerate(names)}
    fused = f"fused P_t ({fusion}; a fallback is the one-hot label)"
    out[fused] = {"mass on the true next token": fused_sum / n}
    return out


def oracle_quality(src_tok, tgt_tok, vmap, texts, positions="exact",
                   context: str | None = None) -> tuple[float, float]:
    """Label quality of one vocab map and position rule on real text: (matched share, oracle label
    mass). The oracle source's top-1 at each token is its own true next token; the mass is the share
    of scored positions (extras/align_stats.py window_stats) where that label, carried over, is the
    target's true next token. context: the labels' context rule (an alignment's "context" setting,
    extras/emitted_tokens.py CONTEXTS; None: the vocab map alone)."""
    sv, tv = align.normalized_vocab(src_tok), align.normalized_vocab(tgt_tok)
    labels = context_labels(src_tok, tgt_tok, vmap, {"context": context})
    totals = Counter()
    for text in texts:
        s_ids, t_ids = src_tok.encode(text), tgt_tok.encode(text)
        oracle = np.array(s_ids[1:] + s_ids[-1:], dtype=np.int64)[:, None]   # (n, 1) the next token
        no_logprobs = np.zeros(oracle.shape, np.float32)
        tr = align.carry(s_ids, t_ids, oracle, no_logprobs, vmap, sv, tv, positions=positions,
                         labels=labels)
        stats = window_stats(tr, s_ids, t_ids, oracle, no_logprobs, vmap, labels=labels)
        totals.update({k: v for k, v in stats.items() if k != "unmatched"})
    return totals["matched"] / totals["positions"], totals["oracle_mass"] / max(totals["scored"], 1)
