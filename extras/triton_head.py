"""
extras/triton_head.py: a block's top-K and log-sum-exp in one read of its logits, a Triton kernel
(NANOFUSE_HEAD=triton, on a GPU).

Why it exists: on a GPU the output head's cost is passes over memory, not the matrix product. For a
block of bf16 logits z (r, V), extras/fast_head.py's "compiled" mode reads them once for torch.topk
(a radix select, which reads its row several times: at 262,144 ids a row does not fit one thread
block's memory) and once more for the log-sum-exp. This kernel reads each logit exactly once: each
program loads one chunk of one row into registers and writes that chunk's maximum, sum of exp(z -
max) and top-K; a small second step in torch merges the chunks of each row. That is about 2 bytes
moved per logit after the matrix product wrote it, against about 20 for transformers' fp32
log_softmax + topk. Whether it is faster than torch.topk on a given GPU is measured, not assumed:
`python tools/bench.py gpu` times every head mode side by side (docs/benchmarks.md).

What it holds:
- `chunk_stats_reference`: the two steps in plain torch, the readable statement of what the kernel
  computes (and the test's reference).
- `chunk_stats_kernel`: the same first step as a Triton kernel; `chunk_stats` launches it.
- `merge`: the second step, shared by both: per row, the top-K of the chunks' top-Ks and the
  log-sum-exp of the chunks' log-sum-exps,
      lse = M + log sum_c s_c exp(m_c - M),   M = max_c m_c,
  where chunk c has maximum m_c and s_c = sum_{j in c} exp(z_j - m_c).
- `topk_lse(z, k)`: top-K values (fp32) and ids, and the log-sum-exp, of each row of z.

The kernel runs on a CUDA GPU. On the CPU it runs only in Triton's interpreter (TRITON_INTERPRET=1,
numpy, slow), which is how tests/parity/test_triton_head.py proves it equal to the reference
without a GPU. Ties: the kernel keeps the first of equal values, torch.topk any of them; the values
are the same, and each id's value is its logit.
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                  # the other head modes need neither; head_mode says what to do
    triton = tl = None

CHUNK = 4096        # logits per program: 8 KiB of bf16, 16 fp32 registers per thread at 8 warps


def chunk_stats_reference(z, k: int, chunk: int):
    """The first step, readably: z (r, V) cut into chunks of `chunk` ids (the last padded with
    -inf) -> per chunk its top-k values and ids (r, n, k), its maximum m (r, n) and s = sum of
    exp(z - m) over the chunk (r, n). n = ceil(V / chunk)."""
    r, V = z.shape
    n = -(-V // chunk)
    x = torch.full((r, n * chunk), -float("inf"), device=z.device)
    x[:, :V] = z.float()
    x = x.view(r, n, chunk)                                               # (r, n, chunk)
    vals, ids = x.topk(k, dim=-1)                                         # (r, n, k)
    ids = ids + torch.arange(n, device=z.device)[:, None] * chunk        # ids within the row
    m = vals[..., 0]                                                      # (r, n) the maxima
    safe = m.masked_fill(m == -float("inf"), 0)           # a chunk all -inf: its sum 0, not NaN
    s = (x - safe[..., None]).exp().sum(-1)                               # (r, n)
    return vals, ids, m, s


def merge(vals, ids, m, s, k: int):
    """The second step: the chunks' statistics (r, n, k), (r, n, k), (r, n), (r, n) -> each row's
    top-k values and ids (r, k) and its log-sum-exp (r,)."""
    top, j = vals.flatten(1).topk(k, dim=-1)                             # (r, k) of n * k
    M = m.max(dim=1, keepdim=True).values                                 # (r, 1)
    M = M.masked_fill(M == -float("inf"), 0)              # a row all -inf: its lse -inf, not NaN
    lse = M[:, 0] + (s * (m - M).exp()).sum(1).log()                     # (r,)
    return top, ids.flatten(1).gather(1, j), lse


def chunk_stats_kernel(z_ptr, row_stride, V, vals_ptr, ids_ptr, m_ptr, s_ptr,
                       K: tl.constexpr, CHUNK: tl.constexpr):
    """Program (row, c): chunk c of row `row`, read once into registers -> its max, sum of exp,
    top-K (K passes of max + argmax over the registers, each taking out the one it found; a loop,
    not unrolled, so that a top-255 compiles as small as a top-10). A chunk with fewer than K
    logits above -inf repeats its last id for the rest (only a row with fewer than K finite
    logits could pick them). Triton specialises V, the stride and the pointers on divisibility
    by 16, which lets it load 16 bytes at a time under the mask: where V is a multiple of 16
    (Llama 2 and 3, Mistral, Gemma), not where it is not (GPT-2's 50,257, Qwen2.5's 151,665:
    2-byte loads, the same results)."""
    row = tl.program_id(0).to(tl.int64)                 # row * row_stride may pass 2^31
    c = tl.program_id(1)
    out = row * tl.num_programs(1) + c                  # this chunk's place in (r, n)
    offs = tl.arange(0, CHUNK)
    cols = c * CHUNK + offs
    x = tl.load(z_ptr + row * row_stride + cols, mask=cols < V, other=-float("inf"))
    x = x.to(tl.float32)                                # (CHUNK,) a bf16 logit is its fp32 value
    m = tl.max(x, axis=0)
    tl.store(m_ptr + out, m)
    safe = tl.where(m == -float("inf"), 0.0, m)         # a chunk all -inf: its sum 0, not NaN
    tl.store(s_ptr + out, tl.sum(tl.exp(x - safe), axis=0))
    for j in range(K):
        v, i = tl.max(x, axis=0, return_indices=True)   # the first of equal values
        tl.store(vals_ptr + out * K + j, v)
        tl.store(ids_ptr + out * K + j, c * CHUNK + i)
        x = tl.where(offs == i, -float("inf"), x)       # taken out for the next pass


@functools.cache
def jitted():
    """The kernel as Triton runs it: compiled for the GPU, or interpreted where TRITON_INTERPRET=1
    (read here, on the first call; and it must have been set before triton was first imported,
    which makes the interpreter's own library functions: tests/conftest.py does both)."""
    return triton.jit(chunk_stats_kernel)


def chunk_stats(z, k: int, chunk: int = 0):
    """chunk_stats_reference's results, from the Triton kernel: one program per (row, chunk)."""
    chunk = chunk or CHUNK
    r, V = z.shape
    z = z if z.stride(1) == 1 else z.contiguous()
    n = -(-V // chunk)
    vals = torch.empty(r, n, k, device=z.device)                          # (r, n, k) fp32
    ids = torch.empty(r, n, k, dtype=torch.long, device=z.device)
    m = torch.empty(r, n, device=z.device)
    s = torch.empty(r, n, device=z.device)
    # Triton launches on the current GPU, not z's: under torchrun data.py's rank 1 has z on cuda:1
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        jitted()[(r, n)](z, z.stride(0), V, vals, ids, m, s, K=k, CHUNK=chunk,
                         num_warps=8 if chunk >= 2048 else 4)
    return vals, ids, m, s


def topk_lse(z, k: int, chunk: int = 0):
    """Each row of z (r, V), k <= V: its top-k values (fp32) and ids (r, k) and its log-sum-exp
    (r,), from one read of z. A chunk gives at most all of its ids, so a k above the chunk size
    still merges to the row's top-k."""
    chunk = chunk or CHUNK
    return merge(*chunk_stats(z, min(k, chunk), chunk), k)
