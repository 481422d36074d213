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
