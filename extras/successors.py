"""extras/successors.py: what came after FuseLLM, as other distances between P_t and Q_t
(train.py --fusion-loss uld | gold | xtoken).

Why it exists: FuseLLM (Wan et al., ICLR 2024) scores the target's Q_t against the fused P_t with
the soft-label cross-entropy (fusellm.token_losses). Later cross-tokenizer distillation methods
keep the idea (a teacher's distribution carried onto the student's text) and change the distance.
To compare them on the same footing, the fusion stays the paper's (MinCE/AvgCE choose P_t, in the
target's ids, carried there by align.py's next-token vocab map) and only the distance changes: each
loss here returns the per-position (B, T) value that takes the place of token_losses' fusion term,
so fusellm.fusion_loss sums and normalises it the same way. The comparison table is in
docs/results.md; what each loss is, in words: docs/training.md.

What it holds: the three losses, `uld` (Boizard et al.), `gold` (TRL's GOLD trainer) and `xtoken`
(NVIDIA NeMo RL's X-Token), on the sparse P_t that fusellm.fuse returns (ids, probs (B, T, E)) and
the target's log-probabilities (B, T, V), the log-softmax token_losses computes once for both terms;
their pieces (`merged`, `sorted_l1`); the tables two of them need, built once from the tokenizers
(`exact_mask`, `prefix_table`); and `distance_for`, which train.py calls at the start of a run for
the chosen one (a `Distance`, what fusellm.fusion_loss takes and hands to token_losses).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

LOSSES = ("ce", "uld", "gold", "xtoken")     # ce: the paper's soft-label CE, in fusellm.py


# --------------------------------------------------------------------------------------------------
# The pieces


def merged(ids, probs):
    """P_t's probability of each distinct id, put on the id's first entry, 0 on its repeats: an id
    can appear more than once in a sparse P_t (AvgCE lays the candidates side by side), and a sorted
    distribution must count it once. ids, probs (B, T, E) -> (B, T, E), e.g. ids [2, 0, 2] with
    probs [0.3, 0.5, 0.2] -> [0.5, 0.5, 0.0]. Sorting the ids puts equal ids side by side, so each
    run is summed in O(E log E) time and O(E) memory per position (no (E, E) comparison)."""
    sorted_ids, order = ids.sort(dim=-1, stable=True)       # (B, T, E); stable: first entry first
    p = probs.gather(-1, order)                                         # (B, T, E) in that order
    start = torch.ones_like(sorted_ids, dtype=torch.bool)               # (B, T, E) a run begins
    start[..., 1:] = sorted_ids[..., 1:] != sorted_ids[..., :-1]
    run = start.cumsum(-1) - 1                                          # (B, T, E) its run's index
    total = torch.zeros_like(p).scatter_add(-1, run, p)                 # (B, T, E) run r's sum at r
    first = total.gather(-1, run) * start                               # the sum on a run's start
    return torch.zeros_like(p).scatter(-1, order, first)                # back in the ids' order


def sorted_l1(p, q):
    """sum_k |sort(p)_k - sort(q)_k|, both sorted in descending order and the shorter padded with
    zeros: the 1-D Wasserstein distance between the two sets of probabilities, ULD's closed form.
    p (B, T, E): a sparse distribution's values (every other id: 0); q (B, T, V): dense. Past
    p's E ranks p is 0, so those ranks add up to q's mass beyond its top E, computed as a sum
    instead of sorting all V. Returns (B, T)."""
    k = min(p.shape[-1], q.shape[-1])
    p_sorted = p.sort(dim=-1, descending=True).values                   # (B, T, E)
    q_top = q.topk(k, dim=-1).values                                    # (B, T, k), descending
    head = (p_sorted[..., :k] - q_top).abs().sum(-1)                    # ranks both have
    q_tail = (q.sum(-1) - q_top.sum(-1)).clamp(min=0)                   # q past rank k, p there: 0
    return head + p_sorted[..., k:].sum(-1) + q_tail                    # (B, T)


# --------------------------------------------------------------------------------------------------
# The losses: the target's log-probabilities log Q_t (B, T, V), the sparse P_t as ids, probs
# (B, T, E) -> (B, T). log Q_t is fusellm.token_losses' log-softmax, computed once for both terms.


def uld(logq, ids, probs):
    """ULD, Universal Logit Distillation (Boizard et al., "Towards Cross-Tokenizer Distillation: the
    Universal Logit Distillation Loss for LLMs", TMLR 2025, arXiv 2402.12030): no vocabulary map;
    at each aligned position the teacher's and the student's probabilities are each sorted, and the
    loss is the L1 distance between the sorted vectors (padded to the longer vocabulary),
        L = sum_k |sort(P_t)_k - sort(Q_t)_k|,
    added to the CE as L_fusion is here.

    Here P_t is already in the target's ids; only its values count (the ids only add up an id's
    repeated entries, `merged`), so what the vocab map chose no longer matters, only how P_t spreads
    its mass. Q_t's top E probabilities are compared rank by rank with P_t's E values. The tail:
    P_t is sparse, and fuse() renormalises each candidate's top-K to sum to one, so P_t's unknown
    tail (the sources' mass beyond their top-K) is taken to be exactly 0, as the soft-label CE takes
    it; the ranks past E then add Q_t's mass beyond its top E, 1 - sum(top-E of Q_t). ULD's own
    teacher is its whole distribution, a flatter one than this top-K."""
    return sorted_l1(merged(ids, probs), logq.exp())                    # (B, T)


def gold(logq, ids, probs, exact):
    """GOLD's hybrid loss (TRL's GOLDTrainer, General Online Logit Distillation, huggingface/trl
    trl/experimental/gold): tokens whose strings match exactly in both vocabularies are compared
    directly, the rest by ULD's sorted L1 (`uld`). exact (V,) bool: the target ids whose text is a
    token of every fused source (`exact_mask`).
        L = -sum_{k exact} P_t(id_k) log Q_t(id_k)              (the soft CE: a KL up to a constant)
            + sorted_l1(P_t on the other ids, Q_t on the other ids)
    Neither part is renormalised: each keeps the mass P_t and Q_t put there. TRL compares the
    matched tokens with a (generalised) Jensen-Shannon divergence and weights the two parts by the
    share of the vocabulary that matches; here the parts are summed and the matched part is the
    paper's soft CE, so with every id exact GOLD is FuseLLM's loss."""
    on_exact = exact[ids]                                               # (B, T, E)
    ce = -(probs * on_exact * logq.gather(-1, ids)).sum(-1)             # (B, T)
    rest = merged(ids, probs).masked_fill(on_exact, 0.0)                # (B, T, E) non-exact ids
    return ce + sorted_l1(rest, logq.exp().masked_fill(exact, 0.0))


def xtoken(logq, ids, probs, prefixes, weights):
    """X-Token-style projection (NVIDIA NeMo RL's cross-tokenizer distillation, arXiv 2605.21699):
    X-Token builds a sparse many-to-many projection between the two vocabularies, a token's mass
    spread over the other vocabulary's tokens its text maps to, and compares the distributions
    after projecting. Here the *teacher* is projected, within the target's vocabulary: a carried
    entry t's mass is spread over the target tokens that t's text begins with, t itself included
    (the (V, P) `prefix_table`), and the target is scored by the soft cross-entropy against that,
        P~(u) = sum_k P_t(id_k) W[id_k, u],        L = -sum_u P~(u) log Q_t(u),
    so L = H(P~) + KL(P~ || Q_t), least at Q_t = P~. Our carried entries are already the target's
    first pieces (the next-token vocab map sends a source token to the first target token the
    target emits for its text); the projection adds the shorter prefixes a target may cut first,
    so a target starting the same text with a shorter piece is not counted wrong.

    Why the teacher: projecting the student instead, -sum_k P_t(id_k) log sum_{u prefix} Q_t(u),
    is least when Q_t puts all its mass on a prefix the entries share (P_t = {the: .5, to: .5}:
    all of Q_t on 't' scores 0, below Q_t = P_t's 0.693), so it would teach the target to emit
    short pieces. W's weights are our choice: each prefix's share is its length in characters
    (of the normalized text, the space mark included), so t itself gets the most; X-Token builds
    its weights from string rules and re-tokenisation. ids, probs (B, T, E); prefixes (V, P) int32,
    -1 padded; weights (V, P) float32, 0 on the padding, each row summing to 1."""
    pre = prefixes[ids].long()                                          # (B, T, E, P)
    spread = probs[..., None] * weights[ids]                            # (B, T, E, P) P~'s pieces
    picked = logq.gather(-1, pre.clamp(min=0).flatten(-2)).reshape(pre.shape)   # log Q_t(u)
    return -(spread * picked.masked_fill(pre < 0, 0.0)).sum((-2, -1))   # (B, T)


# --------------------------------------------------------------------------------------------------
# Their tables, from the tokenizers' normalized vocabularies (align.normalized_vocab), once a run


def exact_mask(target_vocab: list[str], source_vocabs: list[list[str]]) -> torch.Tensor:
    """GOLD's exact ids (V,) bool: the target tokens whose normalized text is also a token of every
    source's vocabulary. Tokens with no text (control tokens, '') never match."""
    shared = [set(v) for v in source_vocabs]
    return torch.tensor([t != "" and all(t in s for s in shared) for t in target_vocab],
                        dtype=torch.bool)


def prefix_table(vocab: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """X-Token's projection W in the target's vocabulary, sparse: prefixes (V, P) int32, row t
    every id whose text is a non-empty prefix of t's text, t itself included (and any other id
    with the same text), then -1; weights (V, P) float32, each prefix's length in characters over
    the row's total (0 on the padding). A token with no text (a control token) keeps its mass.
    E.g. vocab ["a", "ab", "b"] -> [[0, -1], [0, 1], [2, -1]], [[1, 0], [1/3, 2/3], [1, 0]].
    P is the most prefixes any token has (Llama-3's 128k vocabulary: docs/training.md)."""
    ids_of = defaultdict(list)                      # text -> the ids that have it
    for i, t in enumerate(vocab):
        if t:
            ids_of[t].append(i)
    rows = [[u for n in range(1, len(t) + 1) for u in ids_of.get(t[:n], ())] or [i]
            for i, t in enumerate(vocab)]
    table = np.full((len(vocab), max(map(len, rows), default=1)), -1, dtype=np.int32)
    weights = np.zeros(table.shape, dtype=np.float32)
    for i, r in enumerate(rows):
        lengths = np.array([max(len(vocab[u]), 1) for u in r], dtype=np.float64)
        table[i, :len(r)], weights[i, :len(r)] = r, lengths / lengths.sum()
    return torch.from_numpy(table), torch.from_numpy(weights)


class Distance:
    """One successor's L_fusion, as fusellm.token_losses takes it: (logq, ids, probs) -> (B, T),
    with its tables (GOLD's exact mask, X-Token's prefixes and weights) moved to the log-probs'
    device once."""

    def __init__(self, name: str, loss, *tables: torch.Tensor):
        self.name, self.loss, self.tables = name, loss, tables

    def __call__(self, logq, ids, probs):
        if any(t.device != logq.device for t in self.tables):
            self.tables = tuple(t.to(logq.device) for t in self.tables)
        return self.loss(logq, ids, probs, *self.tables)


def source_models(cfg) -> list:
    """The fused sources' model paths, where their tokenizers are: --online's --sources (default:
    the manifest's); else each stored source's (--use-sources, default every aligned one, as
    data.FusionData takes them) from its info.json."""
    import data
    if cfg.online:
        return list(cfg.sources) or data.load_manifest(cfg.data)["sources"]
    names = list(cfg.use_sources) or sorted(
        p.name for p in (Path(cfg.data) / "aligned").glob("*") if p.is_dir())
    return [data.model_info(cfg.data, n)["model"] for n in names]


def distance_for(cfg) -> Distance | None:
    """The L_fusion train.py --fusion-loss chose (None: "ce", the paper's), its table built from the
    tokenizers only (no model loads), so a bad choice is refused before anything heavy runs."""
    if cfg.fusion_loss not in LOSSES:
        raise ValueError(f"--fusion-loss {cfg.fusion_loss!r}: choose one of {', '.join(LOSSES)} "
                         f"(docs/training.md)")
    if cfg.fusion_loss == "ce":
        return None
    if cfg.fusion_loss == "uld":
        return Distance("uld", uld)
    from align import normalized_vocab
    from tokenizer import load_tokenizer
    target = normalized_vocab(load_tokenizer(cfg.target))
    if cfg.fusion_loss == "xtoken":
        return Distance("xtoken", xtoken, *prefix_table(target))
    sources = [normalized_vocab(load_tokenizer(p)) for p in source_models(cfg)]
    return Distance("gold", gold, exact_mask(target, sources))
