"""What our attention asks of torch's scaled_dot_product_attention decides which kernel a GPU runs.
In torch 2.11 flash shares a key/value head among several query heads (enable_gqa) but takes no
mask; the memory-efficient kernel takes a mask but no sharing; cuDNN both, but it runs first only
on an H100/H200 and generation leaves it out. A call with both can fall back to plain math, the
(B, H, T, S) scores written out in fp32 (Gemma 3's sliding layers, every decoding step;
docs/benchmarks.md "The body on a GPU"). On the CPU we check what each call asks, on a GPU which
kernel SDPA picks; the results are checked against transformers in test_model_parity.py and
against the whole sequence in test_kv_cache.py."""
import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fusellm
from conftest import llama, mpt
from extras.cached_generation import KVCache


@pytest.fixture
def calls(monkeypatch):
    """Each SDPA call as (T, S, query heads, key heads, has a mask, is_causal, enable_gqa)."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        seen.append(dict(T=q.shape[2], S=k.shape[2], H=q.shape[1], Hkv=k.shape[1],
                         mask=attn_mask is not None, causal=is_causal, gqa=enable_gqa))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
                    **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return seen


def windowed(window):
    """conftest's llama (4 query heads, 2 key/value heads) with a sliding window on layer 0."""
    model = llama(50, 0)
    args = dataclasses.replace(model.args, sliding_window=window, sliding_layers=(True, False))
    out = fusellm.Transformer(args)
    out.load_state_dict(model.state_dict())
    return out.eval()


def run(model, ids):
    """The whole sequence, then a prompt of 5 with one token at a time through the cache (4 steps),
    then a chunk of 3 after them: 7 calls of each layer, the steps' calls the 3rd to the 6th."""
    p = next(model.parameters())
    with torch.no_grad():
        model(ids)
        cache = KVCache(model.args, 1, ids.shape[1], p.device, p.dtype)
        model(ids[:, :5], cache=cache)
        for t in range(5, 9):
            model(ids[:, t:t + 1], cache=cache)
        model(ids[:, 9:12], cache=cache)


def test_no_call_asks_for_a_mask_and_shared_heads_together(calls):
    """Bug caught: the mask built for a window, a decoding step or a chunk after the cache, handed
    to SDPA with enable_gqa: a GPU computes that attention in unfused fp32 math."""
    run(windowed(3), torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0)))
    masked = [c for c in calls if c["mask"]]
    assert masked and all(c["Hkv"] == c["H"] and not c["gqa"] for c in masked)


def test_a_decoding_step_in_a_window_reads_only_the_window_and_needs_no_mask(calls):
    """A decoding step's one query sees the last `window` keys: the windowed layer hands SDPA those
    3 keys (not all S with a mask, which would copy the whole cache's shared heads every step), the
    other layer every key. The logits: test_kv_cache.py. Bug caught: the window slice dropped (a
    mask and a copied cache each step)."""
    run(windowed(3), torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(2)))
    steps = [c for c in calls if c["T"] == 1]
    assert len(steps) == 4 * 2 and all(not c["mask"] and c["gqa"] for c in steps)
    assert [c["S"] for c in steps] == [3, 6, 3, 7, 3, 8, 3, 9]   # layer 0 windowed, layer 1 not


def test_unmasked_calls_keep_the_heads_shared_and_decoding_needs_no_mask(calls):
    """Without a window, the whole sequence is plain causal and a decoding step sees every key:
    neither needs a mask, so both go to flash with the heads shared (no copies of k and v).
    Bugs caught: k and v always copied; a decoding step given a mask (or is_causal, which for one
    query and S keys would let it see only key 0)."""
    run(windowed(None), torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(1)))
    whole, steps = calls[0], [c for c in calls if c["T"] == 1]
    assert whole["causal"] and not whole["mask"] and whole["gqa"] and whole["Hkv"] == 2
    assert len(steps) == 4 * 2                                     # 4 steps x 2 layers
    assert all(not c["mask"] and not c["causal"] and c["gqa"] and c["Hkv"] == 2 for c in steps)
    chunk = [c for c in calls if c["T"] == 3]                      # 3 queries after 9 keys
    assert chunk and all(c["mask"] and c["Hkv"] == c["H"] for c in chunk)


def test_generation_steps_leave_cudnn_out_and_put_the_flags_back(monkeypatch):
    """eval.py's generation (CachedSteps) and bench.py gpu's batched one (greedy_batch) run every
    attention call with cuDNN's kernel disabled (it would plan anew for each new number of keys)
    and flash enabled, and the flags are as before afterwards. Bug caught: a generation path
    without extras/cached_generation.decoding (cuDNN back in every decoding step)."""
    from extras.cached_generation import CachedSteps
    from tools.gpu_bench import greedy_batch
    flags, sdpa = [], F.scaled_dot_product_attention
    cuda = torch.backends.cuda

    def recorded(*a, **kw):
        flags.append((cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled()))
        return sdpa(*a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    model, before = windowed(3), (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled())
    assert before == (True, True)                                  # torch's defaults
    steps, ids = CachedSteps(model, 16, 4, "cpu"), [1, 2, 3, 4, 5]
    for _ in range(4):
        ids.append(steps(ids))
    greedy_batch(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3)
    assert len(flags) == (4 + 3) * 2 and set(flags) == {(False, True)}
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled()) == before


def test_decoding_puts_back_the_cudnn_flag_it_found_even_after_an_error():
    """extras/cached_generation.decoding() turns cuDNN's attention off inside and back to what it
    was after: off if the user (or a caller) had turned it off, and on again when a step inside
    raises (a generation stopped by an error, KeyboardInterrupt, a bad prompt). Catches the flag
    set to True afterwards instead of to what it was (the test above starts from torch's default,
    True, so cannot see that), and a restore that is not in a finally (cuDNN off for the rest of
    the process after one failed generation: every later prefill slower on an H100)."""
    from extras.cached_generation import decoding
    cuda = torch.backends.cuda
    was = cuda.cudnn_sdp_enabled()
    try:
        cuda.enable_cudnn_sdp(False)
        with decoding():
            assert not cuda.cudnn_sdp_enabled()
        assert not cuda.cudnn_sdp_enabled()                 # off before: off after
        cuda.enable_cudnn_sdp(True)
        with pytest.raises(KeyError), decoding():
            assert not cuda.cudnn_sdp_enabled()
            raise KeyError("a step that fails")
        assert cuda.cudnn_sdp_enabled()                     # on before: on after the error
    finally:
        cuda.enable_cudnn_sdp(was)


def shaped(n_kv_heads, head_dim, window):
    """A random 2-layer llama of 4 query heads on n_kv_heads, head_dim wide, a window on layer 0:
    (1, 64) gives conftest's shape, (1, 256) Gemma 3's."""
    args = dataclasses.replace(llama(50, 0).args, n_kv_heads=n_kv_heads, head_dim=head_dim,
                               sliding_window=window, sliding_layers=(True, False))
    torch.manual_seed(0)
    return fusellm.Transformer(args).eval()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", [lambda: windowed(3), lambda: windowed(None),
                                   lambda: shaped(1, 256, 3), lambda: mpt(50, 1).eval()],
                         ids=["window", "no window", "Gemma 3 heads", "mpt (ALiBi)"])
def test_on_a_gpu_no_call_falls_back_to_math(model):
    """On a GPU, the kernel SDPA's own dispatcher picks (the helper bench.py gpu counts them with)
    for each call our model makes in bf16, whole sequence, decoding and chunk: never math, with
    every kernel allowed and again as generation runs them (decoding: cuDNN's left out, where a
    mask with shared heads has only math left but for the copy model.py makes), the decoding
    steps there on flash."""
    from extras.cached_generation import decoding
    from tools.gpu_bench import sdpa_kernels
    m = model().to("cuda", torch.bfloat16)
    ids = torch.randint(0, 50, (1, 12), device="cuda")
    for kernels_allowed in (contextlib.nullcontext, decoding):
        with sdpa_kernels() as kernels, kernels_allowed():
            run(m, ids)
        layers = m.args.n_layers
        assert len(kernels) == 7 * layers and "math" not in kernels, kernels
        if kernels_allowed is decoding:
            assert "cudnn_attention" not in kernels, kernels
            if m.args.pos != "alibi":                             # ALiBi's steps carry a mask
                assert kernels[2 * layers:6 * layers] == ["flash_attention"] * 4 * layers, kernels
