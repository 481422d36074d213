"""extras/rope_scaling.py: RoPE stretched for long contexts ("llama3" as Llama 3.1 does, "linear").

Why it exists: RoPE rotates each pair of q/k channels by position x frequency, theta_i =
base^(-2i/d); that is what model.py computes and what a learner needs. Checkpoints trained past
their original context rescale some frequencies, and loading one of them needs the same rescaling,
or its logits are wrong from the first position on: "linear" divides every frequency by `factor`;
"llama3" keeps the high ones, divides the low ones, and blends the band between.
extras/hf_configs.py reads which one a config asks for (ROPE_TYPES); model.rope_inv_freq applies it
with `scaled_inv_freq`.
"""
from __future__ import annotations

import math

import torch


def scaled_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """RoPE's frequencies (head_dim/2,) rescaled as the settings `s` say ({"rope_type": "linear" or
    "llama3", "factor", ...}, from hf_configs.rope_settings)."""
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend smoothly in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(medium, smoothed, scaled)
