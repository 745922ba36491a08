"""One trial: trial params -> config -> fit(out=<sweep dir>/trial_NNNN, on_eval=report and prune) -> the objective
metric (an fid_* name) of the last evaluation, minimised."""

from __future__ import annotations

import math
import signal
from typing import Any

from gancore.errors import NonFiniteLossError, SweepError
from gancore.sweep.spec import Sweep, trial_config
from gancore.sweep.trials import slurm_task, worker_id
from gancore.train.rundir import RunDir
from gancore.tracking.sweep_runs import ChildRun


class TrialInterrupted(Exception):
    """A trial stopped by a signal (its checkpoint is kept); the worker re-queues it and exits."""

    def __init__(self, number: int, reason: str, original: BaseException | None = None, signum: int | None = None):
        super().__init__(f"trial {number} interrupted ({reason})")
        self.number, self.reason, self.original, self.signum = number, reason, original, signum


def _resume_point(trial: Any) -> Any | None:
    """The checkpoint a re-queued copy continues from (None for a fresh trial).

    A re-queued copy inherits the interrupted trial's user attrs: the newest checkpoint of that trial's run dir,
    else of the dir it had itself resumed (interrupted again before its first checkpoint)."""
    earlier = [trial.user_attrs.get(k) for k in ("gancore.run_dir", "gancore.resumes")]
    resume = next((c for d in earlier if d and (c := RunDir(d).latest()) is not None), None)
    if trial.user_attrs.get("gancore.interrupted"):  # inherited: about the interrupted trial, not this one
        trial.set_user_attr("gancore.interrupted", None)
    if resume is not None:
        trial.set_user_attr("gancore.resumes", str(RunDir.of_checkpoint(resume).path))
    if resume is not None or "gancore.resume_step" in trial.user_attrs:  # the step this attempt starts from
        trial.set_user_attr("gancore.resume_step", (RunDir.step_of(resume) or 0) if resume is not None else 0)
    return resume


def report_point(base: Any, step: int, images: int | None) -> tuple[int, bool]:
    """The Optuna step an evaluation is reported at, and whether it is the trial's last evaluation.

    A budget in steps (train.max_steps) reports steps. A budget in real images (train.max_images) reports the
    scheduled multiple of eval.every_images the evaluation falls on (the budget at the end), so trials of any batch
    size or D steps report at the same points."""
    if not base.train.max_images:
        return step, step == base.train.max_steps
    every, total = base.eval.every_images, base.train.max_images
    if images is None or images >= total:
        return total, True
    return (images // every) * every if every else images, False


class Objective:
    """trial -> config -> fit(on_eval = report + prune) -> the objective metric of the last evaluation."""

    def __init__(self, sweep: Sweep, parent_id: str | None):
        self.sweep, self.parent_id = sweep, parent_id

    def on_eval(self, trial: Any, child: ChildRun) -> Any:
        """The trainer's on_eval hook: report the objective at this step; raise TrialPruned when told to."""
        import optuna

        def report(step: int, metrics: dict[str, float], images: int | None = None) -> None:
            child.attach()
            if self.sweep.objective not in metrics:
                raise SweepError(f"objective {self.sweep.objective} is not among the reported metrics "
                                 f"({', '.join(sorted(metrics)) or 'none'}); fix `objective` in the sweep file")
            value = float(metrics[self.sweep.objective])
            point, last = report_point(self.sweep.base, step, images)
            trial.report(value, point)
            # the last evaluation ends the trial anyway: it completes with that value (known with a fixed length only)
            if not last and trial.should_prune():
                unit = "images" if self.sweep.base.train.max_images else "step"
                raise optuna.TrialPruned(f"{self.sweep.objective} {value:.4g} at {unit} {point}")

        return report

    @staticmethod
    def _interrupted(trial: Any, child: ChildRun, reason: str, original: BaseException | None = None,
                     signum: int | None = None) -> TrialInterrupted:
        trial.set_user_attr("gancore.interrupted", reason)  # now: once Optuna marks it FAIL it is read-only
        child.finish("INTERRUPTED")
        return TrialInterrupted(trial.number, reason, original, signum)

    def __call__(self, trial: Any) -> float:
        import optuna

        from gancore.train.loop import fit

        trial.set_user_attr("gancore.worker", worker_id())
        if slurm_task():  # which task of a Slurm job array runs it (its death is known once the array ends)
            trial.set_user_attr("gancore.slurm_task", slurm_task())
        resume = _resume_point(trial)
        params = {p.name: p.suggest(trial) for p in self.sweep.space}
        cfg = trial_config(self.sweep, params, trial.number)
        run_dir = self.sweep.dir / f"trial_{trial.number:04d}"
        trial.set_user_attr("gancore.run_dir", str(run_dir))
        child = ChildRun(self.sweep, self.parent_id, trial, run_dir, params)
        try:
            nest = {"mlflow.parentRunId": self.parent_id, "optuna.study": self.sweep.study,
                    "optuna.trial": str(trial.number)} if self.parent_id else None
            result = fit(cfg, out=run_dir, resume=str(resume) if resume else None, on_eval=self.on_eval(trial, child),
                         tags=nest)
        except optuna.TrialPruned:
            child.finish("PRUNED")
            raise
        except NonFiniteLossError as e:  # diverged: this trial fails, the study goes on
            trial.set_user_attr("gancore.failure", str(e).split(";")[0])
            child.finish("FAIL")
            raise
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or submitit's requeue on preemption
            raise self._interrupted(trial, child, type(e).__name__, e) from e
        if result.status == "stopped":  # SIGTERM / SIGUSR1: the trainer wrote a checkpoint
            signum = getattr(result, "stop_signal", None)
            how = f" by {signal.Signals(signum).name}" if signum else ""
            raise self._interrupted(trial, child, f"stopped{how} at step {result.step}", signum=signum)
        return self._value(trial, child, result)

    def _value(self, trial: Any, child: ChildRun, result: Any) -> float:
        """The objective of a finished fit (a run resumed from its final checkpoint: the last reported one)."""
        value = result.metrics.get(self.sweep.objective)
        reported = trial.study.get_trials(deepcopy=False)[trial.number].intermediate_values
        if value is None and result.steps_run == 0 and reported:  # resumed from a final checkpoint: its last report
            value = reported[max(reported)]
        if self.sweep.value == "best" and reported:  # the budget protocol: the best of the evaluations
            value = min(v for v in [*reported.values(), value] if v is not None)
        if value is None:
            raise SweepError(f"objective {self.sweep.objective} not reported by trial {trial.number}; "
                             f"got {', '.join(sorted(result.metrics)) or 'no metrics'}")
        value = float(value)
        child.finish("COMPLETE" if math.isfinite(value) else "FAIL", value)
        return value
