"""The torch.distributed rendezvous of a multi-process job: MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE.

One pure function computes them (`rendezvous_env`); the submitit job (gancore/cluster/job.py) applies its result, and
slurm/train.sh gets the job-wide part from this module's command line, so the port rule lives only here:

    eval "$(python -m gancore.cluster.rendezvous --job-id 123 --tasks 8 --nodes 2 node1 node2)"
    # -> export MASTER_ADDR=node1 MASTER_PORT=20123 WORLD_SIZE=8 LOCAL_WORLD_SIZE=4

(each Slurm task then sets RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID, the same ranks rendezvous_env gives it).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from typing import Mapping, MutableMapping, Sequence

JOB_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE")  # equal for every process of the job
KEEP_IF_SET = ("MASTER_ADDR", "MASTER_PORT")  # a user's (or launcher's) choice wins over ours


def master_port(job_id: str | int | None) -> int:
    """A rendezvous port from the job id: 20000 + id % 20000 (array ids '45_3' use their digits, 453)."""
    digits = re.sub(r"\D", "", str(job_id or "")) or "0"
    return 20000 + int(digits) % 20000


def rendezvous_env(job_id: str | int | None, hostnames: Sequence[str], num_tasks: int, num_nodes: int,
                   global_rank: int = 0, local_rank: int = 0) -> dict[str, str]:
    """The variables Accelerate / torch.distributed read for process `global_rank` of `num_tasks` on `num_nodes`.

    Rank 0 runs on the first node, which therefore hosts the rendezvous (MASTER_ADDR = hostnames[0]).
    """
    return {
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port(job_id)),
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(num_tasks),
        "LOCAL_WORLD_SIZE": str(num_tasks // max(1, num_nodes)),
    }


def apply(env: Mapping[str, str], environ: MutableMapping[str, str] = os.environ) -> None:
    """Set `env` in the process environment; MASTER_ADDR / MASTER_PORT only where they are not set already."""
    for key, value in env.items():
        if key in KEEP_IF_SET:
            environ.setdefault(key, value)
        else:
            environ[key] = value


def main(argv: Sequence[str] | None = None) -> int:
    """Print the job-wide variables as one `export ...` line for a batch script to eval."""
    ap = argparse.ArgumentParser(prog="python -m gancore.cluster.rendezvous", description=main.__doc__)
    ap.add_argument("--job-id", required=True, help="$SLURM_JOB_ID")
    ap.add_argument("--tasks", type=int, required=True, help="processes in the job ($SLURM_NTASKS)")
    ap.add_argument("--nodes", type=int, default=1, help="$SLURM_NNODES")
    ap.add_argument("hostnames", nargs="+", help="the job's nodes in order (scontrol show hostnames)")
    args = ap.parse_args(argv)
    env = rendezvous_env(args.job_id, args.hostnames, args.tasks, args.nodes)
    print("export " + " ".join(f"{k}={shlex.quote(env[k])}" for k in JOB_KEYS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
