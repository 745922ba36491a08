"""submitit executors: Slurm (sbatch), local (subprocesses on this machine) and debug (in this process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gancore.cluster.resources import CLUSTERS, Resources, parse_mem_gb, parse_time_min, slurm_problem
from gancore.errors import LaunchError


def make_executor(cluster: str, folder: str | Path, res: Resources, name: str = "gancore") -> Any:
    """A submitit AutoExecutor for `cluster` with `res`; Slurm jobs requeue on preemption/timeout."""
    import submitit

    if cluster not in CLUSTERS:
        raise LaunchError(f"unknown cluster {cluster!r}; known: {', '.join(CLUSTERS)}")
    if cluster == "slurm":
        problem = slurm_problem()
        if problem:
            raise LaunchError(f"{problem}; use --cluster local to run on this machine")
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": parse_time_min(res.time),
        "nodes": res.nodes,
        "tasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus,
        "gpus_per_node": res.gpus or None,  # --gpus-per-node=0 is refused where there are no GPUs
        "mem_gb": parse_mem_gb(res.mem) if res.mem else None,
        "slurm_partition": res.partition,
        "slurm_account": res.account,
        "slurm_qos": res.qos,
        "slurm_additional_parameters": {"requeue": True},
    }
    if res.cpus:  # srun >= 22.05 does not inherit --cpus-per-task from the batch allocation
        params["slurm_srun_args"] = ["--cpus-per-task", str(res.cpus)]
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None and (cluster == "slurm" or not k.startswith("slurm_"))})
    return executor
