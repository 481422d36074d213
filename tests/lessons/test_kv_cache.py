"""Lesson: a KV cache makes generation cheap without changing a single logit. Each layer keeps the
keys and values of every position it has seen (extras/cached_generation.py KVCache), so the next
token runs through the model alone and attends to all of them; its logits are the ones the whole
sequence, run again, gives at that position."""
import dataclasses

import pytest
import torch

import fusellm
from conftest import llama, mpt
from extras.cached_generation import KVCache


def sliding(model):
    """The same llama with a sliding window of 3 on both layers: a position sees itself and the 2
    before."""
    args = dataclasses.replace(model.args, sliding_window=3, sliding_layers=(True, True))
    windowed = fusellm.Transformer(args)
    windowed.load_state_dict(model.state_dict())
    return windowed.eval()


MODELS = {"llama (RoPE, GQA)": lambda: llama(50, 0).eval(),
          "mpt (ALiBi)": lambda: mpt(50, 1).eval(),
          "llama, sliding window 3": lambda: sliding(llama(50, 2))}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_token_at_a_time_with_the_cache_gives_the_whole_sequences_logits(name):
    """A prompt of 5 tokens fills the cache; then 7 tokens, one per step, each run alone. Step t's
    logits are row t of the logits of all 12 tokens run at once."""
    model = MODELS[name]()
    ids = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = model(ids)                                            # (1, 12, V)
        cache = KVCache(model.args, 1, 12, "cpu", torch.float32)
        steps = [model(ids[:, :5], cache=cache)]                      # the prompt: positions 0..4
        for t in range(5, 12):
            assert cache.len == t                                     # the positions it holds
            steps.append(model(ids[:, t:t + 1], cache=cache))         # one new token, alone
    assert torch.allclose(torch.cat(steps, dim=1), whole, atol=1e-5)
    assert not torch.allclose(whole[0, 5], whole[0, 11], atol=1e-3)  # the positions do differ
