"""extras/hf_configs.py: each family's config.json and tensor names, translated to model.py's.

Why it exists: a real checkpoint spells the same Transformer differently per family. Qwen2 adds
q/k/v biases, Gemma writes its RoPE per layer type and its activation under another key, Phi-3
stores q;k;v in one tensor, MPT has a config of its own, and older and newer configs of one family
name the same setting in two ways. A learner needs the model's ModelArgs; a user loading a real
checkpoint needs every one of these spellings read exactly, and any setting the model cannot compute
refused by name.

What it holds:
- `model_args_kwargs(cfg, source)`: a config.json dict -> the keyword arguments of model.ModelArgs
  (FAMILIES: what each family changes from the Llama block; `mpt_kwargs` for MPT; `rope_settings`);
- `hf_config(args)`: the reverse, a new Llama or MPT config.json for a ModelArgs built in code;
- `hf_names(args)`: our parameter names -> the checkpoint's, fused tensors included.
Errors are extras.format_error.FormatError; model.py turns them into CheckpointError.
"""
from __future__ import annotations

from extras.format_error import FormatError

# What each family changes from the Llama block (ModelArgs fields); MPT has its own reader below.
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm="head"),
    "phi3": {},                                 # the same math; q;k;v and gate;up stored fused
    "olmo2": dict(norm="rms_fp32", qk_norm="all", block_norms="post"),
    "gemma2": dict(norm="gemma", block_norms="sandwich", embed_scale=True, mlp="geglu"),
    "gemma3_text": dict(norm="gemma", block_norms="sandwich", embed_scale=True, mlp="geglu",
                        qk_norm="head"),
}
SUPPORTED_MODEL_TYPES = (*FAMILIES, "mpt")
ROPE_TYPES = ("default", "llama3", "linear")


def model_args_kwargs(cfg: dict, source: str = "config.json") -> dict:
    """model.ModelArgs(**these) for a Hugging Face config.json dict. Unsupported settings raise."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{source}: holds {type(cfg).__name__}, not a JSON object of settings")
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise FormatError(
            f"{source}: model_type {mt!r} is not supported; nanofuse loads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}. Convert the checkpoint to one of these or add "
            f"the family to extras/hf_configs.py.")

    def need(key):
        if key not in cfg:
            raise FormatError(f"{source}: missing required field {key!r} for model_type {mt!r}")
        return cfg[key]

    if mt == "mpt":
        return mpt_kwargs(cfg, source, need)
    family = FAMILIES[mt]
    gemma = mt.startswith("gemma")
    act_key = "hidden_activation" if gemma and "hidden_activation" in cfg else "hidden_act"
    want = "gelu_pytorch_tanh" if gemma else "silu"
    act = cfg.get(act_key, want)
    if act != want:
        raise FormatError(f"{source}: {act_key} {act!r} is not supported (only {want!r} for {mt})")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise FormatError(f"{source}: partial_rotary_factor {cfg['partial_rotary_factor']} is not "
                          f"supported (RoPE over the whole head only)")
    if cfg.get("use_bidirectional_attention"):
        raise FormatError(f"{source}: use_bidirectional_attention is not supported "
                          f"(causal models only)")
    sizes(cfg, source, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size"),
          ("num_key_value_heads", "head_dim", "max_position_embeddings"))
    n_heads = need("num_attention_heads")
    dim = need("hidden_size")
    n_layers = need("num_hidden_layers")
    if not cfg.get("head_dim") and dim % n_heads:
        raise FormatError(f"{source}: hidden_size {dim} is not a multiple of num_attention_heads "
                          f"{n_heads} (and no head_dim is given)")
    if n_heads % (cfg.get("num_key_value_heads") or n_heads):
        raise FormatError(f"{source}: num_attention_heads {n_heads} is not a multiple of "
                          f"num_key_value_heads {cfg['num_key_value_heads']}")
    # RoPE: older configs put rope_theta at the top and scaling in `rope_scaling`; newer ones put
    # both in `rope_parameters`, per layer type for Gemma 3 ({"full_attention": ...,
    # "sliding_attention": ...}).
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
        local_theta, local_scaling = rope_settings(local, cfg, source,
                                                   "rope_parameters.sliding_attention")
        local = {"rope_theta": local_theta, **(local_scaling or {"rope_type": "default"})}
    # sliding window: Mistral and Phi-3 apply it to every layer; Qwen2/3 and Gemma to the layers
    # marked in layer_types (Gemma's older configs: every 2nd layer for Gemma 2, all but every 6th
    # for Gemma 3)
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if not layer_types and gemma:
        every = 2 if mt == "gemma2" else cfg.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                       for i in range(n_layers)]
    if layer_types and len(layer_types) != n_layers:
        raise FormatError(f"{source}: layer_types has {len(layer_types)} entries for "
                          f"{n_layers} layers")
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
    pre_attn_scalar = cfg.get("query_pre_attn_scalar") if gemma else None
    return dict(
        model_type=mt, vocab_size=need("vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim,
        hidden_dim=need("intermediate_size"), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        qkv_bias=family.get("qkv_bias", False) or attention_bias, o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        norm=family.get("norm", "rms"), block_norms=family.get("block_norms", "pre"),
        qk_norm=family.get("qk_norm", ""), mlp=family.get("mlp", "swiglu"),
        embed_scale=family.get("embed_scale", False),
        attn_scale=pre_attn_scalar ** -0.5 if pre_attn_scalar else None,
        attn_softcap=cfg.get("attn_logit_softcapping") if gemma else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        rope_theta=float(theta), rope_scaling=scaling, rope_local=local,
        sliding_window=window if any(sliding) else None, sliding_layers=sliding,
        max_seq_len=cfg.get("max_position_embeddings", 4096), hf_config=dict(cfg))


def mpt_kwargs(cfg: dict, source: str, need) -> dict:
    """MPT's config.json (d_model, n_heads, attn_config, ...): ALiBi, LayerNorm, GELU MLP, no
    biases."""
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
        raise FormatError(f"{source}: MPT settings not supported: {', '.join(problems)}")
    sizes(cfg, source, ("d_model", "n_heads", "n_layers", "vocab_size"),
          ("expansion_ratio", "max_seq_len"))
    dim, n_heads = need("d_model"), need("n_heads")
    n_layers = need("n_layers")
    if dim % n_heads:
        raise FormatError(f"{source}: d_model {dim} is not a multiple of n_heads {n_heads}")
    return dict(
        model_type="mpt", vocab_size=need("vocab_size"), dim=dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_heads, head_dim=dim // n_heads,
        hidden_dim=cfg.get("expansion_ratio", 4) * dim,
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        norm="layer", mlp="gelu", tie_embeddings=True, pos="alibi",
        alibi_bias_max=attn.get("alibi_bias_max", 8), attn_scale=attn.get("softmax_scale"),
        clip_qkv=attn.get("clip_qkv"), sliding_layers=(False,) * n_layers,
        max_seq_len=cfg.get("max_seq_len", 2048), hf_config=dict(cfg))


def sizes(cfg: dict, source: str, required: tuple, optional: tuple):
    """Each size given is a positive whole number (not a float, bool or string); optional ones may
    be null (their default). A missing required one is left to `need` to name."""
    for key in (*required, *optional):
        value = cfg.get(key)
        if key in cfg and (value is not None or key in required):
            if type(value) is not int or value < 1:
                raise FormatError(f"{source}: {key} must be a positive whole number, not "
                                  f"{value!r}")


def rope_settings(params: dict, cfg: dict, source: str,
                  where: str = "rope_parameters / rope_scaling"):
    """(theta, scaling dict or None) from one RoPE parameter dict; a type we cannot compute is an
    error."""
    params = dict(params)
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise FormatError(f"{source}: {where}: RoPE type {rope_type!r} is not supported "
                          f"({', '.join(ROPE_TYPES)}); this checkpoint's positions cannot be "
                          f"computed")
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    need = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in need if k not in params]
    if missing:
        raise FormatError(f"{source}: {where}: RoPE type {rope_type!r} needs {', '.join(missing)}")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings",
                          cfg.get("max_position_embeddings", 8192))
    return float(theta), params


def _int_if_whole(x):
    return int(x) if float(x).is_integer() else x


def hf_config(args) -> dict:
    """A new config.json dict for a model.ModelArgs built in code (a Llama or an MPT one)."""
    if args.model_type == "mpt":
        return {"architectures": ["MptForCausalLM"], "model_type": "mpt", "d_model": args.dim,
                "n_heads": args.n_heads, "n_layers": args.n_layers,
                "expansion_ratio": args.hidden_dim // args.dim, "max_seq_len": args.max_seq_len,
                "vocab_size": args.vocab_size, "layer_norm_epsilon": args.norm_eps,
                "no_bias": True,
                "attn_config": {"alibi": True, "alibi_bias_max": _int_if_whole(args.alibi_bias_max),
                                "softmax_scale": args.attn_scale, "clip_qkv": args.clip_qkv}}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "vocab_size": args.vocab_size, "hidden_size": args.dim,
           "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "head_dim": args.head_dim, "rms_norm_eps": args.norm_eps, "hidden_act": "silu",
           "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
           "tie_word_embeddings": args.tie_embeddings, "attention_bias": args.o_bias,
           "mlp_bias": args.mlp_bias}
    if args.rope_scaling:
        cfg["rope_scaling"] = dict(args.rope_scaling)
    return cfg


def hf_names(args) -> dict[str, tuple[str, tuple | None]]:
    """Our parameter name -> (Hugging Face name, None or (part, row sizes) of a fused tensor), for a
    model.ModelArgs. The one place where the two naming schemes meet; tied output weights are absent
    on both sides."""
    m = {}
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    if args.model_type == "mpt":
        m["tok_embeddings.weight"] = ("transformer.wte.weight", None)
        m["norm.weight"] = ("transformer.norm_f.weight", None)
        for i in range(args.n_layers):
            p, h = f"layers.{i}.", f"transformer.blocks.{i}."
            for j, w in enumerate(("wq", "wk", "wv")):                 # rows q;k;v
                m[f"{p}attention.{w}.weight"] = (f"{h}attn.Wqkv.weight", (j, (q, kv, kv)))
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
    pre = args.block_norms in ("pre", "sandwich")
    post = args.block_norms in ("post", "sandwich")
    phi3 = args.model_type == "phi3"    # Phi-3: rows q;k;v in qkv_proj, gate;up in gate_up_proj
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        proj = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
        for j, (ours, theirs) in enumerate(proj.items()):
            if phi3 and ours != "wo":
                m[f"{p}attention.{ours}.weight"] = (f"{h}self_attn.qkv_proj.weight",
                                                    (j, (q, kv, kv)))
            else:
                m[f"{p}attention.{ours}.weight"] = (f"{h}self_attn.{theirs}.weight", None)
        for ours in ("wq", "wk", "wv") if args.qkv_bias else ():
            m[f"{p}attention.{ours}.bias"] = (f"{h}self_attn.{proj[ours]}.bias", None)
        if args.o_bias:
            m[f"{p}attention.wo.bias"] = (f"{h}self_attn.o_proj.bias", None)
        if args.qk_norm:
            m[f"{p}attention.q_norm.weight"] = (f"{h}self_attn.q_norm.weight", None)
            m[f"{p}attention.k_norm.weight"] = (f"{h}self_attn.k_norm.weight", None)
        for ours, theirs in {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}.items():
            if phi3 and ours != "w2":
                m[f"{p}feed_forward.{ours}.weight"] = (f"{h}mlp.gate_up_proj.weight",
                                                       (int(ours == "w3"), (args.hidden_dim,) * 2))
            else:
                m[f"{p}feed_forward.{ours}.weight"] = (f"{h}mlp.{theirs}.weight", None)
            if args.mlp_bias:
                m[f"{p}feed_forward.{ours}.bias"] = (f"{h}mlp.{theirs}.bias", None)
        # the norms: Llama's post_attention_layernorm is the norm *before* the MLP; Gemma and OLMo 2
        # name the ones after each sublayer post_attention_ / post_feedforward_layernorm
        if pre:
            m[f"{p}attention_norm.weight"] = (f"{h}input_layernorm.weight", None)
            m[f"{p}ffn_norm.weight"] = (f"{h}pre_feedforward_layernorm.weight" if post else
                                        f"{h}post_attention_layernorm.weight", None)
        if post:
            m[f"{p}post_attention_norm.weight"] = (f"{h}post_attention_layernorm.weight", None)
            m[f"{p}post_ffn_norm.weight"] = (f"{h}post_feedforward_layernorm.weight", None)
    return m
