"""
model.py: the model and its checkpoints, in plain torch.

One `Transformer` covers the model families FuseLLM fuses: the Llama family (Llama-2/3, OpenLLaMA,
Mistral, Qwen2) and MPT. It is built from a Hugging Face `config.json`, loads the checkpoint's
safetensors (read here, memory-mapped) or `pytorch_model*.bin` files, and gives the same logits as
`transformers`. `save_model` writes a folder that both this file and `transformers` load.

Tokenizers (sentencepiece, byte-level BPE on tiktoken, Llama-3's tiktoken file) live in tokenizer.py.
fusellm.py, the method, re-exports `load_model`, `load_tokenizer`, `save_model` and `load`, so
`from fusellm import load_model, load_tokenizer, save_model` is all a caller needs.

Read top to bottom: config -> model -> safetensors -> load/save.
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import mmap
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from common import atomic_path
from tokenizer import Tokenizer, load_tokenizer

# What each family changes from the Llama block (ModelArgs fields); MPT has its own reader below.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm="head"),
    "phi3": {},                                       # the same math; q;k;v and gate;up stored fused
    "olmo2": dict(norm="rms_fp32", qk_norm="all", block_norms="post"),
    "gemma2": dict(norm="gemma", block_norms="sandwich", embed_scale=True, mlp="geglu"),
    "gemma3_text": dict(norm="gemma", block_norms="sandwich", embed_scale=True, mlp="geglu", qk_norm="head"),
}
SUPPORTED_MODEL_TYPES = (*FAMILIES, "mpt")
ROPE_TYPES = ("default", "llama3", "linear")


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the fix."""


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000        # rows of the embedding (may exceed the tokenizer's vocabulary)
    dim: int = 4096                # C, the residual width
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32           # < n_heads: grouped-query attention
    head_dim: int = 128
    hidden_dim: int = 11008        # MLP width
    norm_eps: float = 1e-6
    norm: str = "rms"              # rms (Llama) | rms_fp32 (OLMo 2: scaled before the cast) | gemma (x (1 + w))
                                   # | layer (MPT: LayerNorm, weight only)
    block_norms: str = "pre"       # pre (Llama: norm -> sublayer) | sandwich (Gemma: norm -> sublayer -> norm)
                                   # | post (OLMo 2: sublayer -> norm), around attention and MLP alike
    qk_norm: str = ""              # RMSNorm of q and k before RoPE: "head" (each head: Qwen3, Gemma 3) or "all"
                                   # (the whole projection: OLMo 2)
    mlp: str = "swiglu"            # swiglu (Llama) | geglu (Gemma: tanh-GELU gate) | gelu (MPT)
    embed_scale: bool = False      # Gemma: embeddings times sqrt(dim)
    attn_softcap: float | None = None    # Gemma 2: attention scores s -> c tanh(s / c)
    final_softcap: float | None = None   # Gemma 2: logits z -> c tanh(z / c)
    qkv_bias: bool = False         # Qwen2, Llama attention_bias
    o_bias: bool = False           # Llama attention_bias
    mlp_bias: bool = False         # Llama mlp_bias
    tie_embeddings: bool = False
    # positions: RoPE (Llama family) or ALiBi (MPT)
    pos: str = "rope"              # "rope" or "alibi"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", ...} or None
    rope_local: dict | None = None    # Gemma 3: the sliding layers' own {"rope_theta", "rope_type", ...}
    alibi_bias_max: float = 8
    attn_scale: float | None = None   # None: 1/sqrt(head_dim)
    clip_qkv: float | None = None     # MPT
    sliding_window: int | None = None
    sliding_layers: tuple = ()     # per layer: True where the sliding window applies
    max_seq_len: int = 4096
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json it came from

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face config.json dict. Unsupported settings raise CheckpointError."""
        mt = cfg.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {mt!r} is not supported; nanofuse loads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the checkpoint to one of these or add the family to model.py.")

        def need(key):
            if key not in cfg:
                raise CheckpointError(f"{source}: missing required field {key!r} for model_type {mt!r}")
            return cfg[key]

        if mt == "mpt":
            return cls._from_mpt(cfg, source, need)
        family = FAMILIES[mt]
        gemma = mt.startswith("gemma")
        act_key = "hidden_activation" if gemma and "hidden_activation" in cfg else "hidden_act"
        act, want = cfg.get(act_key, "gelu_pytorch_tanh" if gemma else "silu"), ("gelu_pytorch_tanh" if gemma else "silu")
        if act != want:
            raise CheckpointError(f"{source}: {act_key} {act!r} is not supported (only {want!r} for {mt})")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{source}: partial_rotary_factor {cfg['partial_rotary_factor']} is not supported "
                                  f"(RoPE over the whole head only)")
        if cfg.get("use_bidirectional_attention"):
            raise CheckpointError(f"{source}: use_bidirectional_attention is not supported (causal models only)")
        n_heads = need("num_attention_heads")
        dim = need("hidden_size")
        n_layers = need("num_hidden_layers")
        # RoPE: older configs put rope_theta at the top and scaling in `rope_scaling`; newer ones put both in
        # `rope_parameters`, per layer type for Gemma 3 ({"full_attention": ..., "sliding_attention": ...}).
        params = dict(cfg.get("rope_parameters") or {})
        local = None
        if mt == "gemma3_text":
            full = dict(params.get("full_attention") or cfg.get("rope_scaling") or {})
            full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
            local = dict(params.get("sliding_attention") or {})
            local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
            params = full
        theta, scaling = rope_settings(params or cfg.get("rope_scaling") or {}, cfg, source)
        if local is not None:
            local_theta, local_scaling = rope_settings(local, cfg, source, "rope_parameters.sliding_attention")
            local = {"rope_theta": local_theta, **(local_scaling or {"rope_type": "default"})}
        # sliding window: Mistral and Phi-3 apply it to every layer; Qwen2/3 and Gemma to the layers marked in
        # layer_types (Gemma's older configs: every 2nd layer for Gemma 2, all but every 6th for Gemma 3)
        window = cfg.get("sliding_window")
        if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = cfg.get("layer_types")
        if not layer_types and gemma:
            every = 2 if mt == "gemma2" else cfg.get("sliding_window_pattern", 6)
            layer_types = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
        if layer_types and len(layer_types) != n_layers:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        if window is None:
            sliding = (False,) * n_layers
        elif layer_types:
            sliding = tuple(t == "sliding_attention" for t in layer_types)
        elif mt in ("qwen2", "qwen3"):
            sliding = tuple(i >= cfg.get("max_window_layers", 28) for i in range(n_layers))
        else:
            sliding = (True,) * n_layers
        attention_bias = bool(cfg.get("attention_bias", False))
        head_dim = cfg.get("head_dim") or dim // n_heads
        return cls(
            model_type=mt, vocab_size=need("vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
            hidden_dim=need("intermediate_size"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=family.get("qkv_bias", False) or attention_bias, o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
            norm=family.get("norm", "rms"), block_norms=family.get("block_norms", "pre"),
            qk_norm=family.get("qk_norm", ""), mlp=family.get("mlp", "swiglu"),
            embed_scale=family.get("embed_scale", False),
            attn_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma and cfg.get("query_pre_attn_scalar") else None,
            attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
            final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
            rope_theta=float(theta), rope_scaling=scaling, rope_local=local,
            sliding_window=window if any(sliding) else None, sliding_layers=sliding,
            max_seq_len=cfg.get("max_position_embeddings", 4096), hf_config=dict(cfg))

    @classmethod
    def _from_mpt(cls, cfg, source, need):
        attn = cfg.get("attn_config") or {}
        problems = []
        if not attn.get("alibi", True):
            problems.append("attn_config.alibi=false (learned positions)")
        if attn.get("qk_ln"):
            problems.append("attn_config.qk_ln")
        if attn.get("attn_type", "multihead_attention") != "multihead_attention":
            problems.append(f"attn_config.attn_type={attn.get('attn_type')!r}")
        if attn.get("prefix_lm"):
            problems.append("attn_config.prefix_lm")
        if not cfg.get("no_bias", True):
            problems.append("no_bias=false")
        if cfg.get("logit_scale") is not None:
            problems.append("logit_scale")
        if problems:
            raise CheckpointError(f"{source}: MPT settings not supported: {', '.join(problems)}")
        dim, n_heads = need("d_model"), need("n_heads")
        n_layers = need("n_layers")
        return cls(
            model_type="mpt", vocab_size=need("vocab_size"), dim=dim, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=n_heads, head_dim=dim // n_heads,
            hidden_dim=cfg.get("expansion_ratio", 4) * dim, norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            norm="layer", mlp="gelu", tie_embeddings=True, pos="alibi",
            alibi_bias_max=attn.get("alibi_bias_max", 8), attn_scale=attn.get("softmax_scale"),
            clip_qkv=attn.get("clip_qkv"), sliding_layers=(False,) * n_layers,
            max_seq_len=cfg.get("max_seq_len", 2048), hf_config=dict(cfg))

    def to_hf(self) -> dict:
        """A config.json dict for this model: the one it was loaded from, or a new Llama/MPT one."""
        if self.hf_config:
            return dict(self.hf_config)
        if self.model_type == "mpt":
            return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": self.dim,
                    "n_heads": self.n_heads, "n_layers": self.n_layers,
                    "expansion_ratio": self.hidden_dim // self.dim, "max_seq_len": self.max_seq_len,
                    "vocab_size": self.vocab_size, "layer_norm_epsilon": self.norm_eps, "no_bias": True,
                    "attn_config": {"alibi": True, "alibi_bias_max": _int_if_whole(self.alibi_bias_max),
                                    "softmax_scale": self.attn_scale, "clip_qkv": self.clip_qkv}}
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
               "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
               "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
               "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
               "rms_norm_eps": self.norm_eps, "hidden_act": "silu", "rope_theta": self.rope_theta,
               "max_position_embeddings": self.max_seq_len, "tie_word_embeddings": self.tie_embeddings,
               "attention_bias": self.o_bias, "mlp_bias": self.mlp_bias}
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg


def rope_settings(params: dict, cfg: dict, source: str, where: str = "rope_parameters / rope_scaling"):
    """(theta, scaling dict or None) from one RoPE parameter dict; a type we cannot compute is an error."""
    params = dict(params)
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise CheckpointError(f"{source}: {where}: RoPE type {rope_type!r} is not supported "
                              f"({', '.join(ROPE_TYPES)}); this checkpoint's positions cannot be computed")
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in need if k not in params]
    if missing:
        raise CheckpointError(f"{source}: {where}: RoPE type {rope_type!r} needs {', '.join(missing)}")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
    return float(theta), params


def _int_if_whole(x):
    return int(x) if float(x).is_integer() else x


# ----------------------------------------------------------------------------------------------------
# Model


class Norm(nn.Module):
    """RMSNorm, computed in fp32 as the references do, in three spellings, or MPT's weight-only LayerNorm:
    rms (Llama): w * cast(x / rms(x));  rms_fp32 (OLMo 2): cast(w * x / rms(x));  gemma: cast((1 + w) * x / rms(x))."""

    def __init__(self, dim: int, eps: float, kind: str):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.zeros(dim) if kind == "gemma" else torch.ones(dim))

    def forward(self, x):  # (..., C)
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "gemma":
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        if self.kind == "rms_fp32":
            return (self.weight.float() * h).to(x.dtype)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, s: dict | None) -> torch.Tensor:
    """theta_i = base^(-2i/d), with Llama-3.1 ("llama3") or linear scaling applied. (head_dim/2,) fp32."""
    d = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    if not s or s.get("rope_type", "default") == "default":
        return inv_freq
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


def apply_rope(x, cos, sin):
    """Rotate-half RoPE, the layout Hugging Face stores q/k weights in. x (B, H, T, hd), cos/sin (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's ALiBi slopes: 2^(-bias_max * k / n) for k = 1..n, n the next power of two >= n_heads.
    For other head counts the two interleaved series (odd k, then even k) are concatenated and cut."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, device="cpu").float() * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes  # (H,)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:                            # over each head's hd, or over all heads at once
            per = args.head_dim if args.qk_norm == "head" else None
            self.q_norm = Norm(per or args.n_heads * args.head_dim, args.norm_eps, args.norm)
            self.k_norm = Norm(per or args.n_kv_heads * args.head_dim, args.norm_eps, args.norm)
        self.scale, self.clip, self.softcap = args.attn_scale, args.clip_qkv, args.attn_softcap
        self.sliding = bool(args.sliding_layers[layer_id])
        self.window = args.sliding_window if self.sliding else None
        self.layer_id = layer_id

    def forward(self, x, rope, alibi, cache=None):  # x (B, T, C); rope: (cos, sin) of full and of sliding layers
        B, T, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope[1] if self.sliding and rope[1] is not None else rope[0]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:                       # the keys and values of every position so far
            k, v = cache.update(self.layer_id, k, v)                                     # (B, Hkv, S, hd)
        S = k.shape[2]                              # queries are positions S-T .. S-1 of the S keys
        mask, causal = None, True
        if alibi is not None:                       # (1, H, T, S): -slope*(i-j), -inf where j > i
            mask, causal = alibi, False
        elif S > T or self.window is not None and S > self.window or self.softcap:
            i, j = torch.arange(S - T, S, device=x.device), torch.arange(S, device=x.device)
            mask, causal = j[None, :] <= i[:, None], False                               # (T, S) causal
            if self.window is not None:
                mask = mask & (j[None, :] > i[:, None] - self.window)                      # and in the window
        if self.softcap:                            # Gemma 2: scores capped by c tanh(s / c) before the softmax
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)       # (B, H, T, hd)
            scale = self.scale if self.scale is not None else self.head_dim ** -0.5
            s = (q @ k.transpose(-1, -2)) * scale                                            # (B, H, T, T)
            s = self.softcap * torch.tanh(s / self.softcap)                                 # (B, H, T, S)
            s = s.masked_fill(~mask, float("-inf"))
            y = torch.softmax(s.float(), dim=-1).to(q.dtype) @ v                            # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))                             # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) for the Llama family; GeGLU w2(gelu_tanh(w1 x) * w3 x) for Gemma;
    w2(gelu(w1 x)) for MPT."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.kind = args.mlp
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)   # gate (MPT: up)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=args.mlp_bias)   # down
        if self.kind != "gelu":
            self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=args.mlp_bias)  # up

    def forward(self, x):  # (B, T, C)
        if self.kind == "gelu":
            return self.w2(F.gelu(self.w1(x)))
        if self.kind == "geglu":
            return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """x + attention(x), then x + MLP(x), each sublayer with its norms: before it (pre, Llama), before and
    after it (sandwich, Gemma), or after it (post, OLMo 2)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        pre, post = args.block_norms in ("pre", "sandwich"), args.block_norms in ("post", "sandwich")

        def norm(wanted):
            return Norm(args.dim, args.norm_eps, args.norm) if wanted else nn.Identity()

        self.attention_norm, self.post_attention_norm = norm(pre), norm(post)
        self.attention = Attention(args, layer_id)
        self.ffn_norm, self.post_ffn_norm = norm(pre), norm(post)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, alibi, cache=None):  # (B, T, C)
        x = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, alibi, cache))
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class KVCache:
    """The keys and values every layer has computed so far, so that generating one more token runs the model
    on that token alone: model(new_ids, cache=c) attends to everything c holds, then c holds the new ones too.
    Per layer (B, Hkv, max_len, hd), filled from position 0; `len` is how many positions it holds."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, device, dtype):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0

    def update(self, layer: int, k, v):
        """Store one layer's k, v (B, Hkv, T, hd) for positions len .. len+T-1; return all of its keys and values
        so far (B, Hkv, len+T, hd). Transformer.hidden advances len once every layer has stored."""
        end = self.len + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"the KV cache holds {self.k.shape[3]} positions; {end} were asked for")
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = Norm(args.dim, args.norm_eps, args.norm)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False

    def positions(self, T: int, device, dtype, start: int = 0):
        """For positions start .. start+T-1: RoPE (cos, sin) of shape (T, hd) for full-attention layers and for
        sliding layers (None: the same), or the ALiBi additive mask (1, H, T, start+T) over every key so far."""
        t = torch.arange(start, start + T, device=device, dtype=torch.float32)
        if self.args.pos == "alibi":
            slopes = alibi_slopes(self.args.n_heads, self.args.alibi_bias_max).to(device)
            dist = torch.arange(start + T, device=device, dtype=torch.float32)[None, :] - t[:, None]  # (T, S): j - i
            bias = slopes[:, None, None] * dist                              # (H, T, S)
            bias = bias.masked_fill(dist > 0, float("-inf"))                 # causal
            return None, bias[None].to(dtype)
        a = self.args

        def cos_sin(theta, scaling):
            freqs = torch.outer(t, rope_inv_freq(a.head_dim, theta, scaling).to(device))   # (T, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)                                          # (T, hd)
            return emb.cos().to(dtype), emb.sin().to(dtype)

        local = cos_sin(a.rope_local["rope_theta"], a.rope_local) if a.rope_local else None
        return (cos_sin(a.rope_theta, a.rope_scaling), local), None

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32. With a cache: input_ids continue what it holds."""
        return self.logits(self.hidden(input_ids, cache))

    def hidden(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> the final normed hidden states (B, T, C), what the output head reads. With a
        cache (generation), input_ids are the positions after those it holds, and it then holds them too."""
        x = self.tok_embeddings(input_ids)                                   # (B, T, C)
        if self.args.embed_scale:                                            # Gemma: x sqrt(C), in x's dtype
            x = x * torch.tensor(self.args.dim ** 0.5, dtype=x.dtype)
        start = cache.len if cache is not None else 0
        rope, alibi = self.positions(input_ids.shape[1], x.device, x.dtype, start)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:               # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, alibi, use_reentrant=False)
            else:
                x = layer(x, rope, alibi, cache)
        if cache is not None:
            cache.len += input_ids.shape[1]
        return self.norm(x)                                                  # (B, T, C)

    def logits(self, h: torch.Tensor, vocab: slice = slice(None)) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V) in fp32: the output head (and Gemma 2's soft-cap); `vocab`:
        only these output ids (data.head_topk walks the vocabulary in blocks)."""
        z = F.linear(h, self.output.weight[vocab]).float()
        if self.args.final_softcap:                                          # Gemma 2: c tanh(z / c)
            z = self.args.final_softcap * torch.tanh(z / self.args.final_softcap)
        return z


# ----------------------------------------------------------------------------------------------------
# safetensors, read and written by hand: an 8-byte little-endian header length N, N bytes of JSON
# {name: {dtype, shape, data_offsets}}, then the tensors, little-endian and row-major

ST_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Memory-map a .safetensors file; tensors are views of the file (copy-on-write), nothing is read yet."""
    path = Path(path)
    fix = "re-download or re-export the checkpoint"
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); {fix}")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}; truncated or "
                                  f"not safetensors; {fix}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); {fix}")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}: {info}; {fix}") from None
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize or begin < 0 or 8 + n + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({info['dtype']} {shape}) does not fit its byte "
                                  f"range [{begin}, {end}) in a {size}-byte file; truncated or corrupt; {fix}")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=numel, offset=8 + n + begin).view(shape)
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict | None = None):
    """Write tensors (contiguous, little-endian) to `path` atomically (common.atomic_path)."""
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                                     # align the data to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


# ----------------------------------------------------------------------------------------------------
# Load and save a Hugging Face model folder


def hf_names(args: ModelArgs) -> dict[str, tuple[str, tuple | None]]:
    """Our parameter name -> (Hugging Face name, None or (part, row sizes) of a fused tensor). The one place
    where the two naming schemes meet; tied output weights are absent on both sides."""
    m = {}
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    if args.model_type == "mpt":
        m["tok_embeddings.weight"] = ("transformer.wte.weight", None)
        m["norm.weight"] = ("transformer.norm_f.weight", None)
        for i in range(args.n_layers):
            p, h = f"layers.{i}.", f"transformer.blocks.{i}."
            for j, w in enumerate(("wq", "wk", "wv")):
                m[f"{p}attention.{w}.weight"] = (f"{h}attn.Wqkv.weight", (j, (q, kv, kv)))   # rows q;k;v
            m[f"{p}attention.wo.weight"] = (f"{h}attn.out_proj.weight", None)
            m[f"{p}attention_norm.weight"] = (f"{h}norm_1.weight", None)
            m[f"{p}ffn_norm.weight"] = (f"{h}norm_2.weight", None)
            m[f"{p}feed_forward.w1.weight"] = (f"{h}ffn.up_proj.weight", None)
            m[f"{p}feed_forward.w2.weight"] = (f"{h}ffn.down_proj.weight", None)
        return m
    m["tok_embeddings.weight"] = ("model.embed_tokens.weight", None)
    m["norm.weight"] = ("model.norm.weight", None)
    if not args.tie_embeddings:
        m["output.weight"] = ("lm_head.weight", None)
    pre, post = args.block_norms in ("pre", "sandwich"), args.block_norms in ("post", "sandwich")
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        proj = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        phi3 = args.model_type == "phi3"                    # Phi-3: rows q;k;v in qkv_proj, gate;up in gate_up_proj
        for j, (ours, theirs) in enumerate(proj.items()):
            m[f"{p}attention.{ours}.weight"] = ((f"{h}self_attn.qkv_proj.weight", (j, (q, kv, kv)))
                                                 if phi3 and ours != "wo" else (f"{h}self_attn.{theirs}.weight", None))
        for ours in ("wq", "wk", "wv") if args.qkv_bias else ():
            m[f"{p}attention.{ours}.bias"] = (f"{h}self_attn.{proj[ours]}.bias", None)
        if args.o_bias:
            m[f"{p}attention.wo.bias"] = (f"{h}self_attn.o_proj.bias", None)
        if args.qk_norm:
            m[f"{p}attention.q_norm.weight"] = (f"{h}self_attn.q_norm.weight", None)
            m[f"{p}attention.k_norm.weight"] = (f"{h}self_attn.k_norm.weight", None)
        for ours, theirs in {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.items():
            m[f"{p}feed_forward.{ours}.weight"] = ((f"{h}mlp.gate_up_proj.weight", (int(ours == "w3"), (args.hidden_dim,) * 2))
                                                   if phi3 and ours != "w2" else (f"{h}mlp.{theirs}.weight", None))
            if args.mlp_bias:
                m[f"{p}feed_forward.{ours}.bias"] = (f"{h}mlp.{theirs}.bias", None)
        # the norms: Llama's post_attention_layernorm is the norm *before* the MLP; Gemma and OLMo 2 name
        # the ones after each sublayer post_attention_ / post_feedforward_layernorm
        if pre:
            m[f"{p}attention_norm.weight"] = (f"{h}input_layernorm.weight", None)
            m[f"{p}ffn_norm.weight"] = (f"{h}pre_feedforward_layernorm.weight" if post else
                                        f"{h}post_attention_layernorm.weight", None)
        if post:
            m[f"{p}post_attention_norm.weight"] = (f"{h}post_attention_layernorm.weight", None)
            m[f"{p}post_ffn_norm.weight"] = (f"{h}post_feedforward_layernorm.weight", None)
    return m


def read_config(path) -> ModelArgs:
    path = Path(path)
    cfg_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; point to a Hugging Face model folder holding config.json")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: not found; a model folder needs its config.json next to the weights")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    return ModelArgs.from_hf(cfg, source=str(cfg_path))


def checkpoint_files(path) -> tuple[str, list[str]]:
    """The weights files of a model folder and their kind ("st" or "bin"): model.safetensors, sharded safetensors
    (model.safetensors.index.json), or pytorch_model*.bin (+ index); other files beside them (an optimizer.bin,
    a consolidated.safetensors) are not the model's."""
    path = Path(path)
    for index_name, single, kind in (("model.safetensors.index.json", "model.safetensors", "st"),
                                      ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin")):
        files = None
        if (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / index_name}: not a valid index ({e!r})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise CheckpointError(f"{path / index_name}: lists shard(s) {', '.join(missing)} that are not in "
                                      f"{path}; download the missing shard(s)")
        elif (path / single).is_file():
            files = [single]
        if files is not None:
            return kind, files
    raise CheckpointError(f"{path}: no weights found; expected model.safetensors, "
                          f"model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json")


def read_checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    """All tensors of a model folder by their Hugging Face names (checkpoint_files), memory-mapped."""
    path = Path(path)
    kind, files = checkpoint_files(path)
    tensors = {}
    for f in files:
        if kind == "st":
            tensors.update(read_safetensors(path / f))
        else:
            try:
                tensors.update(torch.load(path / f, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:
                raise CheckpointError(f"{path / f}: cannot be read as a PyTorch checkpoint ({e}); "
                                      f"re-download it") from None
    return tensors


def checkpoint_layout(path) -> tuple[torch.dtype, int]:
    """What an export of a model loaded from `path` keeps: (the dtype of most of its floating weights, the
    tensor bytes of its largest weights file, as save_model's max_shard_bytes: its greedy fill then cuts the
    same tensors into the same files). A .gguf file (quantised blocks, no torch dtype): bf16, 5 GiB shards."""
    path = Path(path)
    if path.suffix == ".gguf":
        return torch.bfloat16, 5 * 2**30
    by_dtype = collections.Counter()
    for t in read_checkpoint_tensors(path).values():          # memory-mapped: only headers are read
        if t.is_floating_point():
            by_dtype[t.dtype] += t.numel()
    kind, files = checkpoint_files(path)
    sizes = []                                                 # the tensor bytes of each weights file
    for f in files:
        size = (path / f).stat().st_size
        if kind == "st":                                       # less the 8-byte length and the JSON header
            with open(path / f, "rb") as fh:
                size -= 8 + struct.unpack("<Q", fh.read(8))[0]
        sizes.append(size)
    return by_dtype.most_common(1)[0][0], max(sizes)


@contextlib.contextmanager
def no_init():
    """Skip nn.init while building a model whose weights come from a file. On the meta device the random
    init does nothing anyway, but its first call costs about 2 s of one-time setup inside torch."""
    names = ("normal_", "uniform_", "kaiming_uniform_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *args, **kwargs: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def load_model(path, device="cpu", dtype=None) -> Transformer:
    """Build the model of a Hugging Face folder on the meta device and assign its checkpoint tensors.
    dtype=None keeps each tensor's dtype from the file; otherwise floating tensors are cast. A .gguf file
    is read by load_gguf_model."""
    if Path(path).suffix == ".gguf" and Path(path).is_file():
        return load_gguf_model(path, device, dtype)
    args = read_config(path)
    tensors = read_checkpoint_tensors(path)
    with torch.device("meta"), no_init():
        model = Transformer(args)
    expected = model.state_dict()
    names = hf_names(args)
    if args.tie_embeddings:
        expected.pop("output.weight")
    used, problems, state = set(), [], {}
    for ours, (theirs, chunk) in names.items():
        if theirs not in tensors:
            problems.append(f"missing tensor {theirs}")
            continue
        t = tensors[theirs]
        used.add(theirs)
        if chunk is not None:                       # a fused tensor (MPT Wqkv, Phi-3 qkv_proj): its row block
            part, sizes = chunk
            if t.shape[0] != sum(sizes):
                problems.append(f"tensor {theirs} has {t.shape[0]} rows, config.json implies {sum(sizes)} "
                                f"({' + '.join(map(str, sizes))})")
                continue
            t = t.split(list(sizes), dim=0)[part]
        if t.shape != expected[ours].shape:
            problems.append(f"tensor {theirs} has shape {list(t.shape)}, config.json implies "
                            f"{list(expected[ours].shape)}")
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[ours] = t.to(device)
    # Tolerated extras: a tied lm_head saved anyway, and old checkpoints' RoPE buffers.
    extra = [k for k in tensors if k not in used and not k.endswith("rotary_emb.inv_freq")
             and not (args.tie_embeddings and k == "lm_head.weight")]
    problems += [f"unexpected tensor {k}" for k in sorted(extra)]
    return assign(model, state, problems, f"{path}: checkpoint does not match config.json ({args.model_type})")


def assign(model: Transformer, state: dict, problems: list[str], what: str) -> Transformer:
    """The checkpoint's tensors put into the model built on the meta device, or one error that lists every
    tensor that does not fit (the first 8)."""
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{what}: {shown}")
    tied = model.args.tie_embeddings
    model.load_state_dict(state, assign=True, strict=not tied)
    if tied:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def save_model(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, extra_files=()):
    """Write config.json and safetensors (sharded above max_shard_bytes) under Hugging Face names, plus
    `extra_files` (e.g. tokenizer files) copied in. The folder appears whole or not at all."""
    path = Path(path)
    args = model.args
    state = model.state_dict()
    fused = {}
    tensors = {}
    for ours, (theirs, chunk) in hf_names(args).items():
        t = state[ours].detach()
        if chunk is None:
            tensors[theirs] = t.contiguous()
        else:
            part, sizes = chunk
            fused.setdefault(theirs, [None] * len(sizes))[part] = t
    for theirs, parts in fused.items():
        tensors[theirs] = torch.cat(parts, dim=0)
    cfg = args.to_hf()
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    cfg["torch_dtype"] = str(max(dtypes, key=lambda d: d.itemsize)).removeprefix("torch.")
    # shards: fill each up to max_shard_bytes, in the model's order
    shards, cur, cur_bytes = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name], cur_bytes = t, cur_bytes + nbytes
    shards.append(cur)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, folder=True) as tmp:     # swapped in whole: the old folder leaves only once the new is
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))                              # complete
        if len(shards) == 1:
            write_safetensors(shards[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / fname)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in extra_files:
            shutil.copy(f, tmp / Path(f).name)
    return path


# ----------------------------------------------------------------------------------------------------
# GGUF model files (llama.cpp, Ollama): the config in the metadata, tensors quantised in blocks. The config
# becomes a Hugging Face config.json dict (so one reader, ModelArgs.from_hf, builds every model, and
# save_model writes a folder transformers loads); tensors are dequantised with the `gguf` package.

GGUF_LAYER_NAMES = {   # GGUF name inside blk.N -> ours inside layers.N (norms: GGUF_PLUS_ONE below)
    "attn_q.weight": "attention.wq.weight", "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight", "attn_output.weight": "attention.wo.weight",
    "attn_q.bias": "attention.wq.bias", "attn_k.bias": "attention.wk.bias", "attn_v.bias": "attention.wv.bias",
    "attn_q_norm.weight": "attention.q_norm.weight", "attn_k_norm.weight": "attention.k_norm.weight",
    "attn_norm.weight": "attention_norm.weight", "post_attention_norm.weight": "post_attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight", "post_ffw_norm.weight": "post_ffn_norm.weight",
    "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
}


GGUF_ARCHS = {   # GGUF general.architecture -> (Hugging Face model_type, architectures, what GGUF leaves out)
    "llama": ("llama", "LlamaForCausalLM", {"hidden_act": "silu"}),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", {"hidden_act": "silu"}),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", {"hidden_act": "silu"}),
    "gemma2": ("gemma2", "Gemma2ForCausalLM", {"hidden_activation": "gelu_pytorch_tanh"}),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM", {"hidden_activation": "gelu_pytorch_tanh",
                                                    "rope_local_base_freq": 10000.0}),
}


def gguf_config(fields: dict, path, tensor_names=()) -> dict:
    """A Hugging Face config.json dict from a GGUF file's metadata (architectures in GGUF_ARCHS). What GGUF
    leaves out, llama.cpp fixes per architecture, and so does this: Gemma's sliding layers (Gemma 2: every
    other layer, from the first; Gemma 3: all but every 6th), Gemma 3's local RoPE base 10,000, Gemma's
    query_pre_attn_scalar (head_dim; Gemma 2 27B: hidden / heads). Embeddings are tied when the file has no
    output.weight."""
    arch = fields.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(GGUF_ARCHS)}); "
                              f"use the Hugging Face folder of the model instead")
    g = lambda key, default=None: fields.get(f"{arch}.{key}", default)  # noqa: E731
    if g("embedding_length") is None or g("block_count") is None:
        raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.embedding_length or block_count")
    heads, n = g("attention.head_count"), g("block_count")
    head_dim = g("attention.key_length") or g("embedding_length") // heads
    model_type, cls, extra = GGUF_ARCHS[arch]
    cfg = {"architectures": [cls], "model_type": model_type, **extra,
           "hidden_size": g("embedding_length"), "num_hidden_layers": n,
           "intermediate_size": g("feed_forward_length"), "num_attention_heads": heads,
           "num_key_value_heads": g("attention.head_count_kv") or heads, "head_dim": head_dim,
           "rms_norm_eps": g("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": g("rope.freq_base", 10000.0),
           "max_position_embeddings": g("context_length", 4096), "vocab_size": len(fields["tokenizer.ggml.tokens"]),
           "tie_word_embeddings": bool(tensor_names) and "output.weight" not in tensor_names}
    scaling = g("rope.scaling.type")
    if scaling and scaling != "none":
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": g("rope.scaling.factor")}
    if arch in ("gemma2", "gemma3"):
        every = 2 if arch == "gemma2" else 6
        cfg.update(sliding_window=g("attention.sliding_window", 4096),
                   layer_types=["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)],
                   query_pre_attn_scalar=g("embedding_length") // heads if arch == "gemma2" and n == 46 else head_dim)
    if arch == "gemma2":
        cfg.update(attn_logit_softcapping=g("attn_logit_softcapping", 50.0),
                   final_logit_softcapping=g("final_logit_softcapping", 30.0))
    return cfg


def load_gguf_model(path, device="cpu", dtype=None) -> Transformer:
    """A model from a .gguf file: its config from the metadata, every tensor dequantised to fp32 (then cast
    to dtype when given). llama.cpp stores Gemma's norm weights as 1 + w and Llama's q/k rows interleaved
    for its RoPE; both are undone here."""
    from tokenizer import read_gguf
    path = Path(path)
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF files needs the `gguf` package: pip install gguf") from None
    fields, infos, start = read_gguf(path)
    cfg = gguf_config(fields, path, [t["name"] for t in infos])
    args = ModelArgs.from_hf(cfg, source=str(path))
    with torch.device("meta"), no_init():
        model = Transformer(args)
    expected = model.state_dict()
    if args.tie_embeddings:
        expected.pop("output.weight")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    state, problems = {}, []
    for t in infos:
        name = t["name"]
        if name.startswith("blk."):
            _, layer, rest = name.split(".", 2)
            ours = f"layers.{layer}.{GGUF_LAYER_NAMES.get(rest, rest)}"
        else:
            ours = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                    "output.weight": "output.weight"}.get(name, name)
        if ours not in expected:
            problems.append(f"unexpected tensor {name}")
            continue
        qtype = gguf.GGMLQuantizationType(t["type"])
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = math.prod(t["shape"][:-1]), t["shape"][-1]
        size = rows * cols // block * nbytes
        data = raw[start + t["offset"]:start + t["offset"] + size]
        if len(data) != size:
            raise CheckpointError(f"{path}: tensor {name} runs past the end of the file; truncated, re-download it")
        w = torch.from_numpy(np.array(dequantize(data.reshape(rows, -1), qtype), dtype=np.float32))
        w = w.reshape(t["shape"])
        if args.norm == "gemma" and ours.endswith("norm.weight"):
            w = w - 1                                   # llama.cpp wrote 1 + w
        if args.model_type == "llama" and ours.endswith(("wq.weight", "wk.weight")):
            h = args.n_heads if ours.endswith("wq.weight") else args.n_kv_heads
            w = w.reshape(h, w.shape[0] // h // 2, 2, -1).transpose(1, 2).reshape(w.shape)   # undo the interleave
        if w.shape != expected[ours].shape:
            problems.append(f"tensor {name} has shape {list(w.shape)}, the metadata implies {list(expected[ours].shape)}")
            continue
        state[ours] = w.to(dtype or torch.float32).to(device)
    problems += [f"missing tensor for {k}" for k in expected if k not in state]
    return assign(model, state, problems, f"{path}: tensors do not match the metadata ({args.model_type})")


def load(path, device="cpu", dtype=None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of one folder, checked against each other."""
    model, tok = load_model(path, device, dtype), load_tokenizer(path)
    check_tokenizer_fits(tok, model, path)
    return model, tok


def check_tokenizer_fits(tok: Tokenizer, model: Transformer, path="model"):
    """A tokenizer larger than the embedding is an error; a smaller one is normal (MPT: 50432 rows for
    about 50277 tokens), and downstream code uses only the first tok.vocab_size logits."""
    if tok.vocab_size > model.args.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                              f"only {model.args.vocab_size} rows; this tokenizer does not belong to this model")
