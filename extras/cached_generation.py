"""
extras/cached_generation.py: greedy generation's steps with a KV cache, for real generation lengths.

Why it exists: eval.py's readable Scorer.next_token runs the whole context through the model again
for every new token, so a step costs as much as the prompt; BBH and HumanEval ask for up to 1024
new tokens after prompts of thousands. A real user needs each step to cost one token: the prompt
runs once and fills a KV cache (KVCache), then each new token runs alone and attends to the
keys and values cached so far. A learner reads Scorer.next_token; Scorer.generate takes these steps
instead for any nanofuse Transformer. The two pick the same tokens, while the context fits the
window and once it slides: tests/lessons/test_eval.py on a random model and prompt,
tests/parity/test_generation.py the same text from a checkpoint loaded from its folder (and the same
logits from every family's: tests/lessons/test_kv_cache.py, tests/parity/test_generation.py).

What it holds: `KVCache` (every layer's keys and values so far; model.Attention stores into it
and reads from it), `CachedSteps`, called as Scorer.next_token is: the ids so far -> the most
likely next token, and `decoding`, the attention kernels its steps may use.
"""
from __future__ import annotations

import contextlib

import torch


class KVCache:
    """The keys and values every layer has computed so far, so that generating one more token runs
    the model on that token alone: model(new_ids, cache=c) attends to everything c holds, then c
    holds the new ones too. Per layer (B, Hkv, max_len, hd), filled from 0; `len` positions held."""

    def __init__(self, args, batch: int, max_len: int, device, dtype):
        shape = (args.n_layers, batch, args.n_kv_heads, max_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.len = 0

    def update(self, layer: int, k, v):
        """Store one layer's k, v (B, Hkv, T, hd) for positions len .. len+T-1; return all of its
        keys and values so far (B, Hkv, len+T, hd). Transformer.hidden then advances len."""
        end = self.len + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"the KV cache holds {self.k.shape[3]} positions; {end} were asked "
                             f"for")
        self.k[layer, :, :, self.len:end] = k
        self.v[layer, :, :, self.len:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@contextlib.contextmanager
def decoding():
    """The context generation's steps run in: SDPA may pick any attention kernel but cuDNN's (a
    process-wide switch, put back as it was after). On an H100 or H200, torch 2.11 for CUDA 13
    (the GPU image's, with cuDNN 9.19) tries cuDNN's kernel first, and cuDNN builds an execution
    plan for each new shape, the number of keys included (torch caches the plans by shape, per
    thread): a decoding step adds a key every time, so each step of a generation longer than any
    before it in the process builds one, tens of milliseconds of host time as reported elsewhere
    (not measured here). Flash takes one query against any number of keys without planning."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


class CachedSteps:
    """The greedy steps of one generation with a KV cache, which holds the prompt and the
    max_new_tokens after it (at most the window). Where max_new_tokens alone fills the window
    (lm-eval refuses that), the context slides past it and each step runs the last `window` tokens
    again, as Scorer.next_token does (the same tokens: a test)."""

    def __init__(self, model, window: int, max_new_tokens: int, device):
        self.model, self.window, self.device = model, window, device
        self.max_new_tokens = max_new_tokens
        self.cache = None
        self.seen = 0                            # ids[:seen] are in the cache

    def __call__(self, ids: list[int]) -> int:
        with torch.no_grad(), decoding():
            return self.step(ids)

    def step(self, ids: list[int]) -> int:
        if len(ids) > self.window:
            self.cache = None                                # the whole context, as it stands
            x = torch.tensor([ids[-self.window:]], device=self.device)
            return int(self.model(x)[0, -1].argmax())
        if self.cache is None:                   # the first step: the prompt fills the cache
            param = next(self.model.parameters())
            size = min(self.window, len(ids) + self.max_new_tokens)
            self.cache = KVCache(self.model.args, 1, size, param.device, param.dtype)
        x = torch.tensor([ids[self.seen:]], device=self.device)  # what the cache has not seen yet
        self.seen = len(ids)
        # the output head on the last position only
        logits = self.model.logits(self.model.hidden(x, self.cache)[:, -1])[0]          # (V,)
        return int(logits.argmax())
