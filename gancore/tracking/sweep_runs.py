"""MLflow runs of a sweep (gancore/sweep/): one parent run per study, the trainer's run of each trial as its child.

The sweep side keeps the parent run's id in the study (gancore.sweep.storage.PARENT_ATTR); everything that talks
to MLflow is here. Tracking trouble never fails a trial: its checkpoints are on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gancore.tracking import open_store, run_tags

if TYPE_CHECKING:
    from gancore.sweep.spec import Sweep

log = logging.getLogger(__name__)


def _store(sweep: Sweep) -> tuple[Any, str]:
    return open_store(sweep.base.track.uri, sweep.base.track.experiment)


def parent_run(sweep: Sweep, run_id: str | None, storage: str) -> str:
    """The sweep's parent MLflow run: `run_id` (the study's, set RUNNING again) if it still exists, else a new
    one tagged with the study, `storage` (shown without password) and the search space."""
    from mlflow.entities import Param

    client, exp_id = _store(sweep)
    if run_id:
        with contextlib.suppress(Exception):
            client.update_run(run_id, status="RUNNING")
            return run_id
    space = "; ".join(p.describe() for p in sweep.space)
    note = f"Optuna sweep {sweep.study}: minimise {sweep.objective} over {space}"
    tags = {**run_tags(sweep.base, sweep.dir), "gancore.sweep": "parent", "optuna.study": sweep.study,
            "optuna.storage": storage, "mlflow.note.content": note}
    run = client.create_run(exp_id, run_name=f"sweep-{sweep.study}", tags=tags)
    params = {"sweep.objective": sweep.objective, "sweep.sampler": json.dumps(sweep.sampler),
              "sweep.pruner": json.dumps(sweep.pruner), "sweep.file": str(sweep.path),
              **{f"space.{p.name}": p.describe() for p in sweep.space}}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    if sweep.path is not None:
        client.log_artifact(run.info.run_id, str(sweep.path))
    return run.info.run_id


class ChildRun:
    """Tags the trainer's MLflow run of one trial as a child of the sweep's parent run.

    The trainer creates the run inside fit(); it is found by its gancore.run_dir tag on the first evaluation (and
    when fit returns or raises); fit(tags=...) already nests it from its start.
    """

    def __init__(self, sweep: Sweep, parent_id: str | None, trial: Any, run_dir: Path, params: dict[str, Any]):
        self.sweep, self.parent_id, self.trial, self.run_dir, self.params = sweep, parent_id, trial, run_dir, params
        self.run_id: str | None = None
        self.client: Any = None

    def attach(self) -> str | None:
        if self.run_id is not None or self.parent_id is None:
            return self.run_id
        from mlflow.entities import Param, RunTag

        try:
            self.client, exp_id = _store(self.sweep)
            run = _find_run(self.client, exp_id, self.run_dir)
            if run is None:
                return None
            self.run_id = run.info.run_id
            existing = run.data.params
            tags = {"mlflow.parentRunId": self.parent_id, "optuna.study": self.sweep.study,
                    "optuna.trial": str(self.trial.number), "optuna.state": "RUNNING", "gancore.sweep": "trial"}
            params = [Param(f"optuna.{k}", str(v)) for k, v in self.params.items() if f"optuna.{k}" not in existing]
            self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()])
            self.client.update_run(self.run_id, name=f"{self.sweep.study}-trial{self.trial.number:04d}")  # a re-run
            self.trial.set_user_attr("mlflow.run_id", self.run_id)  # continues the interrupted trial's run
        except Exception as e:  # tracking trouble must not fail a trial (its checkpoints are on disk)
            log.warning("sweep: MLflow run of trial %s not tagged: %s", self.trial.number, e)
        return self.run_id

    def finish(self, state: str, value: float | None = None) -> None:
        """Tag the final Optuna state; pruned and interrupted runs end KILLED (the trainer says FAILED)."""
        if self.attach() is None:
            return
        with contextlib.suppress(Exception):
            tags = {"optuna.state": state, **({"optuna.value": repr(value)} if value is not None else {})}
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)
            if state in ("PRUNED", "INTERRUPTED"):
                self.client.set_terminated(self.run_id, "KILLED")


def _find_run(client: Any, exp_id: str, run_dir: str | Path) -> Any | None:
    """The newest MLflow run the trainer made for `run_dir` (its gancore.run_dir tag), or None."""
    path = str(Path(run_dir).resolve()).replace("'", "\\'")
    runs = client.search_runs([exp_id], f"tags.`gancore.run_dir` = '{path}'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def close_child_runs(sweep: Sweep, t: Any, parent_id: str | None) -> None:
    """Nest the MLflow run(s) of a killed trial `t` (a FrozenTrial) under the parent, tag them INTERRUPTED and end
    them KILLED (found by id and by run dir: the worker may have died before it stored the id, or before its first
    evaluation)."""
    if not sweep.base.track.enabled:
        return
    with contextlib.suppress(Exception):
        client, exp_id = _store(sweep)
        run_dir = t.user_attrs.get("gancore.run_dir")
        found = _find_run(client, exp_id, run_dir) if run_dir else None
        for run_id in {t.user_attrs.get("mlflow.run_id"), found.info.run_id if found else None} - {None}:
            tags = {"optuna.study": sweep.study, "optuna.trial": str(t.number), "optuna.state": "INTERRUPTED",
                    **({"mlflow.parentRunId": parent_id} if parent_id else {})}
            for k, v in tags.items():
                client.set_tag(run_id, k, v)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, "KILLED")


def log_report(sweep: Sweep, parent_id: str, best: Any | None, finished: int, figures: list[Path],
               files: list[Path], final: bool | None) -> None:
    """The sweep's report on its parent run: finished trials, the best trial's value and params, Optuna's figures
    (under optuna/) and `files`; the run ends FINISHED (final), KILLED (interrupted) or stays as it is (None)."""
    from mlflow.entities import Metric, RunTag

    from gancore.metrics.fidelity import MetricKey

    try:
        client, _ = _store(sweep)
        tags = {"sweep.finished_trials": str(finished)}
        metrics = []
        if best is not None:
            tags.update({"best.trial": str(best.number), "best.value": repr(best.value),
                         **{f"best.{k}": str(v) for k, v in best.params.items()}})
            best_key = MetricKey.parse(sweep.objective).as_best().name  # best_fid_lenet_10k
            metrics.append(Metric(best_key, best.value, int(time.time() * 1000), finished))
        client.log_batch(parent_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        for f in figures:
            client.log_artifact(parent_id, str(f), "optuna")
        for f in files:
            if f.is_file():
                client.log_artifact(parent_id, str(f))
        if final is not None:
            client.set_terminated(parent_id, "FINISHED" if final else "KILLED")
    except Exception as e:
        log.warning("sweep: parent MLflow run not updated: %s", e)
