"""
fusellm.py: the method of FuseLLM (Wan et al., "Knowledge Fusion of Large Language Models", ICLR 2024),
and the one import a user needs: `from fusellm import load_model, load_tokenizer, save_model`.

The method, and where each step lives in nanofuse:

| paper | what it is | where |
| --- | --- | --- |
| source distributions P_s | each model's top-K next-token distribution at each of its tokens, and its CE per window | data.py `compute_dists`, `window_topk` |
| token alignment (MinED) | DTW over edit distances between the two token sequences | align.py `dtw` (`dtw_reference`: the readable DP) |
| exact alignment (ours) | tokens that end at the same byte of the text | align.py `byte_alignment`, `matched_positions` |
| vocab mapping (EM, MinED) | source id -> target id: equal string, nearest string | align.py `vocab_map_em`, `vocab_map_mined` |
| next-token vocab map (ours) | source id -> the first target token the target's encoder emits for its text | align.py `vocab_map_next` |
| distribution transfer | a source's top-K moved onto the target's positions and ids | align.py `transfer`, `carry` |
| fusion: MinCE, AvgCE | P_t = the candidate of lowest CE per window; or a CE-weighted mix | `fuse` below |
| per-token MinCE/AvgCE, CE per byte (ours) | the same choice per position, or CE compared per byte | `fuse` below, train.py `--ce-unit byte` |
| L = lambda L_CLM + (1 - lambda) L_fusion | the training objective | `token_losses` below, train.py `fused_loss` |

The model and its checkpoints live in model.py, the tokenizers in tokenizer.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# re-exported: the model, its checkpoints and tokenizers, for `from fusellm import ...`
from model import (CheckpointError, ModelArgs, Transformer, alibi_slopes, load, load_model,  # noqa: F401
                   read_safetensors, save_model, write_safetensors)
from tokenizer import load_tokenizer  # noqa: F401

# ----------------------------------------------------------------------------------------------------
# Fusion (paper section 3): combine the candidates' distributions into one target P_t, and train on it.
# A distribution over the vocabulary is kept sparse: ids (..., E) and probabilities (..., E) summing to 1.

FUSIONS = ("mince", "avgce", "mince_token", "avgce_token")


def token_losses(logits, labels, ids, probs):
    """The two per-position losses of training, from one log-softmax and one gather (the step's memory
    stays at plain cross-entropy's; no dense (B, T, V) target is built):
        L_CLM    = -log p(label)                       (0 where labels == -100)
        L_fusion = -sum_k P_t(id_k) log p(id_k)        the soft-label cross-entropy against the fused P_t
    logits (B, T, V); labels (B, T); ids, probs (B, T, E): the sparse P_t from fuse(). Returns two (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)                                   # (B, T, V)
    picked = logp.gather(-1, torch.cat([labels.clamp(min=0)[..., None], ids], dim=-1))  # (B, T, 1+E)
    clm = -picked[..., 0] * (labels != -100)                                            # (B, T)
    fusion = -(probs * picked[..., 1:]).sum(-1)                                         # (B, T)
    return clm, fusion


def mince_weights(ce):
    """MinCE (paper): per window, all weight on the candidate of minimum cross-entropy,
    P_t = P_{argmin_c CE_c}. ce (C, B) -> weights (C, B), one-hot over candidates; ties go to the earlier
    candidate (the target itself is candidate 0)."""
    return F.one_hot(ce.argmin(dim=0), ce.shape[0]).T.to(ce.dtype)


def avgce_weights(ce, kind: str = "official", tau: float = 1.0):
    """AvgCE weights over candidates from their CE (candidates on dim 0). "official": softmax(exp(-CE)), what
    the official code computes (close to uniform, since exp(-CE) lies in (0, 1]); "softmax": softmax(-CE / tau),
    which really favours the candidates that predict the text better."""
    if kind == "official":
        return torch.softmax(torch.exp(-ce), dim=0)
    if kind == "softmax":
        return torch.softmax(-ce / tau, dim=0)
    raise ValueError(f"AvgCE weights {kind!r}: choose 'official' or 'softmax'")


def fuse(cand_ids, cand_logprobs, cand_fallback, window_ce, labels, method="mince", temperature=1.0,
         avg_weights="official", tau=1.0):
    """The fused target distribution P_t at every position, from C candidates (the target itself first).

    cand_ids, cand_logprobs (C, B, T, K): each candidate's top-K in target ids (-inf log-prob: no entry);
    cand_fallback (C, B, T): where a candidate has no distribution and falls back to a one-hot on the label;
    window_ce (C, B): each candidate's CE on the window; labels (B, T): the next tokens.
    Each candidate's top-K is renormalised (with temperature: p_k ~ exp(log p_k / T)) so it sums to one.

    - mince (paper): per window, the candidate of lowest CE.
    - avgce (paper): per window, the candidates mixed with avgce_weights(CE).
    - mince_token: per position, the candidate giving the label the highest probability (lowest token CE);
      candidates that fall back or miss the label in their top-K do not compete; none left: one-hot.
    - avgce_token: per position, weights softmax(-token CE / tau) over the competing candidates.
    Ties go to the earlier candidate (the target). Returns ids (B, T, E), probs (B, T, E)."""
    if method not in FUSIONS:
        raise ValueError(f"fusion {method!r}: choose one of {FUSIONS}")
    C, B, T, K = cand_ids.shape
    p = torch.softmax(cand_logprobs / temperature, dim=-1).nan_to_num(0.0)            # (C, B, T, K)
    onehot_ids = labels.clamp(min=0)[None, :, :, None].expand(C, B, T, 1)
    onehot_p = torch.ones(C, B, T, 1, dtype=p.dtype, device=p.device)
    # each candidate as a K+1 entry distribution: its top-K, or the one-hot where it falls back
    fb = cand_fallback[..., None]
    ids = torch.cat([cand_ids, onehot_ids], dim=-1)                                    # (C, B, T, K+1)
    probs = torch.cat([p.masked_fill(fb, 0.0), onehot_p.masked_fill(~fb, 0.0)], dim=-1)
    if method in ("mince", "avgce"):
        if method == "mince":
            w = mince_weights(window_ce).to(p.dtype)                                   # (C, B)
        else:
            w = avgce_weights(window_ce, avg_weights, tau)                             # (C, B)
        w = w[:, :, None, None].expand(C, B, T, 1)
    else:
        # token CE: -log p(label) from the renormalised top-K; +inf where the candidate cannot compete
        hit = (cand_ids == labels[None, :, :, None]) & (p > 0)
        p_label = (p * hit).sum(-1)                                                    # (C, B, T)
        tok_ce = torch.where((p_label > 0) & ~cand_fallback, -torch.log(p_label), torch.inf)
        compete = torch.isfinite(tok_ce)
        if method == "mince_token":
            w = F.one_hot(tok_ce.argmin(dim=0), C).permute(2, 0, 1).to(p.dtype) * compete   # (C, B, T)
        else:
            w = torch.softmax(torch.where(compete, -tok_ce / tau, -torch.inf), dim=0).nan_to_num(0.0)
        w = w[..., None]                                                               # (C, B, T, 1)
    # every candidate's entries side by side, weighted: (B, T, C * (K+1))
    ids = ids.permute(1, 2, 0, 3).reshape(B, T, C * (K + 1))
    probs = (probs * w).permute(1, 2, 0, 3).reshape(B, T, C * (K + 1))
    if method in ("mince_token", "avgce_token"):                                      # no candidate left: one-hot
        none = ~compete.any(dim=0)                                                     # (B, T)
        ids = torch.cat([ids, labels.clamp(min=0)[..., None]], dim=-1)
        probs = torch.cat([probs, none[..., None].to(p.dtype)], dim=-1)
    return ids, probs


@torch.no_grad()
def main():
    import argparse
    p = argparse.ArgumentParser(description="Load a Hugging Face model folder and show its next-token top-k.")
    p.add_argument("path")
    p.add_argument("text")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    try:
        model, tok = load(a.path, a.device, torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    except ValueError as e:                         # CheckpointError, TokenizerError: one clear line
        raise SystemExit(f"error: {e}") from None
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(a.text)
    logits = model(torch.tensor([ids], device=a.device))[0, -1, :tok.vocab_size]
    logp = logits.log_softmax(-1)
    top = logp.topk(a.k)
    for lp, i in zip(top.values.tolist(), top.indices.tolist()):
        print(f"{math.exp(lp):8.4f}  {i:7d}  {tok.token_str(i)!r}")


if __name__ == "__main__":
    main()
