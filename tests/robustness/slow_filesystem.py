"""Runs a script (the first argument; the rest are its arguments) as on a slow shared filesystem, where the
ranks of a torchrun job drift apart: every rename of a folder takes 2 seconds, and rank 1's renames of
anything under aligned/ take 1 second each. Two ranks that publish the same folder then trip over each
other, and a rank that merges results without waiting misses the slow rank's."""
import os
import runpy
import sys
import time

_replace = os.replace


def slow_replace(src, dst, *args, **kwargs):
    if os.path.isdir(src):
        time.sleep(2)
    elif os.environ.get("RANK") == "1" and "aligned" in str(dst):
        time.sleep(1)
    return _replace(src, dst, *args, **kwargs)


os.replace = slow_replace
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
