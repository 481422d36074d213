"""The training loop: lambda = 1 is plain CLM, the fusion loss is what it optimises, and a run can be split
over processes or killed and resumed without changing a single loss."""
import json
import os
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import fusellm
import train
from conftest import ROOT
from tokenizer import load_tokenizer


def run(world, out, *extra, **kw):
    argv = ["--data", str(world / "data"), "--target", str(world / "target"), "--out", str(out), "--batch-size", "4",
            "--max-steps", "6", "--lr", "3e-3", "--warmup", "2", "--log-every", "1", "--ckpt-every", "3",
            "--no-export", *extra]
    cfg = train.parse_config(argv)
    train.train(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lambda_one_is_plain_clm_training(world, tmp_path):
    """The loop at lambda = 1 against a plain CLM loop written here: same batches, same optimizer, same losses."""
    got = run(world, tmp_path / "a", "--lam", "1.0")
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"), "--batch-size", "4",
                              "--max-steps", "6", "--lr", "3e-3", "--warmup", "2"])
    torch.manual_seed(cfg.seed)
    model, tok = fusellm.load(world / "target")
    model.train()
    opt = train.make_optimizer(model, cfg, "cpu")
    fd = data.FusionData(world / "data", tokenizer=tok)
    order = train.window_order(data.shard_sizes(fd.manifest), cfg.seed, 0, cfg.shuffle_shards)
    for step in range(6):
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, 6, cfg)
        seqs = [[tok.bos_id] + fd.shard(s)[w]["tokens"] for s, w in order[step * 4:(step + 1) * 4]]
        T = max(len(s) for s in seqs) - 1
        x = torch.zeros(4, T, dtype=torch.long)
        y = torch.full((4, T), -100)
        for b, s in enumerate(seqs):
            x[b, :len(s) - 1], y[b, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
        logits = model(x)[..., :tok.vocab_size]
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size), y.reshape(-1), ignore_index=-100, reduction="sum")
        loss = loss / (y != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        assert got[step]["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
        assert got[step]["fusion"] is None


def test_window_order_is_one_permutation_of_all_windows_fixed_by_seed_and_epoch():
    """Every window once per epoch, shards interleaved (a batch is not a few neighbouring documents), and the
    same order for the same (seed, epoch), which is what a resumed run and paired seeds rely on. With blocks
    of 2 shards, the first 16 windows are exactly two whole shards, mixed."""
    sizes = [8, 8, 8, 5]
    for block in (0, 2):
        order = train.window_order(sizes, seed=0, epoch=0, block=block)
        assert sorted(order) == [(s, w) for s, n in enumerate(sizes) for w in range(n)]
        assert len({s for s, _ in order[:8]}) > 1
        assert order == train.window_order(sizes, seed=0, epoch=0, block=block)
        assert order != train.window_order(sizes, 0, 1, block) and order != train.window_order(sizes, 1, 0, block)
    first_block = train.window_order(sizes, seed=0, epoch=0, block=2)[:16]
    assert len({s for s, _ in first_block}) == 2 and len(set(first_block)) == 16


def test_fusion_data_keeps_the_last_shards_read_in_memory(world):
    fd = data.FusionData(world / "data", cache_shards=2)
    first, second = fd.shard(0), fd.shard(1)
    assert fd.shard(0) is first                   # still in memory, and now the most recently used
    fd.shard(2)                                   # pushes out shard 1, the least recently used
    assert fd.shard(0) is first and fd.shard(1) is not second


def test_training_loss_equals_dense_cross_entropies_of_the_fused_distribution(world):
    """The loop's loss equals lambda * CE + (1 - lambda) * the dense soft-label CE against fuse()'s P_t, term
    by term (the fused P_t itself is checked by hand in test_labels_in_place.py)."""
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"), "--fusion", "avgce"])
    model, tok = fusellm.load(world / "target")
    cands = train.StoredCandidates(cfg, tok)
    b = fusellm.collate(cands.items([(0, 0), (0, 1), (1, 0)]), cands.names, tok.bos_id, 5)
    logits = model(b.input_ids)[..., :tok.vocab_size]
    n_clm, n_fus = int((b.labels != -100).sum()), int(b.fusion_mask.sum())
    loss, clm, fus = fusellm.fusion_loss(logits, b, 0.7, n_clm, n_fus, cfg.fusion)
    ids, probs = fusellm.fuse(b, "avgce")
    P = torch.zeros(*ids.shape[:-1], tok.vocab_size).scatter_add_(-1, ids, probs)            # dense P_t
    soft = F.cross_entropy(logits.transpose(1, 2), P.transpose(1, 2), reduction="none")       # (B, T)
    expected_fus = (soft * b.fusion_mask).sum()
    expected_clm = F.cross_entropy(logits.reshape(-1, tok.vocab_size), b.labels.reshape(-1), reduction="sum")
    assert torch.allclose(fus, expected_fus, rtol=1e-5) and torch.allclose(clm, expected_clm, rtol=1e-5)
    assert torch.allclose(loss, 0.7 * expected_clm / n_clm + 0.3 * expected_fus / n_fus, rtol=1e-5)


def test_fusion_loss_falls(world, tmp_path):
    """With lambda = 0 the fusion loss is the whole objective: it falls."""
    m = run(world, tmp_path / "a", "--lam", "0.0", "--max-steps", "12")
    first, last = np.mean([r["fusion"] for r in m[:3]]), np.mean([r["fusion"] for r in m[-3:]])
    assert last < first - 0.05, (first, last)


def test_resume_after_a_kill_equals_an_uninterrupted_run(world, tmp_path, monkeypatch):
    whole = run(world, tmp_path / "whole", "--fusion", "avgce")
    real_save = train.save_checkpoint

    def save_then_die(path, model, opt, step, *a):
        real_save(path, model, opt, step, *a)
        if step == 3:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path / "split", "--fusion", "avgce")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
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
    with pytest.raises(train.TrainingError, match=r"step 4: the loss is nan .* Last good checkpoint: .*ckpt\.pt \(step 3\)"):
        run(world, tmp_path / "a")
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["step"] == 3


def test_data_for_another_target_tokenizer_is_refused(world, tmp_path):
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "source2"), "--out",
                              str(tmp_path / "a")])
    with pytest.raises(data.DataError, match="made for another target tokenizer"):
        train.train(cfg)


def test_exported_model_loads_here_and_in_transformers(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"), "--out",
                              str(tmp_path / "a"), "--batch-size", "4", "--max-steps", "2"])
    train.train(cfg)
    model, tok = fusellm.load(tmp_path / "a" / "final")
    assert tok.vocab_size == load_tokenizer(world / "target").vocab_size
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").eval()
    ids = torch.tensor([tok.encode("def f(x):\n    return x")])
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() < 1e-4
    trained = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)["model"]
    assert torch.equal(model.tok_embeddings.weight, trained["tok_embeddings.weight"])


def test_online_candidates_equal_the_stored_ones(world):
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"), "--online",
                              "--sources", str(world / "source"), "--topk", "5"])
    tok = load_tokenizer(world / "target")
    online = train.OnlineCandidates(cfg, tok, "cpu").items([(0, 0), (1, 2)])
    stored = train.StoredCandidates(cfg, tok).items([(0, 0), (1, 2)])
    for a, b in zip(online, stored):
        assert a["tokens"] == b["tokens"]
        assert (a["target"]["topk_ids"] == b["target"]["topk_ids"]).all()
        sa, sb = a["sources"]["source"], b["sources"]["source"]
        assert (np.asarray(sa["counts"]) == sb["counts"]).all() and (sa["ids"] == sb["ids"]).all()
        # stored log-probs are rounded twice, each time by at most half a step of 1/16 nat: the source's top-K
        # when data.py stores it, then the carried distribution, where ids the vocab map sends to one target
        # id have been summed (a sum of values each off by a factor e^(+-1/32) is off by at most that factor)
        assert np.abs(sa["logprobs"] - sb["logprobs"]).max() <= 2 / 32 + 1e-5


def test_online_training_runs(world, tmp_path):
    m = run(world, tmp_path / "a", "--online", "--sources", str(world / "source"), "--topk", "5", "--max-steps", "2")
    assert len(m) == 2 and all(np.isfinite(r["fusion"]) for r in m)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(out):
    """The weights of a run's last checkpoint: ckpt.pt, or FSDP's sharded ckpt/ converted to one file."""
    if (out / "ckpt").is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        dcp_to_torch_save(out / "ckpt", out / "ckpt_full.pt")
        return torch.load(out / "ckpt_full.pt", weights_only=False)["model"]
    return torch.load(out / "ckpt.pt", weights_only=False)["model"]


def launch(world, out, ranks, *extra, crash=False):
    """train.py for 6 steps with a checkpoint every 2, on one process or `torchrun` with `ranks`; crash: through
    tests/robustness/crash_after_checkpoint.py, every process killed once the step-2 checkpoint is saved."""
    args = ["--data", str(world / "data"), "--target", str(world / "target"), "--batch-size", "4", "--max-steps",
            "6", "--lr", "3e-3", "--warmup", "1", "--ckpt-every", "2", "--no-export", "--device", "cpu",
            "--out", str(out), *extra]
    script = str(ROOT / "tests" / "robustness" / "crash_after_checkpoint.py") if crash else str(ROOT / "train.py")
    run_with = [sys.executable, script] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), script]
    p = subprocess.run([*run_with, *args], env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=300)
    log = p.stdout.decode()
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
    # Adam turns last-bit differences in a gradient coordinate that nearly cancels (|g| near eps = 1e-8) into
    # update differences of up to a sizeable share of lr: seen 1.2e-5 on one embedding weight, 1e-6 elsewhere
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


@pytest.fixture(scope="module")
def one_process_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process_run")
    launch(world, out, 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process(world, one_process_run, tmp_path, mode):
    """DDP (or FSDP2) on two CPU processes, each with half of every global batch, trains like one process. Under
    FSDP2 each rank loads only its shard of the target and writes its shards of the checkpoint (ckpt/)."""
    launch(world, tmp_path, 2, *(["--fsdp"] if mode == "fsdp" else []))
    assert (tmp_path / "ckpt").is_dir() == (mode == "fsdp") and (tmp_path / "ckpt.pt").is_file() == (mode == "ddp")
    assert_same_run(one_process_run, tmp_path)


@pytest.mark.slow
def test_fsdp_killed_and_resumed_from_its_sharded_checkpoint_equals_one_process(world, one_process_run, tmp_path):
    """Both FSDP2 ranks killed as soon as the first sharded checkpoint (step 2) is saved, then resumed: the steps
    after it and the final weights are one uninterrupted process's. Catches a checkpoint without the Adam
    state or the step, shards read back by the wrong rank, and a half-written ckpt/ taken for a whole one."""
    launch(world, tmp_path, 2, "--fsdp", crash=True)
    assert sorted(metrics(tmp_path)) == [1, 2]
    assert "at step 2" in launch(world, tmp_path, 2, "--fsdp", "--resume")
    assert_same_run(one_process_run, tmp_path)


def test_no_arguments_run_the_demo_as_its_own_program(monkeypatch):
    """`python train.py` is the demo. It runs demo.py in a child process rather than importing demo, which
    imports train: train.py would otherwise be loaded twice, as __main__ and as train."""
    calls = []
    monkeypatch.setattr(train.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    with pytest.raises(SystemExit) as stop:
        train.main([])
    assert stop.value.code == 0 and calls == [[sys.executable, str(ROOT / "demo.py")]]


def test_a_typo_in_a_choice_is_refused_before_anything_loads(capsys):
    """`--fusion minc` stops at the command line with the choices, not after every model has loaded."""
    with pytest.raises(SystemExit):
        train.parse_config(["--data", "nowhere", "--target", "nowhere", "--fusion", "minc"])
    assert "invalid choice: 'minc'" in capsys.readouterr().err
    assert train.field_help()["lam"] == "lambda: weight of the CLM loss"          # --help says what it means


def test_paper_flag_sets_the_paper_settings_unless_overridden():
    cfg = train.parse_config(["--paper", "--lr", "2e-5"])
    assert (cfg.batch_size, cfg.warmup, cfg.lam, cfg.fusion, cfg.weight_decay) == (128, 0.008, 0.9, "mince", 0.1)
    assert cfg.lr == 2e-5


def test_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    assert all(f"--{f.name.replace('_', '-')}" in text for f in train.fields(train.TrainConfig))


def test_learning_rate_warms_up_then_follows_a_cosine():
    cfg = train.TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert train.lr_at(0, 110, cfg) == pytest.approx(0.1) and train.lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, 110, cfg) == pytest.approx(0.55)          # halfway: 0.1 + 0.9 * 0.5
    assert train.lr_at(110, 110, cfg) == pytest.approx(0.1)


def test_weight_decay_falls_on_matrices_only():
    """make_optimizer puts AdamW's weight decay on every matrix (the embedding, the attention and MLP projections,
    the untied output) and on nothing 1-D (norm weights, biases), as TrainConfig.weight_decay documents. Decay
    on a norm's weight pulls it towards 0 and shrinks the activations it scales; catches the groups swapped,
    norms or biases decayed, or the embedding left out."""
    args = fusellm.ModelArgs(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32,
                             qkv_bias=True, sliding_layers=(False, False))
    model = fusellm.Transformer(args)
    cfg = train.TrainConfig(weight_decay=0.1)
    opt = train.make_optimizer(model, cfg, "cpu")
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay.isdisjoint(no_decay) and decay | no_decay == {id(p) for p in named.values()}
    decayed = sorted(n for n, p in named.items() if id(p) in decay)
    kept = sorted(n for n, p in named.items() if id(p) in no_decay)
    assert "tok_embeddings.weight" in decayed and "output.weight" in decayed
    assert any("wq.weight" in n for n in decayed) and any("w1.weight" in n for n in decayed)
    assert kept and all(("norm" in n) or n.endswith(".bias") for n in kept), kept
    assert any("norm" in n for n in kept) and any(n.endswith(".bias") for n in kept)


def test_ce_per_byte_can_reverse_the_mince_choice():
    """Candidate A: 2.0 nats per token over 10 predictions of a 40-byte text = 0.5 nats per byte. Candidate B,
    with a finer tokenizer: 1.5 nats per token over 20 predictions = 0.75 per byte. Per token MinCE picks B;
    per byte, the comparison that does not depend on the tokenizer, it picks A."""
    assert data.ce_per_byte(2.0, 10, True, 40) == 0.5 and data.ce_per_byte(1.5, 21, False, 40) == 0.75
    item = {"tokens": [5, 6, 7],
            "target": {"topk_ids": np.zeros((3, 1), dtype=np.int64), "topk_logprobs": np.zeros((3, 1)), "ce": 2.0,
                       "ce_per_byte": 0.5},
            "sources": {"B": {"counts": np.zeros(3, dtype=np.int64), "ids": np.zeros(0, dtype=np.int64),
                              "logprobs": np.zeros(0), "ce": 1.5, "ce_per_byte": 0.75}}}
    per_token = fusellm.collate([item], ["target", "B"], 1, 1, "token").window_ce[:, 0]
    per_byte = fusellm.collate([item], ["target", "B"], 1, 1, "byte").window_ce[:, 0]
    assert per_token.argmin() == 1 and per_byte.argmin() == 0


def test_stored_ce_per_byte_matches_the_window_text(world):
    tok = load_tokenizer(world / "target")
    fd = data.FusionData(world / "data", tokenizer=tok)
    item = fd.shard(0)[0]
    n_bytes = len(item["text"].encode())
    assert item["target"]["ce_per_byte"] == pytest.approx(item["target"]["ce"] * len(item["tokens"]) / n_bytes)
    src_tok = load_tokenizer(world / "source")             # byte-level, no BOS: one prediction fewer
    n_src = len(src_tok.encode(item["text"]))
    assert item["sources"]["source"]["ce_per_byte"] == pytest.approx(
        item["sources"]["source"]["ce"] * (n_src - 1) / n_bytes, rel=1e-6)


def test_gradient_accumulation_equals_one_big_batch(world, tmp_path):
    """Two micro-batches of 2 windows train exactly like one batch of 4: the losses are normalised by the
    whole step's token counts, not per micro-batch."""
    whole = run(world, tmp_path / "a", "--batch-size", "4", "--max-steps", "3")
    accum = run(world, tmp_path / "b", "--batch-size", "4", "--micro-batch", "2", "--max-steps", "3")
    for a, b in zip(whole, accum):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["fusion"] == pytest.approx(b["fusion"], abs=1e-5)


@pytest.mark.parametrize("batch, micro, world, plan", [
    (128, 0, 8, (8, 2)),        # --paper on 8 GPUs: 16 windows each, 8 per forward pass, 2 accumulation steps
    (128, 2, 8, (2, 8)),        # the same 128 windows per step with smaller forward passes
    (128, 4, 1, (4, 32)),       # --paper on one GPU: still 128 windows per step
    (6, 0, 2, (3, 1)),          # a share of 3: 3 per forward pass
    (24, 0, 1, (8, 3)),         # the largest divisor of 24 up to 8
    (14, 0, 1, (7, 2)),         # 14 = 7 x 2: not 8
])
def test_the_global_batch_is_the_setting_and_the_rest_follows(batch, micro, world, plan):
    """Catches the old arithmetic, where --paper's 128 with --grad-accum 8 silently became 1,024 windows per
    step: processes x micro-batch x accumulation always equals --batch-size."""
    assert train.batch_plan(batch, micro, world) == plan
    assert world * plan[0] * plan[1] == batch


@pytest.mark.parametrize("batch, micro, world, says", [
    (128, 0, 3, "must split evenly over the 3 processes: use a multiple of 3, e.g. 126 or 129"),
    (128, 3, 8, "--micro-batch 3 must divide the 16 windows each of the 8 processes takes per step"),
    (0, 0, 1, "--batch-size 0"),
])
def test_a_batch_that_does_not_split_evenly_is_one_clear_error(batch, micro, world, says):
    with pytest.raises(train.TrainingError, match=re.escape(says)):
        train.batch_plan(batch, micro, world)


def test_a_steps_windows_do_not_depend_on_processes_or_micro_batches(world):
    """Step k takes the same windows whether one process runs 4 per pass or two processes run 1 per pass twice,
    and item i of a micro-batch goes to rank i % world. Catches a micro-batch that starts at
    micro x micro_batch instead of micro x micro_batch x world (ranks would repeat windows and skip others)."""
    cfg = train.TrainConfig(data=str(world / "data"), batch_size=4)
    echo = types.SimpleNamespace(items=lambda picked: picked)
    one = train.Batches(echo, cfg, 0, 1, micro=4)
    ranks = [train.Batches(echo, cfg, r, 2, micro=1) for r in (0, 1)]
    for step in range(5):
        split = [ranks[r].items(step, m) for m in range(2) for r in (0, 1)]
        assert split == [[w] for w in one.items(step, 0)]


def test_gradient_checkpointing_changes_memory_not_results(world, tmp_path):
    plain = run(world, tmp_path / "a", "--max-steps", "3")
    ckpt = run(world, tmp_path / "b", "--max-steps", "3", "--grad-checkpointing")
    assert [r["loss"] for r in plain] == pytest.approx([r["loss"] for r in ckpt], abs=1e-6)


def test_lambda_schedule_moves_linearly():
    cfg = train.TrainConfig(lam=0.9, lam_end=0.5)
    assert [train.lam_at(s, 5, cfg) for s in range(5)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert train.lam_at(3, 5, train.TrainConfig(lam=0.9)) == 0.9


def test_loss_curve_picture_is_drawn(world, tmp_path):
    pytest.importorskip("matplotlib")
    run(world, tmp_path / "a", "--max-steps", "2")
    assert train.plot_losses(tmp_path / "a") == tmp_path / "a" / "loss.png"
    assert (tmp_path / "a" / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(world, tmp_path):
    eager = run(world, tmp_path / "a", "--max-steps", "2")
    compiled = run(world, tmp_path / "b", "--max-steps", "2", "--compile")
    assert [r["loss"] for r in eager] == pytest.approx([r["loss"] for r in compiled], abs=1e-4)


@pytest.mark.parametrize("dtype, shard_bytes", [(torch.bfloat16, 12_000), (torch.float32, 5 * 2**30)])
def test_export_keeps_the_targets_dtype_and_shards(tmp_path, dtype, shard_bytes):
    """Training holds fp32 master weights; the exported model comes out as the target went in: a bf16 target in
    several shards gives bf16 in as many shards (not 2x the disk in fp32), an fp32 single file gives one fp32 file;
    other files in the folder (an optimizer.bin) do not count."""
    from conftest import llama
    model = llama(60, 0)
    fusellm.save_model(model.to(dtype), tmp_path / "target", max_shard_bytes=shard_bytes)
    shards_in = sorted(p.name for p in (tmp_path / "target").glob("*.safetensors"))
    (tmp_path / "target" / "optimizer.bin").write_bytes(bytes(2**20))      # not the model's: must not count
    trained = {k: v.float() + 1 for k, v in model.state_dict().items()}                       # fp32, changed
    train.export(model.args, trained, tmp_path / "target", tmp_path / "final")
    shards_out = sorted(p.name for p in (tmp_path / "final").glob("*.safetensors"))
    assert shards_out == shards_in and (len(shards_in) > 1) == (dtype == torch.bfloat16)
    back = fusellm.load_model(tmp_path / "final")
    assert {p.dtype for p in back.parameters()} == {dtype}
    assert torch.equal(back.tok_embeddings.weight, trained["tok_embeddings.weight"].to(dtype))
