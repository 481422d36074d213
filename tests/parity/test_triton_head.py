"""
extras/triton_head.py's kernel, checked without a GPU: in Triton's interpreter (the suite sets
TRITON_INTERPRET=1 in conftest.py) against its plain-torch reference and against torch's own
topk and logsumexp; and compiled by Triton's real compiler for an H100 (sm_90), which needs no GPU,
so that a kernel the interpreter accepts but the compiler would not (or one that spills its
registers) fails here rather than in a GPU session. head_topk with NANOFUSE_HEAD=triton against
the readable head is in test_gpu_head.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from extras import fast_head, triton_head

pytest.importorskip("triton")          # Linux only (requirements-dev.txt); the GPU image has it
ROOT = Path(__file__).resolve().parents[2]


def tied_logits(r, V, dtype=torch.bfloat16, seed=0):
    """(r, V) logits rounded to quarters, so that equal values (ties) are common, as in bf16."""
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(r, V, generator=g) * 3 * 4).round() / 4).to(dtype)


def check_topk(z, vals, ids, k):
    """vals (..., k) are the k largest of z's rows, in order, and ids point at them (each its own
    value, k distinct ids): a valid top-k however ties are broken."""
    assert torch.equal(vals, z.float().topk(k, dim=-1).values)
    assert torch.equal(z.float().gather(-1, ids), vals)
    assert all(len(set(row.tolist())) == k for row in ids.reshape(-1, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 4])
def test_the_kernel_gives_the_readable_chunk_statistics(dtype, k):
    """Rows of 700 in chunks of 128 (the last one 60, padded): each chunk's max, sum of exp(z -
    max) and top-k, as chunk_stats_reference computes them. Catches: the last chunk's padding read
    as logits (the mask dropped), ids not shifted by the chunk's start, a found value not taken
    out (an id twice), the sum taken without subtracting the maximum."""
    z = tied_logits(5, 700, dtype)
    got = triton_head.chunk_stats(z, k, 128)
    want = triton_head.chunk_stats_reference(z, k, 128)
    vals, ids, m, s = got
    assert [t.shape for t in got] == [t.shape for t in want] == [(5, 6, k)] * 2 + [(5, 6)] * 2
    assert torch.equal(m, want[2]) and torch.allclose(s, want[3], rtol=1e-6)
    assert torch.equal(vals, want[0])
    for c in range(6):                     # each chunk's ids: its own entries, a valid top-k
        part = z[:, c * 128:(c + 1) * 128]
        check_topk(part, vals[:, c], ids[:, c] - c * 128, k)


def test_merging_the_chunks_gives_the_whole_rows_topk_and_log_sum_exp():
    """merge(chunk statistics) = torch's topk and logsumexp over the whole row, with chunks from the
    reference and from the kernel; a chunk all -inf (masked ids) adds nothing, and a row all -inf
    has log-sum-exp -inf, as torch's. Catches: the chunks' sums added without rescaling by
    exp(m_c - M), ids gathered from the wrong chunk, NaN from exp(-inf - (-inf)). A top-k larger
    than a chunk (each chunk gives all its ids) is the row's top-k too."""
    z = tied_logits(6, 1000)
    z[0, :256] = -float("inf")                          # row 0's first chunk
    z[1] = -float("inf")                                # row 1, all of it
    want = z.float().logsumexp(-1)
    ref, kernel = triton_head.chunk_stats_reference, triton_head.chunk_stats
    for stats in (ref(z, 10, 256), kernel(z, 10, 256)):
        vals, ids, lse = triton_head.merge(*stats, 10)
        rows = [0, 2, 3, 4, 5]
        check_topk(z[rows], vals[rows], ids[rows], 10)
        assert torch.allclose(lse, want, atol=2e-6) and lse[1] == -float("inf")
    small = tied_logits(3, 100)                         # top-20 from chunks of 16 ids
    vals, ids, lse = triton_head.topk_lse(small, 20, 16)
    check_topk(small, vals, ids, 20)
    assert torch.allclose(lse, small.float().logsumexp(-1), atol=2e-6)


def test_a_strided_view_of_logits_gives_the_numbers_of_its_contiguous_copy():
    """topk_lse on logits that are a view, not a fresh (r, V) tensor: a column slice of a wider
    block (each row V entries apart from the next: row stride 1000, V 700) and a transposed
    tensor (the entries of a row not adjacent). Both give the top-k and log-sum-exp of the same
    values made contiguous. Catches the row stride taken as V (rows read from the wrong place) and
    the contiguity guard dropped (the kernel reads row entries as if adjacent)."""
    wide = tied_logits(4, 1000, seed=3)
    tall = tied_logits(700, 4, seed=4)
    for z in (wide[:, :700], tall.t()):
        assert not z.is_contiguous()
        vals, ids, lse = triton_head.topk_lse(z, 5, 256)
        check_topk(z.contiguous(), vals, ids, 5)
        assert torch.allclose(lse, z.float().logsumexp(-1), atol=2e-6)


COMPILE = r"""
import json, subprocess, sys
from pathlib import Path
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from extras import triton_head
fn, target = triton_head.jitted(), GPUTarget("cuda", 90, 32)
backend = make_backend(target)
binder = create_function_from_signature(fn.signature, fn.params, backend)   # as a launch does
usage = {}
for dtype, K in ((torch.bfloat16, 10), (torch.float32, 10), (torch.bfloat16, 255)):
    # the arguments of a block of 262,144 ids (the tensors' sizes do not enter the compile)
    z, f, i = torch.empty(1, 16, dtype=dtype), torch.empty(16), torch.empty(16, dtype=torch.long)
    kw = dict(K=K, CHUNK=triton_head.CHUNK, num_warps=8)
    bound, spec, opts = binder(z, 262144, 262144, f, i, f, f, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                       options=options.__dict__)
    cubin = Path(sys.argv[1]) / "k.cubin"
    cubin.write_bytes(k.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True)
    usage[f"{dtype} top-{K}"] = [res.stdout.strip().splitlines()[-1],
                                 "ld.global.v4" in k.asm["ptx"]]
print(json.dumps(usage))
"""


def test_the_kernel_compiles_for_an_h100_without_spilling_registers(tmp_path):
    """Triton's compiler (not its interpreter) builds the kernel for sm_90 as a launch on a block
    of 262,144 ids would (Triton's own specialisation of the arguments; triton_head.CHUNK ids a
    program; top-10 on bf16 and fp32 logits, and data.py's largest top-255) into code whose
    registers fit (no stack, no local memory) and that loads 16 bytes at a time. Catches a kernel
    only the interpreter runs, a chunk too large for the registers (CHUNK = 65536 spills 2,752
    bytes a thread to the stack), and V kept from specialisation (do_not_specialize: 2-byte
    loads)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(usage) == 3
    for what, (line, wide_loads) in usage.items():
        fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", (what, line)
        assert 0 < int(fields["REG"]) <= 255 and wide_loads, (what, line)


def failing_head(monkeypatch, error):
    """head_topk with NANOFUSE_HEAD=triton on a bf16 model (blocks of 8 x 300) where the kernel
    raises `error`, twice; and data.head_topk."""
    from test_gpu_head import blocked_head_twice
    monkeypatch.setenv("NANOFUSE_HEAD", "triton")
    monkeypatch.setattr(fast_head, "TRITON_FAILED", [])

    def broken(z, k):
        raise error
    monkeypatch.setattr(triton_head, "topk_lse", broken)
    return blocked_head_twice()


def test_a_kernel_that_fails_falls_back_to_the_compiled_head_once_and_says_so(monkeypatch, capsys):
    """A kernel Triton cannot build or launch on this GPU costs no result: that block and every
    later one take the compiled mode, with the reference's numbers, and the failure is said once.
    Catches the failing block dropped, the error raised, a message per block."""
    from test_gpu_head import fell_back_once
    error = RuntimeError("no sm_90 here")
    got, want = failing_head(monkeypatch, error)
    fell_back_once(got, want, capsys.readouterr().err, "the Triton kernel failed", error,
                   fast_head.TRITON_FAILED)


def test_out_of_memory_in_the_kernel_is_raised_as_it_is(monkeypatch):
    """Catches an except clause that hides running out of GPU memory behind the fallback."""
    with pytest.raises(torch.OutOfMemoryError):
        failing_head(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    assert fast_head.TRITON_FAILED == []


def test_the_triton_mode_is_refused_where_it_cannot_run(monkeypatch):
    """NANOFUSE_HEAD=triton: without the triton package, or on the CPU outside the interpreter, a
    ValueError saying what to do; on a GPU, or in the interpreter, the mode itself. Catches the
    checks removed (the run would load its models and then fail, or crawl in the interpreter)."""
    monkeypatch.setenv("NANOFUSE_HEAD", "triton")
    assert fast_head.head_mode(True) == "triton" and fast_head.head_mode(False) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fast_head.head_mode(True) == "triton"
    with pytest.raises(ValueError, match="runs on a CUDA GPU.*unset NANOFUSE_HEAD"):
        fast_head.head_mode(False)
    monkeypatch.setattr(triton_head, "triton", None)
    with pytest.raises(ValueError, match="triton package is not installed.*pip install triton"):
        fast_head.head_mode(True)


def test_data_py_refuses_the_triton_mode_on_the_cpu_before_any_work(tmp_path):
    """`NANOFUSE_HEAD=triton python data.py dists --device cpu` stops at once, naming the fix,
    without loading a model or writing a file."""
    env = {"NANOFUSE_HEAD": "triton", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "dists", "--name", "m", "--data",
                        str(tmp_path), "--model", str(tmp_path / "missing"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "runs on a CUDA GPU" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


def test_train_py_online_accepts_the_triton_mode_on_a_gpu_and_refuses_it_on_the_cpu(monkeypatch,
                                                                                     capsys):
    """train.py --online checks NANOFUSE_HEAD with the device the run will use: --device cuda:0 is
    accepted (on the CPU machine too: nothing is loaded yet), --device cpu refused naming the fix.
    Catches the check made as if every run were on the CPU (refusing triton on a GPU), or not
    made."""
    import train
    monkeypatch.setenv("NANOFUSE_HEAD", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    args = ["--online", "--data", "d", "--target", "t", "--out", "o"]
    assert train.parse_config(args + ["--device", "cuda:0"]).device == "cuda:0"
    with pytest.raises(SystemExit):
        train.parse_config(args + ["--device", "cpu"])
    assert "NANOFUSE_HEAD=triton runs on a CUDA GPU" in capsys.readouterr().err
