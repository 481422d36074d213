"""
fusellm.py: the method of FuseLLM (Wan et al., "Knowledge Fusion of Large Language Models", ICLR
2024), and the one import a user needs:
`from fusellm import load_model, load_tokenizer, save_model`.

FuseLLM continue-trains one target LLM on a corpus to match, next to its usual next-token loss, a
fusion of what several source LLMs (other architectures, other tokenizers) predict on the same text:

    L = lambda * L_CLM + (1 - lambda) * L_fusion,   L_fusion = -E_t [ sum_v P_t(v) log Q_t(v) ]

where Q_t is the target's next-token distribution and P_t the fused one. The pipeline, stage by
stage (the paper's symbols in brackets; "ours": not in the paper), and where each is computed:

corpus -> windows: text cut so every tokenizer fits it in seq_len tokens
    data.py `split_document`, `build_windows`
source distributions [P_s, CE_s]: each model's top-K next-token distribution at each of its
tokens, its CE per window
    data.py `compute_dists`, `window_topk`, `head_topk` (in blocks: extras/fast_head.py)
token alignment (MinED): DTW over edit distances between the two token sequences
    align.py `dtw` (`dtw_reference`: the readable DP)
exact alignment (ours): tokens that end at the same byte of the text
    align.py `byte_alignment`, `matched_positions`
vocab mapping (EM, MinED): source id -> target id: equal string, nearest string
    align.py `vocab_map_em`, `vocab_map_mined`
next-token vocab map (ours): source id -> the first target token the target emits for its text
    align.py `vocab_map` (kind "next": extras/emitted_tokens.py)
distribution transfer: a source's top-K moved onto the target's positions and ids
    align.py `transfer`, `carry`, with `PRESETS` (nanofuse, paper, official); data.py
    `align_source`, stored as padded rows (`padded`); its label quality: extras/align_stats.py
candidates [P_t^j]: every candidate's distribution at every target position, as tensors
    data.py `FusionData`; `Batch`, `collate` below
fusion: MinCE [P_t = P_argmin CE]: per window, the candidate of lowest CE       `mince` below
fusion: AvgCE [P_t = sum_j w_j P_j]: per window, a CE-weighted mix   `avgce`, `avgce_weights`
per-token fusion (ours): the same choice per position          `mince_token`, `avgce_token`
CE per byte (ours): candidates' CE compared per byte, not per own token
    `collate(ce_unit="byte")`, data.py `ce_per_byte`
objective [L_CLM, L_fusion, lambda]: both losses from one log-softmax
    `token_losses`, `fusion_loss` below
continue-training: the loop: schedules, micro-batches, DDP/FSDP, checkpoints
    train.py `run_steps`, `train`
evaluation: bits per byte, multiple choice, exact match, HumanEval    eval.py `evaluate`

The model and its checkpoints live in model.py, the tokenizers in tokenizer.py.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

# re-exported: the model, its checkpoints and tokenizers, for `from fusellm import ...`
from model import (CheckpointError, ModelArgs, Transformer, alibi_slopes,  # noqa: F401
                   load, load_model, save_model)
from tokenizer import load_tokenizer  # noqa: F401

# --------------------------------------------------------------------------------------------------
# 1. The candidates: a micro-batch of windows, every candidate's distribution at every position.


@dataclass
class Batch:
    """One micro-batch: the target's tokens of B windows and C candidates' next-token distributions
    on them. The candidates are the target itself (candidate 0: the paper fuses it with the
    sources) and each source, carried onto the target's tokens and vocabulary by align.py. T
    positions, K entries per distribution.

    field          shape         dtype    what
    input_ids      (B, T)        int64    [BOS] + the window's target tokens, without the last
    labels         (B, T)        int64    the next token (input_ids moved by one); -100: pad
    fusion_mask    (B, T)        bool     positions with candidates (not BOS -> first, not pad)
    cand_ids       (C, B, T, K)  int64    each candidate's top-K next tokens, in target ids
    cand_logprobs  (C, B, T, K)  float32  their log-probs over its whole vocabulary; -inf: no entry
    cand_fallback  (C, B, T)     bool     none carried here: it stands for a one-hot on the label
    window_ce      (C, B)        float32  each candidate's CE on the window (per token or per byte)

    A CLM-only batch (lambda = 1) has no candidates: their fields are None. `collate` builds a
    Batch from stored windows; `fuse` turns it into P_t; `token_losses` scores the target's logits
    against both."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    fusion_mask: torch.Tensor | None = None
    cand_ids: torch.Tensor | None = None
    cand_logprobs: torch.Tensor | None = None
    cand_fallback: torch.Tensor | None = None
    window_ce: torch.Tensor | None = None

    def to(self, device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: None if t is None else t.to(device) for k, t in moved.items()})


def collate(items: list[dict], names: list[str], bos: int | None, K: int,
            ce_unit: str = "token") -> Batch:
    """A Batch from windows as data.FusionData (or train's online candidates) gives them. The round
    trip of one window of n target tokens x_0 .. x_{n-1}:

    stored by data.py (one row per target token; row i is the distribution of the token after x_i,
    so row n-1, which predicts past the window, is never used):
        item["tokens"]                   (n,)     the target's tokens
        item["target"]["topk_ids"]       (n, K)   the target's own top-K at each token
        item["sources"][name]["counts"]  (n,)     entries carried onto each target token (0: falls
                                                  back to the one-hot)
        ...["ids"], ["logprobs"]         (n, K')  those entries first, then padding (data.py
                                                  `padded`; K': the source's stored top-K)
        item[...]["ce"], ["ce_per_byte"] ()       the model's CE on the window
    here, dense: the sequence is s = [BOS] + tokens; input_ids = s[:-1] and labels = s[1:], so row
    i (predicting x_{i+1}) lands at position i + 1 with a BOS (position 0 predicts x_0 from BOS
    alone: nothing to fuse) and at position i without one. A source's row keeps its first counts
    entries (log-prob -inf after them). Windows shorter than the longest are padded (labels -100,
    fusion_mask False)."""
    if ce_unit not in ("token", "byte"):
        raise ValueError(f"--ce-unit {ce_unit!r}: choose 'token' (paper) or 'byte'")
    ce_key = "ce" if ce_unit == "token" else "ce_per_byte"
    nb = int(bos is not None)
    seqs = [([bos] if nb else []) + it["tokens"] for it in items]
    B, T, C = len(items), max(len(s) for s in seqs) - 1, len(names)
    x = np.zeros((B, T), dtype=np.int64)
    y = np.full((B, T), -100, dtype=np.int64)
    mask = np.zeros((B, T), dtype=bool)
    cid = np.zeros((C, B, T, K), dtype=np.int64)
    clp = np.full((C, B, T, K), -np.inf, dtype=np.float32)
    cfb = np.zeros((C, B, T), dtype=bool)
    ce = np.zeros((C, B), dtype=np.float32)
    for b, (it, s) in enumerate(zip(items, seqs)):
        n = len(it["tokens"])
        x[b, :len(s) - 1], y[b, :len(s) - 1] = s[:-1], s[1:]
        rows = slice(nb, nb + n - 1)                      # the positions of rows 0 .. n-2
        mask[b, rows] = True
        k = it["target"]["topk_ids"].shape[1]
        cid[0, b, rows, :k] = it["target"]["topk_ids"][:n - 1]
        clp[0, b, rows, :k] = it["target"]["topk_logprobs"][:n - 1]
        ce[0, b] = it["target"][ce_key]
        for c, name in enumerate(names[1:], 1):
            src = it["sources"][name]
            k = min(K, src["ids"].shape[1])             # its stored top-K, at most K
            counts = np.asarray(src["counts"][:n - 1])  # (n-1,) e.g. [2, 0, 1]
            carried = np.arange(k) < counts[:, None]    # (n-1, k)   [[1, 1], [0, 0], [1, 0]]
            cid[c, b, rows, :k] = src["ids"][:n - 1, :k]
            clp[c, b, rows, :k] = np.where(carried, src["logprobs"][:n - 1, :k], -np.inf)
            cfb[c, b, rows] = counts == 0
            ce[c, b] = src[ce_key]
    t = torch.from_numpy
    return Batch(input_ids=t(x), labels=t(y), fusion_mask=t(mask), cand_ids=t(cid),
                 cand_logprobs=t(clp), cand_fallback=t(cfb), window_ce=t(ce))


# --------------------------------------------------------------------------------------------------
# 2. Fusion (paper section 3): the candidates' distributions -> one target distribution P_t per
# position. A distribution is kept sparse: ids (..., E) and probabilities (..., E) that sum to 1;
# an id may appear more than once (its probabilities add up).

FUSIONS = ("mince", "avgce", "mince_token", "avgce_token")
AVG_WEIGHTS = ("official", "softmax")


def candidate_dists(batch: Batch, temperature: float = 1.0):
    """Each candidate's distribution at each position as K+1 entries: its top-K renormalised to sum
    to one, p_k ~ exp(log p_k / temperature), and one entry on the label that holds all the mass
    where the candidate falls back (a one-hot, as the paper does where alignment fails); no
    entries: probability 0. Returns ids, probs (C, B, T, K+1)."""
    C, B, T, K = batch.cand_ids.shape
    p = torch.softmax(batch.cand_logprobs / temperature, dim=-1).nan_to_num(0.0)   # (C, B, T, K)
    fb = batch.cand_fallback[..., None]                                # (C, B, T, 1)
    label = batch.labels.clamp(min=0)[None, :, :, None].expand(C, B, T, 1)
    ids = torch.cat([batch.cand_ids, label], dim=-1)                   # (C, B, T, K+1)
    probs = torch.cat([p.masked_fill(fb, 0.0), fb.to(p.dtype)], dim=-1)   # (C, B, T, K+1)
    return ids, probs


def side_by_side(ids, probs):
    """C candidates' weighted entries (C, B, T, E) as one distribution per position (B, T, C*E)."""
    C, B, T, E = ids.shape
    return tuple(x.permute(1, 2, 0, 3).reshape(B, T, C * E) for x in (ids, probs))


def mince(batch: Batch, temperature: float = 1.0):
    """MinCE (paper): per window, P_t is the distribution of the candidate of lowest cross-entropy,
        P_t = P_j,  j = argmin_i CE_i.
    Ties go to the earlier candidate (the target itself is candidate 0). Returns ids, probs
    (B, T, K+1)."""
    ids, probs = candidate_dists(batch, temperature)                 # (C, B, T, K+1)
    j = batch.window_ce.argmin(dim=0)                                # (B,) each window's winner
    b = torch.arange(len(j), device=j.device)
    return ids[j, b], probs[j, b]                                    # (B, T, K+1)


def avgce_weights(ce, kind: str = "official", tau: float = 1.0):
    """AvgCE's weights over candidates (dim 0) from their CE. "official": softmax(exp(-CE)), what
    the official code computes (close to uniform, since exp(-CE) lies in (0, 1]); "softmax" (ours):
    softmax(-CE / tau), which really favours the candidates that predict the text better."""
    if kind == "official":
        return torch.softmax(torch.exp(-ce), dim=0)
    if kind == "softmax":
        return torch.softmax(-ce / tau, dim=0)
    raise ValueError(f"AvgCE weights {kind!r}: choose one of {AVG_WEIGHTS}")


def avgce(batch: Batch, temperature: float = 1.0, weights: str = "official", tau: float = 1.0):
    """AvgCE (paper): per window, P_t is the candidates' distributions averaged with weights from
    their CE,
        P_t = sum_i w_i P_i,  w = avgce_weights(CE).
    Returns ids, probs (B, T, C*(K+1))."""
    ids, probs = candidate_dists(batch, temperature)                 # (C, B, T, K+1)
    w = avgce_weights(batch.window_ce, weights, tau)                 # (C, B)
    return side_by_side(ids, probs * w[:, :, None, None])


# Ours, not the paper's: the same two choices made per position instead of per window. A
# candidate's token CE is -log of the probability its renormalised top-K gives the label; one that
# falls back, or lacks the label in its top-K, does not compete, and where none competes P_t is
# the one-hot on the label.


def token_ce(batch: Batch, ids, probs):
    """Each candidate's token CE (C, B, T), +inf where it does not compete."""
    K = batch.cand_ids.shape[-1]
    on_label = ids[..., :K] == batch.labels[None, :, :, None]               # (C, B, T, K)
    p_label = (probs[..., :K] * on_label).sum(-1)                           # (C, B, T)
    return torch.where(p_label > 0, -torch.log(p_label), torch.inf)


def mince_token(batch: Batch, temperature: float = 1.0):
    """Per position, the candidate giving the label the highest probability. Returns (B, T, K+2)."""
    ids, probs = candidate_dists(batch, temperature)                 # (C, B, T, K+1)
    ce = token_ce(batch, ids, probs)                                 # (C, B, T)
    j = ce.argmin(dim=0)[None, :, :, None].expand(1, *ids.shape[1:])   # (1, B, T, K+1) winners
    none = torch.isinf(ce).all(dim=0)                                # (B, T) no candidate competes
    ids, probs = ids.gather(0, j)[0], probs.gather(0, j)[0] * ~none[..., None]
    return with_one_hot(ids, probs, batch.labels, none)


def avgce_token(batch: Batch, temperature: float = 1.0, tau: float = 1.0):
    """Per position, the competing candidates mixed with weights softmax(-token CE / tau).
    Returns (B, T, C*(K+1)+1)."""
    ids, probs = candidate_dists(batch, temperature)                 # (C, B, T, K+1)
    ce = token_ce(batch, ids, probs)                                 # (C, B, T)
    w = torch.softmax(-ce / tau, dim=0).nan_to_num(0.0)    # (C, B, T); no candidate competes: 0
    ids, probs = side_by_side(ids, probs * w[..., None])
    return with_one_hot(ids, probs, batch.labels, torch.isinf(ce).all(dim=0))


def with_one_hot(ids, probs, labels, where):
    """One more entry per position: the label, probability 1 where `where` (B, T) holds, else 0."""
    return (torch.cat([ids, labels.clamp(min=0)[..., None]], dim=-1),
            torch.cat([probs, where[..., None].to(probs.dtype)], dim=-1))


def fuse(batch: Batch, method: str = "mince", temperature: float = 1.0,
         avg_weights: str = "official", tau: float = 1.0):
    """P_t at every position by one of FUSIONS. Returns ids, probs (B, T, E)."""
    if method == "mince":
        return mince(batch, temperature)
    if method == "avgce":
        return avgce(batch, temperature, avg_weights, tau)
    if method == "mince_token":
        return mince_token(batch, temperature)
    if method == "avgce_token":
        return avgce_token(batch, temperature, tau)
    raise ValueError(f"fusion {method!r}: choose one of {FUSIONS}")


# --------------------------------------------------------------------------------------------------
# 3. The objective (paper section 3): L = lambda * L_CLM + (1 - lambda) * L_fusion


def token_losses(logits, labels, ids, probs, distance=None):
    """The two per-position losses, from one log-softmax and two small gathers (the step's memory
    stays at plain cross-entropy's; no dense (B, T, V) target is built), with Q_t the target model's
    predictions:
        L_CLM    = -log Q_t(label)                     (0 where labels == -100)
        L_fusion = -sum_k P_t(id_k) log Q_t(id_k)      the soft-label cross-entropy against P_t
    logits (B, T, V); labels (B, T); ids, probs (B, T, E): the sparse P_t from fuse(); distance:
    another L_fusion (FuseLLM's successors), scored on the same log Q_t. Returns two (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)                            # (B, T, V)
    clm = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)   # (B, T)
    if distance is not None:     # ULD, GOLD, X-Token (extras/successors.py) in the CE's place
        return clm, distance(logp, ids, probs)                                  # (B, T) each
    fusion = -(probs * logp.gather(-1, ids)).sum(-1)                            # (B, T)
    return clm, fusion


def fusion_loss(logits, batch: Batch, lam: float, n_clm: float, n_fus: float,
                fusion: str = "mince", temperature: float = 1.0, avg_weights: str = "official",
                tau: float = 1.0, distance=None):
    """The training objective on one micro-batch, L = lambda * L_CLM + (1 - lambda) * L_fusion: P_t
    by `fuse`, then each per-position loss summed and divided by its token count over the whole
    step (n_clm: labelled positions, n_fus: positions in fusion_mask, every micro-batch and process
    together), so the step's loss is the mean over its tokens however it is split. Returns (loss,
    CLM sum, fusion sum); the sums are detached. `distance`: another L_fusion than the CE, above."""
    ids, probs = fuse(batch, fusion, temperature, avg_weights, tau)            # (B, T, E)
    clm, fus = token_losses(logits, batch.labels, ids, probs, distance)        # (B, T) each
    clm, fus = clm.sum(), (fus * batch.fusion_mask).sum()
    loss = lam * clm / max(n_clm, 1) + (1 - lam) * fus / max(n_fus, 1)
    return loss, clm.detach(), fus.detach()


if __name__ == "__main__":          # `python fusellm.py FOLDER TEXT`: a model's next-token top-k
    from extras.next_tokens import main
    main()
