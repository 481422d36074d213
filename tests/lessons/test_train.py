"""The training loop, taught on a tiny data folder of its own (a sentencepiece-BPE Llama target, a
byte-level-BPE MPT source, both random; their fusion-ready data built by data.py here): lambda = 1
is plain CLM training, the loss is lambda * CE + (1 - lambda) * the soft-label CE against the fused
distribution, a step's windows come from one permutation per epoch whatever the processes and
micro-batches, micro-batches add up to one big batch, and the schedules and the optimizer's groups
are what TrainConfig says. Runs that are killed, resumed, spread over processes or fed bad input:
tests/robustness/test_train_runs.py; comparisons with other implementations:
tests/parity/test_train_parity.py."""
import copy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import fusellm
import train
from conftest import build_world, train_run
from extras.stored_candidates import StoredCandidates
from tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """This file's own small inputs (not the session's): a corpus of six standard-library files, a
    sentencepiece-BPE Llama target (400 tokens), a byte-level-BPE MPT source (520), all tiny and
    random, and their fusion-ready data (windows of 200 tokens, 4 to a shard, top-5): tiny /
    "data"."""
    return build_world(tmp_path_factory.mktemp("train_lessons"))


run = train_run


def test_lambda_one_is_plain_clm_training(tiny, tmp_path):
    """The loop at lambda = 1 against a plain CLM loop written here: same batches, same optimizer,
    same losses."""
    got = run(tiny, tmp_path / "a", "--lam", "1.0")
    cfg = train.parse_config(["--data", str(tiny / "data"), "--target", str(tiny / "target"),
                              "--batch-size", "4", "--max-steps", "6", "--lr", "3e-3", "--warmup",
                              "2"])
    torch.manual_seed(cfg.seed)
    model, tok = fusellm.load(tiny / "target")
    model.train()
    opt = train.make_optimizer(model, cfg, "cpu")
    fd = data.FusionData(tiny / "data", tokenizer=tok)
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
        loss = F.cross_entropy(logits.reshape(-1, tok.vocab_size), y.reshape(-1), ignore_index=-100,
                               reduction="sum")
        loss = loss / (y != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad()
        assert got[step]["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
        assert got[step]["fusion"] is None


def test_window_order_is_one_permutation_of_all_windows_fixed_by_seed_and_epoch():
    """Every window once per epoch, shards interleaved (a batch is not a few neighbouring
    documents), and the same order for the same (seed, epoch), which is what a resumed run and
    paired seeds rely on. With blocks of 2 shards, the first 16 windows are exactly two whole
    shards, mixed."""
    sizes = [8, 8, 8, 5]
    for block in (0, 2):
        order = train.window_order(sizes, seed=0, epoch=0, block=block)
        assert sorted(order) == [(s, w) for s, n in enumerate(sizes) for w in range(n)]
        assert len({s for s, _ in order[:8]}) > 1
        assert order == train.window_order(sizes, seed=0, epoch=0, block=block)
        assert order != train.window_order(sizes, 0, 1, block)
        assert order != train.window_order(sizes, 1, 0, block)
    first_block = train.window_order(sizes, seed=0, epoch=0, block=2)[:16]
    assert len({s for s, _ in first_block}) == 2 and len(set(first_block)) == 16


def test_fusion_data_keeps_the_last_shards_read_in_memory(tiny):
    fd = data.FusionData(tiny / "data", cache_shards=2)
    first, second = fd.shard(0), fd.shard(1)
    assert fd.shard(0) is first                   # still in memory, and now the most recently used
    fd.shard(2)                                   # pushes out shard 1, the least recently used
    assert fd.shard(0) is first and fd.shard(1) is not second


def test_training_loss_equals_dense_cross_entropies_of_the_fused_distribution(tiny):
    """The loop's loss equals lambda * CE + (1 - lambda) * the dense soft-label CE against fuse()'s
    P_t, term by term (the fused P_t itself is checked by hand in test_labels_in_place.py)."""
    cfg = train.parse_config(["--data", str(tiny / "data"), "--target", str(tiny / "target"),
                              "--fusion", "avgce"])
    model, tok = fusellm.load(tiny / "target")
    cands = StoredCandidates(cfg, tok)
    b = fusellm.collate(cands.items([(0, 0), (0, 1), (1, 0)]), cands.names, tok.bos_id, 5)
    logits = model(b.input_ids)[..., :tok.vocab_size]
    n_clm, n_fus = int((b.labels != -100).sum()), int(b.fusion_mask.sum())
    loss, clm, fus = fusellm.fusion_loss(logits, b, 0.7, n_clm, n_fus, cfg.fusion)
    ids, probs = fusellm.fuse(b, "avgce")
    P = torch.zeros(*ids.shape[:-1], tok.vocab_size).scatter_add_(-1, ids, probs)      # dense P_t
    soft = F.cross_entropy(logits.transpose(1, 2), P.transpose(1, 2), reduction="none")  # (B, T)
    expected_fus = (soft * b.fusion_mask).sum()
    expected_clm = F.cross_entropy(logits.reshape(-1, tok.vocab_size), b.labels.reshape(-1),
                                   reduction="sum")
    assert torch.allclose(fus, expected_fus, rtol=1e-5)
    assert torch.allclose(clm, expected_clm, rtol=1e-5)
    assert torch.allclose(loss, 0.7 * expected_clm / n_clm + 0.3 * expected_fus / n_fus, rtol=1e-5)


def test_fusion_loss_falls(tiny, tmp_path):
    """With lambda = 0 the fusion loss is the whole objective: it falls."""
    m = run(tiny, tmp_path / "a", "--lam", "0.0", "--max-steps", "12")
    first, last = np.mean([r["fusion"] for r in m[:3]]), np.mean([r["fusion"] for r in m[-3:]])
    assert last < first - 0.05, (first, last)


def test_gradient_accumulation_equals_one_big_batch(tiny, tmp_path):
    """Two micro-batches of 2 windows train exactly like one batch of 4: the losses are normalised
    by the whole step's token counts, not per micro-batch."""
    whole = run(tiny, tmp_path / "a", "--batch-size", "4", "--max-steps", "3")
    accum = run(tiny, tmp_path / "b", "--batch-size", "4", "--micro-batch", "2", "--max-steps", "3")
    for a, b in zip(whole, accum):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["fusion"] == pytest.approx(b["fusion"], abs=1e-5)


@pytest.mark.parametrize("batch, micro, world, plan", [
    (128, 0, 8, (8, 2)),    # --paper on 8 GPUs: 16 windows each, 8 per pass, 2 accumulation steps
    (128, 2, 8, (2, 8)),        # the same 128 windows per step with smaller forward passes
    (128, 4, 1, (4, 32)),       # --paper on one GPU: still 128 windows per step
    (6, 0, 2, (3, 1)),          # a share of 3: 3 per forward pass
    (24, 0, 1, (8, 3)),         # the largest divisor of 24 up to 8
    (14, 0, 1, (7, 2)),         # 14 = 7 x 2: not 8
    (8, 4, 2, (4, 1)),          # a micro-batch of a process's whole share
])
def test_the_global_batch_is_the_setting_and_the_rest_follows(batch, micro, world, plan):
    """Catches the old arithmetic, where --paper's 128 with --grad-accum 8 silently became 1,024
    windows per step: processes x micro-batch x accumulation always equals --batch-size."""
    assert train.batch_plan(batch, micro, world) == plan
    assert world * plan[0] * plan[1] == batch


def test_a_steps_windows_do_not_depend_on_processes_or_micro_batches(tiny):
    """Step k takes the same windows whether one process runs 4 per pass or two processes run 1 per
    pass twice, and item i of a micro-batch goes to rank i % world. Catches a micro-batch that
    starts at micro x micro_batch instead of micro x micro_batch x world (ranks would repeat windows
    and skip others)."""
    cfg = train.TrainConfig(data=str(tiny / "data"), batch_size=4)
    echo = types.SimpleNamespace(items=lambda picked: picked)
    one = train.Batches(echo, cfg, 0, 1, micro=4)
    ranks = [train.Batches(echo, cfg, r, 2, micro=1) for r in (0, 1)]
    for step in range(5):
        split = [ranks[r].items(step, m) for m in range(2) for r in (0, 1)]
        assert split == [[w] for w in one.items(step, 0)]


def test_learning_rate_warms_up_then_follows_a_cosine():
    cfg = train.TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert train.lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert train.lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert train.lr_at(60, 110, cfg) == pytest.approx(0.55)          # halfway: 0.1 + 0.9 * 0.5
    assert train.lr_at(110, 110, cfg) == pytest.approx(0.1)


def test_lambda_schedule_moves_linearly():
    cfg = train.TrainConfig(lam=0.9, lam_end=0.5)
    assert [train.lam_at(s, 5, cfg) for s in range(5)] == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5])
    assert train.lam_at(3, 5, train.TrainConfig(lam=0.9)) == 0.9


def test_weight_decay_falls_on_matrices_only():
    """make_optimizer puts AdamW's weight decay on every matrix (the embedding, the attention and
    MLP projections, the untied output) and on nothing 1-D (norm weights, biases), as
    TrainConfig.weight_decay documents. Decay on a norm's weight pulls it towards 0 and shrinks the
    activations it scales; catches the groups swapped, norms or biases decayed, or the embedding
    left out."""
    args = fusellm.ModelArgs(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                             hidden_dim=32, qkv_bias=True, sliding_layers=(False, False))
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


def test_paper_flag_sets_the_paper_settings_unless_overridden():
    cfg = train.parse_config(["--paper", "--lr", "2e-5"])
    paper = (128, 0.008, 0.9, "mince", 0.1)
    assert (cfg.batch_size, cfg.warmup, cfg.lam, cfg.fusion, cfg.weight_decay) == paper
    assert cfg.lr == 2e-5


def test_ce_per_byte_can_reverse_the_mince_choice():
    """Candidate A: 2.0 nats per token over 10 predictions of a 40-byte text = 0.5 nats per byte.
    Candidate B, with a finer tokenizer: 1.5 nats per token over 20 predictions = 0.75 per byte. Per
    token MinCE picks B; per byte, the comparison that does not depend on the tokenizer, it picks
    A."""
    assert data.ce_per_byte(2.0, 10, True, 40) == 0.5
    assert data.ce_per_byte(1.5, 21, False, 40) == 0.75
    item = {"tokens": [5, 6, 7],
            "target": {"topk_ids": np.zeros((3, 1), dtype=np.int64),
                       "topk_logprobs": np.zeros((3, 1)), "ce": 2.0, "ce_per_byte": 0.5},
            "sources": {"B": {"counts": np.zeros(3, dtype=np.int64),
                              "ids": np.zeros((3, 1), dtype=np.int64), "logprobs": np.zeros((3, 1)),
                              "ce": 1.5, "ce_per_byte": 0.75}}}
    per_token = fusellm.collate([item], ["target", "B"], 1, 1, "token").window_ce[:, 0]
    per_byte = fusellm.collate([item], ["target", "B"], 1, 1, "byte").window_ce[:, 0]
    assert per_token.argmin() == 1 and per_byte.argmin() == 0


def test_stored_ce_per_byte_matches_the_window_text(tiny):
    tok = load_tokenizer(tiny / "target")
    fd = data.FusionData(tiny / "data", tokenizer=tok)
    item = fd.shard(0)[0]
    n_bytes = len(item["text"].encode())
    per_byte = item["target"]["ce"] * len(item["tokens"]) / n_bytes
    assert item["target"]["ce_per_byte"] == pytest.approx(per_byte)
    src_tok = load_tokenizer(tiny / "source")             # byte-level, no BOS: one prediction fewer
    n_src = len(src_tok.encode(item["text"]))
    assert item["sources"]["source"]["ce_per_byte"] == pytest.approx(
        item["sources"]["source"]["ce"] * (n_src - 1) / n_bytes, rel=1e-6)


def test_ce_per_byte_of_a_target_without_bos_counts_one_prediction_fewer(tiny):
    """The source here (byte-level, no BOS, like GPT-2 or Qwen2) read as the target: without BOS the
    first of its n tokens is not predicted, so its CE per byte is the mean CE times n - 1
    predictions over the window's bytes, whether the model is read as a source or as the target.
    Catches the target's CE per byte counted with BOS whatever its tokenizer (n predictions)."""
    fd = data.FusionData(tiny / "data", target="source", sources=[])
    item = fd.shard(0)[0]
    n = len(load_tokenizer(tiny / "source").encode(item["text"]))
    assert len(item["target"]["topk_ids"]) == n
    assert item["target"]["ce_per_byte"] == pytest.approx(
        item["target"]["ce"] * (n - 1) / len(item["text"].encode()), rel=1e-6)


def random_fusion_batch(lengths=(6, 4, 5, 3), V=40, C=2, K=3, seed=0):
    """A hand-built fusellm.Batch of len(lengths) windows, padded to the longest: window b is
    `lengths[b]` tokens with its BOS (lengths[b] - 1 labelled positions, the first of them BOS ->
    first, outside the fusion mask); C candidates with random top-K on the mask, some falling
    back."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths) - 1
    labels = torch.full((B, T), -100)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        labels[b, :n - 1] = torch.randint(2, V, (n - 1,), generator=g)
        mask[b, 1:n - 1] = True
    x = torch.cat([torch.ones(B, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    lp = torch.log_softmax(torch.randn(C, B, T, K, generator=g), -1).masked_fill(~mask[..., None],
                                                                                  -torch.inf)
    source = (torch.arange(C) > 0)[:, None, None]                   # the target never falls back
    fallback = (torch.rand(C, B, T, generator=g) < 0.3) & mask & source
    return fusellm.Batch(input_ids=x, labels=labels, fusion_mask=mask,
                         cand_ids=torch.randint(0, V, (C, B, T, K), generator=g), cand_logprobs=lp,
                         cand_fallback=fallback, window_ce=torch.rand(C, B, generator=g) * 3)


class RecordingOptimizer:
    """Stands in for AdamW: keeps each step's gradients instead of applying them (AdamW and
    clipping would hide a uniform scale of the gradient)."""
    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{"lr": 0.0}], []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.model.parameters()])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_a_steps_gradient_is_that_of_the_mean_loss_however_it_is_split(lam):
    """One step of 4 windows run as 1, 2 or 4 micro-batches: the gradient run_steps hands the
    optimizer, and the grad_norm it records, equal the gradient of the plain mean loss over the 4
    windows, lambda * mean CE + (1 - lambda) * mean soft-label CE against fuse()'s P_t on the mask,
    computed here by torch's dense cross-entropies. Windows of different lengths give micro-batches
    different token counts. Catches a loss multiplied by the number of micro-batches, or divided by
    each micro-batch's own token count: AdamW and clipping hide such a scale, so comparing the
    losses (test_gradient_accumulation_equals_one_big_batch) cannot see it. The record's clm,
    fusion and loss are those means too (catches the logged fusion term divided by the CLM's token
    count instead of the fusion mask's). The model has 8 spare rows past the tokenizer's V, which
    take no part (catches the logits not cut to [..., :V]: the spare rows in every softmax)."""
    V = 40
    args = fusellm.ModelArgs(vocab_size=V + 8, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                             head_dim=8, hidden_dim=32, qkv_bias=False, sliding_layers=(False,))
    torch.manual_seed(0)                  # 8 spare rows of the checkpoint past the tokenizer's V
    model = fusellm.Transformer(args)
    b = random_fusion_batch(V=V)
    cfg = train.TrainConfig(lam=lam, grad_clip=1e9, warmup=0, fusion="avgce")

    reference = copy.deepcopy(model)
    logits = reference(b.input_ids)[..., :V]
    clm = F.cross_entropy(logits.transpose(1, 2), b.labels, ignore_index=-100)     # the mean
    P = torch.zeros(*logits.shape).scatter_add_(-1, *fusellm.fuse(b, "avgce"))     # dense P_t
    soft = F.cross_entropy(logits.transpose(1, 2), P.transpose(1, 2), reduction="none")
    fus = (soft * b.fusion_mask).sum() / b.fusion_mask.sum()
    (lam * clm + (1 - lam) * fus).backward()
    expected = [p.grad for p in reference.parameters()]
    expected_norm = torch.cat([g.flatten() for g in expected]).norm()

    def part(rows):
        return fusellm.Batch(b.input_ids[rows], b.labels[rows], b.fusion_mask[rows],
                             b.cand_ids[:, rows], b.cand_logprobs[:, rows],
                             b.cand_fallback[:, rows], b.window_ce[:, rows])

    for n_micro in (1, 2, 4):
        m = copy.deepcopy(model)
        opt = RecordingOptimizer(m)
        size = 4 // n_micro
        batches = [part(slice(i * size, (i + 1) * size)) for i in range(n_micro)]
        (rec,) = list(train.run_steps(m, opt, cfg, 1, lambda step: batches, "cpu", V, 1))
        assert rec["grad_norm"] == pytest.approx(float(expected_norm), rel=1e-4), n_micro
        assert rec["clm"] == pytest.approx(clm.item(), rel=1e-5), n_micro
        assert rec["loss"] == pytest.approx(lam * clm.item() + (1 - lam) * fus.item(), rel=1e-5)
        if lam < 1:
            assert rec["fusion"] == pytest.approx(fus.item(), rel=1e-5), n_micro
        for got, want in zip(opt.grads[0], expected):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-7), n_micro


class SyncRecordingModel(torch.nn.Module):
    """A model with DDP's no_sync(), recording for each forward whether it ran inside it (DDP then
    keeps that micro-batch's gradients local, without averaging them over the processes)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.local, self.calls = model, False, []

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def inside():
            self.local = True
            try:
                yield
            finally:
                self.local = False
        return inside()

    def forward(self, x):
        self.calls.append(self.local)
        return self.model(x)


def test_only_the_last_micro_batch_averages_gradients_over_the_processes():
    """Under DDP, a step's micro-batches but the last run inside model.no_sync(): their gradients
    add up locally, and the last backward averages the sum over the processes once. Worked: 3
    micro-batches a step, 2 steps -> inside, inside, outside; inside, inside, outside. Catches the
    flag on the wrong micro-batch (`last = i == 0`: the first averaged, the others never, so the
    processes' weights drift apart), which one process (no no_sync) cannot show."""
    V = 40
    args = fusellm.ModelArgs(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                             hidden_dim=32, sliding_layers=(False,))
    model = SyncRecordingModel(fusellm.Transformer(args))
    b = random_fusion_batch(V=V)
    cfg = train.TrainConfig(lam=0.5, warmup=0, fusion="avgce")
    opt = RecordingOptimizer(model)
    list(train.run_steps(model, opt, cfg, 2, lambda step: [b, b, b], "cpu", V))
    assert model.calls == [True, True, False] * 2


def test_an_infinite_loss_stops_before_the_update():
    """A loss of +inf (a label whose logit is -inf: log p = -inf) stops the loop with LossNotFinite
    before the optimizer steps, as a NaN does (tests/robustness/test_train_runs.py). Catches the
    check written as isnan(loss), which lets +inf through to AdamW (NaN weights from then on)."""
    V = 40
    args = fusellm.ModelArgs(vocab_size=V, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                             hidden_dim=32, sliding_layers=(False,))

    class NoSeven(torch.nn.Module):                       # token 7 can never be predicted
        def __init__(self):
            super().__init__()
            self.model = fusellm.Transformer(args)

        def forward(self, x):
            z = self.model(x)
            return z.masked_fill(torch.arange(z.shape[-1]) == 7, -float("inf"))

    model, b = NoSeven(), random_fusion_batch(V=V)
    b.labels[0, 0] = 7
    opt = RecordingOptimizer(model)
    with pytest.raises(train.LossNotFinite, match="inf"):
        list(train.run_steps(model, opt, train.TrainConfig(lam=1.0, warmup=0), 1, lambda s: [b],
                             "cpu", V))
    assert opt.grads == []                                # no update


@pytest.mark.parametrize("loss, online", [("uld", False), ("gold", False), ("xtoken", False),
                                          ("gold", True)])
def test_each_successor_loss_trains_and_replaces_the_fusion_term(tiny, tmp_path, loss, online):
    """train.py --fusion-loss uld | gold | xtoken (extras/successors.py), stored and --online: two
    steps with finite losses, and the first step's fusion term is the successor's, not the CE
    (same windows, same starting weights): ULD is a sorted L1, in [0, 2]; X-Token's (the CE
    against P_t spread over its prefixes) and GOLD's differ from it. GOLD's exact ids on these two
    tokenizers (sentencepiece target, byte-level BPE source) are some but not all. Catches the
    choice not reaching fusellm.fusion_loss (the CE logged under another name), a table built for
    another vocabulary (an index error), a NaN."""
    extra = ("--online", "--sources", str(tiny / "source"), "--topk", "5") if online else ()
    ce = run(tiny, tmp_path / "ce", "--max-steps", "2", *extra)
    got = run(tiny, tmp_path / loss, "--max-steps", "2", "--fusion-loss", loss, *extra)
    assert len(got) == 2 and all(np.isfinite([r["loss"], r["fusion"]]).all() for r in got)
    first, ce_first = got[0]["fusion"], ce[0]["fusion"]
    assert first != pytest.approx(ce_first, rel=1e-3)
    if loss == "uld":
        assert 0 <= first <= 2
    if loss == "gold" and not online:
        from extras.successors import distance_for
        cfg = train.parse_config(["--data", str(tiny / "data"), "--target", str(tiny / "target"),
                                  "--fusion-loss", "gold"])
        exact, = distance_for(cfg).tables                                # (V,) bool
        assert len(exact) == 400 and 0 < int(exact.sum()) < 400
