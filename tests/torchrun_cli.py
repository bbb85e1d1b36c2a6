"""Start the histomil command line under torchrun (CPU processes, gloo) for the multi-process tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(command: Sequence[object], processes: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node processes -m histomil COMMAND``, one thread per process and no
    rank variables inherited from the test process; a failure shows the end of its output."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--standalone",
                           "-m", "histomil", *map(str, command)], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def history(run: Path) -> list[dict[str, float]]:
    """A run folder's history.csv, every value as a float."""
    with open(run / "history.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
