"""
extras/sampled_labels.py: unbiased sparse labels, N next-token ids drawn from a model's distribution
instead of its top-K (`python data.py dists --sample N`).

Why it exists: storing each model's top-K and renormalising it to one (the paper's top-10, and
data.py's default) is biased: every id outside the top-K gets probability 0 and the ones inside get
more than the model gives them, so a student fitted to it is miscalibrated. Anshumann et al.,
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (ACL 2025) show this and store
instead ids *sampled* from the teacher (Random Sampling KD, by importance sampling), which needs
about 12 stored entries to match full distillation at 300M to 3B parameters. Here the proposal is
the model's own distribution p, so every draw weighs the same: at each position N ids are drawn
with replacement from p, each stored with probability 1/N (log-prob -log N). Then

    p_hat(v) = count(v) / N,   E[p_hat(v)] = p(v),   Var[p_hat(v)] = p(v) (1 - p(v)) / N,

and the soft cross-entropy -sum_v p_hat(v) log q(v) is, in expectation, -sum_v p(v) log q(v), for
any q: fusellm's L_fusion is unbiased, where the top-K's is not.

A draw that repeats an id is stored as an entry of its own (all N entries have the same log-prob),
never merged with a count, so every row keeps exactly N entries and no padding, and every later
stage that adds entries of one id (align.transfer merge "sum", fusellm.token_losses, label_mass)
gets count(v)/N. align.transfer merge "first" would keep one draw of a repeated id: aligning a
sampled source with it is refused (extras/storage.py settings_conflict). fusellm's temperature
does nothing to the model's own rows (equal log-probs stay equal); on an aligned source's rows it
sharpens the counts of merged draws, which is not the model's temperature: keep it at 1. A window's
CE stays exact (the whole vocabulary's log-sum-exp).

What it holds:
- `uniforms`: the N sorted uniforms of every position of a batch, from a generator seeded by each
  window's tokens and the model's name (never the rank or the batch): a resumed or torchrun run
  draws the same ids, so it writes the same bytes.
- `sample_reference`: the readable sampler, the whole (N, V) distribution at once (softmax, cumsum,
  searchsorted: inverse-CDF sampling).
- `head_sample`: the same in blocks of positions x vocabulary (extras/fast_head.py's block shape;
  fast_head.head_topk calls it when given uniforms), never (N, V): a first pass for the
  log-sum-exp and the next token's log-prob, a second that accumulates each block's probabilities
  and finds the id where the CDF crosses each uniform.
  tests/lessons/test_sampled_labels.py proves the two equal given the same uniforms.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def uniforms(seqs: list[list[int]], n: int, seed: str = "") -> torch.Tensor | None:
    """(sum of len(s), n) float64 uniforms in [0, 1), sorted along each row: the draws of every
    position of every token list in `seqs` (as the model reads them, BOS included), in order. One
    generator per list, seeded by a hash of `seed` (the model's name), n and the list's tokens, so
    a window gets the same draws whatever batch, rank or run it is in. n = 0: None (top-K)."""
    if not n:
        return None
    rows = []
    for s in seqs:
        key = hashlib.sha256(f"{seed}:{n}:".encode() + np.asarray(s, np.int64).tobytes())
        g = torch.Generator().manual_seed(int.from_bytes(key.digest()[:8], "little") >> 1)
        rows.append(torch.rand(len(s), n, generator=g, dtype=torch.float64).sort(-1).values)
    return torch.cat(rows) if rows else torch.empty(0, n, dtype=torch.float64)


def sample_reference(model, h, nxt, u, V: int):
    """The sampler written whole: p = softmax of the logits over the tokenizer's V ids (float64),
    its CDF, and for each uniform the first id whose CDF passes it (inverse-CDF sampling:
    P(id = v) = p(v)). h (N, C): final hidden states; nxt (N,): the next token (-1: none); u (N, S):
    sorted uniforms. Returns ids (N, S) (ascending along a row, since u is sorted), their log-probs
    (N, S), all -log S (each draw weighs 1/S), and the next token's log-prob (N,) (0 where nxt is
    -1). The float64 CDF's last value misses 1 by rounding (~1e-13 on a real vocabulary); a uniform
    at or past it finds no id, and takes the id where the CDF reaches that value: the last one
    whose probability counted, never one of probability 0 (a reserved token at the end, say)."""
    logp = torch.log_softmax(model.logits(h, slice(0, V)).double(), dim=-1)     # (N, V)
    cdf = logp.exp().cumsum(dim=-1)                                             # (N, V)
    ids = torch.searchsorted(cdf, u.to(cdf.device), right=True)      # (N, S); V: past the CDF
    last = torch.searchsorted(cdf, cdf[:, -1:].contiguous())    # (N, 1) first id where cdf = end
    ids = torch.minimum(ids, last)               # a found id is never past it: only V changes
    label = logp.gather(1, nxt.clamp(min=0)[:, None])[:, 0] * (nxt >= 0)        # (N,)
    return ids, torch.full(ids.shape, -math.log(u.shape[1]), device=ids.device), label.float()


def head_sample(model, h, nxt, u, V: int, rows: int, cols: int):
    """sample_reference in blocks of `rows` positions x `cols` vocabulary entries (the block shape
    extras/fast_head.py chooses; it calls this when given uniforms), never (N, V). For a slice
    of positions, pass 1 walks the vocabulary for the log-sum-exp (float64, running logaddexp) and
    the next token's logit; pass 2 walks it again: block probabilities p = exp(z - lse), their CDF
    from where the last block ended (acc + cumsum), and each uniform not yet placed whose CDF
    crossing falls in this block takes the id there (searchsorted). A uniform at or past the CDF's
    last value (float rounding) takes the id where the CDF reaches that value, as in the
    reference: the last block that added to the CDF, where its CDF reaches its end. Same arguments
    and results."""
    S = u.shape[1]
    ids, label = [], []
    for i in range(0, len(h), rows):
        hs, t, us = h[i:i + rows], nxt[i:i + rows], u[i:i + rows].to(h.device)  # (r, C), (r,)
        r = len(hs)
        lse = torch.full((r,), -math.inf, dtype=torch.float64, device=h.device)     # (r,)
        lab = torch.zeros(r, dtype=torch.float64, device=h.device)                  # (r,)
        for c in range(0, V, cols):                                      # pass 1: lse, label
            z = model.logits(hs, slice(c, min(c + cols, V))).double()    # (r, cols)
            lse = torch.logaddexp(lse, z.logsumexp(dim=-1))
            here = (t >= c) & (t < c + z.shape[1])
            lab = torch.where(here, z.gather(1, (t - c).clamp(0, z.shape[1] - 1)[:, None])[:, 0],
                              lab)
        acc = torch.zeros(r, dtype=torch.float64, device=h.device)      # (r,) CDF before the block
        got = torch.zeros(r, S, dtype=torch.long, device=h.device)      # (r, S)
        open_ = torch.ones(r, S, dtype=torch.bool, device=h.device)      # not placed yet
        last = torch.zeros(r, dtype=torch.long, device=h.device)        # (r,) where the CDF ends
        for c in range(0, V, cols):                                      # pass 2: the CDF
            z = model.logits(hs, slice(c, min(c + cols, V))).double()    # (r, cols)
            cdf = acc[:, None] + (z - lse[:, None]).exp_().cumsum(dim=-1)          # (r, cols)
            j = torch.searchsorted(cdf, us, right=True)                  # (r, S) first cdf > u
            hit = open_ & (j < z.shape[1])
            got = torch.where(hit, j + c, got)
            open_ &= ~hit
            end = torch.searchsorted(cdf, cdf[:, -1:].contiguous())[:, 0]    # (r,) first cdf = end
            last = torch.where(cdf[:, -1] > acc, end + c, last)       # if the block added to it
            acc = cdf[:, -1]
        ids.append(torch.where(open_, last[:, None], got))    # past the CDF's end: where it ends
        label.append(((lab - lse) * (t >= 0)).float())
    ids = torch.cat(ids)
    return ids, torch.full(ids.shape, -math.log(S), device=h.device), torch.cat(label)
