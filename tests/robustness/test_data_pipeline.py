"""The data pipeline on the tiny world (tests/conftest.py): shards on disk, resumed after a kill,
split between ranks (torchrun) with the same bytes as one process, adding a source later, the
alignment presets, and bad input ending in one clear error with nothing half-written. The lessons
of each stage are in tests/lessons/test_windows_and_dists.py."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import align
import data
import fusellm
from conftest import ROOT, SEQ, marked, whole   # the `world` fixture comes from conftest
from extras import align_stats, data_cli, storage
from tokenizer import load_tokenizer


def tree(path):
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def differences(ours: dict, theirs: dict) -> dict:
    """What differs between two trees, by file name (a failure names the files, not their bytes)."""
    return {"only ours": sorted(set(ours) - set(theirs)),
            "only theirs": sorted(set(theirs) - set(ours)),
            "different": sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])}


NONE = {"only ours": [], "only theirs": [], "different": []}


@pytest.fixture(scope="module")
def pipeline(world):
    return world / "data"


# --- corpus and windows --------------------------------------------------------------------------

def test_windows_are_sharded_with_counts_in_the_manifest(pipeline):
    m = data.load_manifest(pipeline)
    assert m["complete"] and m["shards"] == len(list((pipeline / "windows").glob("shard-*.jsonl")))
    assert m["shards"] == -(-m["windows"] // 4) and m["corpus_stats"]["documents"] == 6
    # manifest.json's keys in the order data folders have always had them (the file's bytes)
    assert list(m) == ["complete", "corpus", "target", "sources", "seq_len", "shard_windows",
                       "shards", "windows", "documents_split", "target_tokenizer", "corpus_stats"]


# --- distributions -------------------------------------------------------------------------------

def test_storage_is_under_a_quarter_of_the_official_format(pipeline):
    """The official format is about 120 bytes per token per model (fp16 logits + int64 ids,
    padded). A model's distributions, and a source's aligned ones (padded rows: data.padded), stay
    within 30 bytes per target token."""
    files = list((pipeline / "models" / "target").glob("shard-*.npz"))
    tokens = sum(int(np.load(f)["offsets"][-1]) for f in files)
    assert sum(f.stat().st_size for f in files) / tokens <= 30
    aligned = list((pipeline / "aligned" / "source").glob("shard-*.npz"))
    assert sum(len(np.load(f)["counts"]) for f in aligned) == tokens
    assert all(np.load(f)["ids"].shape[1] == 5 for f in aligned)       # padded rows, K = 5
    assert sum(f.stat().st_size for f in aligned) / tokens <= 30


def test_resume_after_a_kill_gives_byte_identical_shards(world, pipeline, tmp_path):
    shutil.copytree(pipeline / "windows", tmp_path / "windows")
    shutil.copy(pipeline / "manifest.json", tmp_path)
    data.compute_dists(tmp_path, world / "source", "source", topk=5, batch_size=3, quiet=True)
    last = sorted((tmp_path / "models" / "source").glob("shard-*.npz"))[-1]
    last.unlink()                                         # killed while writing the last shard:
    (last.parent / f".{last.name}.tmp999").write_bytes(b"partial")    # only its temporary remains
    shards = tmp_path / "models" / "source"
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    data.compute_dists(tmp_path, world / "source", "source", topk=5, batch_size=3, quiet=True)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    kept = {k: v for k, v in after.items() if k in before}
    assert kept == before, "finished shards are not redone"
    theirs = tree(pipeline / "models" / "source")
    ours = tree(tmp_path / "models" / "source")
    assert differences({k: v for k, v in ours.items() if not k.startswith(".")}, theirs) == NONE


class Killed(BaseException):
    """A kill, simulated: raised right after a file is written, so nothing after it runs."""


def test_a_shard_killed_while_written_leaves_no_file_under_its_name(tmp_path, monkeypatch):
    """A kill while a shard's second array is written leaves nothing at shard-00000.npz (a rerun
    redoes a shard that is not there, and skips one that is). Catches save_npz writing straight to
    the real name: a half-written zip there, skipped on resume and refused only when read."""
    write_array = np.lib.format.write_array

    def killed_at_the_second(f, arr, **kw):
        if arr.size == 3:
            raise KeyboardInterrupt("killed")
        write_array(f, arr, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        storage.save_npz(tmp_path / "shard-00000.npz", offsets=np.zeros(2), ce=np.zeros(3))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("killed_after", ["save_shard_stats", "save_aligned"])
def test_align_killed_between_a_shards_two_files_resumes_to_the_same_folder(
        pipeline, tmp_path, monkeypatch, killed_after):
    """The align stage writes two files per shard, its statistics and the shard; the shard's file
    marks it done. Killed right after either one is written, a rerun ends with the folder (and the
    merged diagnostics) of a run never killed. Catches the shard written first: a kill between the
    two left a shard without its statistics, which the rerun skipped, and diagnostics.json counted
    one shard less (found by the torchrun kill test, once in a few runs, under load)."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    shutil.rmtree(d / "aligned" / "source")
    owner = align_stats if killed_after == "save_shard_stats" else storage
    write = getattr(owner, killed_after)

    def write_then_die(*args, **kwargs):
        write(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(owner, killed_after, write_then_die)
    with pytest.raises(Killed):
        data.align_source(d, "source", quiet=True)
    monkeypatch.undo()
    data.align_source(d, "source", quiet=True)
    assert differences(tree(d / "aligned"), tree(pipeline / "aligned")) == NONE


def test_a_shard_without_its_statistics_is_named(pipeline, tmp_path):
    """A folder an older version left with a shard but not its statistics: the align stage names
    the shard and the fix, instead of merging diagnostics that miss a shard."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    (d / "aligned" / "source" / "stats-00001.json").unlink()
    shard = d / "aligned" / "source" / "shard-00001.npz"
    with pytest.raises(ValueError) as e:
        data.align_source(d, "source", quiet=True)
    assert str(e.value) == (f"{shard} has no statistics beside it (a run killed between the two "
                            f"files): delete shard-00001.npz and run the align stage again")


def shard_with(path, **change):
    """Rewrite the .npz shard at `path` with some of its arrays changed by `change`'s functions."""
    z = dict(np.load(path))
    storage.save_npz(path, **{k: change[k](v) if k in change else v for k, v in z.items()})


def test_a_models_shard_of_fewer_windows_than_its_windows_shard_is_refused(pipeline, tmp_path):
    """A target shard holding its windows shard's first 3 windows of 4, whole and self-consistent
    (as one kept from before the corpus grew: `windows` rebuilt, the stored distributions kept)
    is refused naming both counts. Catches read_dists's window-count check dropped: the first
    windows' checksums still match, and the fourth window's was an IndexError."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    path = d / "models" / "target" / "shard-00000.npz"
    n = int(np.load(path)["offsets"][3])                     # the rows of the first 3 windows
    shard_with(path, offsets=lambda o: o[:4], topk_ids=lambda a: a[:n],
               topk_logprobs=lambda a: a[:n], ce=lambda a: a[:3], checksum=lambda a: a[:3])
    with pytest.raises(data.DataError, match="holds 3 windows, its windows shard 4"):
        data.FusionData(d).shard(0)


def test_window_offsets_that_do_not_start_at_row_0_are_refused(pipeline, tmp_path):
    """A target shard whose first offset is 1 instead of 0 (damaged: its first window would lose
    its first row, and every row of it shift by one position) is refused as arrays that do not fit
    together. Catches offsets_fit's `o[0] == 0` dropped."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    shard_with(d / "models" / "target" / "shard-00000.npz",
               offsets=lambda o: np.where(np.arange(len(o)) == 0, 1, o))
    with pytest.raises(data.DataError, match="do not fit together"):
        data.FusionData(d).shard(0)


def test_aligned_rows_cut_at_other_target_offsets_are_refused(pipeline, tmp_path):
    """An aligned shard whose target offsets put one row of window 0 into window 1 (its arrays
    still fit together) is refused: each window's rows must sit on that window's target tokens.
    Catches read_aligned's comparison with the target shard's offsets dropped."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    shard_with(d / "aligned" / "source" / "shard-00000.npz",
               target_offsets=lambda t: np.where(np.arange(len(t)) == 1, t - 1, t))
    with pytest.raises(data.DataError, match="aligned from other distributions"):
        data.FusionData(d).shard(0)


def test_ranks_split_the_shards_and_together_equal_one_process(world, pipeline, tmp_path,
                                                               monkeypatch):
    shutil.copytree(pipeline / "windows", tmp_path / "windows")
    shutil.copy(pipeline / "manifest.json", tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        data.compute_dists(tmp_path, world / "target", "target", topk=5, batch_size=3, quiet=True)
        if rank == "0":
            done = sorted(p.name for p in (tmp_path / "models" / "target").glob("shard-*.npz"))
            n_shards = data.load_manifest(tmp_path)["shards"]
            assert done == [f"shard-{s:05d}.npz" for s in range(0, n_shards, 2)]
    assert differences(tree(tmp_path / "models" / "target"),
                       tree(pipeline / "models" / "target")) == NONE


# --- sampled labels (--sample N, extras/sampled_labels.py) ----------------------------------------

@pytest.fixture(scope="module")
def sampled(world, pipeline, tmp_path_factory):
    """The world's windows with the target's and the source's labels drawn, 12 per token
    (`data.py dists --sample 12`), and the source aligned (nanofuse: merge "sum")."""
    d = tmp_path_factory.mktemp("sampled") / "d"
    d.mkdir()
    shutil.copytree(pipeline / "windows", d / "windows")
    shutil.copy(pipeline / "manifest.json", d)
    for name in ("target", "source"):
        data_cli.main(["dists", "--data", str(d), "--model", str(world / name), "--name", name,
                       "--sample", "12", "--batch-size", "3", "--device", "cpu", "--quiet"])
    data_cli.main(["align", "--data", str(d), "--name", "source", "--quiet"])
    return d


def test_sampled_labels_go_through_alignment_and_a_training_step(world, sampled, tmp_path):
    """--sample 12: info.json says so (topk 12: entries per token), every token stores 12 ids in
    ascending order with one log-prob, -log 12 (uint8 code 40), repeats kept; aligned, a target
    token's entries are distinct ids (merge "sum" added the repeats) and at most 12; the stored
    form stays within 30 bytes per token per model; FusionData, fusellm.collate (K = 12 from the
    target's info.json), label_mass and one training step (MinCE) read it with finite losses.
    Catches the draws' count lost in the stored form, a K cut below the draws, or a stage that
    breaks on repeated ids."""
    import train
    from extras.label_quality import label_mass
    info = data.model_info(sampled, "source")
    assert info["sample"] == 12 and info["topk"] == 12
    shards = sorted((sampled / "models" / "source").glob("shard-*.npz"))
    tokens = 0
    for f in shards:
        z = np.load(f)
        assert z["topk_ids"].shape[1] == 12 and (np.diff(z["topk_ids"], axis=1) >= 0).all()
        assert (z["topk_logprobs"] == 40).all()                   # round(16 log 12) = 40
        tokens += int(z["offsets"][-1])
    assert (np.diff(np.load(shards[0])["topk_ids"], axis=1) == 0).any()    # repeats are kept
    assert sum(f.stat().st_size for f in shards) / tokens <= 30
    z = storage.read_aligned(sampled, "source", 0)
    for row, c in zip(z["ids"], z["counts"]):
        assert c <= 12 and len(set(row[:c].tolist())) == c
    assert z["logprobs"].dtype == np.float16             # merged draws keep their counts' ratios
    mass = label_mass(sampled)
    assert 0 < mass["candidate: target"]["mass on the true next token"] < 1
    out = tmp_path / "run"
    train.train(train.parse_config(["--data", str(sampled), "--target", str(world / "target"),
                                    "--out", str(out), "--batch-size", "4", "--max-steps", "1",
                                    "--log-every", "1", "--no-export"]))
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert all(np.isfinite(v) for v in logged.values() if isinstance(v, float))


def test_sampled_labels_are_the_same_bytes_on_any_rank_and_resumed(world, sampled, tmp_path,
                                                                  monkeypatch):
    """Each window's draws come from a generator seeded by its tokens and the model's name, never
    the rank or the batch: rank 1 of 2 (the odd shards, in batches of 2) writes the bytes one
    process wrote (in batches of 3), and so does a shard lost to a kill and redone. Catches uniforms
    drawn from one generator running through the shards a process takes (rank 1 would draw other
    ids for the same window), or seeded by the batch."""
    shutil.copytree(sampled / "windows", tmp_path / "windows")
    shutil.copy(sampled / "manifest.json", tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    data.compute_dists(tmp_path, world / "source", "source", batch_size=2, quiet=True, sample=12)
    (tmp_path / "models" / "source" / "shard-00001.npz").unlink()        # killed: redone
    data.compute_dists(tmp_path, world / "source", "source", batch_size=2, quiet=True, sample=12)
    ours, theirs = tree(tmp_path / "models" / "source"), tree(sampled / "models" / "source")
    assert sorted(ours) == [f"shard-{s:05d}.npz" for s in range(1, len(theirs) - 1, 2)]
    assert differences(ours, {k: v for k, v in theirs.items() if k in ours}) == NONE


def test_sampled_and_top_k_labels_are_never_mixed(world, pipeline, sampled, tmp_path):
    """One clear error before any work: a sampled model beside top-K ones in a data folder (the
    candidates are read with the target's K entries: a sampled source beside a top-5 target would
    be cut to 5 of its draws), the reverse, another N, top-K added to a sampled folder, --topk
    with --sample, and a sampled source aligned with merge "first" (the official preset: a
    repeated id would keep one draw's weight)."""
    with pytest.raises(data.DataError, match=r"data: source's distributions were made with top-K "
                                             r"and these would be --sample 12; every model"):
        data.compute_dists(pipeline, world / "source2", "source2", sample=12)
    with pytest.raises(data.DataError, match="were made with --sample 12 and these would be top-K"):
        data.compute_dists(sampled, world / "source2", "source2", topk=5)
    with pytest.raises(data.DataError, match="made with --sample 12 and these would be --sample 8"):
        data.compute_dists(sampled, world / "source2", "source2", sample=8)
    with pytest.raises(data.DataError, match="already holds distributions made with"):
        data.compute_dists(sampled, world / "source", "source", topk=12)
    with pytest.raises(data.DataError, match="--sample 300: choose 1 to 255"):
        data.compute_dists(sampled, world / "source2", "source2", sample=300)
    assert not (sampled / "models" / "source2").exists()
    assert not (pipeline / "models" / "source2").exists()
    with pytest.raises(SystemExit, match="error: --topk 5 and --sample 12 both given"):
        data_cli.main(["dists", "--data", str(sampled), "--model", str(world / "source"),
                       "--name", "source", "--topk", "5", "--sample", "12"])
    with pytest.raises(SystemExit, match="error: --align official merges repeated ids"):
        data_cli.main(["all", "--corpus", str(world / "corpus"), "--target", str(world / "target"),
                       "--data", str(tmp_path / "d"), "--sample", "12", "--align", "official"])
    assert not (tmp_path / "d").exists()
    d = tmp_path / "copy"
    shutil.copytree(sampled, d)
    shutil.rmtree(d / "aligned" / "source")
    with pytest.raises(data.DataError, match="source's labels are sampled .--sample 12.: merge "
                                             "'first' .the official preset. would keep one draw"):
        data.align_source(d, "source", "official", quiet=True)
    assert not (d / "aligned" / "source").exists()


def test_online_candidates_of_a_sampled_folder_are_the_stored_draws(world, sampled):
    """train.py --online on a folder made with --sample 12 runs the models in the loop with the
    same draws as data.py dists: for one window, the target's 12 ids per token and the source's
    aligned ids and counts equal the stored ones, all entries at -log 12 for the target (the
    stored ones are uint8 codes, -2.5). Catches the online path computing the top-K of a sampled
    folder (--topk's 10 ids), or drawing with another seed than compute_dists's (the model's
    name in the folder)."""
    import train
    from extras.online import OnlineCandidates
    from extras.stored_candidates import StoredCandidates
    cfg = train.parse_config(["--data", str(sampled), "--target", str(world / "target"),
                              "--online", "--sources", str(world / "source")])
    tok = load_tokenizer(world / "target")
    online = OnlineCandidates(cfg, tok, "cpu")
    assert online.k == 12
    (a,), (b,) = online.items([(0, 1)]), StoredCandidates(cfg, tok).items([(0, 1)])
    assert a["tokens"] == b["tokens"]
    assert np.array_equal(a["target"]["topk_ids"], b["target"]["topk_ids"])
    assert np.allclose(a["target"]["topk_logprobs"], -np.log(12))
    sa, sb = a["sources"]["source"], b["sources"]["source"]
    assert np.array_equal(sa["counts"], sb["counts"]) and np.array_equal(sa["ids"], sb["ids"])


def test_a_folder_already_holding_both_kinds_of_labels_is_named(tmp_path):
    """A data folder whose models' labels were made two ways (top-K beside --sample 12: a folder of
    an older version, or one put together by hand) is refused by folder_sample, which --online
    draws by, never read as one of them. Catches its check loosened to three kinds."""
    for name, sample in (("target", 0), ("source", 12)):
        (tmp_path / "models" / name).mkdir(parents=True)
        info = {"model": name, "tokenizer": "0" * 16, "topk": 5, "sample": sample}
        (tmp_path / "models" / name / "info.json").write_text(json.dumps(info))
    with pytest.raises(storage.FormatError, match=r"made in different ways \(\[0, 12\]"):
        storage.folder_sample(tmp_path)


def test_a_bad_sample_or_topk_is_refused_before_any_work(world, tmp_path):
    """`data.py all --sample 300` (or --topk 0) is one error before the windows are cut: the
    number is checked with the flags, not after every window is built (info_conflict's check in
    dists). Catches the range checked only by compute_dists."""
    for flag in (["--sample", "300"], ["--topk", "0"]):
        with pytest.raises(SystemExit, match=f"error: {' '.join(flag)}: choose 1 to 255"):
            data_cli.main(["all", "--corpus", str(world / "corpus"), "--target",
                           str(world / "target"), "--data", str(tmp_path / "d"), *flag])
        assert not (tmp_path / "d").exists()


def test_a_damaged_sibling_info_is_named_with_its_fix(world, sampled, tmp_path):
    """dists for a new model reads every other model's info.json of the folder (one kind of labels
    per folder); a damaged one is refused, not skipped (skipping could hide a top-K source beside
    sampled ones), with one DataError naming that file, its fix and why it is read, and nothing
    written for the new model. Catches a sibling's JSON error escaping as a bare FormatError
    without the reason, or the sibling skipped."""
    d = tmp_path / "copy"
    shutil.copytree(sampled, d)
    (d / "models" / "source" / "info.json").write_text('{"model": "x", "topk"')
    with pytest.raises(data.DataError) as e:
        data.compute_dists(d, world / "source2", "source2", topk=5, quiet=True)
    said = str(e.value)
    assert str(d / "models" / "source" / "info.json") in said
    assert "delete its folder and run `python data.py dists --name source" in said
    assert "to check that they all store their labels one way" in said
    assert not (d / "models" / "source2").exists()


def data_command(world, out, ranks: int = 1, slow_filesystem=False) -> list[str]:
    """`python data.py all` on the world's target and source, or `torchrun --nproc_per_node <ranks>
    data.py all`, optionally through tests/robustness/slow_filesystem.py."""
    slow = [str(ROOT / "tests" / "robustness" / "slow_filesystem.py")] if slow_filesystem else []
    args = [*slow, str(ROOT / "data.py"),
            "all", "--corpus", str(world / "corpus"), "--target", str(world / "target"),
            "--sources", str(world / "source"), "--data", str(out), "--seq-len", str(SEQ),
            "--shard-windows", "4", "--topk", "5", "--batch-size", "3", "--device", "cpu"]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                "127.0.0.1", "--master_port", str(port), *args]
    return [sys.executable, *args]


def data_all(world, out, ranks: int = 1, slow_filesystem=False):
    """data_command run to its end (whole: nothing it started outlives it). One thread per process,
    so every process gets the same floating-point results."""
    command = data_command(world, out, ranks, slow_filesystem)
    with whole(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as (p, _):
        log = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, log


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    data_all(world, out)
    return tree(out)


@pytest.mark.slow
def test_torchrun_data_preparation_equals_one_process_byte_for_byte(world, one_process, tmp_path):
    """Two ranks on a slow filesystem (folder renames stall, rank 1 lags): rank 0 alone builds the
    windows and the vocab map, each rank aligns its own shards, and rank 0 merges the diagnostics
    once both are done. Catches ranks that both build windows/ (the second swaps it away while the
    first reads it), diagnostics merged before the slow rank's shards are in, and a rank that skips
    or repeats another's shards."""
    data_all(world, tmp_path, ranks=2, slow_filesystem=True)
    two = tree(tmp_path)
    assert differences(two, one_process) == NONE
    diag = json.loads(two["aligned/source/diagnostics.json"])
    assert diag["positions"] == sum(int(np.load(f)["offsets"][-1])
                                    for f in (tmp_path / "models" / "target").glob("*.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["manifest.json", "models/source/shard-00000.npz",
                                     "aligned/source/shard-00000.npz"])
def test_torchrun_data_preparation_killed_and_rerun_equals_one_process(world, one_process, tmp_path,
                                                                      kill_at):
    """Killed (every process, at once) as soon as a file of the given stage appears, then run again
    with two ranks: the result is byte for byte one process's. Catches a rerun that redoes a stage
    over another rank's finished files, keeps a half-written one, or never merges the
    diagnostics."""
    with whole(data_command(world, tmp_path, ranks=2), stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL) as (p, _):
        t0 = time.time()
        while not (tmp_path / kill_at).is_file() and p.poll() is None and time.time() - t0 < 300:
            time.sleep(0.002)
    # whole() killed every process, each worker's group with torchrun's
    diagnostics = tmp_path / "aligned" / "source" / "diagnostics.json"
    assert not diagnostics.is_file(), "killed too late to test a resume"
    data_all(world, tmp_path, ranks=2)
    final = {k: v for k, v in tree(tmp_path).items() if not k.rsplit("/", 1)[-1].startswith(".")}
    assert differences(final, one_process) == NONE


@pytest.mark.slow
def test_ranks_end_when_their_torchrun_agent_is_killed(world, tmp_path):
    """torchrun's agent and rank 1 killed by SIGKILL while rank 0 builds the windows: rank 0 ends
    too, at once (extras/ranks.py: die_with_agent), not a day later. Catches ranks that outlive
    their agent: torchrun starts each in a session of its own, which no kill of the agent reaches,
    and rank 0 would wait for rank 1 in the process group's start-up until its timeout (a day)."""
    out = tmp_path / "out"
    with whole(data_command(world, out, ranks=2), stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL) as (p, marker):
        t0 = time.time()
        while not out.is_dir() and p.poll() is None and time.time() - t0 < 60:   # rank 0's windows
            time.sleep(0.01)
        ranks = {env.get("RANK"): pid for pid, env in marked(marker).items()}
        assert out.is_dir() and {"0", "1"} <= set(ranks), "the ranks never started"
        assert not (out / "manifest.json").exists(), "the windows were built before the kill"
        os.kill(p.pid, signal.SIGKILL)
        os.kill(ranks["1"], signal.SIGKILL)
        p.wait()
        t0 = time.time()
        while (left := marked(marker)) and time.time() - t0 < 60:
            time.sleep(0.1)
        left = {pid: env.get("RANK") for pid, env in left.items()}
        assert left == {}, f"ranks (pid: rank) outlived their agent by {time.time() - t0:.0f} s"


# --- alignment, diagnostics, fusion-ready data ---------------------------------------------------

def test_diagnostics_are_saved_next_to_the_data(pipeline):
    diag = json.loads((pipeline / "aligned" / "source" / "diagnostics.json").read_text())
    assert diag["positions"] == sum(int(np.load(f)["offsets"][-1])
                                    for f in (pipeline / "models" / "target").glob("shard-*.npz"))
    assert 0.3 < diag["aligned_1to1"] <= 1
    assert abs(diag["aligned_1to1"] + diag["fallback"] - 1) < 1e-9
    assert 0 <= diag["topk_mass_lost_in_vocab_map"] < 1
    # exact positions and the next-token map carry an oracle source's next token onto the target's
    assert diag["oracle_label_mass"] > 0.95 and 0 < diag["label_mass"] < 1
    unmatched = diag["most_frequent_unmatched"]
    assert unmatched and {"source", "target", "count"} <= set(unmatched[0])


def test_fusion_data_gives_every_candidate_per_window(pipeline, world):
    fd = data.FusionData(pipeline)
    assert fd.sources == ["source"]
    tok = load_tokenizer(world / "target")
    windows = storage.read_windows(pipeline, 1)
    for item, win in zip(fd.shard(1), windows):
        n = len(tok.encode(win["text"]))
        assert item["target"]["topk_ids"].shape == (n, 5)
        src = item["sources"]["source"]
        assert len(src["counts"]) == n
        assert src["ids"].shape == src["logprobs"].shape == (n, 5) and (src["counts"] <= 5).all()
        padding = np.arange(5) >= src["counts"][:, None]
        assert (src["ids"][padding] == 0).all() and (src["logprobs"][padding] == 0).all()
        assert (src["ids"] < tok.vocab_size).all() and np.isfinite(src["ce"])
        assert (np.exp(src["logprobs"]) <= 1 + 1e-6).all()


def test_official_fallback_stores_the_current_token_and_training_uses_it(world, pipeline, tmp_path):
    """The official preset's fallback (the official code's off-by-one) is stored: every unmatched
    position carries a one-hot on its own current target token, where the next-token fallback
    stores nothing (training then puts the next-token label there). Compared with the same preset
    and the next-token fallback, window by window (data.align_window). fusellm.collate passes the
    stored one-hot on as the candidate's distribution."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    shutil.rmtree(d / "aligned" / "source")
    data.align_source(d, "source", "official", quiet=True)
    tok, s_tok = load_tokenizer(world / "target"), load_tokenizer(world / "source")
    official = np.load(d / "aligned" / "source" / "shard-00000.npz")
    settings = {**align.PRESETS["official"], "fallback": "next"}
    vmap = align.vocab_map(s_tok, tok, "mined", d / "cache", "lowest")
    sv, tv = align.normalized_vocab(s_tok), align.normalized_vocab(tok)
    src = storage.read_dists(d, "source", 0)
    counts = []                                 # the next-token fallback's counts
    for w, win in enumerate(storage.read_windows(d, 0)):
        a, b = src["offsets"][w], src["offsets"][w + 1]
        lps = storage.dequantize_logprobs(src["topk_logprobs"][a:b])
        tr = data.align_window(s_tok.encode(win["text"]), tok.encode(win["text"]),
                               src["topk_ids"][a:b].astype(np.int64), lps, vmap, sv, tv, None,
                               settings)
        counts.append(data.padded(tr, 5)["counts"])
    default = {"counts": np.concatenate(counts)}
    tgt_ids = [i for w in storage.read_windows(pipeline, 0) for i in tok.encode(w["text"])]
    fell_back = default["counts"] == 0
    assert fell_back.sum() > 10 and (official["counts"][fell_back] == 1).all()
    assert (official["ids"][fell_back, 0] == np.array(tgt_ids)[fell_back]).all()      # CURRENT
    assert (official["logprobs"][fell_back, 0] == 0).all()                          # probability 1
    assert (official["counts"][~fell_back] == default["counts"][~fell_back]).all()
    fd = data.FusionData(d, tokenizer=tok)
    b = fusellm.collate(fd.shard(0)[:1], ["target", "source"], tok.bos_id, 5)
    n = len(tok.encode(storage.read_windows(d, 0)[0]["text"]))
    pos = np.flatnonzero(fell_back[:n - 1])           # window 0's fallback positions with a label
    assert not b.cand_fallback[1, 0, pos + 1].any()            # +1: BOS comes first in the batch
    assert (b.cand_ids[1, 0, pos + 1, 0] == b.input_ids[0, pos + 1]).all()  # input token, not label


def test_aligned_shards_in_the_old_ragged_form_are_refused(pipeline, tmp_path):
    """Aligned shards written by an earlier version (ragged: ids and logprobs flat, (sum counts,))
    are refused with one error naming the folder and the fix, by FusionData (before any shard is
    decoded) and by align (before any shard is added to the folder)."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    for f in sorted((d / "aligned" / "source").glob("shard-*.npz")):
        z = dict(np.load(f))
        carried = np.arange(z["ids"].shape[1]) < z["counts"][:, None]
        storage.save_npz(f, **{**z, "ids": z["ids"][carried], "logprobs": z["logprobs"][carried]})
    folder = d / "aligned" / "source"
    fix = f"delete {folder} and rerun `python data.py align --data {d} --name source`"
    with pytest.raises(data.DataError, match="old ragged form") as e:
        data.FusionData(d)
    assert str(e.value) == f"{folder} holds aligned shards in the old ragged form; {fix}"
    with pytest.raises(data.DataError, match="old ragged form"):
        data.align_source(d, "source", quiet=True)


def test_topk_that_the_storage_cannot_count_is_refused(pipeline, world):
    """Aligned shards store each position's entry count as uint8: a top-K above 255 would wrap
    silently."""
    with pytest.raises(data.DataError, match="--topk 300: choose 1 to 255"):
        data.compute_dists(pipeline, world / "target", "big", topk=300)


@pytest.mark.parametrize("topk, refused", [(0, True), (1, False), (255, False), (256, True)])
def test_topk_is_refused_exactly_past_the_bounds_uint8_counts_hold(tmp_path, topk, refused):
    """1 to 255 entries per position fit aligned shards' uint8 counts; 256 would be stored as a
    count of 0 (every entry of a position dropped). Catches the bound off by one (`<= 256`)."""
    said = storage.info_conflict(tmp_path / "m", {"model": "m", "topk": topk, "logprob_bits": 8})
    assert (said == f"--topk {topk}: choose 1 to 255 (aligned distributions store their sizes "
                     f"as uint8)") if refused else said is None


def test_a_model_folder_from_before_sample_existed_takes_more_top_k_shards(tmp_path):
    """A model folder whose info.json predates --sample (no "sample" key: top-K labels) takes the
    rest of its shards with the same settings (a resumed `dists`), and refuses --sample. Catches
    info_conflict reading the missing key as None instead of 0 ("already holds" on every
    resume of such a folder)."""
    d = tmp_path / "models" / "target"
    d.mkdir(parents=True)
    old = {"model": "m", "tokenizer": "0" * 16, "topk": 5, "logprob_bits": 8}
    (d / "info.json").write_text(json.dumps(old))
    assert storage.info_conflict(d, dict(model="m", topk=5, sample=0, logprob_bits=8)) is None
    assert "already holds" in storage.info_conflict(d, dict(model="m", topk=5, sample=5,
                                                            logprob_bits=8))


def test_alignment_settings_are_checked_before_any_work(pipeline):
    with pytest.raises(data.DataError, match="alignment preset 'bytes'; choose one of"):
        data.align_source(pipeline, "source", "bytes")
    with pytest.raises(data.DataError, match="vocab map 'bytes'; choose one of"):
        data.align_source(pipeline, "source", vocab_map="bytes")
    with pytest.raises(data.DataError, match="other settings"):
        data.align_source(pipeline, "source", vocab_map="mined")


def test_a_preset_and_a_vocab_map_from_the_command_line_are_stored(pipeline, tmp_path):
    """`--align paper --vocab-map em` (the paper's EM ablation) aligns with the paper's preset, its
    vocab map replaced, and stores the six settings; a rerun with other settings is refused."""
    d = tmp_path / "d"
    shutil.copytree(pipeline, d)
    shutil.rmtree(d / "aligned" / "source")
    data_cli.main(["align", "--data", str(d), "--name", "source", "--align", "paper",
                   "--vocab-map", "em", "--quiet"])
    stored = json.loads((d / "aligned" / "source" / "settings.json").read_text())
    assert stored == {**align.PRESETS["paper"], "vocab_map": "em"}
    assert storage.stored_align_settings(d, "source") == stored
    with pytest.raises(SystemExit, match="error: .* was aligned with other settings"):
        data_cli.main(["align", "--data", str(d), "--name", "source", "--quiet"])


def test_settings_of_older_data_folders_are_read_as_they_were_used(pipeline, tmp_path):
    """settings.json files from before a setting existed: without "positions" they were aligned by
    the paper's rule with lowest-id vocab-map ties; without "map_ties", with emitted ties. A value
    align.py does not know is refused, naming the file."""
    folder = tmp_path / "aligned" / "source"
    folder.mkdir(parents=True)
    old = {"vocab_map": "mined", "ties": "closest", "fallback": "next", "merge": "sum"}
    (folder / "settings.json").write_text(json.dumps(old))
    assert storage.stored_align_settings(tmp_path, "source") == {
        **old, "positions": "paper", "map_ties": "lowest"}
    (folder / "settings.json").write_text(json.dumps({**old, "positions": "exact"}))
    assert storage.stored_align_settings(tmp_path, "source")["map_ties"] == "emitted"
    (folder / "settings.json").write_text(json.dumps({**old, "positions": "bytes"}))
    with pytest.raises(ValueError, match=r"settings\.json: alignment setting positions='bytes'"):
        storage.stored_align_settings(tmp_path, "source")
    assert storage.stored_align_settings(tmp_path, "other") == align.PRESETS["nanofuse"]


def test_adding_a_source_later_leaves_the_first_untouched(world, pipeline, tmp_path):
    shutil.copytree(pipeline, tmp_path / "d")
    before = tree(tmp_path / "d")
    data.compute_dists(tmp_path / "d", world / "source2", "source2", topk=5, batch_size=3,
                       quiet=True)
    data.align_source(tmp_path / "d", "source2", quiet=True)
    after = tree(tmp_path / "d")
    assert differences({k: v for k, v in after.items() if k in before}, before) == NONE
    assert any(k.startswith("aligned/source2/shard-") for k in after)
    assert data.FusionData(tmp_path / "d").sources == ["source", "source2"]
    # --use-sources fuses only the sources named (catches StoredCandidates ignoring it)
    import train
    from extras.stored_candidates import StoredCandidates
    cfg = train.parse_config(["--data", str(tmp_path / "d"), "--target", str(world / "target"),
                              "--use-sources", "source2"])
    chosen = StoredCandidates(cfg, load_tokenizer(world / "target"))
    assert chosen.names == ["target", "source2"]
    assert list(chosen.items([(0, 1)])[0]["sources"]) == ["source2"]


def test_command_line_runs_all_stages_and_prints_progress(world, tmp_path, capsys):
    data_cli.main(["all", "--corpus", str(world / "corpus"), "--target", str(world / "target"),
                   "--sources", str(world / "source"), "--data", str(tmp_path / "d"), "--seq-len",
                   str(SEQ), "--topk", "3"])
    out = capsys.readouterr().out
    assert "expected disk at most" in out and "tokens/s" in out and "ETA" in out
    assert "carry the source's distribution" in out
    assert (tmp_path / "d" / "aligned" / "source" / "diagnostics.json").is_file()


# --- bad input: one clear error, nothing half-written --------------------------------------------

def test_empty_corpus(world, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(data.DataError, match="no documents with text"):
        data.build_windows(tmp_path / "c.jsonl", world / "target", [], tmp_path / "d", quiet=True)
    assert not (tmp_path / "d" / "windows").exists()
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_binary_file_in_corpus_is_named(world, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("fine text")
    (tmp_path / "c" / "b.txt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(data.DataError, match=r"b\.txt: not UTF-8 text"):
        data.build_windows(tmp_path / "c", world / "target", [], tmp_path / "d", quiet=True)
    assert [p.name for p in (tmp_path / "d").iterdir()] == []


def test_tokenizer_that_yields_no_tokens(world, tmp_path, monkeypatch):
    import tokenizer

    class Mute:
        kind, vocab_size, bos_id, eos_id = "mute", 10, None, None

        def encode(self, text):
            return [] if "zzz" in text else [1] * len(text.split())

    real = tokenizer.load_tokenizer
    monkeypatch.setattr(tokenizer, "load_tokenizer",
                        lambda p: Mute() if "mute" in str(p) else real(p))
    (tmp_path / "c.jsonl").write_text('{"text": "hello there"}\n{"text": "zzz"}\n')
    with pytest.raises(data.DataError,
                       match=r"mute yields no tokens for window 0 of document 1 \('zzz'\)"):
        data.build_windows(tmp_path / "c.jsonl", world / "target", [tmp_path / "mute"],
                           tmp_path / "d", quiet=True)
    assert [p.name for p in (tmp_path / "d").iterdir()] == []


def test_source_whose_tokenizer_does_not_fit_its_model(world, pipeline, tmp_path):
    shutil.copytree(world / "source", tmp_path / "bad")
    shutil.copy(world / "source2" / "tokenizer.json", tmp_path / "bad")   # 700 tokens, 520 rows
    with pytest.raises(fusellm.CheckpointError,
                       match="tokenizer has 700 tokens but the model's embedding has only 520"):
        data.compute_dists(pipeline, tmp_path / "bad", "bad", quiet=True)
    assert not (pipeline / "models" / "bad").exists()


def test_changed_tokenizer_is_caught_at_alignment(world, pipeline, tmp_path):
    shutil.copytree(pipeline, tmp_path / "d")
    info = json.loads((tmp_path / "d" / "models" / "source" / "info.json").read_text())
    info["tokenizer"] = "0" * 16
    (tmp_path / "d" / "models" / "source" / "info.json").write_text(json.dumps(info))
    shutil.rmtree(tmp_path / "d" / "aligned")
    with pytest.raises(data.DataError, match="changed since `dists --name source` ran"):
        data.align_source(tmp_path / "d", "source", quiet=True)


class ThreeTokens:
    """A tokenizer as tokenizer_fingerprint sees it: three one-byte tokens, BOS 1, EOS 2."""
    kind, vocab_size, bos_id, eos_id = "bpe", 3, 1, 2

    def __init__(self, **changed):
        self.__dict__.update(changed)

    def token_bytes(self, i):
        return b"abc"[i:i + 1]


def test_a_tokenizer_whose_bos_or_eos_alone_changed_gets_another_fingerprint():
    """The same tokens with another BOS (or none: a tokenizer_config.json edited) make other
    windows' tokens and other distributions, so the fingerprint that stored distributions and data
    folders are checked by differs. Catches the fingerprint hashing only the tokens."""
    changed = [{}, {"bos_id": None}, {"eos_id": 0}, {"kind": "sp"}]
    assert len({storage.tokenizer_fingerprint(ThreeTokens(**c)) for c in changed}) == 4


def test_a_resumed_dists_keeps_the_fingerprint_its_first_shards_were_made_with(tmp_path):
    """write_info writes info.json once: a `dists` resumed after the model's tokenizer changed
    leaves the first run's fingerprint, so align still names the change (changed_tokenizer).
    Catches info.json rewritten on every run, which would vouch for shards made with the old
    tokenizer."""
    d = tmp_path / "models" / "source"
    storage.write_info(d, {"model": "m", "topk": 5}, ThreeTokens())
    storage.write_info(d, {"model": "m", "topk": 5}, ThreeTokens(bos_id=None))
    info = json.loads((d / "info.json").read_text())
    assert info["tokenizer"] == storage.tokenizer_fingerprint(ThreeTokens())
    assert "changed since `dists --name source` ran" in storage.changed_tokenizer(
        ThreeTokens(bos_id=None), info, "source")


def test_stages_out_of_order_say_what_to_run(tmp_path):
    with pytest.raises(data.DataError, match="run `python data.py windows`"):
        data.compute_dists(tmp_path, tmp_path, "x", quiet=True)


def test_online_finds_a_source_by_the_name_its_folder_gives_it(tmp_path):
    """train.py --online names each source as data.py's folder does: the models/<name>/ whose
    info.json names that model (demo.py real stores Gemma's .gguf as "source"), else the path's
    name. Catches: the path's name used where the folder chose another (the stored alignment
    settings and the sampling seed would be looked up under the wrong name)."""
    import json
    from extras.online import folder_name
    for name, model in (("source", "/m/gemma.gguf"), ("target", "/m/base")):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "info.json").write_text(json.dumps({"model": model}))
    assert folder_name(tmp_path, "/m/gemma.gguf") == "source"
    assert folder_name(tmp_path, "/m/other model") == "other_model"
