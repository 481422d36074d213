"""`python tools/bench.py gpu --dry-run`: the GPU session's one command, run here at tiny sizes on
the CPU, so that it cannot rot between the sessions that lend a GPU (tools/gpu_bench.py)."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT

PARTS = ["precision", "dists", "train", "generate", "torchrun"]


def bench_gpu(out, *args, env=None, timeout=300):
    """`bench.py gpu --out OUT ARGS` in a process of its own (its group killed whatever happens):
    its exit code and output."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "gpu", "--out", str(out), *args]
    p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = p.communicate(timeout=timeout)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return p.returncode, log


def dry_run(out, *extra, env=None):
    """bench.py gpu --dry-run: the JSON it wrote and its output."""
    rc, log = bench_gpu(out, "--dry-run", *extra, env=env)
    assert rc == 0, log[-3000:]
    return json.loads((out / "gpu_bench.json").read_text()), log


def bench_result(**rows):
    """A result as bench.py gpu's main() builds it (device "dev", torch "t", date "d"), each part
    named done, with the rows given for it."""
    return dict(device="dev", torch="t", date="d", dry_run=False, peak_bf16_tflops=None,
                seconds=1.0, parts={part: dict(rows=r, notes=[], error=None, seconds=1.0)
                                    for part, r in rows.items()})


def figures(row):
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


@pytest.mark.slow
def test_the_dry_run_gives_every_part_with_finite_figures(tmp_path):
    """Every part runs to the end on the CPU with finite figures, the transformers comparisons
    included, and the killed-and-resumed torchrun run equals the uninterrupted one. Catches a part
    broken by a change elsewhere (a renamed function it calls, a changed signature), a NaN figure,
    and a table row without its device, torch version and date."""
    result, _ = dry_run(tmp_path)
    assert list(result["parts"]) == PARTS
    for name, part in result["parts"].items():
        assert part["error"] is None, f"{name}: {part['error']}"
        assert part["rows"], name
        for row in part["rows"]:
            assert figures(row) and all(math.isfinite(v) for v in figures(row)), (name, row)
    assert {r["vocab"] for r in result["parts"]["dists"]["rows"]} == {"320", "1280", "2620"}
    assert all("hf_tokens_per_s" in r for r in result["parts"]["dists"]["rows"])
    assert [r["batch"] for r in result["parts"]["generate"]["rows"]] == [1, 8]
    # each precision row counts the kernels its attention calls got (none seen would be "")
    assert all(" x" in r["attention"] for r in result["parts"]["precision"]["rows"])
    assert all(r["ours_sdpa_tokens_per_s"] > 0 and r["no_cudnn_gain"] > 0
               for r in result["parts"]["generate"]["rows"])
    # greedy on the same fp32 weights: transformers picks the same tokens
    assert all(r["same_tokens"] == 1.0 for r in result["parts"]["generate"]["rows"])
    run = result["parts"]["torchrun"]["rows"][0]
    assert run["equal"] and run["steps_before_kill"] == 2 and run["resumed_at"] == 2
    assert run["backend"] == "gloo"
    table = (tmp_path / "gpu_bench.md").read_text()
    stamp = f"| {result['device']} | {result['torch']} | {result['date']} |"
    n_rows = sum(len(p["rows"]) for p in result["parts"].values())
    assert table.count(stamp) == n_rows
    # every head mode timed, and giving the same numbers; the accumulated steps; the profiles
    dists = result["parts"]["dists"]["rows"]
    modes = ("compiled", "triton", "eager", "fp32")      # triton: in Triton's interpreter
    big = [f"{m}@{2**29}" for m in ("compiled", "triton")]      # and both with 1 GiB blocks
    assert all(f"{m}_tokens_per_s" in r for r in dists for m in modes + tuple(big))
    names = modes + ("compiled, 1 GiB blocks", "triton, 1 GiB blocks")
    assert all(r["triton_failed"] is None and r["best_mode"] in names for r in dists)
    assert all(r["body_tokens_per_s"] > 0 and r["body_speed"] > 0 for r in dists)
    assert all(r["max_logprob_diff"] <= 1e-5 and r["max_ce_diff"] <= 1e-5 for r in dists)
    train = result["parts"]["train"]["rows"]
    steps = [(r["step"], r["compile"], r["tokens"]) for r in train]
    assert len(steps) == 12 and ("CLM + fusion, 2 micro-batches", "eager", 128) in steps
    # one graph each way, no breaks: compiled block by block, the 2 blocks share one compilation,
    # which captures fewer operations than the whole model's (no embedding, head or other block)
    assert {(r["compile"], r["graphs"], r["graph_breaks"]) for r in train} == {
        ("no", None, None), ("eager", 1, 0), ("eager, each block", 1, 0)}
    ops = {r["compile"]: r["ops_captured"] for r in train}
    assert 0 < ops["eager, each block"] < ops["eager"] and ops["no"] is None
    for name in ("profile-dists-ours-2620.txt", "profile-dists-transformers-2620.txt",
                 "profile-train-ours-eager.txt", "profile-train-ours-eager-each-block.txt"):
        assert name in table and "Self CPU" in (tmp_path / name).read_text()


@pytest.mark.slow
def test_a_part_that_fails_is_recorded_and_the_next_part_still_runs(tmp_path):
    """A part that raises writes its error into the JSON and the table, and the part after it
    still gives its figures. Catches one failure losing every figure of the session (an exception
    let through, or the JSON written only at the very end of a clean run)."""
    result, log = dry_run(tmp_path, "--parts", "precision,generate",
                          env={"NANOFUSE_GPU_BENCH_FAIL": "precision"})
    assert list(result["parts"]) == ["precision", "generate"]
    failed, ok = result["parts"]["precision"], result["parts"]["generate"]
    assert "failed on purpose" in failed["error"] and failed["rows"] == []
    assert ok["error"] is None and len(ok["rows"]) == 2
    assert "[precision]" in log and "failed: RuntimeError" in log
    assert "failed: RuntimeError: precision failed on purpose" in (
        tmp_path / "gpu_bench.md").read_text()


def test_a_command_killed_during_a_part_keeps_the_parts_before_it(tmp_path, monkeypatch):
    """The JSON and the table are on disk after every part and every row, and a part that is
    running says so: a device call stopped at its time limit (SIGKILL, no clean-up) still brings
    back the parts it finished and the rows of the one it was in. Here the second part makes a
    row, looks at the files as a kill would leave them, then stops the command. Catches the files
    written only once every part is done, a part cut off by the kill left out instead of named,
    and its rows so far lost."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench
    left = {}

    def first(sz, work, deadline, rows):
        rows.append(dict(model="m", max_logprob_diff=0.5))

    def killed(sz, work, deadline, rows):
        rows.append(dict(vocab="262k"))
        left.update(json=json.loads((tmp_path / "gpu_bench.json").read_text()),
                    md=(tmp_path / "gpu_bench.md").read_text())
        raise KeyboardInterrupt                 # not caught as a part's failure: the end

    monkeypatch.setattr(gpu_bench, "PARTS", {"precision": first, "dists": killed})
    for var in ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET"):     # main() sets them: put back
        monkeypatch.setenv(var, os.environ.get(var, ""))
    with pytest.raises(KeyboardInterrupt):
        gpu_bench.main(dry_run=True, out=str(tmp_path))
    parts = left["json"]["parts"]
    assert list(parts) == ["precision", "dists"]
    assert parts["precision"]["error"] is None and parts["precision"]["rows"][0]["model"] == "m"
    assert parts["dists"]["error"] == gpu_bench.STOPPED
    assert parts["dists"]["rows"] == [dict(vocab="262k")]
    assert "| 0.5 |" in left["md"] and "## dists" in left["md"] and "| 262k |" in left["md"]
    assert f"failed: {gpu_bench.STOPPED}" in left["md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_bench.json", "gpu_bench.md"]


def test_the_table_says_when_the_compiled_head_ran_uncompiled():
    """A dists row whose torch.compile (or Triton kernel) failed (extras/fast_head.py fell back) is
    named under the part's table with the error, so its "compiled" (or Triton) figures are not read
    as such; a row without that note says nothing. Catches the fallback hidden behind the mode's
    label."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench
    row = dict(vocab="262k", model="gemma-270m", tokens=8192, compiled_tokens_per_s=1e5)
    result = bench_result(dists=[row, dict(row, vocab="128k", compile_failed=None)])
    assert "ran uncompiled" not in gpu_bench.markdown(result)
    row["compile_failed"] = "BackendCompilerFailed: no triton"
    table = gpu_bench.markdown(result)
    assert "262k: torch.compile failed (BackendCompilerFailed: no triton)" in table
    assert table.count("ran uncompiled") == 1 and "Triton kernel failed" not in table
    row["triton_failed"] = "CompilationError: at 12:4"
    table = gpu_bench.markdown(result)
    assert "262k: the Triton kernel failed (CompilationError: at 12:4): from the block it failed " \
           "on, the Triton columns ran the compiled mode" in table
    assert "bf16, Triton kernel" not in table      # no row has a Triton figure: no such column
    row["triton_tokens_per_s"] = 2e5                # one row has it: the column, "-" in the other
    table = gpu_bench.markdown(result)
    assert "bf16, Triton kernel" in table and "| 200,000 |" in table and "| - |" in table


def test_a_triton_mode_that_fell_back_is_never_named_the_fastest():
    """Where the Triton kernel failed, its columns ran the compiled mode's code: the fastest is
    named among the other modes. Catches the fallback's figure credited to the Triton kernel."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench
    timed = {m: dict(tokens_per_s=v) for m, v in
             [("compiled", 1.0), ("triton", 3.0), (f"triton@{2**29}", 4.0), ("eager", 2.0)]}
    assert gpu_bench.fastest(timed, None) == f"triton@{2**29}"
    assert gpu_bench.fastest(timed, "CompilationError: at 12:4") == "eager"


def test_without_a_gpu_the_real_run_stops_at_once(tmp_path):
    """`bench.py gpu` without --dry-run where no CUDA GPU is visible stops before any part, naming
    --dry-run, instead of running the GPU's sizes on the CPU until every time box runs out. Catches
    the device check missing (the parts start: a model of 1.24B parameters on the CPU)."""
    rc, log = bench_gpu(tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert rc != 0 and "no CUDA GPU visible" in log and "--dry-run" in log, log[-2000:]
    assert "[precision]" not in log and list(tmp_path.iterdir()) == []


def test_the_attention_kernel_count_passes_every_argument_through_and_puts_sdpa_back():
    """precision's count of the kernels SDPA picks wraps torch's scaled_dot_product_attention: the
    wrapped call gives the same result (scale, mask, is_causal, enable_gqa passed on), one
    backend name a call, and the function is torch's own again after, even when the block raised.
    Catches an argument dropped by the wrapper (the bench's bf16 log-probs computed wrongly) and
    the wrapper left in place."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend
    from tools import gpu_bench
    sdpa = F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4 if n == 0 else 2, 6, 8, generator=g) for n in range(3))
    k4, v4 = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = torch.rand(6, 6, generator=g) > 0.3
    mask[:, 0] = True
    calls = [((q, k, v), dict(scale=0.3, enable_gqa=True)), ((q, k4, v4), dict(attn_mask=mask)),
             ((q, k4, v4), dict(is_causal=True))]
    want = [sdpa(*a, **kw) for a, kw in calls]
    assert not torch.allclose(want[1], want[2]) and not torch.allclose(want[0], sdpa(q, k4, v4))
    with gpu_bench.sdpa_kernels() as kernels:
        assert F.scaled_dot_product_attention is not sdpa
        got = [F.scaled_dot_product_attention(*a, **kw) for a, kw in calls]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert len(kernels) == 3 and set(kernels) <= {b.lower() for b in SDPBackend.__members__}
    assert F.scaled_dot_product_attention is sdpa
    with pytest.raises(ValueError), gpu_bench.sdpa_kernels():
        raise ValueError
    assert F.scaled_dot_product_attention is sdpa


def test_the_attention_kernel_count_asks_the_dispatcher_with_the_calls_own_arguments():
    """The kernel counted for a call of shared key/value heads (enable_gqa) is the one SDPA picks
    for it: on the CPU flash, as for the same attention with the heads copied, not "math" (what
    the dispatcher answers when asked without enable_gqa: 4 query heads against 2 key heads do not
    fit otherwise). Catches enable_gqa (or another argument) left out of the _fused_sdp_choice call:
    SDPA's result stays right, so the test above cannot see it, but bench.py gpu's precision part
    would report every GQA call as falling back to math."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    from tools import gpu_bench
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4 if n == 0 else 2, 6, 8, generator=g) for n in range(3))
    with gpu_bench.sdpa_kernels() as kernels:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                       is_causal=True)
    assert kernels[0] == kernels[1] != "math", kernels


def test_a_figure_of_zero_is_written_as_zero_not_as_missing():
    """In the markdown table a figure that is 0 (no graph breaks, no rows the same as
    transformers') is written "0"; only a missing one (None) is "-". Catches `if not value` for
    `if value is None`: the table would say "no figure" where the figure is the good news."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench
    rows = [dict(step="compiled", graphs=3, graph_breaks=0), dict(step="eager", graphs=None,
                                                                   graph_breaks=None)]
    result = bench_result(train=rows)
    lines = [row for row in gpu_bench.markdown(result).splitlines() if row.startswith("| comp")]
    assert lines == ["| compiled | 3 | 0 | dev | t | d |"]


def test_a_write_cut_off_halfway_leaves_the_last_whole_files(tmp_path, monkeypatch):
    """write() puts each file whole under another name, then renames it over the last version
    (extras/atomic_files.py): a kill in the middle of writing (the device call's time limit can
    land there) leaves the previous gpu_bench.json, which still parses, not half of the new one.
    Here the second write stops halfway through its first file, whichever of Path's writers it
    uses. Catches the files written in place."""
    sys.path.insert(0, str(ROOT))
    from pathlib import Path
    from tools import gpu_bench
    result = bench_result(precision=[dict(model="m")])
    gpu_bench.write(result, tmp_path)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}

    def half_then_killed(self, data, *args, **kwargs):
        with open(self, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data[:len(data) // 2])
        raise KeyboardInterrupt                     # stands for the kill

    monkeypatch.setattr(Path, "write_text", half_then_killed)
    monkeypatch.setattr(Path, "write_bytes", half_then_killed)
    result["parts"]["dists"] = dict(rows=[], notes=[], error=gpu_bench.STOPPED, seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        gpu_bench.write(result, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in tmp_path.iterdir() if p.name in before} == before
    assert list(json.loads((tmp_path / "gpu_bench.json").read_text())["parts"]) == ["precision"]


def test_a_table_that_cannot_be_written_costs_neither_the_figures_nor_the_run(tmp_path,
                                                                            monkeypatch):
    """write() is called after every part and row: a bug in the table's formatting (a figure of an
    unexpected type on the GPU) writes its traceback where the table would be, and the JSON and
    the profiles still. Catches the table built first and outside a try, which would stop the
    whole command (every later part lost) for a cosmetic error."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench

    def broken(result):
        raise ValueError("Unknown format code 'f' for object of type 'str'")

    monkeypatch.setattr(gpu_bench, "markdown", broken)
    result = bench_result(train=[dict(step="CLM only", profile=dict(table="Self CUDA time total"))])
    gpu_bench.write(result, tmp_path)
    assert json.loads((tmp_path / "gpu_bench.json").read_text()) == result
    assert "Unknown format code" in (tmp_path / "gpu_bench.md").read_text()
    assert (tmp_path / "profile-train-ours-.txt").read_text() == "Self CUDA time total"


def test_the_time_boxes_leave_the_command_within_the_issues_8_minutes():
    """The GPU run's parts' time boxes add up to at most 460 s: with Python's start, torch's import
    and naming the GPU (seconds, in a fresh process), the command stays within the 8 minutes it is
    sized for (a GPU session has 15 minutes of device time, the machine's start and a second
    try included). Catches a box raised without another lowered."""
    sys.path.insert(0, str(ROOT))
    from tools import gpu_bench
    boxes = gpu_bench.Sizes.for_gpu().budget_s
    assert set(boxes) == set(gpu_bench.PARTS) and sum(boxes.values()) <= 460, boxes
