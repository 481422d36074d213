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
the target's logits (B, T, V); their pieces (`merged`, `sorted_l1`); the tables two of them need,
built once from the tokenizers (`exact_mask`, `prefix_table`); and `distance_for`, which train.py
calls at the start of a run for the chosen one (a `Distance`, what fusellm.fusion_loss takes).
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
    probs [0.3, 0.5, 0.2] -> [0.5, 0.5, 0.0]."""
    E = ids.shape[-1]
    same = ids[..., :, None] == ids[..., None, :]                       # (B, T, E, E)
    total = (same * probs[..., None, :]).sum(-1)                        # (B, T, E) its id's total
    before = torch.ones(E, E, dtype=torch.bool, device=ids.device).tril(-1)    # [k, j]: j < k
    repeat = (same & before).any(-1)                                    # (B, T, E) seen earlier
    return total.masked_fill(repeat, 0.0)


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
# The losses: logits (B, T, V), the sparse P_t as ids, probs (B, T, E) -> (B, T)


def uld(logits, ids, probs):
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
    q = torch.softmax(logits.float(), dim=-1)                           # (B, T, V)
    return sorted_l1(merged(ids, probs), q)


def gold(logits, ids, probs, exact):
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
    logq = torch.log_softmax(logits.float(), dim=-1)                    # (B, T, V)
    on_exact = exact[ids]                                               # (B, T, E)
    ce = -(probs * on_exact * logq.gather(-1, ids)).sum(-1)             # (B, T)
    rest = merged(ids, probs).masked_fill(on_exact, 0.0)                # (B, T, E) non-exact ids
    return ce + sorted_l1(rest, logq.exp().masked_fill(exact, 0.0))


def xtoken(logits, ids, probs, prefixes):
    """X-Token-style P-KL (NVIDIA NeMo RL's cross-tokenizer distillation, arXiv 2605.21699): X-Token
    builds a sparse many-to-many projection between the two vocabularies from string rules, and its
    P-KL projects the student's distribution into the teacher's vocabulary before the KL. Here the
    projection stays in the target's vocabulary: the student's probability of a carried entry t is
    its total probability on the target tokens that t's text begins with (t itself included; the
    (V, P) `prefix_table`, -1 padded),
        L = -sum_k P_t(id_k) log sum_{u in prefixes(id_k)} Q_t(u).
    What differs from X-Token's own: our carried entries are already the target's first pieces (the
    next-token vocab map sends a source token to the first target token the target emits for its
    text), so no projection across vocabularies is left to do; the projection adds the shorter
    prefixes a target may cut first, crediting the target for starting the same text with a
    shorter piece. Each projected value is at most 1 (distinct tokens), but together they may sum
    to more than 1, so this is a cross-entropy against a projection, not a KL between
    distributions."""
    logq = torch.log_softmax(logits.float(), dim=-1)                    # (B, T, V)
    B, T, E = ids.shape
    pre = prefixes[ids]                                                 # (B, T, E, P)
    picked = logq.gather(-1, pre.clamp(min=0).reshape(B, T, -1)).reshape(pre.shape)
    projected = picked.masked_fill(pre < 0, -torch.inf).logsumexp(-1)   # (B, T, E) log sum Q_t
    return -(probs * projected).sum(-1)                                 # (B, T)


# --------------------------------------------------------------------------------------------------
# Their tables, from the tokenizers' normalized vocabularies (align.normalized_vocab), once a run


def exact_mask(target_vocab: list[str], source_vocabs: list[list[str]]) -> torch.Tensor:
    """GOLD's exact ids (V,) bool: the target tokens whose normalized text is also a token of every
    source's vocabulary. Tokens with no text (control tokens, '') never match."""
    shared = [set(v) for v in source_vocabs]
    return torch.tensor([t != "" and all(t in s for s in shared) for t in target_vocab],
                        dtype=torch.bool)


def prefix_table(vocab: list[str]) -> torch.Tensor:
    """X-Token's projection, in the target's vocabulary (V, P) int64: row t lists every id whose
    text is a non-empty prefix of t's text, t itself included (and any other id with the same text),
    then -1. E.g. vocab ["a", "ab", "b"] -> [[0, -1], [0, 1], [2, -1]]."""
    ids_of = defaultdict(list)                      # text -> the ids that have it
    for i, t in enumerate(vocab):
        if t:
            ids_of[t].append(i)
    rows = [[u for n in range(1, len(t) + 1) for u in ids_of.get(t[:n], ())] or [i]
            for i, t in enumerate(vocab)]
    table = np.full((len(vocab), max(map(len, rows), default=1)), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return torch.from_numpy(table)


class Distance:
    """One successor's L_fusion, as fusellm.fusion_loss takes it: (logits, ids, probs) -> (B, T),
    with its table (GOLD's exact mask, X-Token's prefixes) moved to the logits' device once."""

    def __init__(self, name: str, loss, table: torch.Tensor | None = None):
        self.name, self.loss, self.table = name, loss, table

    def __call__(self, logits, ids, probs):
        if self.table is None:
            return self.loss(logits, ids, probs)
        if self.table.device != logits.device:
            self.table = self.table.to(logits.device)
        return self.loss(logits, ids, probs, self.table)


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
        return Distance("xtoken", xtoken, prefix_table(target))
    sources = [normalized_vocab(load_tokenizer(p)) for p in source_models(cfg)]
    return Distance("gold", gold, exact_mask(target, sources))
