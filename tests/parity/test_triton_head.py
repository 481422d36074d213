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

import data
from extras import fast_head, triton_head

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
    reference and from the kernel. Catches: the chunks' sums added without rescaling by exp(m_c -
    M), ids gathered from the wrong chunk."""
    z = tied_logits(6, 1000)
    want = z.float().logsumexp(-1)
    ref, kernel = triton_head.chunk_stats_reference, triton_head.chunk_stats
    for stats in (ref(z, 10, 256), kernel(z, 10, 256)):
        vals, ids, lse = triton_head.merge(*stats, 10)
        check_topk(z, vals, ids, 10)
        assert torch.allclose(lse, want, atol=2e-6)
    with pytest.raises(ValueError, match="top-300 from chunks of 256"):
        triton_head.topk_lse(z, 300, 256)


COMPILE = r"""
import json, subprocess, sys
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from extras import triton_head
usage = {}
for z in ("*bf16", "*fp32"):
    sig = dict(z_ptr=z, row_stride="i32", V="i32", vals_ptr="*fp32", ids_ptr="*i64", m_ptr="*fp32",
               s_ptr="*fp32", K="constexpr", CHUNK="constexpr")
    src = ASTSource(fn=triton_head._jitted(""), signature=sig,
                    constexprs=dict(K=10, CHUNK=triton_head.CHUNK))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    cubin = Path(sys.argv[1]) / "k.cubin"
    cubin.write_bytes(k.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    res = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True)
    usage[z] = res.stdout.strip().splitlines()[-1]
print(json.dumps(usage))
"""


def test_the_kernel_compiles_for_an_h100_without_spilling_registers(tmp_path):
    """Triton's compiler (not its interpreter) builds the kernel for sm_90 at the GPU's sizes
    (top-10, triton_head.CHUNK ids a program, bf16 and fp32 logits) into code whose registers fit:
    no stack, no local memory. Catches a kernel only the interpreter runs, and a chunk too large
    for the registers (CHUNK = 65536 spills 2,752 bytes a thread to the stack)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-c", COMPILE, str(tmp_path)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    usage = json.loads(r.stdout.strip().splitlines()[-1])
    for z, line in usage.items():
        fields = dict(f.split(":", 1) for f in line.split() if ":" in f)
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", (z, line)
        assert 0 < int(fields["REG"]) <= 255, (z, line)


def failing_head(monkeypatch, error):
    """head_topk with NANOFUSE_HEAD=triton on a bf16 model (blocks of 8 x 300) where the kernel
    raises `error`, twice; and data.head_topk."""
    from test_gpu_head import bf16_model
    monkeypatch.setenv("NANOFUSE_HEAD", "triton")
    monkeypatch.setattr(fast_head, "TRITON_FAILED", [])

    def broken(z, k):
        raise error
    monkeypatch.setattr(triton_head, "topk_lse", broken)
    model = bf16_model()
    h = torch.randn(30, model.args.dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    nxt = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = [fast_head.head_topk(model, h, nxt, 5, 1000, 8 * 300, 300) for _ in range(2)]
        return got, data.head_topk(model, h, nxt, 5, 1000)


def test_a_kernel_that_fails_falls_back_to_the_compiled_head_once_and_says_so(monkeypatch, capsys):
    """A kernel Triton cannot build or launch on this GPU costs no result: that block and every
    later one take the compiled mode, with the reference's numbers, and the failure is said once.
    Catches the failing block dropped, the error raised, a message per block."""
    got, want = failing_head(monkeypatch, RuntimeError("no sm_90 here"))
    for ids, lps, label in got:
        assert torch.allclose(lps, want[1], atol=2e-6) and torch.allclose(label, want[2], atol=2e-6)
    err = capsys.readouterr().err
    assert err.count("the Triton kernel failed") == 1 and "no sm_90 here" in err
    assert fast_head.TRITON_FAILED == ["RuntimeError: no sm_90 here"]


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
