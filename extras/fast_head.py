"""
extras/fast_head.py: the output head in blocks, for real vocabularies.

Why it exists: data.py's readable head builds the whole (N, V) logits of a batch at once. With a
real vocabulary that does not fit: Gemma 3's 262,144 tokens over 8 windows of 2048 tokens is 17 GB
of fp32 logits. A real user needs the same top-K, log-probs and CE with the memory of one small
block, and on the CPU the blocked walk is also faster (a block stays in cache for the passes after
the matrix product). A learner reads data.head_topk, the whole-vocabulary log_softmax + topk +
gather; data.window_topk calls this one instead, and tests/lessons/test_windows_and_dists.py
proves the two equal on random and real inputs (tests/parity/test_gpu_head.py: with bf16 weights,
as on a GPU).

What it holds: `head_topk`, with the block shape chosen by device (`block_shape`), and how a
block's top-K and log-sum-exp are taken (`block_topk_lse`, `block_lse`: in place in fp32 on the
CPU; on a GPU from the bf16 logits, the log-sum-exp in one torch.compile'd pass, NANOFUSE_HEAD
choosing otherwise, e.g. extras/triton_head.py's one-read kernel). Given uniforms (`python
data.py dists --sample N`), head_topk draws N ids per position from the whole distribution
instead, in the same blocks (extras/sampled_labels.py head_sample).
"""
from __future__ import annotations

import functools
import os
import sys

import torch

CPU_ELEMENTS = 2**21       # floats per block on the CPU: 8 MiB, 512 positions x 4096 entries
GPU_ELEMENTS = 2**26       # logits per block on a GPU: 128 MiB in bf16, the whole vocabulary a row
CPU_COLS = 4096            # vocabulary entries per block on the CPU


def block_shape(V: int, on_gpu: bool, head_elements: int = 0,
                head_cols: int = 0) -> tuple[int, int]:
    """(positions, vocabulary entries) per block; 0 for head_elements or head_cols: the device's
    default. On CPU, 2^21 floats (8 MiB: 512 positions x 4096 entries), so a block stays in cache
    for the exp and top-K passes that follow the matrix product: on Gemma 3 270M and 2 cores that is
    1.4x faster than whole-vocabulary rows (docs/benchmarks.md, tools/bench.py dists). On GPU,
    where each block costs kernel launches, 2^26 logits (128 MiB in bf16), the whole vocabulary
    a row."""
    cols = min(V, head_cols or (V if on_gpu else CPU_COLS))
    rows = max(1, (head_elements or (GPU_ELEMENTS if on_gpu else CPU_ELEMENTS)) // cols)
    return rows, cols


def head_topk(model, h, nxt, k: int, V: int, head_elements: int = 0, head_cols: int = 0,
              u=None):
    """data.head_topk in blocks of positions x vocabulary, never the whole (N, V) logits: for a
    slice of `rows` positions, walk the vocabulary `cols` entries at a time -> logits (rows, cols)
    -> fold them into a running log-sum-exp (logaddexp), a running top-K (the block's top-K merged
    with the best so far) and the next token's logit when it falls in this block -> the next block.
    Peak memory is one block of head_elements floats whatever N and V. h (N, C): final hidden
    states; nxt (N,): the next token at each position (-1: none). Returns top-K ids and log-probs
    (N, K) and the next token's log-prob (N,) (0 where nxt is -1). u (N, S), sorted uniforms
    (extras/sampled_labels.py `uniforms`), or None: with them, k is unused and the ids are S draws
    from each position's distribution, each of log-prob -log S (sampled_labels.head_sample).
    On a GPU the top-K comes from bf16 logits (`head_mode`, `block_lse` below)."""
    rows, cols = block_shape(V, h.is_cuda, head_elements, head_cols)
    if u is not None:
        from extras.sampled_labels import head_sample
        return head_sample(model, h, nxt, u, V, rows, cols)
    mode = head_mode(h.is_cuda)
    ids, lps, label = [], [], []
    for i in range(0, len(h), rows):
        hs, t = h[i:i + rows], nxt[i:i + rows]                          # (r, C), (r,)
        lse = torch.full((len(hs),), -float("inf"), device=h.device)    # (r,) running log-sum-exp
        top_v = torch.empty(len(hs), 0, device=h.device)                # (r, <=K) running top-K
        top_i = torch.empty(len(hs), 0, dtype=torch.long, device=h.device)   # (r, <=K) their ids
        lab = torch.zeros(len(hs), device=h.device)                     # (r,) next token's logit
        for c in range(0, V, cols):
            z = model.logits(hs, slice(c, min(c + cols, V)), fp32=mode == "fp32")   # (r, cols)
            here = (t >= c) & (t < c + z.shape[1])                      # next token in this block
            at = (t - c).clamp(0, z.shape[1] - 1)[:, None]              # (r, 1)
            lab = torch.where(here, z.gather(1, at)[:, 0].float(), lab)
            bv, bi, block = block_topk_lse(z, min(k, z.shape[1]), mode)   # (r, k), (r, k), (r,)
            lse = torch.logaddexp(lse, block)
            top_v, j = torch.cat([top_v, bv], 1).topk(min(k, top_v.shape[1] + bv.shape[1]), dim=-1)
            top_i = torch.cat([top_i, bi + c], 1).gather(1, j)
        ids.append(top_i)
        lps.append(top_v - lse[:, None])                       # log-probs over the whole vocabulary
        label.append((lab - lse) * (t >= 0))
    return torch.cat(ids), torch.cat(lps), torch.cat(label)


# --------------------------------------------------------------------------------------------------
# A block's log-sum-exp, max + log sum exp(z - max), the pass over every logit of the block. On the
# CPU the logits are fp32 and the pass is done in place (no second (r, cols) tensor). On a GPU they
# are bf16, and the passes over memory are what costs: converting each logit to fp32 first, then
# subtracting, exponentiating and summing, moves about 26 bytes per logit. So a GPU block takes its
# top-K from the bf16 logits (half the bytes, exact) and its log-sum-exp in one torch.compile'd
# kernel that reads each bf16 logit once ("compiled"). Where that cannot be compiled, the in-place
# pass runs on an fp32 copy ("eager"); "fp32" converts the logits before the top-K too (as before).
# "triton" takes the top-K and the log-sum-exp together from one read, in extras/triton_head.py's
# kernel. NANOFUSE_HEAD=fp32|eager|compiled|triton picks one (tools/gpu_bench.py times them). The
# sampled labels (extras/sampled_labels.py) read fp32 logits whatever it says. Gemma 2's soft-capped
# logits are fp32 in every mode.

MODES = ("auto", "fp32", "eager", "compiled", "triton")


def head_mode(on_gpu: bool) -> str:
    """NANOFUSE_HEAD (unset or empty: auto, "compiled" on a GPU and "fp32" on the CPU), checked:
    a name not in MODES, or "triton" without the triton package or off a GPU (where only Triton's
    interpreter runs it, TRITON_INTERPRET=1: the tests), is a ValueError saying what to do."""
    mode = os.environ.get("NANOFUSE_HEAD") or "auto"
    if mode not in MODES:
        raise ValueError(f"NANOFUSE_HEAD={mode!r}: use one of {', '.join(MODES)}")
    if mode == "triton":
        from extras import triton_head
        if triton_head.triton is None:
            raise ValueError("NANOFUSE_HEAD=triton: the triton package is not installed (pip "
                             "install triton; CUDA builds of torch bring it), or choose another "
                             "mode: " + ", ".join(MODES))
        if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("NANOFUSE_HEAD=triton runs on a CUDA GPU, and this run is on the "
                             "CPU: unset NANOFUSE_HEAD (on the CPU only Triton's interpreter runs "
                             "it, TRITON_INTERPRET=1, for tests)")
    return ("compiled" if on_gpu else "fp32") if mode == "auto" else mode


def block_topk_lse(z, k: int, mode: str):
    """One block z (r, cols): its top-k values (fp32) and ids (r, k) and its log-sum-exp (r,); z
    is overwritten where it is fp32. "triton": all three from one read (extras/triton_head.py)."""
    if mode == "triton" and not TRITON_FAILED:
        from extras import triton_head
        got = or_none(TRITON_FAILED, "the Triton kernel failed", "the head runs "
                      "NANOFUSE_HEAD=compiled from here", lambda: triton_head.topk_lse(z, k))
        if got is not None:
            return got
    bv, bi = z.topk(k, dim=-1)                                          # (r, k): bv[:, 0] the max
    bv = bv.float()                         # exact: a bf16 value is its fp32 value, same order
    return bv, bi, block_lse(z, bv[:, :1], "compiled" if mode == "triton" else mode)


def block_lse(z, m, mode: str):
    """log sum_j exp(z_j) of each row of one block z (r, cols), in fp32 whatever z's dtype; m (r, 1)
    the rows' maxima (fp32). z is overwritten where it is fp32 (the caller is done with it)."""
    if z.dtype == torch.float32:                                        # one pass less, in place
        return m[:, 0] + z.sub_(m).exp_().sum(-1).log()
    if mode == "compiled" and not COMPILE_FAILED:
        got = or_none(COMPILE_FAILED, "torch.compile failed", "the log-sum-exp runs uncompiled "
                      "from here (NANOFUSE_HEAD=eager: from the start)",
                      lambda: compiled_lse()(z, m))     # torch.compile() itself may refuse too
        if got is not None:
            return got
    return block_lse(z.float(), m, mode)                                # eager: on an fp32 copy


def or_none(failed: list, what: str, instead: str, fn):
    """fn(), or None where it fails (no Triton, no C++ compiler, a kernel this GPU cannot
    build): why is kept in `failed`, so that the caller stops trying, and said once, with what
    runs instead. Out of GPU memory is raised as it is: a smaller batch is the fix there."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        raise
    except Exception as e:                                              # noqa: BLE001 - said once
        failed.append(f"{type(e).__name__}: {str(e)[:300]}")
        print(f"[head] {what} ({failed[0]}); {instead}", file=sys.stderr, flush=True)
        return None


def lse_reference(z, m):
    """The log-sum-exp as torch.compile fuses it: each logit read once, converted, exp'd, summed."""
    return m[:, 0] + (z.float() - m).exp().sum(-1).log()


COMPILE_FAILED = []      # why torch.compile failed in this process, once it has
TRITON_FAILED = []       # why the Triton kernel failed in this process, once it has


@functools.cache
def compiled_lse():
    return torch.compile(lse_reference, dynamic=True)
