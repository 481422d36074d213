"""Runs train.py with the arguments given and kills each process with SIGKILL as soon as its first
checkpoint is saved, as a crash would (torchrun then stops every rank): a resume must start from
that checkpoint."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train  # noqa: E402
from extras import distributed  # noqa: E402

save = distributed.save_checkpoint


def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


distributed.save_checkpoint = save_then_die
train.main(sys.argv[1:])
