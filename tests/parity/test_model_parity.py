"""Our plain-torch Transformer gives the logits of `transformers` on tiny random checkpoints of
every family."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig,  # noqa: E402
                          LlamaConfig, MistralConfig, MptConfig, Olmo2Config, Phi3Config,
                          Qwen2Config, Qwen3Config)

import fusellm  # noqa: E402
from conftest import randomize_  # noqa: E402

TOL = 1e-4
LLAMA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
# head_dim 16, base 500000: wavelengths 2 pi 500000^(i/8) = 6.3, 32.5, 168, ... With 64 original
# positions the smoothing band (64 / high_freq_factor, 64 / low_freq_factor) = (16, 64) holds 32.5:
# one frequency is blended.
LLAMA3_ROPE_BAND = dict(LLAMA3_ROPE, original_max_position_embeddings=64)

CASES = {
    "llama_mha_untied":
        (LlamaConfig, dict(LLAMA, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied": (LlamaConfig, dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "llama_explicit_head_dim": (LlamaConfig, dict(LLAMA, num_key_value_heads=2, head_dim=24)),
    "llama_attention_and_mlp_bias": (LlamaConfig, dict(LLAMA, attention_bias=True, mlp_bias=True)),
    "llama3_rope_parameters":
        (LlamaConfig, dict(LLAMA, num_key_value_heads=2,
                           rope_parameters=dict(LLAMA3_ROPE, rope_theta=500000.0))),
    "mistral_sliding_window": (MistralConfig, dict(LLAMA, num_key_value_heads=2, sliding_window=7)),
    # 3 query heads a key/value head: a masked call copies each kv head to its own 3 (a head count
    # of 2 query heads a kv head, as above, cannot tell n_heads // n_kv_heads from n_kv_heads)
    "mistral_3_query_heads_a_kv_head":
        (MistralConfig, dict(LLAMA, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                             sliding_window=7)),
    "qwen2_biases_tied":
        (Qwen2Config, dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_sliding_upper_layers":
        (Qwen2Config, dict(LLAMA, num_hidden_layers=3, num_key_value_heads=2,
                           use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Qwen3: RMSNorm on each head's q and k before RoPE
    "qwen3_qk_norm": (Qwen3Config, dict(LLAMA, num_key_value_heads=2, head_dim=16)),
    # Phi-3: q;k;v rows fused in qkv_proj (unequal blocks under GQA), gate;up in gate_up_proj;
    # window everywhere
    "phi3_fused_gqa_sliding":
        (Phi3Config, dict(LLAMA, num_key_value_heads=2, sliding_window=7, pad_token_id=0)),
    # OLMo 2: norms after attention and MLP only, q/k norms over the whole projection
    "olmo2_post_norms": (Olmo2Config, dict(LLAMA, num_key_value_heads=2)),
    # Gemma 2: (1 + w) sandwich norms, sqrt(C) embeddings, GeGLU, query_pre_attn_scalar, both
    # soft-caps, a sliding window on every other layer
    "gemma2_softcaps":
        (Gemma2Config, dict(LLAMA, num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                            sliding_window=7, query_pre_attn_scalar=24,
                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                            pad_token_id=0)),
    # Gemma 3: as Gemma 2 without soft-caps, plus q/k norms, and RoPE per layer type (linear scaling
    # on the global layers, another base on the sliding ones)
    "gemma3_text":
        (Gemma3TextConfig, dict(LLAMA, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                sliding_window=7, query_pre_attn_scalar=24, pad_token_id=0,
                                layer_types=["sliding_attention", "full_attention",
                                             "sliding_attention"],
                                rope_parameters={
                                    "full_attention": dict(rope_type="linear", factor=4.0,
                                                           rope_theta=100000.0),
                                    "sliding_attention": dict(rope_type="default",
                                                              rope_theta=500.0)})),
    # RoPE scaling where it acts: llama3 with wavelengths inside the smoothing band, and linear
    "llama3_rope_in_band":
        (LlamaConfig, dict(LLAMA, rope_parameters=dict(LLAMA3_ROPE_BAND, rope_theta=500000.0))),
    "llama_linear_rope":
        (LlamaConfig, dict(LLAMA, rope_parameters=dict(rope_type="linear", factor=4.0,
                                                       rope_theta=10000.0))),
    "mpt_4_heads":
        (MptConfig, dict(d_model=64, n_heads=4, n_layers=2, vocab_size=97, max_seq_len=128)),
    "mpt_6_heads":
        (MptConfig, dict(d_model=48, n_heads=6, n_layers=2, vocab_size=97, max_seq_len=128)),
}


def build_reference(tmp_path, config_cls, kwargs, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    ref = randomize_(AutoModelForCausalLM.from_config(config_cls(**kwargs)), seed).eval()
    if ref.config.tie_word_embeddings:
        ref.tie_weights()
    ref.save_pretrained(tmp_path, **save_kwargs)
    return ref


def logits_of(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    config_cls, kwargs = CASES[case]
    ref = build_reference(tmp_path, config_cls, kwargs)
    ours = fusellm.load_model(tmp_path)
    # 72 positions: past every window and band
    ids = torch.randint(0, 97, (2, 72), generator=torch.Generator().manual_seed(1))
    expected = logits_of(ref, ids)
    assert expected.abs().max() > 1.0, "logits near zero would make the comparison vacuous"
    assert (logits_of(ours, ids) - expected).abs().max().item() < TOL


def test_llama3_rope_scaling_old_spelling_means_the_same(tmp_path):
    """Older configs write rope_theta at the top and the llama3 scaling under `rope_scaling`."""
    rope = dict(LLAMA3_ROPE, rope_theta=500000.0)
    ref = build_reference(tmp_path, LlamaConfig,
                          dict(LLAMA, num_key_value_heads=2, rope_parameters=rope))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = dict(LLAMA3_ROPE)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = fusellm.load_model(tmp_path)
    assert ours.args.rope_theta == 500000.0 and ours.args.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(2))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() < TOL
    assert (logits_of(ours, ids) - logits_of(reloaded, ids)).abs().max().item() < TOL


def test_llama3_scaling_changes_the_logits(tmp_path):
    """The scaled and unscaled RoPE give different models, so the parity above really tests the
    scaling."""
    scaled = dict(LLAMA3_ROPE, rope_theta=500000.0)
    plain = dict(rope_type="default", rope_theta=500000.0)
    build_reference(tmp_path / "a", LlamaConfig, dict(LLAMA, rope_parameters=scaled))
    build_reference(tmp_path / "b", LlamaConfig, dict(LLAMA, rope_parameters=plain))
    ids = torch.arange(60).view(1, 60) % 97
    a, b = fusellm.load_model(tmp_path / "a"), fusellm.load_model(tmp_path / "b")
    assert (logits_of(a, ids) - logits_of(b, ids)).abs().max() > 1e-2


def test_sharded_safetensors_load(tmp_path):
    ref = build_reference(tmp_path, LlamaConfig, dict(LLAMA, num_key_value_heads=2),
                          max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    ours = fusellm.load_model(tmp_path)
    assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() < TOL


def test_pytorch_bin_single_and_sharded_load(tmp_path):
    ref = build_reference(tmp_path / "st", LlamaConfig, dict(LLAMA, num_key_value_heads=2))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    for d in ("single", "sharded"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(state, tmp_path / "single" / "pytorch_model.bin")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for fname, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / "sharded" / fname)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (tmp_path / "sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    for d in ("single", "sharded"):
        ours = fusellm.load_model(tmp_path / d)
        assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() < TOL


def test_bf16_checkpoint_keeps_its_dtype_and_dtype_argument_casts(tmp_path):
    ref = build_reference(tmp_path, LlamaConfig, dict(LLAMA, dtype="bfloat16"))
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    assert fusellm.load_model(tmp_path).tok_embeddings.weight.dtype == torch.bfloat16
    m32 = fusellm.load_model(tmp_path, dtype=torch.float32)
    assert m32.tok_embeddings.weight.dtype == torch.float32
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(5))
    # a fresh reference: .to(bfloat16) above also rounded its RoPE buffer, which .float() cannot
    # undo
    ref32 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (logits_of(m32, ids) - logits_of(ref32, ids)).abs().max().item() < TOL


def test_the_llama3_band_case_has_a_wavelength_inside_the_band():
    """The in-band case above is only a test of the smoothing if some wavelength falls between
    original / high_freq_factor and original / low_freq_factor."""
    import math
    wavelengths = [2 * math.pi * 500000.0 ** (i / 8) for i in range(8)]
    assert any(64 / 4 < w < 64 / 1 for w in wavelengths)


def test_gemma3_older_config_spelling_means_the_same(tmp_path):
    """Gemma 3 configs on the Hub before transformers 5 write rope_theta, rope_local_base_freq,
    rope_scaling (for the global layers) and sliding_window_pattern instead of rope_parameters and
    layer_types."""
    config_cls, kwargs = CASES["gemma3_text"]
    ref = build_reference(tmp_path, config_cls, kwargs)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "layer_types"):
        cfg.pop(key)
    # sliding_window_pattern 2: layers 0, 2 sliding; layer 1 global, as layer_types said
    cfg.update(rope_theta=100000.0, rope_local_base_freq=500.0,
               rope_scaling=dict(rope_type="linear", factor=4.0), sliding_window_pattern=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = fusellm.load_model(tmp_path)
    assert ours.args.sliding_layers == (True, False, True)
    assert ours.args.rope_local["rope_theta"] == 500.0
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() < TOL


@pytest.mark.parametrize("field, value, says", [
    ("rope_parameters", dict(rope_type="yarn", factor=4.0, rope_theta=10000.0),
     "RoPE type 'yarn' is not supported"),
    ("rope_parameters", dict(rope_type="linear", rope_theta=10000.0), "'linear' needs factor"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor 0.5 is not supported"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
])
def test_config_fields_the_model_cannot_honour_are_named(tmp_path, field, value, says):
    """A setting we cannot compute is an error naming it, never ignored (a yarn model run with plain
    RoPE would load and give wrong logits)."""
    build_reference(tmp_path, LlamaConfig, LLAMA)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fusellm.CheckpointError, match=says):
        fusellm.load_model(tmp_path)


@pytest.mark.parametrize("case", ["phi3_fused_gqa_sliding", "gemma3_text", "olmo2_post_norms"])
def test_a_loaded_family_saves_back_to_a_folder_transformers_loads(tmp_path, case):
    """save_model writes a family's own names back, fused tensors re-fused (Phi-3's unequal q;k;v
    rows), so transformers loads our copy to the same logits. Catches the fused blocks re-joined in
    the wrong order."""
    config_cls, kwargs = CASES[case]
    ref = build_reference(tmp_path / "ref", config_cls, kwargs)
    fusellm.save_model(fusellm.load_model(tmp_path / "ref"), tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(7))
    assert (logits_of(again, ids) - logits_of(ref, ids)).abs().max().item() < TOL


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
GEMMA_GGUF_NAMES = dict(GGUF_NAMES, post_attention_layernorm="post_attention_norm",
                        pre_feedforward_layernorm="ffn_norm",
                        post_feedforward_layernorm="post_ffw_norm")


def write_gguf(path, ref, arch, vocab_size):
    """A tiny model as llama.cpp's converter writes it: `arch` metadata, f32 tensors under GGUF
    names, for llama the q and k rows interleaved for llama.cpp's RoPE (its `permute`), for Gemma
    the norm weights stored as 1 + w, no output.weight when the embeddings are tied, and a
    byte-level BPE vocabulary to satisfy readers."""
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "gemma2":
        w.add_sliding_window(c.sliding_window)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(vocab_size)])
    w.add_token_types([1] * vocab_size)

    def permute(t, heads):
        pairs = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
        return pairs.swapaxes(1, 2).reshape(t.shape)

    names = GEMMA_GGUF_NAMES if arch.startswith("gemma") else GGUF_NAMES
    for k, v in ref.state_dict().items():
        v = v.float().numpy()
        if arch.startswith("gemma") and k.endswith("norm.weight"):
            v = v + 1
        if k == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", v)
        elif k == "model.norm.weight":
            w.add_tensor("output_norm.weight", v)
        elif k == "lm_head.weight":
            if not c.tie_word_embeddings:
                w.add_tensor("output.weight", v)
        else:
            _, _, i, rest = k.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            if arch == "llama" and module == "self_attn.q_proj":
                v = permute(v, c.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                v = permute(v, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{names[module]}.{kind}", v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {   # GGUF architecture -> the reference model it is written from
    "llama": (LlamaConfig, dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": (Qwen2Config, dict(LLAMA, num_key_value_heads=2, tie_word_embeddings=True)),
    # head_dim 128: transformers' GGUF reader ignores qwen3.attention.key_length and takes Qwen3's
    # default
    "qwen3": (Qwen3Config, dict(LLAMA, num_key_value_heads=2, head_dim=128,
                                tie_word_embeddings=False)),
    # head_dim 256 and Gemma 2's real soft-caps: GGUF stores no query_pre_attn_scalar, transformers'
    # reader ignores the soft-caps, and both fall back to these
    "gemma2": (Gemma2Config, dict(LLAMA, num_hidden_layers=3, num_key_value_heads=1, head_dim=256,
                                  sliding_window=7, query_pre_attn_scalar=256,
                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                  pad_token_id=0)),
}


@pytest.mark.parametrize("arch", list(GGUF_CASES))
def test_a_gguf_file_gives_the_logits_transformers_reads_from_it(tmp_path, arch):
    """A .gguf model of each architecture loads with the reference's logits, as transformers loads
    it from the same file (gguf_file=). Catches llama's q/k interleave left in place or undone with
    the query head count on the keys (llama: untied, GQA), biases or q/k norms dropped (qwen2,
    qwen3), embeddings not tied when the file has no output.weight (qwen2), Gemma's 1 + w norms
    kept, its sliding layers or soft-caps wrong (gemma2; 30 tokens against a window of 7)."""
    pytest.importorskip("accelerate")
    config_cls, kwargs = GGUF_CASES[arch]
    ref = build_reference(tmp_path / "hf", config_cls, kwargs)
    write_gguf(tmp_path / "tiny.gguf", ref, arch, 97)
    ours = fusellm.load_model(tmp_path / "tiny.gguf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf",
                                                  dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(8))
    assert (logits_of(ours, ids) - logits_of(ref, ids)).abs().max().item() < TOL
    assert (logits_of(theirs, ids) - logits_of(ref, ids)).abs().max().item() < TOL


def test_a_bf16_models_rope_is_the_fp32_angle_rounded_once():
    """RoPE's cos and sin for a bf16 model (every GPU run) at positions 0..4095 are cos(p theta_i)
    worked here in float64, rounded once to bf16: the positions and frequencies stay fp32 and only
    the result is cast. Catches the positions made in the model's dtype (bf16 holds integers
    exactly only up to 256: position 1001 becomes 1000) and the frequencies cast to bf16 before the
    product (a relative error of 2^-9 is radians by position 2000), which fp32 test models cannot
    show."""
    from conftest import llama
    model = llama(50, 0)
    (rope, _), _ = model.positions(4096, "cpu", torch.bfloat16)
    cos, sin = rope
    d = model.args.head_dim
    inv_freq = model.args.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(torch.arange(4096, dtype=torch.float64), inv_freq)      # (T, hd/2)
    angle = torch.cat([angle, angle], -1)                                       # (T, hd)
    assert cos.dtype == sin.dtype == torch.bfloat16
    assert (cos.double() - angle.cos()).abs().max() < 8e-3        # bf16's step near 1: 2^-8
    assert (sin.double() - angle.sin()).abs().max() < 8e-3
