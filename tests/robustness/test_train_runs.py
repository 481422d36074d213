"""Training runs that must hold up: killed and resumed (in one process, and every FSDP2 rank killed
by SIGKILL), spread over processes with torchrun (DDP, FSDP2), a non-finite loss, bad input refused
with one clear error, the command line, and the settings that change memory or speed but not results
(gradient checkpointing, torch.compile). The loop itself is taught in
tests/lessons/test_train.py."""
import dataclasses
import json
import re
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import fusellm
import train
from conftest import ROOT, train_run       # the `world` fixture comes from conftest
from extras import distributed
from extras.cli import field_help
from extras.export import export
from extras.progress import plot_losses
from conftest import whole       # Popen, and nothing it started left behind


run = train_run


def test_resume_after_a_kill_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    whole = run(world, tmp_path / "whole", "--fusion", "avgce")
    real_save = distributed.save_checkpoint

    def save_then_die(path, model, opt, step, *a):
        real_save(path, model, opt, step, *a)
        if step == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(distributed, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "split", "--fusion", "avgce")
    monkeypatch.setattr(distributed, "save_checkpoint", real_save)
    resumed = run(world, tmp_path / "split", "--fusion", "avgce", "--resume")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, resumed):
        assert (a["loss"], a["clm"], a["fusion"]) == (b["loss"], b["clm"], b["fusion"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = fusellm.fuse

    def nan_from_step_5(*a, **k):
        calls["n"] += 1
        ids, probs = real(*a, **k)
        return ids, probs * float("nan") if calls["n"] >= 5 else probs

    monkeypatch.setattr(fusellm, "fuse", nan_from_step_5)
    says = r"step 4: the loss is nan .* Last good checkpoint: .*ckpt\.pt \(step 3\)"
    with pytest.raises(train.TrainingError, match=says):
        run(world, tmp_path / "a")
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["step"] == 3


def test_data_for_another_target_tokenizer_is_refused(world, tmp_path):
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "source2"),
                              "--out", str(tmp_path / "a")])
    with pytest.raises(data.DataError, match="made for another target tokenizer"):
        train.train(cfg)


@pytest.mark.parametrize("batch, micro, world, says", [
    (128, 0, 3, "must split evenly over the 3 processes: use a multiple of 3, e.g. 126 or 129"),
    (128, 3, 8,
     "--micro-batch 3 must divide the 16 windows each of the 8 processes takes per step"),
    (0, 0, 1, "--batch-size 0"),
])
def test_a_batch_that_does_not_split_evenly_is_one_clear_error(batch, micro, world, says):
    with pytest.raises(train.TrainingError, match=re.escape(says)):
        train.batch_plan(batch, micro, world)


def test_a_typo_in_a_choice_is_refused_before_anything_loads(capsys):
    """`--fusion minc` stops at the command line with the choices, not after every model has
    loaded."""
    with pytest.raises(SystemExit):
        train.parse_config(["--data", "nowhere", "--target", "nowhere", "--fusion", "minc"])
    assert "invalid choice: 'minc'" in capsys.readouterr().err
    # --help says what it means
    assert field_help(train.TrainConfig)["lam"] == "lambda: weight of the CLM loss"


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(train.TrainConfig)]
    assert all(flag in text for flag in flags)


def test_no_arguments_run_the_demo_in_the_same_process(monkeypatch):
    """`python train.py` is the demo: train.py's __main__ block imports demo and runs demo.main([])
    in the same process (under __main__, so that train and demo do not import each other around a
    loop: train.main([]) itself asks for --data and --target)."""
    import demo
    calls = []
    monkeypatch.setattr(demo, "main", lambda argv=None: calls.append(argv))
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    assert calls == [[]]
    with pytest.raises(SystemExit, match="error: give --data"):
        train.main([])


def test_online_training_runs(world, tmp_path):
    m = run(world, tmp_path / "a", "--online", "--sources", str(world / "source"), "--topk", "5",
            "--max-steps", "2")
    assert len(m) == 2 and all(np.isfinite(r["fusion"]) for r in m)


def test_gradient_checkpointing_changes_memory_not_results(world, tmp_path):
    plain = run(world, tmp_path / "a", "--max-steps", "3")
    ckpt = run(world, tmp_path / "b", "--max-steps", "3", "--grad-checkpointing")
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in ckpt], abs=1e-6)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(world, tmp_path):
    eager = run(world, tmp_path / "a", "--max-steps", "2")
    compiled = run(world, tmp_path / "b", "--max-steps", "2", "--compile")
    assert [r["loss"] for r in eager] == pytest.approx([r["loss"] for r in compiled], abs=1e-4)


def test_loss_curve_picture_is_drawn(world, tmp_path):
    pytest.importorskip("matplotlib")
    run(world, tmp_path / "a", "--max-steps", "2")
    assert plot_losses(tmp_path / "a") == tmp_path / "a" / "loss.png"
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype, shard_bytes", [(torch.bfloat16, 12_000),
                                                (torch.float32, 5 * 2**30)])
def test_export_keeps_the_targets_dtype_and_shards(tmp_path, dtype, shard_bytes):
    """Training holds fp32 master weights; the exported model comes out as the target went in: a
    bf16 target in several shards gives bf16 in as many shards (not 2x the disk in fp32), an fp32
    single file gives one fp32 file; other files in the folder (an optimizer.bin) do not count."""
    from conftest import llama
    model = llama(60, 0)
    fusellm.save_model(model.to(dtype), tmp_path / "target", max_shard_bytes=shard_bytes)
    shards_in = sorted(p.name for p in (tmp_path / "target").glob("*.safetensors"))
    # not the model's: must not count
    (tmp_path / "target" / "optimizer.bin").write_bytes(bytes(2**20))
    trained = {k: v.float() + 1 for k, v in model.state_dict().items()}            # fp32, changed
    export(model.args, trained, tmp_path / "target", tmp_path / "final")
    shards_out = sorted(p.name for p in (tmp_path / "final").glob("*.safetensors"))
    assert shards_out == shards_in and (len(shards_in) > 1) == (dtype == torch.bfloat16)
    back = fusellm.load_model(tmp_path / "final")
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert torch.equal(back.tok_embeddings.weight, trained["tok_embeddings.weight"].to(dtype))



def test_the_last_step_is_saved_also_off_the_checkpoint_interval(monkeypatch, tmp_path):
    """6 steps with a checkpoint every 4: steps 4 and 6 are saved, and the last good one is 6.
    Catches Checkpoints.after without `or step == total` (a run whose length is no multiple of
    --ckpt-every would end with its last steps unsaved: the run's end, without its result)."""
    saved = []
    monkeypatch.setattr(distributed, "save_checkpoint",
                        lambda path, model, opt, step, *a: saved.append(step))
    ckpts = distributed.Checkpoints(tmp_path, False, None, None,
                                    train.TrainConfig(ckpt_every=4), 0)
    for step in range(1, 7):
        ckpts.after(step, 6)
    assert saved == [4, 6] and ckpts.last_good == 6


def test_resume_takes_the_checkpoint_a_kill_left_half_swapped(monkeypatch, tmp_path):
    """FSDP swaps a new out/ckpt/ in as ckpt -> .ckpt.old, .ckpt.tmp -> ckpt: a kill between the
    two renames leaves only .ckpt.old, and --resume continues from it instead of saying there is
    no checkpoint. Catches resume's `.old` fallback dropped."""
    old = tmp_path / ".ckpt.old"
    old.mkdir()
    monkeypatch.setattr(distributed, "load_checkpoint", lambda path, *a: 4 if path == old else -1)
    assert distributed.resume(tmp_path, True, None, None, 0) == (old, 4)


@pytest.mark.parametrize("fsdp", [False, True])
def test_resume_says_which_kind_of_checkpoint_is_there(tmp_path, fsdp):
    """--resume without --fsdp beside an FSDP checkpoint (out/ckpt/), or the other way round,
    names the one there and how it was written. Catches the hint's "with"/"without" swapped."""
    (tmp_path / "ckpt").mkdir() if not fsdp else (tmp_path / "ckpt.pt").write_bytes(b"")
    how = "without" if fsdp else "with"
    with pytest.raises(ValueError, match=f"written by a run {how} FSDP on several processes"):
        distributed.resume(tmp_path, fsdp, None, None, 0)


def test_a_ddp_checkpoint_holds_the_models_own_names_and_resumes(tmp_path):
    """Under DDP the model is wrapped (its names start "module."): ckpt.pt stores the inner
    model's names, so export and a resume with any number of processes read it, and
    load_checkpoint puts them back into a wrapped model. Catches unwrap() dropped on either
    side. One gloo process, in this one."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                         rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        models = [torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
                  for _ in range(2)]
        opts = [torch.optim.AdamW(m.parameters()) for m in models]
        models[0](torch.ones(1, 3)).sum().backward()
        opts[0].step()
        path = tmp_path / "ckpt.pt"
        distributed.save_checkpoint(path, models[0], opts[0], 5, train.TrainConfig(), False, 0)
        assert sorted(torch.load(path, weights_only=False)["model"]) == ["bias", "weight"]
        assert distributed.load_checkpoint(path, models[1], opts[1], False) == 5
        assert torch.equal(models[1].module.weight, models[0].module.weight)
    finally:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(out):
    """The weights of a run's last checkpoint: ckpt.pt, or FSDP's sharded ckpt/ converted to one
    file."""
    if (out / "ckpt").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(out / "ckpt", out / "ckpt_full.pt")
        return torch.load(out / "ckpt_full.pt", weights_only=False)["model"]
    return torch.load(out / "ckpt.pt", weights_only=False)["model"]


def launch(world, out, ranks, *extra, crash=False):
    """train.py for 6 steps with a checkpoint every 2, on one process or `torchrun` with `ranks`;
    crash: through tests/robustness/crash_after_checkpoint.py, every process killed once the step-2
    checkpoint is saved."""
    args = ["--data", str(world / "data"), "--target", str(world / "target"), "--batch-size", "4",
            "--max-steps", "6", "--lr", "3e-3", "--warmup", "1", "--ckpt-every", "2", "--no-export",
            "--device", "cpu",
            "--out", str(out), *extra]
    crasher = ROOT / "tests" / "robustness" / "crash_after_checkpoint.py"
    script = str(crasher) if crash else str(ROOT / "train.py")
    run_with = [sys.executable, script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script]
    # whole: in a session of its own, and nothing it started (torchrun's workers) outlives it
    with whole([*run_with, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as (p, _):
        log = p.communicate(timeout=300)[0].decode()
    assert (p.returncode != 0) == crash, log[-3000:]
    return log


def metrics(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def assert_same_run(one, two):
    a, b = metrics(one), metrics(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for k in a:
        assert a[k]["tokens"] == b[k]["tokens"]
        assert a[k]["loss"] == pytest.approx(b[k]["loss"], abs=1e-5)
        assert a[k]["fusion"] == pytest.approx(b[k]["fusion"], abs=1e-5)
    w1, w2 = final_weights(one), final_weights(two)
    assert sorted(w1) == sorted(w2)
    # Adam turns last-bit differences in a gradient coordinate that nearly cancels (|g| near eps =
    # 1e-8) into update differences of up to a sizeable share of lr: seen 1.2e-5 on one embedding
    # weight, 1e-6 elsewhere
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


@pytest.fixture(scope="module")
def one_process_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process_run")
    launch(world, out, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process(world, one_process_run, tmp_path, mode):
    """DDP (or FSDP2) on two CPU processes, each with half of every global batch, trains like one
    process. Under FSDP2 each rank loads only its shard of the target and writes its shards of the
    checkpoint (ckpt/)."""
    launch(world, tmp_path, 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert (tmp_path / "ckpt").is_dir() == (mode == "fsdp")
    assert (tmp_path / "ckpt.pt").is_file() == (mode == "ddp")
    assert_same_run(one_process_run, tmp_path)


@pytest.mark.slow
def test_fsdp_killed_and_resumed_from_its_sharded_checkpoint_equals_one_process(
        world, one_process_run, tmp_path):
    """Both FSDP2 ranks killed as soon as the first sharded checkpoint (step 2) is saved, then
    resumed: the steps after it and the final weights are one uninterrupted process's. Catches a
    checkpoint without the Adam state or the step, shards read back by the wrong rank, and a
    half-written ckpt/ taken for a whole one."""
    launch(world, tmp_path, 2, "--fsdp", crash=True)
    assert sorted(metrics(tmp_path)) == [1, 2]
    assert "at step 2" in launch(world, tmp_path, 2, "--fsdp", "--resume")
    assert_same_run(one_process_run, tmp_path)
