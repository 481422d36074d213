"""Model-written code runs contained (extras/sandbox.py), under each layer this machine allows
("namespaces": bubblewrap; "user": an unprivileged uid; "python": the guards alone). The first part:
a completion that is wrong, loops, crashes, deletes files, forks without end, eats memory, writes a
huge file or leaves a child running fails its problem and harms nothing outside its run, under every
layer. The second part: the escapes that code written to get out tries, each harmless if it gets
out (canaries in a temporary folder, children that end by themselves, a socket and a process of
the test's own), each contained exactly by the layers the docs say (CONTAINED), and escaping the
others."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from extras import sandbox
from extras.benchmarks import humaneval_program

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=sandbox.LAYERS)
def layer(request):
    """Each layer in turn. Where this machine cannot use one, the test is skipped, except where the
    layer should run: in CI as root, "user" always, and "namespaces" once bubblewrap is installed
    (.ci/run installs it; a failing probe must not pass for a missing tool)."""
    if request.param not in sandbox.usable_layers():
        expected = {"user": os.geteuid() == 0, "namespaces": bool(shutil.which("bwrap"))}
        if os.environ.get("CI") and os.geteuid() == 0 and expected.get(request.param):
            pytest.fail(f"the {request.param!r} layer is not usable in CI, where it should be "
                        f"(for namespaces: may bubblewrap create user namespaces here?)")
        pytest.skip(f"the {request.param!r} layer is not usable on this machine")
    return request.param


def run_program(program: str, layer: str, **kwargs):
    return sandbox.run_program(program, layer=layer, **kwargs)


def run(body: str, layer: str, timeout: float = 5.0):
    """A program whose function body is the model's completion, checked as HumanEval checks it."""
    problem = {"prompt": "def f():\n", "test": "def check(g):\n    assert g() == 1\n",
               "entry_point": "f"}
    return run_program(humaneval_program(problem, body), layer, timeout=timeout)


PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(2, 3) == 5\n"}


@pytest.mark.parametrize("completion,passes", [
    ("    return a + b\n", True),
    ("    return a - b\n", False),
    ("    while True:\n        pass\n", False),        # infinite loop: killed by the timeout
    ("    import os\n    os.abort()\n", False),          # a crash of the interpreter
])
def test_humaneval_scoring_survives_wrong_looping_and_crashing_completions(completion, passes,
                                                                           layer):
    ok, why = run_program(humaneval_program(PROBLEM, completion), layer, timeout=2.0)
    assert ok is passes, why


def test_humaneval_infinite_loop_reports_the_timeout(layer):
    program = humaneval_program(PROBLEM, "    while True:\n        pass\n")
    ok, why = run_program(program, layer, timeout=1.0)
    assert not ok and why == "timed out after 1.0 s"


def test_a_correct_completion_still_passes(layer):
    assert run("    import math, json, collections\n    return 1\n", layer) == (True, "")


@pytest.mark.parametrize("escape", ["    import sys\n    sys.exit(0)\n",
                                    "    import os\n    os._exit(0)\n",
                                    "    raise SystemExit\n"],
                         ids=["sys.exit", "os._exit", "SystemExit"])
def test_a_completion_that_exits_cleanly_before_the_tests_fails(escape, layer):
    """Exit status 0 is not a pass: the tests must have run to the end (the reference harness
    agrees)."""
    assert run(escape, layer) == (False, "the program exited before its end")


def test_what_the_program_prints_does_not_hide_its_end(layer):
    assert run("    print('lots of output ' * 1000, end='')\n    return 1\n", layer) == (True, "")


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
def test_a_completion_that_deletes_files_outside_its_folder_fails_and_deletes_nothing(
        tmp_path, attack, layer):
    precious = tmp_path / "keep" / "precious.txt"
    precious.parent.mkdir()
    precious.write_text("mine")
    ok, why = run(attack.format(path=str(precious), folder=str(precious.parent)), layer)
    assert not ok and why
    assert precious.read_text() == "mine"


@pytest.mark.parametrize("bomb", [
    "    import os\n    while True:\n        os.fork()\n",
    "    import multiprocessing\n    while True:\n"
    "        multiprocessing.Process(target=print).start()\n",
], ids=["os.fork", "multiprocessing"])
def test_a_fork_bomb_fails_at_once(bomb, layer):
    t0 = time.time()
    ok, why = run(bomb, layer)
    assert not ok and time.time() - t0 < 4


def test_a_memory_hog_fails_with_a_memory_error_not_the_machine(layer):
    t0 = time.time()
    # fits this machine, not the limit
    ok, why = run("    block = bytearray(4 * 2**30)\n    return 1\n", layer)
    assert not ok and "MemoryError" in why and time.time() - t0 < 4


def test_a_huge_file_is_cut_off_at_the_file_size_limit(layer):
    ok, why = run("    with open('big.bin', 'wb') as f:\n        for _ in range(100):\n"
                  "            f.write(bytes(2**20))\n    return 1\n", layer)
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
def test_a_child_left_running_is_killed_with_the_program(ends, layer):
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
    run(body, layer, timeout=2.0)
    time.sleep(0.2)
    assert processes_with(marker) == []


def test_the_program_runs_in_a_fresh_temporary_folder_of_its_own(tmp_path, monkeypatch, layer):
    """A program's relative paths land in a folder made for that run and deleted after it, never in
    the caller's working directory. Catches run_program starting the program in the caller's folder
    (cwd left out): a huge-file completion would then write 16 MiB into the repository, and any
    completion could read or overwrite what lies there. (Under "namespaces" the folder is a tmpfs
    at /tmp of the run's own mount namespace: the same path each time, a new folder.)"""
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    # the program lists its folder, writes a relative file, then fails with both as the reason
    program = ("import os\nseen = sorted(os.listdir('.'))\n"
               "open('left-behind.txt', 'w').write('x')\n"
               "raise AssertionError(f'{os.getcwd()} {seen}')\n")
    runs = [run_program(program, layer) for _ in range(2)]
    assert all(not ok and why.startswith("AssertionError: /") for ok, why in runs), runs
    folders = [why.removeprefix("AssertionError: ").split(" ")[0] for _, why in runs]
    assert list(caller.iterdir()) == [], "the program wrote into the caller's folder"
    assert os.path.realpath(folders[0]) != os.path.realpath(caller)
    assert "left-behind.txt" not in runs[1][1], "the second run found the first one's file"
    if layer != "namespaces":
        assert not any(os.path.exists(f) for f in folders), "the run's folder outlives it"


@pytest.mark.parametrize("attack", [
    "posix.remove({canary!r})", "posix.unlink({canary!r})", "posix.rename({canary!r}, {moved!r})",
    "posix.replace({canary!r}, {moved!r})", "posix.truncate({canary!r}, 0)",
    "os.rename({canary!r}, {moved!r})", "os.replace({canary!r}, {moved!r})",
    "os.truncate({canary!r}, 0)",
], ids=lambda a: a.split("(")[0])
def test_the_c_module_behind_os_is_guarded_too(tmp_path, attack, layer):
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
    ok, why = run(body + "    return 1\n", layer)
    assert not ok and "TypeError" in why, why
    assert canary.read_text() == "mine" and not moved.exists()


# --- Escapes, layer by layer ----------------------------------------------------------------------

# What each layer contains (docs/evaluation.md says the same): every other layer lets it out, and
# the tests check that too, so the table cannot claim more or less than is true here.
CONTAINED = {
    "writes outside its folder": {"namespaces", "user"},
    "writes into a world-writable folder": {"namespaces"},
    "processes that outlive the run": {"namespaces", "user"},
    "killing another process": {"namespaces", "user"},
    "new processes (fork memory)": {"namespaces", "user"},
    "disk beyond the work folder's size": {"namespaces"},
    "reading the caller's environment": {"namespaces", "user"},
    "connecting to a local socket": {"namespaces"},
    "seeing other processes": {"namespaces"},
    "a user namespace of its own (own mounts)": {"namespaces"},
    "reading the caller's standard input": {"namespaces", "user", "python"},
}
if os.geteuid() != 0:           # as another user than root, the process limit binds "python" too
    for row in ("processes that outlive the run", "new processes (fork memory)"):
        CONTAINED[row] = CONTAINED[row] | {"python"}

# Unguarded functions, as code written to escape gets them: the C module behind `os` imported
# afresh, and ctypes imported again past the guard's empty sys.modules entry.
UNGUARDED = """import importlib, sys
sys.modules.pop('posix', None)
posix = importlib.import_module('posix')
sys.modules.pop('ctypes', None)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
"""


def contained(what: str, layer: str, escaped: bool):
    """Assert that `what` was contained under `layer` exactly when CONTAINED says so."""
    if layer in CONTAINED[what]:
        assert not escaped, f"{what}: got out under the {layer!r} layer"
    else:
        assert escaped, f"{what}: contained under the {layer!r} layer, which the docs deny"


CANARIES = ("open", "io", "fileio", "trunc", "unlink", "ctypes")


@pytest.fixture
def shared_folder():
    """A folder outside the run that every user can enter (mode 0o755, root's when we are root),
    holding canaries no other user may change (0o644), and a folder anyone may write (0o777, as
    /tmp is)."""
    # /var/tmp, not /tmp: the "namespaces" layer hides /tmp behind its own tmpfs, which would
    # hide a file system left writable
    d = Path(tempfile.mkdtemp(prefix="nanofuse-canary-",
                              dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        d.chmod(0o755)
        for name in CANARIES:
            (d / f"{name}.txt").write_text("mine")
            (d / f"{name}.txt").chmod(0o644)
        (d / "open").mkdir(mode=0o777)
        (d / "open").chmod(0o777)
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], check=True)


def test_writes_outside_the_work_folder(shared_folder, layer):
    """Plain open(), io.open, _io.FileIO, os.open with O_TRUNC, a fresh posix.unlink and libc's
    unlink through ctypes, at files outside the run: a model can write the first by accident. Then
    a new file in a folder anyone may write. Catches the program run as root (user= dropped) or the
    file system left writable (--ro-bind / / as --bind)."""
    d = str(shared_folder)
    program = UNGUARDED + f"""import io, _io
for attempt in (lambda: open('{d}/open.txt', 'w').write('x'),
                lambda: io.open('{d}/io.txt', 'w').write('x'),
                lambda: _io.FileIO('{d}/fileio.txt', 'w').write(b'x'),
                lambda: posix.open('{d}/trunc.txt', posix.O_WRONLY | posix.O_TRUNC),
                lambda: posix.unlink('{d}/unlink.txt'),
                lambda: libc.unlink(b'{d}/ctypes.txt'),
                lambda: open('{d}/open/new.txt', 'w').write('x')):
    try:
        attempt()
    except OSError:
        pass
"""
    run_program(program, layer)
    left = {p.name: p.read_text() for p in shared_folder.glob("*.txt")}
    contained("writes outside its folder", layer,
              left != {f"{n}.txt": "mine" for n in CANARIES})
    contained("writes into a world-writable folder", layer, (shared_folder / "open" / "new.txt")
              .exists())


def test_processes_that_outlive_the_run(layer):
    """A double fork with setsid through the fresh posix module: the grandchild leaves the run's
    process group, which the kill at the end misses. It sleeps 3 s and ends by itself. Catches
    the program run as root (NPROC does not bind root) without a PID namespace of its own."""
    marker = f"nanofuse-outlives-{os.getpid()}-{layer}"
    program = UNGUARDED + f"""
try:
    if posix.fork() == 0:
        posix.setsid()
        if posix.fork() == 0:
            posix.execv('/bin/sleep', ['{marker}', '3'])
        posix._exit(0)
except OSError:
    pass
import time
time.sleep(0.5)
"""
    run_program(program, layer)
    time.sleep(0.5)
    contained("processes that outlive the run", layer, processes_with(marker) != [])


def test_killing_another_process(layer):
    """SIGKILL to a process of the test's own, by pid, through posix and through libc."""
    victim = subprocess.Popen(["sleep", "30"])
    try:
        program = UNGUARDED + f"""
for attempt in (lambda: posix.kill({victim.pid}, 9), lambda: libc.kill({victim.pid}, 9)):
    try:
        attempt()
    except OSError:
        pass
"""
        run_program(program, layer)
        time.sleep(0.2)
        contained("killing another process", layer, victim.poll() is not None)
    finally:
        victim.kill()
        victim.wait()


def test_new_processes(layer):
    """Forks (each child ends at once): the memory limit is per process, so forks multiply it.
    Catches the program run as root, for whom RLIMIT_NPROC does not hold."""
    program = UNGUARDED + """
forked = 0
for _ in range(8):
    try:
        if posix.fork() == 0:
            posix._exit(0)
        forked += 1
    except OSError:
        pass
raise AssertionError(f'forked {forked}')
"""
    ok, why = run_program(program, layer)
    assert why.startswith("AssertionError: forked ")
    contained("new processes (fork memory)", layer, why != "AssertionError: forked 0")


def test_disk_beyond_the_work_folders_size(layer):
    """16 files of 1 MiB each, every one under the file-size limit (1 MiB here), into each folder a
    program may find writable (its own, /dev/shm, /run, /dev): only tmpfs of bounded size (four
    files' worth) and read-only mounts stop the sum. Catches /run or /dev left writable (tmpfs of
    half the RAM each, outside the memory limit). What gets written under the weaker layers is
    removed."""
    program = """
written = 0
for folder in ('.', '/dev/shm', '/run', '/dev'):
    for i in range(16):
        try:
            with open(f'{folder}/nanofuse-part-{i}.bin', 'wb') as f:
                f.write(bytes(2**20 - 1))
            written += 2**20 - 1
        except OSError:
            pass
raise AssertionError(f'wrote {written}')
"""
    try:
        ok, why = run_program(program, layer, file_size=2**20)
    finally:
        for folder in ("/dev/shm", "/run", "/dev"):
            for part in Path(folder).glob("nanofuse-part-*.bin"):
                part.unlink()
    written = int(why.removeprefix("AssertionError: wrote "))
    contained("disk beyond the work folder's size", layer, written > 2 * 4 * 2**20)


def test_reading_the_callers_environment(layer):
    """/proc/<pid>/environ of the process that runs the sandbox (its parent, with a secret in its
    environment), and of every process the program can see."""
    program = """import os
found = []
for pid in {os.getppid(), 1, *(int(p) for p in os.listdir('/proc') if p.isdigit())}:
    try:
        found += [v for v in open(f'/proc/{pid}/environ', 'rb').read().split(b'\\0')
                  if v.startswith(b'NANOFUSE_SECRET=')]
    except OSError:
        pass
raise AssertionError(found)
"""
    secret = os.urandom(8).hex()
    runner = ("import sys\nfrom extras.sandbox import run_program\n"
              "print(run_program(sys.stdin.read(), layer=sys.argv[1]))")
    p = subprocess.run([sys.executable, "-c", runner, layer], input=program, cwd=ROOT, text=True,
                       env={**os.environ, "NANOFUSE_SECRET": secret}, capture_output=True,
                       timeout=60)
    assert "AssertionError" in p.stdout, p.stdout + p.stderr
    contained("reading the caller's environment", layer, secret in p.stdout)


def test_connecting_to_a_local_socket(layer):
    """A TCP connection to a port the test listens on (as a local service would)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        run_program("import socket\ntry:\n    socket.create_connection(('127.0.0.1', "
                    f"{port}), 1).sendall(b'out')\nexcept OSError:\n    pass\n", layer)
        try:
            server.accept()[0].close()
            escaped = True
        except TimeoutError:
            escaped = False
    contained("connecting to a local socket", layer, escaped)


@pytest.mark.parametrize("where", ["argv", "cmdline", "__main__", "excepthook"])
def test_a_wrong_answer_cannot_fake_its_end(where, layer):
    """A wrong answer that looks for the end token where a runner might keep it (its argv,
    /proc/self/cmdline, the __main__ module), prints every candidate and leaves with exit status 0
    before its tests, or from an excepthook once a test fails. Catches the token passed in argv or
    left in the launcher's globals (as it was)."""
    look = {"argv": "found = list(sys.argv)",
            "cmdline": "found = open('/proc/self/cmdline').read().split('\\0')",
            "__main__": "import __main__\nfound = [str(v) for v in vars(__main__).values()]",
            "excepthook": "import __main__\nfound = sys.argv + "
                          "[str(v) for v in vars(__main__).values()]"}[where]
    leave = ("def hook(*args):\n    print(*found)\n    sys.stdout.flush()\n    posix._exit(0)\n"
             "sys.excepthook = hook\nassert 1 + 1 == 3\n" if where == "excepthook" else
             "print(*found)\nsys.stdout.flush()\nposix._exit(0)\n")
    assert run_program(UNGUARDED + look + "\n" + leave, layer)[0] is False


def test_the_weaker_layers_say_what_they_leave_open(capsys):
    """A weaker layer prints one warning line, once, naming what it does not contain (and a note
    where the system's Python stands in for ours)."""
    sandbox.warn_once.cache_clear()
    for _ in range(2):
        sandbox.warn_once("python")
    sandbox.warn_once("namespaces")
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert err == [f"warning: model-written code runs contained by the 'python' layer only: "
                   f"{sandbox.NOT_CONTAINED['python']}"]


def test_a_layer_forced_by_the_environment_leaves_out_the_stronger_ones(monkeypatch):
    monkeypatch.setenv("NANOFUSE_SANDBOX", "python")
    sandbox.usable_layers.cache_clear()
    try:
        assert sandbox.usable_layers() == ("python",)
        with pytest.raises(ValueError, match="'namespaces' is not usable here"):
            sandbox.run_program("pass", layer="namespaces")
        monkeypatch.setenv("NANOFUSE_SANDBOX", "docker")
        sandbox.usable_layers.cache_clear()
        with pytest.raises(ValueError, match="NANOFUSE_SANDBOX='docker'"):
            sandbox.usable_layers()
    finally:
        monkeypatch.delenv("NANOFUSE_SANDBOX")
        sandbox.usable_layers.cache_clear()


def test_seeing_other_processes(layer):
    """Whether the test's own process shows in the program's /proc. Catches the PID namespace
    dropped (--unshare-all without its PID part), which the unprivileged user hides otherwise."""
    ok, why = run_program(f"import os\nraise AssertionError(os.path.exists('/proc/{os.getpid()}'))",
                          layer)
    assert why in ("AssertionError: True", "AssertionError: False"), why
    contained("seeing other processes", layer, why == "AssertionError: True")


def test_the_callers_environment_does_not_reach_the_program(layer, monkeypatch):
    """Under every layer the program starts with PATH and PYTHONHASHSEED alone (and
    OMP_NUM_THREADS=1, which the guard sets). Catches the environment passed on (env= dropped): API
    keys and tokens of the caller's shell; and the thread setting dropped."""
    secret = os.urandom(8).hex()
    monkeypatch.setenv("NANOFUSE_SECRET", secret)
    ok, why = run_program("import os\nraise AssertionError(dict(os.environ))", layer)
    env = eval(why.removeprefix("AssertionError: "))
    # besides: Python's locale coercion (LC_CTYPE), bubblewrap's --chdir (PWD), and the guard's
    # one thread for numerical libraries (a program's threads share its memory limit)
    assert set(env) - {"LC_CTYPE", "PWD"} == {"PATH", "PYTHONHASHSEED", "OMP_NUM_THREADS"}, why
    assert env["OMP_NUM_THREADS"] == "1" and secret not in why


def test_a_program_past_its_timeout_leaves_nothing_running(layer):
    """A program asleep past the wall-clock timeout (so the CPU limit never ends it) is gone once
    run_program returns. Catches bubblewrap's sandbox left alive when bwrap is killed
    (--die-with-parent dropped: bwrap's --new-session puts it out of the killed process group)."""
    memory = 2**30 + int.from_bytes(os.urandom(3), "big")       # in its command line: our mark
    assert run_program("import time\ntime.sleep(30)", layer, timeout=1.0, memory=memory) == (
        False, "timed out after 1.0 s")
    t0 = time.time()
    while processes_with(f"\0{memory}\0") and time.time() - t0 < 2:
        time.sleep(0.05)
    assert processes_with(f"\0{memory}\0") == []


def test_the_interpreter_runs_isolated(layer):
    """python -I: no user site-packages, and neither the work folder nor the caller's on sys.path.
    Catches -I dropped (python -c puts the current folder first on sys.path)."""
    ok, why = run_program("import os, sys\nraise AssertionError((sys.flags.isolated, "
                          "'' in sys.path or os.getcwd() in sys.path))", layer)
    assert why == "AssertionError: (1, False)", why


def test_a_run_whose_caller_is_killed_ends_by_its_cpu_limit(layer):
    """The evaluator killed (SIGKILL) while a program loops: no wall-clock timeout is left to stop
    it, so the CPU-time limit (timeout + 1 s) or, under "namespaces", bwrap's parent-death signal
    must. Catches RLIMIT_CPU dropped."""
    memory = 2**30 + int.from_bytes(os.urandom(3), "big")       # in its command line: our mark
    mark = f"\0{memory}\0"
    runner = ("import sys\nfrom extras.sandbox import run_program\n"
              "run_program('while True:\\n    pass', timeout=2.0, layer=sys.argv[1], "
              f"memory={memory})")
    caller = subprocess.Popen([sys.executable, "-c", runner, layer], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    try:
        t0 = time.time()
        while not processes_with(mark) and time.time() - t0 < 30:
            time.sleep(0.05)
        assert processes_with(mark), "the program never started"
        caller.kill()
        t0 = time.time()
        while processes_with(mark) and time.time() - t0 < 30:      # 3 s of CPU, on busy cores
            time.sleep(0.1)
        assert processes_with(mark) == [], "the loop outlived its caller"
    finally:
        caller.kill()
        caller.wait()
        for pid in processes_with(mark):
            os.kill(pid, 9)


# The Python guards, the one layer everywhere (the list is written here again, not read from the
# sandbox, so that a name dropped there fails here).
GUARDED = ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
           "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
           "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "chdir", "posix_spawn",
           "posix_spawnp", "setsid", "setpgid", "setpgrp", "execv", "execve", "spawnv", "popen",
           "link", "symlink", "mkfifo", "mknod")
BLOCKED = ("ctypes", "multiprocessing", "_posixsubprocess", "resource", "psutil", "joblib")


def test_the_guards_disable_the_functions_behind_os_and_posix():
    """Every function the guard lists is None in `os` and in `posix` (under the "python" layer;
    the guard is the same under every layer). Catches a name dropped from the guard, which the
    layers above may hide on this machine but not on one without them."""
    program = ("import os, posix\nnames = " + repr(GUARDED) + "\nraise AssertionError(["
               "n for n in names if getattr(os, n, None) or getattr(posix, n, None)])")
    assert run_program(program, "python") == (False, "AssertionError: []")


@pytest.mark.parametrize("module", BLOCKED)
def test_the_guards_block_the_modules_that_start_processes(module):
    ok, why = run_program(f"import {module}", "python")
    assert why == f"ModuleNotFoundError: import of {module} halted; None in sys.modules", why


def test_threads_share_the_memory_limit(layer):
    """Eight threads of 256 MiB each: threads share one address space, so the 1 GiB limit holds
    for their sum (forks, which would multiply it, are the escape tests' business). Under the
    unprivileged layers no thread starts: Linux counts threads against RLIMIT_NPROC."""
    program = """import threading
blocks, errors = [], []
def grab():
    try:
        blocks.append(bytearray(2**28))
    except MemoryError:
        errors.append(1)
threads = [threading.Thread(target=grab) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
raise AssertionError(len(blocks))
"""
    ok, why = run_program(program, layer)
    if layer == "python" and os.geteuid() == 0:         # root: the process limit does not hold
        assert why.startswith("AssertionError: ") and int(why.split()[-1]) <= 4, why
    else:                           # a thread is a process to RLIMIT_NPROC: none starts at all
        assert why == "RuntimeError: can't start new thread", why


def test_a_user_namespace_of_its_own(layer):
    """unshare(CLONE_NEWUSER) through libc: in a user namespace of its own the program may mount a
    tmpfs of any size (memory outside every limit). Catches --disable-userns dropped."""
    program = UNGUARDED + "raise AssertionError(libc.unshare(0x10000000))\n"   # CLONE_NEWUSER
    ok, why = run_program(program, layer)
    assert why in ("AssertionError: 0", "AssertionError: -1"), why
    contained("a user namespace of its own (own mounts)", layer, why == "AssertionError: 0")


def test_reading_the_callers_standard_input(layer):
    """A program that reads its standard input while the caller's holds a secret (input() would
    also wait there, taking a terminal's keystrokes). Catches stdin left to the child."""
    program = "import sys\nraise AssertionError(sys.stdin.read())"
    secret = os.urandom(8).hex()
    runner = ("import sys\nfrom extras.sandbox import run_program\n"
              f"print(run_program({program!r}, layer=sys.argv[1]))")
    p = subprocess.run([sys.executable, "-c", runner, layer], input=secret, cwd=ROOT, text=True,
                       capture_output=True, timeout=60)
    assert "AssertionError" in p.stdout, p.stdout + p.stderr
    contained("reading the caller's standard input", layer, secret in p.stdout)


def test_a_unix_socket_anyone_may_write_is_reachable_under_every_layer(layer):
    """The limit the docs state: a Unix socket file that every user may write (mode 0777, in a
    folder that the read-only file system still shows) takes connections from every layer; the
    network namespace isolates TCP and abstract sockets only. If this starts to fail, a layer
    contains it: update the docs' table."""
    folder = Path(tempfile.mkdtemp(prefix="nanofuse-socket-",
                                   dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        folder.chmod(0o755)
        path = folder / "s"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            path.chmod(0o777)
            server.listen()
            server.settimeout(0.5)
            run_program("import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n"
                        f"    s.connect({str(path)!r})\n    s.sendall(b'out')\n"
                        "except OSError:\n    pass\n", layer)
            server.accept()[0].close()              # TimeoutError if it did not get through
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=True)


def test_run_by_an_ordinary_user():
    """nanofuse run by a user other than root: the sandbox (copied where every user can read it; it
    needs the standard library alone) run as an unprivileged uid with a home folder of its own.
    bubblewrap then runs as that user: its home folder (keys, tokens) is hidden from the program,
    and the process limit binds every layer, "python" included."""
    python = sandbox.reachable_python()
    if os.geteuid() != 0 or python is None:
        pytest.skip("needs root, to become another user, and a Python every user can run")
    uid = sandbox.unused_uid()
    # every user may enter /var/tmp, and the "namespaces" layer shows it (it hides /tmp)
    tmp_path = Path(tempfile.mkdtemp(prefix="nanofuse-user-",
                                     dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    try:
        ordinary_user_runs(python, uid, tmp_path)
    finally:
        subprocess.run(["rm", "-rf", str(tmp_path)], check=True)


def ordinary_user_runs(python: str, uid: int, tmp_path: Path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "sandbox.py").write_bytes((ROOT / "extras" / "sandbox.py").read_bytes())
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("key")
    os.chown(home, uid, uid)
    os.chown(home / "secret.txt", uid, uid)
    for folder in (tmp_path, code):
        folder.chmod(0o755)
    program = UNGUARDED + f"""
try:
    seen = open({str(home / 'secret.txt')!r}).read()
except OSError:
    seen = 'hidden'
try:
    forked = posix.fork() != 0 or posix._exit(0)
except OSError:
    forked = False
raise AssertionError((seen, forked))
"""
    runner = ("import sys\nsys.path.insert(0, sys.argv[1])\nimport sandbox\n"
              "print(sandbox.usable_layers())\n"
              "for layer in sandbox.usable_layers():\n"
              f"    print(layer, sandbox.run_program({program!r}, layer=layer)[1])")
    p = subprocess.run([python, "-I", "-c", runner, str(code)], cwd="/", user=uid, group=uid,
                       extra_groups=[], env={"PATH": os.environ["PATH"], "HOME": str(home)},
                       capture_output=True, text=True, timeout=120)
    lines = p.stdout.splitlines()
    assert p.returncode == 0 and lines, p.stdout + p.stderr
    layers = eval(lines[0])
    if "namespaces" in sandbox.usable_layers():
        assert layers == ("namespaces", "python"), p.stdout + p.stderr
        assert "namespaces AssertionError: ('hidden', False)" in lines
    assert "python AssertionError: ('key', False)" in lines, p.stdout + p.stderr
