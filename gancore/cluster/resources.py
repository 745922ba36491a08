"""What a run asks the scheduler for (`Resources`, the one place its Slurm defaults live) and whether Slurm is here.

jobs/submit.py's options and the sweep file's `slurm:` section take their defaults from `Resources`' fields; the
`#SBATCH` lines of slurm/train.sh and slurm/sweep.sh mirror them.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass

from gancore.errors import LaunchError

CLUSTERS = ("slurm", "local", "debug")  # submitit's executors: sbatch / subprocesses here / in this process


@dataclass(frozen=True)
class Resources:
    """Per run. GPUs are per node and get one task (= one training process) each; CPUs per task, memory per node."""

    gpus: int = 0  # per node; 0 = CPU only (--gpus-per-node=0 is refused where there are no GPUs, so it is left out)
    nodes: int = 1
    cpus: int | None = 4  # per task; None = the cluster's default
    mem: str | None = "16G"  # Slurm spelling: 16G, 500M; a bare number is GB; None = the cluster's default
    time: str = "4:00:00"  # Slurm spelling: minutes, H:MM:SS, D-HH[:MM[:SS]]
    partition: str | None = None  # None: the cluster's (or $SBATCH_PARTITION's) default
    account: str | None = None
    qos: str | None = None

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus)


def parse_time_min(text: str) -> int:
    """Slurm's --time spellings -> whole minutes (rounded up): 90, 1:30:00, 2-00, 1-12:00:00, 45:30 (min:s)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise LaunchError(f"bad --time {text!r}; use minutes (90), H:MM:SS (4:00:00) or D-HH:MM:SS (1-00:00:00)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # minutes
        seconds = a * 60
    if seconds <= 0:
        raise LaunchError(f"--time {text!r} is zero")
    return math.ceil(seconds / 60)


def parse_mem_gb(text: str) -> float:
    """16G / 16GB / 500M / 1T / 16 (GB) -> GB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip(), re.IGNORECASE)
    if not m:
        raise LaunchError(f"bad --mem {text!r}; use e.g. 16G or 500M")
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1.0}[m.group(2).upper()]
    return float(m.group(1)) * scale


def slurm_problem() -> str | None:
    """Why Slurm cannot be used here (None when `sbatch` exists and `sinfo` answers)."""
    if shutil.which("sbatch") is None:
        return "sbatch not found on PATH (no Slurm client here)"
    try:
        subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=True)
    except subprocess.CalledProcessError as e:
        why = " ".join((e.stderr or e.stdout or "").split())[:200] or f"exit code {e.returncode}"
        return f"sinfo failed: {why}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {type(e).__name__}: {e}"
    return None
