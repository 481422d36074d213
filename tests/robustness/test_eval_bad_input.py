"""A bad task file or model folder for eval.py ends in one error naming the file, the line or row,
and what is wrong, not a bare ValueError or a traceback."""
import json

import pytest

from conftest import ROOT
from extras import benchmarks, eval_cli


def test_malformed_jsonl_line_names_line_and_field(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"context": "a", "choices": ["x"], "label": 0}\n'
                 '{"context": "b", "choices": "xy", "label": 0}\n')
    with pytest.raises(benchmarks.BenchmarkError,
                       match=r"t\.jsonl:2: field 'choices' should be list, got str"):
        benchmarks.read_mc(f)
    f.write_text('{"context": "a", "choices": ["x"], "label": 0}\n{"context": "b", "label": 0\n')
    with pytest.raises(benchmarks.BenchmarkError, match=r"t\.jsonl:2: not valid JSON"):
        benchmarks.read_mc(f)
    f.write_text('{"context": "a", "choices": ["x"]}\n')
    with pytest.raises(benchmarks.BenchmarkError, match=r"t\.jsonl:1: missing field 'label'"):
        benchmarks.read_mc(f)


def test_a_commonsense_row_that_cannot_be_read_names_its_row(tmp_path):
    """HellaSwag's test split has empty labels; an ARC answer key not among the labels: one error
    each, naming the file and row, not a bare ValueError."""
    f = tmp_path / "hs.jsonl"
    row = {"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "y"], "label": "0"}
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": ""}) + "\n")
    with pytest.raises(benchmarks.BenchmarkError,
                       match=r"hs\.jsonl: row 2: .*use its validation split"):
        benchmarks.read_mc(f)
    arc = {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"}
    f.write_text(json.dumps(arc) + "\n")
    with pytest.raises(benchmarks.BenchmarkError, match=r"hs\.jsonl: row 1: not a usable row"):
        benchmarks.read_mc(f)
    f.write_text(json.dumps({"prompt": "q", "answer": 1}) + "\n")
    with pytest.raises(benchmarks.BenchmarkError,
                       match=r"row 1 has neither the fields context, choices and label"):
        benchmarks.read_mc(f)


def test_empty_task(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(benchmarks.BenchmarkError, match="the task has no examples"):
        benchmarks.read_mc(tmp_path / "e.jsonl")


def test_model_folder_without_tokenizer(world, tmp_path):
    import shutil
    shutil.copytree(world / "source", tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    with pytest.raises(SystemExit, match="no tokenizer.json or tokenizer.model"):
        eval_cli.main(["--models", str(tmp_path / "m"), "--lm", str(ROOT / "tasks" / "sample_text.txt")])
