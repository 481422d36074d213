"""
extras/align_stats.py: the alignment stage's statistics, per shard and merged into diagnostics.json.

Why it exists: a real user aligning real sources needs to know how well it went (how many target
positions carry the source's distribution, how much probability the vocab map lost, how good the
carried labels are, which token pairs fail most) and needs that summed correctly when several
processes align the shards. A learner reads the alignment itself (align.py) and its stage
(data.align_source), which calls two functions here: `save_shard_stats` after each shard,
`merged_diagnostics` once every shard is in.

What it holds: `window_stats` (how one window's transfer went), STAT_KEYS, `save_shard_stats`,
`diagnostics` (the merge, written to aligned/<name>/diagnostics.json), `print_diagnostics`, and
`merged_diagnostics` (both, once, by rank 0 under torchrun).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from align import BYTE_BASE, Transferred
from extras.atomic_files import write_json
from extras import ranks

STAT_KEYS = ("positions", "matched", "fallback", "kept_mass", "lost_mass", "scored", "label_mass",
             "oracle_mass")


def display(norm: str) -> str:
    """A normalized token for people: stray bytes shown as <0xNN>."""
    return "".join(f"<0x{ord(c) - BYTE_BASE:02X}>" if BYTE_BASE <= ord(c) < BYTE_BASE + 256 else c
                   for c in norm)


def window_stats(tr: Transferred, src_ids, tgt_ids, src_topk_ids, src_topk_logprobs, vmap,
                 src_vocab=None, tgt_vocab=None, labels=None) -> dict:
    """How well one window's transfer went (align.transfer's result `tr`, for the same inputs, the
    same `labels` included: the ids are labelled as the transfer labelled them):
    - "matched" / "fallback": target positions that carry the source's distribution / fall back;
    - "kept_mass" / "lost_mass": the top-K probability at matched positions whose ids the vocab map
      sends to a target id / to none;
    - label quality over the positions that carry a distribution and where both sides have a next
      token ("scored"): "label_mass" adds the probability the renormalised carried distribution (its
      stored float32 log-probs) puts on the target's true next token; "oracle_mass" counts where
      an oracle source, whose top-1 is always its own true next token src_ids[i+1], lands on the
      target's true next token through the vocab map (or `labels`). A perfect transfer gives
      oracle_mass == scored;
    - "unmatched": the source and target tokens at positions that took no source position (with
      the vocabularies and carry's alignment), counted."""
    m, n = len(tgt_ids), len(src_ids)

    def label(i, ids):                       # (k,) target ids of the source ids predicted at i
        return vmap[ids] if labels is None else labels(src_ids, i, ids)
    kept_mass = lost_mass = label_mass = 0.0
    scored = oracle = 0
    unmatched: Counter = Counter()
    for j in range(m):
        i = int(tr.matched[j])
        if i < 0:
            if tr.alignment is not None and src_vocab is not None:
                source_text = " ".join(display(src_vocab[src_ids[k]]) for k in tr.alignment[j])
                unmatched[source_text, display(tgt_vocab[tgt_ids[j]])] += 1
            continue
        p = np.exp(src_topk_logprobs[i].astype(np.float64))          # (K,) probabilities
        mapped = label(i, src_topk_ids[i]) >= 0                       # (K,) bool
        kept_mass += p[mapped].sum()
        lost_mass += p[~mapped].sum()
        if not tr.fallback[j] and j + 1 < m and i + 1 < n:
            a, b = tr.offsets[j], tr.offsets[j + 1]
            q = np.exp(tr.logprobs[a:b].astype(np.float64))            # the carried entries
            scored += 1
            oracle += int(label(i, src_ids[i + 1:i + 2])[0] == tgt_ids[j + 1])
            label_mass += q[tr.ids[a:b] == tgt_ids[j + 1]].sum() / q.sum()
    return {"positions": m, "matched": int((~tr.fallback).sum()),
            "fallback": int(tr.fallback.sum()), "kept_mass": kept_mass, "lost_mass": lost_mass,
            "scored": scored, "label_mass": label_mass, "oracle_mass": oracle,
            "unmatched": unmatched}


def save_shard_stats(d: Path, shard: int, stats: list[dict]):
    """One shard's statistics (window_stats, summed over its windows) as d/stats-<shard>.json,
    with its 200 most frequent unmatched token pairs."""
    unmatched = Counter()
    for st in stats:
        unmatched.update(st["unmatched"])
    agg = {k: float(sum(st[k] for st in stats)) for k in STAT_KEYS}
    agg["unmatched"] = [[s, t, n] for (s, t), n in unmatched.most_common(200)]
    write_json(d / f"stats-{shard:05d}.json", agg)


def shard_without_stats(d: Path) -> str | None:
    """A message naming an aligned shard whose statistics are missing, or None. Older versions
    wrote the statistics second, so a run killed between the two left such a shard, which a rerun
    skips: its diagnostics would miss it."""
    for shard in sorted(d.glob("shard-*.npz")):
        if not (d / shard.name.replace("shard-", "stats-").replace(".npz", ".json")).is_file():
            return (f"{shard} has no statistics beside it (a run killed between the two files): "
                    f"delete {shard.name} and run the align stage again")
    return None


def diagnostics(out, name) -> dict:
    """Per source: the share of target positions that take the source's distribution
    ("aligned_1to1", the matched share), the share that fell back, the top-K probability mass lost
    in the vocab map, the label quality at matched positions (window_stats: "label_mass", the mean
    probability the renormalised carried distribution puts on the target's true next token;
    "oracle_label_mass", the share of positions where an oracle source's true next token lands on
    the target's true next token, 1.0 for a perfect transfer), and the most frequent unmatched token
    pairs."""
    d = Path(out) / "aligned" / name
    tot = Counter()
    unmatched = Counter()
    for f in sorted(d.glob("stats-*.json")):
        st = json.loads(f.read_text())
        for k in STAT_KEYS:
            tot[k] += st[k]
        for s, t, n in st["unmatched"]:
            unmatched[(s, t)] += n
    mass = tot["kept_mass"] + tot["lost_mass"]
    positions, scored = max(tot["positions"], 1), max(tot["scored"], 1)
    most = [{"source": s, "target": t, "count": n} for (s, t), n in unmatched.most_common(20)]
    diag = {"source": name, "positions": int(tot["positions"]),
            "aligned_1to1": tot["matched"] / positions,
            "fallback": tot["fallback"] / positions,
            "topk_mass_lost_in_vocab_map": tot["lost_mass"] / mass if mass else 0.0,
            "label_mass": tot["label_mass"] / scored,
            "oracle_label_mass": tot["oracle_mass"] / scored,
            "most_frequent_unmatched": most}
    write_json(d / "diagnostics.json", diag)
    return diag


def print_diagnostics(name, diag):
    print(f"[align {name}] {diag['positions']} target positions: {diag['aligned_1to1']:.1%} carry "
          f"the source's distribution, {diag['fallback']:.1%} fell back; "
          f"{diag['topk_mass_lost_in_vocab_map']:.2%} of the top-K mass lost in the vocab map; "
          f"label quality: oracle {diag['oracle_label_mass']:.3f}, this source's labels put "
          f"{diag['label_mass']:.3f} on the target's next token")
    for u in diag["most_frequent_unmatched"][:8]:
        print(f"    {u['count']:6d}  source {u['source']!r:24} target {u['target']!r}")


def merged_diagnostics(out, name, quiet: bool) -> dict:
    """Once every rank's shards are aligned: rank 0 merges the statistics (`diagnostics`) and prints
    them, then the other ranks read its diagnostics.json. Returns the diagnostics on every rank."""
    rank = ranks.rank_world()[0]

    def merged():
        if rank != 0:
            return json.loads((Path(out) / "aligned" / name / "diagnostics.json").read_text())
        diag = diagnostics(out, name)
        if not quiet:
            print_diagnostics(name, diag)
        return diag
    return ranks.first_rank_then_all(merged)
