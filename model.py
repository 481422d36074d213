"""
model.py: the Transformer that every fused model runs on, in plain torch.

One `Transformer` covers the families FuseLLM fuses and their relatives: Llama (Llama-2/3,
OpenLLaMA), Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, Gemma 2, Gemma 3 (text) and MPT, each a setting of
`ModelArgs` away from the Llama block, with the logits of `transformers`. It loads a Hugging Face
folder (config.json; safetensors, sharded or not, or pytorch_model*.bin) or a GGUF file (llama,
qwen2, qwen3, gemma2, gemma3; any quantisation the `gguf` package reads), whose formats extras/
reads into plain dicts (hf_configs.py, checkpoint_files.py, gguf.py), and `save_model` writes a
folder that `transformers` loads too. Read top to bottom: config -> model -> load/save.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tokenizer import Tokenizer, load_tokenizer


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names the file and the fix."""


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
    norm: str = "rms"              # rms (Llama) | rms_fp32 (OLMo 2: scaled before the cast)
                                   # | gemma (x (1 + w)) | layer (MPT: LayerNorm, weight only)
    block_norms: str = "pre"       # pre (Llama: norm -> sublayer) | sandwich (Gemma: norm ->
                                   # sublayer -> norm) | post (OLMo 2: sublayer -> norm), around
                                   # attention and MLP alike
    qk_norm: str = ""              # RMSNorm of q and k before RoPE: "head" (each head: Qwen3,
                                   # Gemma 3) or "all" (the whole projection: OLMo 2)
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
    rope_local: dict | None = None    # Gemma 3: the sliding layers' own
                                      # {"rope_theta", "rope_type", ...}
    alibi_bias_max: float = 8
    attn_scale: float | None = None   # None: 1/sqrt(head_dim)
    clip_qkv: float | None = None     # MPT
    sliding_window: int | None = None
    sliding_layers: tuple = ()     # per layer: True where the sliding window applies
    max_seq_len: int = 4096
    hf_config: dict = field(default_factory=dict, repr=False)  # the config.json it came from

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face config.json dict; each family's spelling of these settings is
        translated in extras/hf_configs.py. Unsupported settings raise CheckpointError."""
        from extras.format_error import raised_as
        from extras.hf_configs import model_args_kwargs
        with raised_as(CheckpointError):        # the translation's FormatError, same message
            return cls(**model_args_kwargs(cfg, source))


# --------------------------------------------------------------------------------------------------
# Model


class Norm(nn.Module):
    """RMSNorm, computed in fp32 as the references do, in three spellings, or MPT's weight-only
    LayerNorm: rms (Llama): w * cast(x / rms(x));  rms_fp32 (OLMo 2): cast(w * x / rms(x));
    gemma: cast((1 + w) * x / rms(x))."""

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
    """RoPE's frequencies theta_i = base^(-2i/d), (head_dim/2,) fp32, with Llama-3.1 ("llama3") or
    linear scaling applied when `s` asks for it (extras/rope_scaling.py)."""
    d = head_dim
    i2 = torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float()      # 2i
    inv_freq = 1.0 / (theta ** (i2 / d))
    if not s or s.get("rope_type", "default") == "default":
        return inv_freq
    from extras.rope_scaling import scaled_inv_freq
    return scaled_inv_freq(inv_freq, s)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (Hugging Face's q/k layout). x (B, H, T, hd), cos/sin (T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(n_heads: int, bias_max: float = 8.0) -> torch.Tensor:
    """MPT's ALiBi slopes: 2^(-bias_max * k / n) for k = 1..n, n the next power of two >= n_heads.
    For other head counts the two interleaved series (odd k, then even k), joined and cut."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, device="cpu").float() * (bias_max / n))
    if n != n_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes  # (H,)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(hd) + mask) v over H query heads sharing Hkv key/value heads (grouped
    query attention), positions by RoPE on q and k or by ALiBi in the mask."""

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

    def forward(self, x, rope, alibi, cache=None):
        """x (B, T, C) -> (B, T, C). rope: the (cos, sin) of full-attention layers and of sliding
        ones (None: the same), or None under ALiBi; alibi: its additive mask (1, H, T, S)."""
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
            k, v = cache.update(self.layer_id, k, v)                        # (B, Hkv, S, hd)
        if T == 1 and self.window is not None and alibi is None:
            k, v = k[:, :, -self.window:], v[:, :, -self.window:]    # a decoding step: the window
        S = k.shape[2]                              # queries are positions S-T .. S-1 of the S keys
        mask, causal = None, T > 1                  # one query (a decoding step) sees every key
        if alibi is not None:                       # (1, H, T, S): -slope*(i-j), -inf where j > i
            mask, causal = alibi, False
        elif S > T > 1 or self.window is not None and S > self.window or self.softcap:
            i, j = torch.arange(S - T, S, device=x.device), torch.arange(S, device=x.device)
            mask, causal = j[None, :] <= i[:, None], False                  # (T, S) causal
            if self.window is not None:
                mask = mask & (j[None, :] > i[:, None] - self.window)        # and in the window
        if mask is not None and self.n_kv_heads != self.n_heads:
            # On a GPU (torch 2.11), SDPA's flash kernel shares a key/value head among query heads
            # but takes no mask, its memory-efficient one takes a mask but no sharing; cuDNN's takes
            # both but runs first only on an H100/H200: elsewhere SDPA falls back to unfused math,
            # the (B, H, T, S) scores in fp32. So share them by copying.
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        if self.softcap:                # Gemma 2: scores capped by c tanh(s / c) before the softmax
            scale = self.scale if self.scale is not None else self.head_dim ** -0.5
            s = (q @ k.transpose(-1, -2)) * scale                           # (B, H, T, S)
            s = self.softcap * torch.tanh(s / self.softcap)                 # (B, H, T, S)
            s = s.masked_fill(~mask, float("-inf"))
            y = torch.softmax(s.float(), dim=-1).to(q.dtype) @ v            # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               scale=self.scale,
                                               enable_gqa=k.shape[1] != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))                 # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x) for the Llama family; GeGLU w2(gelu_tanh(w1 x) * w3 x) for
    Gemma; w2(gelu(w1 x)) for MPT."""

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
    """x + attention(x), then x + MLP(x), each sublayer with its norms: before it (pre, Llama),
    before and after it (sandwich, Gemma), or after it (post, OLMo 2)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        pre = args.block_norms in ("pre", "sandwich")
        post = args.block_norms in ("post", "sandwich")

        def norm(wanted):
            return Norm(args.dim, args.norm_eps, args.norm) if wanted else nn.Identity()

        self.attention_norm, self.post_attention_norm = norm(pre), norm(post)
        self.attention = Attention(args, layer_id)
        self.ffn_norm, self.post_ffn_norm = norm(pre), norm(post)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, alibi, cache=None):  # (B, T, C)
        x = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, alibi, cache))
        return x + self.post_ffn_norm(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    """token ids -> embeddings -> n_layers Blocks -> final norm -> output head -> logits."""

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
        """For positions start .. start+T-1: RoPE (cos, sin) of shape (T, hd) for full-attention
        layers and for sliding layers (None: the same), or the ALiBi additive mask (1, H, T,
        start+T) over every key so far."""
        t = torch.arange(start, start + T, device=device, dtype=torch.float32)
        if self.args.pos == "alibi":
            slopes = alibi_slopes(self.args.n_heads, self.args.alibi_bias_max).to(device)
            keys = torch.arange(start + T, device=device, dtype=torch.float32)
            dist = keys[None, :] - t[:, None]                                # (T, S): j - i
            bias = slopes[:, None, None] * dist                              # (H, T, S)
            bias = bias.masked_fill(dist > 0, float("-inf"))                 # causal
            return None, bias[None].to(dtype)
        a = self.args

        def cos_sin(theta, scaling):
            inv_freq = rope_inv_freq(a.head_dim, theta, scaling).to(device)
            freqs = torch.outer(t, inv_freq)                                 # (T, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)                          # (T, hd)
            return emb.cos().to(dtype), emb.sin().to(dtype)

        local = cos_sin(a.rope_local["rope_theta"], a.rope_local) if a.rope_local else None
        return (cos_sin(a.rope_theta, a.rope_scaling), local), None

    def forward(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) in fp32; with a cache (a KVCache of
        extras/cached_generation.py: generation), ids that continue it."""
        return self.logits(self.hidden(input_ids, cache))

    def hidden(self, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """input_ids (B, T) -> the final normed hidden states (B, T, C), what the output head reads.
        With a cache (generation): the positions after those it holds, which it then holds too."""
        x = self.tok_embeddings(input_ids)                                   # (B, T, C)
        if self.args.embed_scale:                           # Gemma: x sqrt(C), in x's dtype
            x = x * torch.tensor(self.args.dim ** 0.5, dtype=x.dtype)
        start = cache.len if cache is not None else 0
        rope, alibi = self.positions(input_ids.shape[1], x.device, x.dtype, start)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:   # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, alibi, use_reentrant=False)
            else:
                x = layer(x, rope, alibi, cache)
        if cache is not None:
            cache.len += input_ids.shape[1]
        return self.norm(x)                                                  # (B, T, C)

    def logits(self, h: torch.Tensor, vocab: slice = slice(None),
               fp32: bool = True) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V) in fp32: the output head (and Gemma 2's
        soft-cap); `vocab`: only these ids (extras/fast_head.py walks the vocabulary in blocks).
        fp32=False: in the weights' dtype (each bf16 logit is exactly its fp32 value), or fp32 if
        soft-capped."""
        z = F.linear(h, self.output.weight[vocab])
        z = z.float() if fp32 or self.args.final_softcap else z
        if self.args.final_softcap:                         # Gemma 2: c tanh(z / c)
            z = self.args.final_softcap * torch.tanh(z / self.args.final_softcap)
        return z


# --------------------------------------------------------------------------------------------------
# Load and save. extras/ reads and writes the files (a folder: checkpoint_files.py; a .gguf file:
# gguf.py) into plain dicts; its FormatError becomes CheckpointError here (raised_as).


def read_config(path) -> ModelArgs:
    """The ModelArgs of a model folder's config.json, or of a .gguf file's metadata."""
    from extras.checkpoint_files import reader_for
    from extras.format_error import raised_as
    with raised_as(CheckpointError):
        return ModelArgs.from_hf(*reader_for(path).read_config(path))


def load_model(path, device="cpu", dtype=None) -> Transformer:
    """Build the model of a Hugging Face folder or a .gguf file on the meta device, then assign its
    tensors. dtype=None keeps each one's dtype from the file (GGUF: fp32); else floats are cast."""
    from extras.checkpoint_files import no_init, reader_for
    from extras.format_error import raised_as
    args = read_config(path)
    with torch.device("meta"), no_init():
        model = Transformer(args)               # shapes only: no memory, no random init
    with raised_as(CheckpointError):            # the tensors by our names, checked against these
        state = reader_for(path).read_state(path, args, model.state_dict(), dtype, device)
    model.load_state_dict(state, assign=True, strict=not args.tie_embeddings)
    if args.tie_embeddings:     # the output head is the embedding itself, not a tensor of the file
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def save_model(model: Transformer, path, max_shard_bytes: int = 5 * 2**30, extra_files=()):
    """Write config.json and safetensors (sharded above max_shard_bytes) under Hugging Face names,
    plus `extra_files` (e.g. tokenizer files) copied in. The folder appears whole or not at all."""
    from extras.checkpoint_files import save_folder
    return save_folder(model.state_dict(), model.args, path, max_shard_bytes, extra_files)


def load(path, device="cpu", dtype=None) -> tuple[Transformer, Tokenizer]:
    """Model and tokenizer of one folder, checked against each other: a tokenizer larger than the
    embedding is refused, a smaller one is normal (extras/checkpoint_files.py tokenizer_misfit)."""
    from extras.checkpoint_files import tokenizer_misfit
    model, tok = load_model(path, device, dtype), load_tokenizer(path)
    if misfit := tokenizer_misfit(tok.vocab_size, model.args.vocab_size, path):
        raise CheckpointError(misfit)
    return model, tok
