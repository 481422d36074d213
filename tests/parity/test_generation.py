"""Generating with a KV cache (the fast path) gives what running the whole sequence again gives (the
reference): the same logits at every new position, for every family's checkpoint as transformers
writes it (sliding windows, soft-caps and ALiBi included), and the same greedy text in eval.py. (The
idea, worked small: tests/lessons/test_kv_cache.py.)"""
import pytest
import torch

import eval as ev
import fusellm
from test_model_parity import CASES, build_reference
from extras.cached_generation import KVCache


@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_equal_the_whole_sequence(tmp_path, case):
    """The prompt fills the cache, then one token, three at once, then one token at a time past
    every sliding window (5 and 7 in the cases). Catches RoPE restarting at position 0 for new
    tokens, a causal mask aligned to the first key instead of the last (SDPA's is_causal does that
    when queries are fewer than keys), the window ignored for cached keys, ALiBi distances from the
    wrong end, and a cache that does not advance."""
    config_cls, kwargs = CASES[case]
    build_reference(tmp_path, config_cls, kwargs)
    model = fusellm.load_model(tmp_path)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = model(ids)                                                    # (B, T, V)
        cache = KVCache(model.args, 2, 30, "cpu", torch.float32)
        parts, cuts = [], [0, 12, 13, 16, *range(17, 31)]
        for a, b in zip(cuts, cuts[1:]):
            parts.append(model(ids[:, a:b], cache=cache))
        assert cache.len == 30
    cached = torch.cat(parts, dim=1)
    assert whole.abs().max() > 1.0
    assert (cached - whole).abs().max().item() < 1e-4


class Uncached(torch.nn.Module):
    """The same model, seen by eval.py as any model: it runs the whole context at every step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


@pytest.mark.parametrize("window", [64, 24])
def test_greedy_generation_with_the_cache_equals_without(world, window):
    """eval.py's greedy decoding gives the same text with the cache as without, both while the
    context fits the window and once it slides (window 24: the prompt and the new tokens pass it).
    Catches a cache kept after the context slid, and a first step that feeds the cache only the last
    token."""
    model, tok = fusellm.load(world / "source2")
    prompt = "def main():\n    return"
    texts = [ev.Scorer(m, tok, window=window).generate(prompt, 30, [])
             for m in (model, Uncached(model))]
    assert len(tok.encode(texts[1])) >= 20, "a generation cut short by EOS would compare little"
    assert texts[0] == texts[1]


def greedy_uncached(model, x, new):
    """The reference: `new` greedy tokens for each row of x (B, P), the whole sequence run again
    for each one. (B, new)."""
    ids = x
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, x.shape[1]:]


def test_bench_batched_generation_gives_the_tokens_of_the_whole_sequence_run_again():
    """tools/gpu_bench.py greedy_batch (bench.py gpu's batched generation, B rows through one
    KVCache) picks, for each of 2 different prompts, the tokens the uncached loop picks. Its tokens
    are compared with transformers' only in a GPU run (with_hf), so without this a wrong
    greedy_batch would show first as a GPU session's low same_tokens figure. Catches each step fed
    the first new token instead of the last, and the first token read from the prompt's first
    position instead of its last."""
    from conftest import llama
    from tools.gpu_bench import greedy_batch
    model = llama(50, 0).eval()
    x = torch.tensor([[3, 14, 15, 9], [26, 5, 35, 8]])
    want = greedy_uncached(model, x, 6)
    assert len(set(want[0].tolist())) > 1 and not torch.equal(want[0], want[1])   # not constant
    with torch.no_grad():
        assert torch.equal(greedy_batch(model, x, 6), want)


def test_a_bf16_model_generates_with_a_cache_of_its_own_dtype():
    """A bf16 model (every GPU generation: data.py, eval.py and bench.py load bf16 there) keeps
    bf16 keys and values in its KVCache, so that a decoding step's query, keys and values share a
    dtype, as SDPA requires; eval.py's steps (CachedSteps) and bench.py's batched ones
    (greedy_batch) both run. Catches a cache allocated in fp32 (torch.zeros' default) whatever the
    model's dtype: every test model on the CPU is fp32, so only a GPU session would see the
    error."""
    from conftest import llama
    from extras.cached_generation import CachedSteps
    from tools.gpu_bench import greedy_batch
    model = llama(50, 0).eval().to(torch.bfloat16)
    steps, ids = CachedSteps(model, 32, 4, "cpu"), [1, 2, 3, 4, 5]
    for _ in range(4):
        ids.append(steps(ids))
    assert steps.cache.k.dtype == steps.cache.v.dtype == torch.bfloat16
    with torch.no_grad():
        assert greedy_batch(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 3).shape == (2, 3)
