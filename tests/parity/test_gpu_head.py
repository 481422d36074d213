"""
The output head the way a GPU runs it, checked on the CPU: extras/fast_head.py with bf16 weights
takes each block's top-K from the bf16 logits and its log-sum-exp in one of three ways
(NANOFUSE_HEAD: fp32 logits first, an fp32 copy after the top-K, or one torch.compile'd pass).
Each must give data.head_topk's numbers, the readable whole-vocabulary log_softmax + topk on the
same model's fp32 logits. bf16 logits tie often, and tied ids may come in any order, so the top-K
is checked as a valid top-K (its values the reference's, each id's log-prob its value) rather than
id by id.
"""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import fusellm
from conftest import llama
from extras import fast_head, triton_head

ROOT = Path(__file__).resolve().parents[2]


def bf16_model(softcap=None):
    model = llama(1000, 3)
    if softcap:                      # Gemma 2's c tanh(z / c): the block's logits must be capped
        model = fusellm.Transformer(dataclasses.replace(model.args, final_softcap=softcap))
        model.load_state_dict(llama(1000, 3).state_dict())
    return model.eval().to(torch.bfloat16)


@pytest.mark.parametrize("mode, softcap", [(m, c) for m in ("fp32", "eager", "compiled")
                                           for c in (None, 2.0)] + [("triton", None)])
def test_the_gpu_head_gives_the_readable_heads_numbers(monkeypatch, mode, softcap):
    """Catches: the maximum left out of the compiled sum (or subtracted and not added back), top-K
    ids not shifted by the block's start, the soft-cap computed on bf16 logits; "triton" (the
    kernel in Triton's interpreter, chunks of 512 ids so that a row spans two, the last one
    short; the kernel on fp32 logits, as soft-capped ones are, in test_triton_head.py): a chunk's
    ids not shifted by its start, the chunks' sums merged without their maxima."""
    if mode == "triton":
        pytest.importorskip("triton")        # Linux only (requirements-dev.txt)
    monkeypatch.setenv("NANOFUSE_HEAD", mode)
    monkeypatch.setattr(triton_head, "CHUNK", 512)
    model, N, V, K = bf16_model(softcap), 41, 1000, 7
    h = torch.randn(N, model.args.dim, generator=torch.Generator().manual_seed(1)) * 4
    h = h.bfloat16()
    nxt = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    nxt[-1] = -1
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(h, slice(0, V)), dim=-1)          # (N, V) reference
        want = data.head_topk(model, h, nxt, K, V)
        for rows, cols in [(8, 300), (64, V)]:           # short last blocks both ways; one block
            ids, lps, label = fast_head.head_topk(model, h, nxt, K, V, rows * cols, cols)
            assert lps.dtype == torch.float32 and label.dtype == torch.float32
            assert torch.allclose(lps, want[1], atol=2e-6), (rows, cols)
            assert torch.allclose(logp.gather(1, ids), lps, atol=2e-6)   # each id: its log-prob
            assert all(len(set(r.tolist())) == K for r in ids)            # K distinct ids
            assert torch.allclose(label, want[2], atol=2e-6) and label[-1] == 0
    assert not fast_head.COMPILE_FAILED and not fast_head.TRITON_FAILED


def test_a_bf16_model_keeps_its_logits_in_bf16_unless_soft_capped():
    """model.logits(fp32=False): the weights' dtype, each value exactly the fp32 logit; a
    soft-capped model's in fp32 (the cap is not exact in bf16)."""
    h = torch.randn(5, 32).bfloat16()
    plain, capped = bf16_model(), bf16_model(softcap=2.0)
    z = plain.logits(h, fp32=False)
    assert z.dtype == torch.bfloat16 and torch.equal(z.float(), plain.logits(h))
    assert torch.equal(capped.logits(h, fp32=False), capped.logits(h))


@pytest.mark.parametrize("script, args", [
    ("data.py", ["dists", "--name", "m", "--data", "{d}", "--model", "{d}/missing"]),
    ("train.py", ["--online", "--data", "{d}", "--target", "{d}/missing", "--out", "{d}/out"])])
def test_a_wrong_head_mode_is_named_before_any_work(tmp_path, script, args):
    """NANOFUSE_HEAD=fast (a typo): data.py dists and train.py --online (whose sources' heads run in
    the loop) say so at once, naming the choices, without loading a model or writing a file."""
    env = {"NANOFUSE_HEAD": "fast", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / script), *(a.format(d=tmp_path) for a in args)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "NANOFUSE_HEAD='fast'" in r.stderr, r.stderr
    assert "auto, fp32, eager, compiled" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def head_with_failing_compile(monkeypatch, error):
    """fast_head.head_topk on a bf16 model (blocks of 8 x 300) where torch.compile raises `error`;
    what it returns, what data.head_topk returns."""
    monkeypatch.setenv("NANOFUSE_HEAD", "compiled")
    monkeypatch.setattr(fast_head, "COMPILE_FAILED", [])

    def broken(z, m):
        raise error
    monkeypatch.setattr(fast_head, "compiled_lse", lambda: broken)
    return blocked_head_twice()


def blocked_head_twice():
    """fast_head.head_topk on a bf16 model in blocks of 8 x 300, called twice (the second call:
    after whatever the first one did), and data.head_topk on the same inputs."""
    model = bf16_model()
    h = torch.randn(30, model.args.dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    nxt = torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = [fast_head.head_topk(model, h, nxt, 5, 1000, 8 * 300, 300) for _ in range(2)]
        return got, data.head_topk(model, h, nxt, 5, 1000)


def test_a_compile_that_fails_falls_back_once_and_says_so(monkeypatch, capsys):
    """torch.compile failing (no Triton, no C++ compiler) costs no result: the block it failed on
    and every later one, in this call and the next, take the uncompiled pass, with the reference's
    numbers, and the failure is said once, with its reason. Catches the failing block dropped or
    its log-sum-exp left out, the error raised, and a message per block."""
    error = RuntimeError("no triton here")
    got, want = head_with_failing_compile(monkeypatch, error)
    fell_back_once(got, want, capsys.readouterr().err, "torch.compile failed", error,
                   fast_head.COMPILE_FAILED)


def fell_back_once(got, want, err, said: str, error, failed: list):
    """Every blocked head's numbers in `got` are the readable head's `want`; the failure is said
    once in `err`, with its reason, and kept in `failed` (so that no later block tries again)."""
    for ids, lps, label in got:
        assert torch.allclose(lps, want[1], atol=2e-6) and torch.allclose(label, want[2], atol=2e-6)
    assert err.count(said) == 1 and str(error) in err
    assert failed == [f"{type(error).__name__}: {error}"]


def test_running_out_of_memory_is_not_taken_for_a_failed_compile(monkeypatch):
    """Out of GPU memory inside the compiled pass is raised as it is (a smaller --batch-size is the
    fix), not hidden behind the fallback. Catches an except clause that swallows every error."""
    with pytest.raises(torch.OutOfMemoryError):
        head_with_failing_compile(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    assert fast_head.COMPILE_FAILED == []


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_the_default_head_mode_is_compiled_on_a_gpu_and_fp32_on_the_cpu(monkeypatch, value):
    """NANOFUSE_HEAD unset, or set empty (`NANOFUSE_HEAD= python data.py ...`, how a shell clears
    it): "auto", which is "compiled" on a GPU (the bf16 top-K and one compiled log-sum-exp pass,
    the fast mode the docs promise) and "fp32" on the CPU; a mode that is set is taken as it is.
    Catches the empty value refused as a typo (os.environ.get(name, "auto") keeps ""), and the
    auto choices swapped (a GPU silently running the slow fp32 mode, which every numeric test,
    run on the CPU, would pass)."""
    if value is None:
        monkeypatch.delenv("NANOFUSE_HEAD", raising=False)
    else:
        monkeypatch.setenv("NANOFUSE_HEAD", value)
    assert (fast_head.head_mode(True), fast_head.head_mode(False)) == ("compiled", "fp32")
    monkeypatch.setenv("NANOFUSE_HEAD", "eager")
    assert (fast_head.head_mode(True), fast_head.head_mode(False)) == ("eager", "eager")
