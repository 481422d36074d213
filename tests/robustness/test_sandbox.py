"""Model-written code runs contained (extras/sandbox.py): a completion that is wrong, loops,
crashes, deletes files, forks without end, eats memory, writes a huge file or leaves a child running
fails its problem and harms nothing outside its run."""
import os
import time
from pathlib import Path

import pytest

from extras.benchmarks import humaneval_program
from extras.sandbox import run_program


def run(body: str, timeout: float = 5.0):
    """A program whose function body is the model's completion, checked as HumanEval checks it."""
    problem = {"prompt": "def f():\n", "test": "def check(g):\n    assert g() == 1\n",
               "entry_point": "f"}
    return run_program(humaneval_program(problem, body), timeout=timeout)


PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(2, 3) == 5\n"}


@pytest.mark.parametrize("completion,passes", [
    ("    return a + b\n", True),
    ("    return a - b\n", False),
    ("    while True:\n        pass\n", False),        # infinite loop: killed by the timeout
    ("    import os\n    os.abort()\n", False),          # a crash of the interpreter
])
def test_humaneval_scoring_survives_wrong_looping_and_crashing_completions(completion, passes):
    ok, why = run_program(humaneval_program(PROBLEM, completion), timeout=2.0)
    assert ok is passes, why


def test_humaneval_infinite_loop_reports_the_timeout():
    program = humaneval_program(PROBLEM, "    while True:\n        pass\n")
    ok, why = run_program(program, timeout=1.0)
    assert not ok and why == "timed out after 1.0 s"


def test_a_correct_completion_still_passes():
    assert run("    import math, json, collections\n    return 1\n") == (True, "")


@pytest.mark.parametrize("escape", ["    import sys\n    sys.exit(0)\n",
                                    "    import os\n    os._exit(0)\n",
                                    "    raise SystemExit\n"],
                         ids=["sys.exit", "os._exit", "SystemExit"])
def test_a_completion_that_exits_cleanly_before_the_tests_fails(escape):
    """Exit status 0 is not a pass: the tests must have run to the end (the reference harness
    agrees)."""
    assert run(escape) == (False, "the program exited before its end")


def test_what_the_program_prints_does_not_hide_its_end():
    assert run("    print('lots of output ' * 1000, end='')\n    return 1\n") == (True, "")


@pytest.mark.parametrize("attack", [
    "    import os\n    os.remove({path!r})\n    return 1\n",
    "    import shutil\n    shutil.rmtree({folder!r})\n    return 1\n",
    "    import os\n    os.system('rm -rf {folder}')\n    return 1\n",
    "    import subprocess\n    subprocess.run(['rm', '-rf', {folder!r}])\n    return 1\n",
    "    import os\n    os.posix_spawn('/bin/rm', ['rm', '-rf', {folder!r}], {{}})\n    return 1\n",
    "    import os\n    os.unlink({path!r})\n    return 1\n",
    "    import pathlib\n    pathlib.Path({path!r}).unlink()\n    return 1\n",
], ids=["os.remove", "shutil.rmtree", "os.system", "subprocess", "posix_spawn", "os.unlink",
        "pathlib"])
def test_a_completion_that_deletes_files_outside_its_folder_fails_and_deletes_nothing(tmp_path,
                                                                                      attack):
    precious = tmp_path / "keep" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    ok, why = run(attack.format(path=str(precious), folder=str(precious.parent)))
    assert not ok and why
    assert precious.read_text() == "mine"


@pytest.mark.parametrize("bomb", [
    "    import os\n    while True:\n        os.fork()\n",
    "    import multiprocessing\n    while True:\n"
    "        multiprocessing.Process(target=print).start()\n",
], ids=["os.fork", "multiprocessing"])
def test_a_fork_bomb_fails_at_once(bomb):
    t0 = time.time()
    ok, why = run(bomb)
    assert not ok and time.time() - t0 < 4


def test_a_memory_hog_fails_with_a_memory_error_not_the_machine():
    t0 = time.time()
    # fits this machine, not the limit
    ok, why = run("    block = bytearray(4 * 2**30)\n    return 1\n")
    assert not ok and "MemoryError" in why and time.time() - t0 < 4


def test_a_huge_file_is_cut_off_at_the_file_size_limit():
    ok, why = run("    with open('big.bin', 'wb') as f:\n        for _ in range(100):\n"
                  "            f.write(bytes(2**20))\n    return 1\n")
    assert not ok


def processes_with(marker: str) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and marker in (p / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(p.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("ends", ["passes", "times out"])
def test_a_child_left_running_is_killed_with_the_program(ends):
    """Disabling functions is no wall: code can import the C module behind `os` afresh and fork. The
    process group is what ends such a child, after a normal exit as after the timeout. (As root the
    process limit does not apply and the child really starts; as another user it may not start at
    all.)"""
    marker = f"nanofuse-orphan-{os.getpid()}-{ends.replace(' ', '-')}"
    # an escape the guard leaves: the C module behind `os`, imported afresh, still has fork and exec
    body = ("    import importlib, sys\n"
            "    sys.modules.pop('posix', None)\n"
            "    posix = importlib.import_module('posix')\n"
            "    pid = posix.fork()\n"
            "    if pid == 0:\n"
            f"        posix.execv('/bin/sleep', ['{marker}', '60'])\n"
            + ("    return 1\n" if ends == "passes" else "    while True:\n        pass\n"))
    run(body, timeout=2.0)
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_the_program_runs_in_a_fresh_temporary_folder_of_its_own(tmp_path, monkeypatch):
    """A program's relative paths land in a folder made for that run and deleted after it, never in
    the caller's working directory. Catches run_program starting the program in the caller's folder
    (cwd left out): a huge-file completion would then write 16 MiB into the repository, and any
    completion could read or overwrite what lies there."""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    # the program writes a relative file, then fails with its working directory as the reason
    program = ("import os\nopen('left-behind.txt', 'w').write('x')\n"
               "raise AssertionError(os.getcwd())\n")
    runs = [run_program(program) for _ in range(2)]
    assert all(not ok and why.startswith("AssertionError: /") for ok, why in runs), runs
    folders = [why.removeprefix("AssertionError: ") for _, why in runs]
    assert list(caller.iterdir()) == [], "the program wrote into the caller's folder"
    assert os.path.realpath(folders[0]) != os.path.realpath(caller)
    assert folders[0] != folders[1], "each run gets a folder of its own"
    assert not any(os.path.exists(f) for f in folders), "the run's folder outlives it"


@pytest.mark.parametrize("attack", [
    "posix.remove({canary!r})", "posix.unlink({canary!r})", "posix.rename({canary!r}, {moved!r})",
    "posix.replace({canary!r}, {moved!r})", "posix.truncate({canary!r}, 0)",
    "os.rename({canary!r}, {moved!r})", "os.replace({canary!r}, {moved!r})",
    "os.truncate({canary!r}, 0)",
], ids=lambda a: a.split("(")[0])
def test_the_c_module_behind_os_is_guarded_too(tmp_path, attack):
    """`import posix` gives the functions behind `os` under their own names: the guard must disable
    them there as well. Catches the guard that clears os.remove, os.rename, ... but leaves
    posix.remove, posix.rename, ... working (the line on sys.modules["posix"] dropped): the
    completion below would delete, move or empty the canary and still pass. The canary sits in a
    test's temporary folder, so an escape harms nothing."""
    canary = tmp_path / "keep" / "canary.txt"
    canary.parent.mkdir()
    canary.write_text("mine")
    moved = tmp_path / "keep" / "moved.txt"
    body = f"    import os, posix\n    {attack.format(canary=str(canary), moved=str(moved))}\n"
    ok, why = run(body + "    return 1\n")
    assert not ok and "TypeError" in why, why
    assert canary.read_text() == "mine" and not moved.exists()
