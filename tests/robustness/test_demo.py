"""The built-in demo runs every stage at a small size, caches each one, and ends with a row per
model."""
import time

import demo


def test_demo_runs_every_stage_and_second_run_skips_them(tmp_path, capsys):
    table = demo.run_demo(tmp_path / "d", size="tiny")
    assert list(table) == ["source: code", "source: prose", "target base", "target CLM-only",
                           "target fused (MinCE)"]
    for row in table.values():
        assert set(row) == {"code", "prose"} and all(0 < v < 16 for v in row.values())
    d = tmp_path / "d"
    for path in ("corpus/train/mix.jsonl", "corpus/eval/code.jsonl", "corpus/eval/prose.jsonl",
                 "tok/target/tokenizer.model", "models/code/config.json",
                 "models/prose/tokenizer.model", "models/base/model.safetensors",
                 "data/manifest.json", "data/aligned/code/diagnostics.json",
                 "data/aligned/prose/diagnostics.json", "runs/clm/final/config.json",
                 "runs/fused/final/tokenizer.model", "runs/fused/metrics.jsonl"):
        assert (d / path).is_file(), path
    out = capsys.readouterr().out
    assert "| target fused (MinCE) |" in out
    t0 = time.time()
    again = demo.run_demo(tmp_path / "d", size="tiny")
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
