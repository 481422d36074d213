"""Every stored or online distribution sits where the model produced it: checked against the models'
own logits and a fusion loss rebuilt by hand from the raw shards, never by comparing nanofuse with
itself."""
import json
import zlib

import numpy as np
import pytest
import torch

import align
import fusellm
import train
from extras.stored_candidates import StoredCandidates

STEP = 16                # uint8 code q stores log p = -q / 16 (data.py's format, written out here)
QUANT = 1 / (2 * STEP) + 1e-4     # a stored log-prob: within half a step of the model's (+ noise)
CLEAR = 1e-3             # top-1 and top-2 log-probs further apart than this: an unambiguous argmax


def logprobs(codes) -> np.ndarray:
    return -np.asarray(codes, dtype=np.float64) / STEP


def checksum(ids) -> int:
    return zlib.crc32(np.asarray(ids, dtype=np.int64).tobytes())


def read_shards(d, source="source") -> list[dict]:
    """Every window of a data folder, read straight from its files with json and numpy: the text,
    the target's and the source's stored rows (row r: the distribution after the model's own token
    r), and the source's aligned entries per target token (stored as padded rows (n, K): row r's
    entries are its first counts[r], the rest padding)."""
    m = json.loads((d / "manifest.json").read_text())
    for name in ("target", source):
        assert json.loads((d / "models" / name / "info.json").read_text())["logprob_bits"] == 8
    out = []
    for s in range(m["shards"]):
        texts = [json.loads(line)["text"] for line in
                 (d / "windows" / f"shard-{s:05d}.jsonl").read_text(encoding="utf-8").splitlines()]
        tz, sz = (np.load(d / "models" / n / f"shard-{s:05d}.npz") for n in ("target", source))
        az = np.load(d / "aligned" / source / f"shard-{s:05d}.npz")
        assert (az["target_offsets"] == tz["offsets"]).all()
        assert az["ids"].shape == az["logprobs"].shape == (len(az["counts"]), 5)
        for w, text in enumerate(texts):
            rows = {}
            for name, z in (("target", tz), (source, sz)):
                a, b = z["offsets"][w], z["offsets"][w + 1]
                rows[name] = {"ids": z["topk_ids"][a:b].astype(np.int64),
                              "lps": logprobs(z["topk_logprobs"][a:b]),
                              "ce": float(z["ce"][w]), "checksum": int(z["checksum"][w])}
            a, b = tz["offsets"][w], tz["offsets"][w + 1]
            entries = [(az["ids"][r, :az["counts"][r]].astype(np.int64),
                        logprobs(az["logprobs"][r, :az["counts"][r]])) for r in range(a, b)]
            out.append({"shard": s, "window": w, "text": text, "rows": rows, "aligned": entries,
                        "aligned_ce": float(az["ce"][w])})
    return out


@pytest.fixture(scope="module")
def stored(world):
    """The target model and tokenizer, every window read by hand, and fusellm.collate's batch of all
    of them (in the same order) with the target's logits on its input_ids."""
    model, tok = fusellm.load(world / "target")
    windows = read_shards(world / "data")
    for win in windows:
        win["tokens"] = tok.encode(win["text"])
        made_on = win["rows"]["target"]["checksum"]
        assert checksum(win["tokens"]) == made_on, "not the tokens the rows were made on"
    cfg = train.TrainConfig(data=str(world / "data"), target=str(world / "target"))
    cands = StoredCandidates(cfg, tok)
    assert cands.names == ["target", "source"]
    items = cands.items([(w["shard"], w["window"]) for w in windows])
    batch = fusellm.collate(items, cands.names, tok.bos_id, 5)
    with torch.no_grad():
        logits = model(batch.input_ids)[..., :tok.vocab_size]
    return {"model": model, "tok": tok, "windows": windows, "items": items, "batch": batch,
            "logits": logits, "cfg": cfg, "names": cands.names}


def assert_rows_are_the_models(ids, lps, logp, tol, where):
    """ids, lps (N, K): stored top-K rows; logp (N, V): the model's own log-softmax at the same N
    positions. Every stored log-prob is the model's for that id (within tol), the stored top-1 is
    the model's maximum, and where the maximum is unambiguous it is the argmax. where(i) names row i
    in a failure message."""
    ids, lps, logp = torch.as_tensor(ids), torch.as_tensor(lps, dtype=torch.float64), logp.double()
    model_lp = logp.gather(-1, ids)
    saturated = lps <= -255 / STEP        # codes saturate at 255 (p < 1.2e-7): only an upper bound
    bad = torch.where(saturated, model_lp > lps + tol, (model_lp - lps).abs() > tol).any(-1)
    assert not bad.any(), (f"{int(bad.sum())} of {len(bad)} rows: stored log-probs are not the "
                           f"model's, first at {where(int(bad.nonzero()[0]))}: stored "
                           f"{lps[bad][0].tolist()} ids {ids[bad][0].tolist()}, "
                           f"model {model_lp[bad][0].tolist()}")
    top2 = logp.topk(2, dim=-1).values
    not_max = model_lp[:, 0] < top2[:, 0] - 1e-4
    assert not not_max.any(), (f"{int(not_max.sum())} of {len(ids)} rows: stored top-1 is not the "
                               f"model's most probable token, first at "
                               f"{where(int(not_max.nonzero()[0]))}")
    clear = top2[:, 0] - top2[:, 1] > CLEAR
    assert clear.float().mean() > 0.9, \
        "too few unambiguous maxima for the argmax check to mean anything"
    assert (ids[clear, 0] == logp[clear].argmax(-1)).all()


def test_batch_inputs_labels_and_fusion_mask_follow_the_window_text(stored):
    """Catches labels or inputs shifted against each other, a missing BOS, the first text token
    dropped from the labels, or a fusion mask one position off (covering BOS's position, or the last
    real one left out)."""
    b, tok = stored["batch"], stored["tok"]
    nb = int(tok.bos_id is not None)
    x, y, mask = b.input_ids.numpy(), b.labels.numpy(), b.fusion_mask.numpy()
    for i, win in enumerate(stored["windows"]):
        t, n = win["tokens"], len(win["tokens"])
        seq = ([tok.bos_id] if nb else []) + t
        assert x[i, :len(seq) - 1].tolist() == seq[:-1], f"window {i}: inputs"
        assert y[i, :len(seq) - 1].tolist() == t[1 - nb:], \
            f"window {i}: labels are not the next tokens"
        assert (y[i, len(seq) - 1:] == -100).all(), f"window {i}: padding carries labels"
        real = np.flatnonzero(y[i] != -100)
        assert (y[i, real[:-1]] == x[i, real[:-1] + 1]).all(), \
            f"window {i}: label is not the next input"
        first = y[i, real[0]]
        assert first == (t[0] if nb else t[1]), \
            f"window {i}: first label {first} is not the first text token"
        expect = np.zeros(y.shape[1], dtype=bool)
        expect[nb:nb + n - 1] = True     # inputs holding text tokens 0..n-2: stored rows 0..n-2
        assert (mask[i] == expect).all(), f"window {i}: fused positions " \
                                          f"{np.flatnonzero(mask[i])[:3]}... expected " \
                                          f"{np.flatnonzero(expect)[:3]}..."


def test_stored_target_topk_is_the_target_models_own_distribution_at_every_fused_position(stored):
    """At each fused position the batch's target candidate is the target model's top-K there (model
    called here on input_ids). Catches the target's rows placed one position early or late by
    collate (a shifted `used` slice) or stored without the BOS offset by data.window_topk /
    compute_dists."""
    b, V = stored["batch"], stored["tok"].vocab_size
    mask = b.fusion_mask
    logp = torch.log_softmax(stored["logits"].double(), -1)[mask]                   # (N, V)
    where = mask.nonzero()
    assert len(where) == sum(len(w["tokens"]) - 1 for w in stored["windows"])
    assert_rows_are_the_models(b.cand_ids[0][mask], b.cand_logprobs[0][mask], logp, QUANT,
                               lambda r: f"window {int(where[r, 0])} position {int(where[r, 1])}")
    assert (b.cand_ids[0][mask] < V).all()


@pytest.mark.parametrize("name", ["target", "source"])
def test_stored_rows_are_each_models_distribution_after_each_of_its_tokens(world, stored, name):
    """Straight from models/<name>/shard-*.npz: row r of a window is the model's distribution after
    its token r (input [BOS] + tokens, BOS when the tokenizer has one), the last row included.
    Catches data.window_topk / compute_dists storing rows without the BOS offset (the distribution
    after BOS stored as row 0, and so on)."""
    model, tok = fusellm.load(world / name)
    nb = int(tok.bos_id is not None)
    ids, lps, logps = [], [], []
    windows = stored["windows"][::4]                       # every fourth window: enough, and fast
    seqs = []
    for win in windows:
        t = tok.encode(win["text"])
        assert checksum(t) == win["rows"][name]["checksum"]
        seqs.append(([tok.bos_id] if nb else []) + t)
    x = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[..., :tok.vocab_size].double(), -1)
    where = []
    for i, (win, s) in enumerate(zip(windows, seqs)):
        rows, n = win["rows"][name], len(s) - nb
        assert rows["ids"].shape == (n, 5)
        ids.append(rows["ids"])
        lps.append(rows["lps"])
        logps.append(logp[i, nb:nb + n])
        where += [f"shard {win['shard']} window {win['window']} row {r}" for r in range(n)]
    assert_rows_are_the_models(np.concatenate(ids), np.concatenate(lps), torch.cat(logps), QUANT,
                               where.__getitem__)


def bytes_after(tok, ids) -> np.ndarray:
    """For each token, how many bytes of the text follow it: a position in the text that two
    tokenizations share (counted from the end, so sentencepiece's dummy-prefix space at the start
    does not matter)."""
    n = np.array([len(tok.token_bytes(i)) for i in ids], dtype=np.int64)
    return np.cumsum(n[::-1])[::-1] - n


def test_aligned_source_rows_sit_at_the_target_token_ending_where_the_source_token_ends(world,
                                                                                        stored):
    """Where a target token and a source token end at the same byte of the text, both models have
    read the same prefix, and the source's aligned entries at that target token should be the
    source's stored row for that source token, carried through the vocab map. Catches align_source /
    transfer placing source rows one token early or late (every row would miss). With positions
    "exact" every carried row must agree. The paper's MinED DTW itself misplaces a few: a target
    'c','o','m','m' against a source ' co','m','m' pairs the first target 'm' with the second source
    'm' (cheaper than pairing 'o' with ' co'), so otherwise the bar is 95%, not 100% (the fixture
    gave about 98%)."""
    d = world / "data"
    t_tok = stored["tok"]
    s_tok = fusellm.load(world / "source")[1]
    settings = json.loads((d / "aligned" / "source" / "settings.json").read_text())
    assert settings["merge"] == "sum"
    vmap = align.vocab_map(s_tok, t_tok, settings["vocab_map"], cache_dir=d / "cache")
    carried = same_end = agree = 0
    misses = []
    for win in stored["windows"]:
        t, s = win["tokens"], s_tok.encode(win["text"])
        text_bytes = len(win["text"].encode("utf-8"))
        for tk, ids in ((t_tok, t), (s_tok, s)):
            # 1: a dummy-prefix space
            assert sum(len(tk.token_bytes(i)) for i in ids) - text_bytes in (0, 1)
        src_at = {int(r): i for i, r in enumerate(bytes_after(s_tok, s))}
        src_rows = win["rows"]["source"]
        for j, (r, (ids, lps)) in enumerate(zip(bytes_after(t_tok, t), win["aligned"])):
            if len(ids) == 0:
                continue                       # falls back to the one-hot: nothing carried over
            carried += 1
            i = src_at.get(int(r))
            if i is None:
                continue
            same_end += 1
            expect = {}
            src_probs = np.exp(src_rows["lps"][i]).tolist()
            for sid, p in zip(vmap[src_rows["ids"][i]].tolist(), src_probs):
                if sid >= 0:
                    expect[sid] = expect.get(sid, 0.0) + p
            got = dict(zip(ids.tolist(), lps.tolist()))
            # quantised twice (the source's row, then the merged log-prob): within one step
            close = all(abs(got[k] - np.log(expect[k])) <= 2 * QUANT for k in got)
            if set(got) == set(expect) and close:
                agree += 1
            elif len(misses) < 3:
                misses.append(f"shard {win['shard']} window {win['window']} target token {j} "
                              f"{t_tok.token_bytes(t[j])!r} / source token {i} "
                              f"{s_tok.token_bytes(s[i])!r}")
    assert carried > 1000 and same_end > 0.5 * carried, (carried, same_end)
    if settings.get("positions") == "exact":    # matched by where tokens end: every carried row
        assert agree == same_end == carried, f"{carried} rows carried, {same_end} at a shared " \
                                             f"end, {agree} agree: {misses}"
    assert agree >= 0.95 * same_end, f"only {agree} of {same_end} aligned rows come from the " \
                                     f"same prefix: {misses}"


def by_hand_window_losses(windows, logp, nb, winners):
    """The MinCE fusion loss of each window, from the rows read by hand: the winner's top-K at
    target token j renormalised to sum to one (a source's count-0 position: a one-hot on token j+1),
    scored by the target's log-softmax at input position j + nb; summed over j = 0..n-2. Plain
    loops, float64."""
    out = []
    for i, (win, winner) in enumerate(zip(windows, winners)):
        t, total = win["tokens"], 0.0
        for j in range(len(t) - 1):
            if winner == 0:
                ids, lps = win["rows"]["target"]["ids"][j], win["rows"]["target"]["lps"][j]
            else:
                ids, lps = win["aligned"][j]
                assert len(ids) <= 5
                if len(ids) == 0:
                    ids, lps = np.array([t[j + 1]]), np.zeros(1)
            p = np.exp(lps)
            p = p / p.sum()
            for k in range(len(ids)):
                total -= p[k] * logp[i, j + nb, ids[k]]
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("winner", ["by CE", "source forced"])
def test_fusion_loss_equals_a_mince_loss_rebuilt_by_hand_from_the_shards(stored, winner):
    """fusellm.fusion_loss on fusellm.collate's batch equals, window by window, a MinCE loss built
    here from the npz files with plain loops (the lowest window CE wins, the target on ties; with
    the source forced to win every window too, so every source row is scored). Catches collate
    putting any candidate's rows (a source's `pos + nb` or the target's `used`) one position off, a
    fallback one-hot on the current token instead of the next, the wrong MinCE winner, and top-K
    rows left unrenormalised."""
    tok, windows, cfg = stored["tok"], stored["windows"], stored["cfg"]
    nb = int(tok.bos_id is not None)
    items = stored["items"]
    if winner == "source forced":
        items = [{**it, "target": {**it["target"], "ce": 1e9}} for it in items]
        winners = [1] * len(windows)
    else:
        winners = [0 if w["rows"]["target"]["ce"] <= w["aligned_ce"] else 1 for w in windows]
        assert 0 in winners
    b = fusellm.collate(items, stored["names"], tok.bos_id, 5)
    assert torch.equal(b.input_ids, stored["batch"].input_ids)
    logits = stored["logits"]
    logp = torch.log_softmax(logits.double(), -1).numpy()
    want = by_hand_window_losses(windows, logp, nb, winners)
    clm_want = -sum(logp[i, p, label] for i, w in enumerate(windows)
                    for p, label in enumerate(w["tokens"][1 - nb:]))
    n_fus = sum(len(w["tokens"]) - 1 for w in windows)
    n_clm = sum(len(w["tokens"]) - 1 + nb for w in windows)
    def per_window(i):                                    # the batch cut down to window i
        def cut(k, v):
            return v[:, i:i + 1] if k.startswith("cand_") or k == "window_ce" else v[i:i + 1]
        return fusellm.Batch(**{k: cut(k, v) for k, v in vars(b).items()})

    for i, w in enumerate(windows):
        _, _, fus = fusellm.fusion_loss(logits[i:i + 1], per_window(i), 0.0, 1, 1, cfg.fusion)
        assert float(fus) == pytest.approx(want[i], rel=1e-5), \
            f"shard {w['shard']} window {w['window']} (winner {stored['names'][winners[i]]}): " \
            f"fusion_loss gives {float(fus):.6f}, by hand {want[i]:.6f}"
    loss, clm, fus = fusellm.fusion_loss(logits, b, 0.3, n_clm, n_fus, cfg.fusion)
    assert float(fus) == pytest.approx(want.sum(), rel=1e-5)
    assert float(clm) == pytest.approx(clm_want, rel=1e-5)
    assert float(loss) == pytest.approx(0.3 * clm_want / n_clm + 0.7 * want.sum() / n_fus, rel=1e-5)


def test_online_target_topk_is_the_target_models_own_distribution_at_every_fused_position(world,
                                                                                          stored):
    """The online path (extras.online.OnlineCandidates, the target run inside the loop) places the
    target's top-K like the stored one: at each fused position it is the model's top-K on the
    batch's input_ids, unquantised. Catches data.window_topk without the BOS offset, and collate's
    `used` shift, on the online path."""
    cfg = train.parse_config(["--data", str(world / "data"), "--target", str(world / "target"),
                              "--online", "--topk", "5"])
    tok = stored["tok"]
    from extras.online import OnlineCandidates
    cands = OnlineCandidates(cfg, tok, "cpu")
    chosen = [stored["windows"][k] for k in (0, len(stored["windows"]) // 2, -1)]
    picked = [(w["shard"], w["window"]) for w in chosen]
    b = fusellm.collate(cands.items(picked), cands.names, tok.bos_id, 5)
    with torch.no_grad():
        logp = torch.log_softmax(stored["model"](b.input_ids)[..., :tok.vocab_size].double(), -1)
    mask = b.fusion_mask
    where = mask.nonzero()
    assert len(where) == sum(len(w["tokens"]) - 1 for w in chosen)
    assert_rows_are_the_models(b.cand_ids[0][mask], b.cand_logprobs[0][mask], logp[mask], 1e-4,
                               lambda r: f"window {picked[int(where[r, 0])]} position "
                                         f"{int(where[r, 1])}")
