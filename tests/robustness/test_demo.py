"""The built-in demo runs every stage at a small size, caches each one, and ends with a row per
model."""
import json
import statistics
import sys
import time
from pathlib import Path

import pytest

import demo
from extras.corpus import read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import demo_runs  # noqa: E402


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """The demo at its tiny size, run once for this file's tests: (folder, its table)."""
    d = tmp_path_factory.mktemp("demo") / "d"
    return d, demo.run_demo(d, size="tiny")


def test_demo_runs_every_stage_and_second_run_skips_them(tiny_demo, capsys):
    d, table = tiny_demo
    assert list(table) == ["source: code", "source: prose", "target base", "target CLM-only",
                           "target fused (MinCE)"]
    for row in table.values():
        assert set(row) == {"code", "prose"} and all(0 < v < 16 for v in row.values())
    for path in ("corpus/train/mix.jsonl", "corpus/eval/code.jsonl", "corpus/eval/prose.jsonl",
                 "tok/target/tokenizer.model", "models/code/config.json",
                 "models/prose/tokenizer.model", "models/base/model.safetensors",
                 "data/manifest.json", "data/aligned/code/diagnostics.json",
                 "data/aligned/prose/diagnostics.json", "runs/clm/final/config.json",
                 "runs/fused/final/tokenizer.model", "runs/fused/metrics.jsonl"):
        assert (d / path).is_file(), path
    t0 = time.time()
    again = demo.run_demo(d, size="tiny")
    assert again == table                           # cached stages, same models, same numbers
    assert "continue-training" not in capsys.readouterr().out and time.time() - t0 < 60


def test_stdlib_file_splits_into_code_and_prose():
    code, prose = demo.split_source('"""Module doc."""\n# a comment here\n'
                                    'x = 1  # trailing note\n\n'
                                    'def f():\n    """Say hi."""\n    return x\n')
    assert code == "x = 1  # trailing note\ndef f():\n    return x"
    assert prose == "Module doc.\nSay hi.\na comment here\ntrailing note"


def test_repro_and_real_reach_demo_runs_wherever_they_stand_on_the_command_line(tmp_path):
    """`python demo.py --size tiny real ...` goes to tools/demo_runs.py as `python demo.py real
    --size tiny ...` does (argparse takes options before the positional too): a missing --source
    is demo_runs' one error line, not demo.py's refusal to run `real` itself."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    for argv in (["real", "--size", "tiny"], ["--size", "tiny", "real"]):
        run = subprocess.run([sys.executable, str(root / "demo.py"), *argv, "--out",
                              str(tmp_path / "r"), "--source", str(tmp_path / "none.gguf")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 1
        assert run.stderr.strip().splitlines() == [
            f"error: --source {tmp_path / 'none.gguf'}: no such file or folder"], run.stderr


def test_a_sweep_reuses_the_demos_runs_pairs_each_row_with_its_own_clm_and_builds_its_folders(
        tiny_demo, capsys):
    """demo.py dose / methods / grid (tools/demo_runs.py sweep) on the tiny demo's stages. Catches:
    a sweep row that should be the demo's own run (lambda 0.9, MinCE, 1x) trained again or mapped to
    the wrong run (its numbers must be the demo's fused row); a paired difference taken against
    another setting's CLM-only (the lr 3e-3 and the smaller target's rows must pair with their own
    CLM-only); a smaller target continue-training the demo's base instead of its own; the
    sampled-labels folder not sampled; the label-mass column not the data's own; a folder of two
    variants at once (demo_runs.combined_copy: the smaller target with sampled labels) taking the
    demo's base or other windows (its CLM-only run must equal the smaller target's), or leaving
    its distributions top-10 or computed by the demo's base."""
    d, table = tiny_demo
    rows = {"CLM-only": ("data", 1, dict(lam=1.0)),
            "FuseLLM": ("data", 1, dict(lam=0.9, fusion="mince")),
            "ULD": ("data", 1, dict(lam=0.9, fusion="mince", fusion_loss="uld")),
            "sampled": ("data_sampled", 1, dict(lam=0.9, fusion="mince")),
            "lr 3e-3, CLM-only": ("data", 1, dict(lam=1.0, lr=3e-3)),
            "lr 3e-3, lambda 0.5": ("data", 1, dict(lam=0.5, fusion="mince", lr=3e-3)),
            "small target, CLM-only": ("data_target16x1", 1, dict(lam=1.0)),
            "small target, lambda 0.5": ("data_target16x1", 1, dict(lam=0.5, fusion="mince")),
            "small sampled, CLM-only": ("data_target16x1_sampled", 1, dict(lam=1.0)),
            "small sampled, lambda 0.5": ("data_target16x1_sampled", 1, dict(lam=0.5,
                                                                           fusion="mince"))}
    capsys.readouterr()
    out = demo_runs.sweep("toy", str(d), "tiny", rows, 1, "test sweep")
    log = capsys.readouterr().out
    assert "continue-training: fused" not in log and "continue-training: clm" not in log
    held = {name: float(out[name]["held-out bits per byte"].split()[0]) for name in rows}
    for name, run in (("CLM-only", "target CLM-only"), ("FuseLLM", "target fused (MinCE)")):
        assert held[name] == pytest.approx(statistics.mean(table[run].values()), abs=1e-4)
    assert held["lr 3e-3, CLM-only"] != held["CLM-only"]
    paired = float(out["lr 3e-3, lambda 0.5"]["minus CLM-only (paired)"].split()[0])
    assert paired == pytest.approx(held["lr 3e-3, lambda 0.5"] - held["lr 3e-3, CLM-only"],
                                   abs=2e-4)
    small = float(out["target base (base_16x1)"]["held-out bits per byte"])
    assert small != float(out["target base"]["held-out bits per byte"])
    assert held["small target, CLM-only"] != held["CLM-only"]
    paired = float(out["small target, lambda 0.5"]["minus CLM-only (paired)"].split()[0])
    small_clm = held["small target, CLM-only"]
    assert paired == pytest.approx(held["small target, lambda 0.5"] - small_clm, abs=2e-4)
    info = json.loads((d / "data_sampled" / "models" / "code" / "info.json").read_text())
    assert info["sample"] == demo_runs.SAMPLES
    assert held["small sampled, CLM-only"] == pytest.approx(small_clm, abs=1e-4)
    both = d / "data_target16x1_sampled" / "models"
    for name in ("target", "code", "prose"):
        assert json.loads((both / name / "info.json").read_text())["sample"] == demo_runs.SAMPLES
    assert json.loads((both / "target" / "info.json").read_text())["model"] == str(
        d / "models" / "base_16x1")
    paired = float(out["small sampled, lambda 0.5"]["minus CLM-only (paired)"].split()[0])
    assert paired == pytest.approx(held["small sampled, lambda 0.5"] - small_clm, abs=2e-4)
    with pytest.raises(ValueError, match="name it data_ and any of textN"):
        demo_runs.combined_copy(d, "toy", None, "tiny", "", "", {}, "data_target16x1_bogus")
    mass = demo_runs.label_mass(d / "data")
    fused = [v for k, v in mass.items() if k.startswith("fused")][0]["mass on the true next token"]
    assert out["FuseLLM"]["label mass (P_t)"] == f"{fused:.3f}"
    assert out["CLM-only"]["label mass (P_t)"] == ""


def test_a_subset_of_the_fusion_data_keeps_the_first_shards_of_every_stage(tmp_path):
    """demo.py grid's less fusion text (demo_runs.subset_copy): the first n shards of the windows,
    of every model's distributions and of every aligned source, with their statistics, and a
    manifest saying n shards and their windows. Catches: a later shard copied (the subset would
    not be smaller), a stage left out (training could not read it), the manifest's window count
    left at the whole folder's."""
    d = tmp_path / "data"
    files = ["windows/shard-{:05d}.jsonl", "models/target/shard-{:05d}.npz",
             "aligned/code/shard-{:05d}.npz", "aligned/code/stats-{:05d}.json"]
    for s in range(3):
        for f in files:
            (d / f.format(s)).parent.mkdir(parents=True, exist_ok=True)
            (d / f.format(s)).write_text(str(s))
    for f in ("models/target/info.json", "aligned/code/settings.json",
              "aligned/code/diagnostics.json", "cache/map.npy"):
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_text("{}")
    (d / "manifest.json").write_text(json.dumps({"shards": 3, "windows": 40, "shard_windows": 16,
                                                 "complete": True}))
    new = demo_runs.subset_copy(tmp_path, 2)
    kept = sorted(str(p.relative_to(new)) for p in new.rglob("*") if p.is_file())
    assert kept == sorted([f.format(s) for s in range(2) for f in files] + [
        "models/target/info.json", "aligned/code/settings.json", "aligned/code/diagnostics.json",
        "manifest.json"])
    assert json.loads((new / "manifest.json").read_text()) == {
        "shards": 2, "windows": 32, "shard_windows": 16, "complete": True}


def test_more_fusion_text_takes_more_of_the_same_files_and_none_held_out(tmp_path):
    """demo.py grid's more fusion text (demo_runs.longer_fuse_corpus, read by text_copy): the real
    demo's fusion files again, in order, with up to `times` x max_chars characters of each, so
    held-out and pre-training text stay the demo's. Catches: files of another split taken (held-out
    text trained on), other files or another order (not the demo's text made longer), the limit
    left at max_chars (no more text) or not applied."""
    sz, chars = demo_runs.REAL_SIZES["tiny"]
    demo_runs.build_real_corpus(tmp_path, sz, chars)
    read = lambda name: list(read_corpus(tmp_path / "corpus" / name))             # noqa: E731
    fuse, longer = read("fuse.jsonl"), read(demo_runs.longer_fuse_corpus(tmp_path, "tiny", 3).name)
    assert len(longer) == len(fuse) and all(t.startswith(f) for t, f in zip(longer, fuse))
    assert sum(map(len, longer)) > sum(map(len, fuse))
    assert max(map(len, longer)) <= 3 * sz.max_chars
    others = {t[:200] for split in ("eval", "pretrain") for t in read(f"{split}.jsonl")}
    assert not others & {t[:200] for t in longer}
