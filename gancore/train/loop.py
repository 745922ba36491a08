"""The one training loop: setup -> resume -> loop -> done.

    loop { phases (GAN: D x d_iters, then G), EMA, stats, grids, snapshots, metrics, checkpoint }

The loop drives a family object (gancore/families/) and never asks which family, model or loss it runs. What it
uses lives beside it: the checkpoint dict and resume (state.py), stop signals (signals.py), the fast path
(fast.py), on-device statistics (stats.py), the generator EMA (ema.py) and the end-of-run report (report.py).
The step has no host synchronisation: statistics stay on the device until every `train.log_every` steps. With
`train.compile=cudagraph` the same step runs as fast.StaticStep (fixed buffers; on a GPU one CUDA graph replay per
step); everything around the step is unchanged.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed

from gancore import plots
from gancore.config import Config, save_yaml
from gancore.data import DeviceLoader, load_images
from gancore.errors import NonFiniteLossError, TrackingError
from gancore.families.base import Batch, Family, StepContext
from gancore.progress import Bar
from gancore.tracking import check_reachable, make_tracker, resolve_uri
from gancore.train import budget as budgets
from gancore.train import fast, report
from gancore.train import state as ckpt
from gancore.train.rundir import RunDir
from gancore.train.ema import EMA
from gancore.train.signals import StopFlag
from gancore.train.stats import StatsAccumulator, non_finite


@dataclass
class RunResult:
    run_dir: Path
    run_id: str | None
    step: int
    total_steps: int
    status: str  # finished | stopped (signal / stop_after: a checkpoint was written, resume continues)
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    loop_seconds: float = 0.0  # wall time of the training loop alone (no setup, no end-of-run reports)
    steps_run: int = 0  # steps this call ran (after a resume: fewer than `step`)
    stop_signal: int | None = None  # the signal that stopped the run (launchers requeue on warnings, not SIGTERM)


def _accelerator(cfg: Config) -> Accelerator:
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.train.mixed_precision) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(True)  # a second run in one process (tests, sweeps) with another precision
    # several processes without CUDA (torchrun / srun on CPUs): Accelerate picks gloo only when told `cpu=True`
    # (`accelerate launch --cpu` says so through ACCELERATE_USE_CPU; plain torchrun and srun do not)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu)


def fit(cfg: Config, out: str | Path | None = None, resume: str | None = None,
        stop_after: int | None = None, on_eval: Callable[[int, dict[str, float], int], None] | None = None,
        tags: dict[str, str] | None = None) -> RunResult:
    """Train `cfg` to the end (or until a stop signal / `stop_after` steps), writing everything under the run dir.

    `on_eval(step, metrics, images)` is called after every sample-quality evaluation (sweeps report and prune
    there; `images`: real images shown to D so far);
    `tags` go onto the MLflow run from its start (a sweep's parent run id, the trial number).
    """
    # ------------------------------------------------------------------------------------------------------------
    # Setup: devices, seeds, data, the family and its optimisers
    accelerator = _accelerator(cfg)
    is_main = accelerator.is_main_process
    if is_main and cfg.track.enabled:  # an unreachable tracking server fails before anything is loaded or written
        check_reachable(resolve_uri(cfg.track.uri))
    set_seed(cfg.train.seed + accelerator.process_index)  # distinct noise per process, same data order
    x_all, y_all = load_images(cfg.data)
    image_shape = tuple(x_all.shape[1:])
    num_classes = max(int(y_all.max()) + 1, cfg.model.num_classes) if len(y_all) else cfg.model.num_classes
    family = ckpt.build_family(cfg, image_shape, num_classes)
    fast_plan = fast.setup(cfg, family.networks, accelerator.device, accelerator.num_processes, is_main)
    names, opt_names = list(family.networks), list(family.optimizers)
    prepared = accelerator.prepare(*family.networks.values(), *family.optimizers.values())
    family.networks = dict(zip(names, prepared[: len(names)]))
    family.optimizers = dict(zip(opt_names, prepared[len(names):]))
    gen_net = accelerator.unwrap_model(family.networks[family.generator_name])
    if cfg.train.ema_decay > 0:
        family.ema = EMA(gen_net, cfg.train.ema_decay)
    loader = DeviceLoader(x_all, y_all, cfg.optim.batch_size, seed=cfg.train.seed, device=accelerator.device,
                          on_device=cfg.data.on_device, rank=accelerator.process_index,
                          world=accelerator.num_processes)
    draws = family.draws_per_step()  # real batches consumed per step
    steps_per_epoch = max(1, loader.steps_per_epoch // draws)
    plan = budgets.budget(cfg, steps_per_epoch, draws)  # steps, or real images shown to D (train/budget.py)
    total_steps = plan.total_steps
    fixed = family.fixed_inputs(cfg.train.grid_size, torch.Generator().manual_seed(cfg.train.seed + 12345))

    # ------------------------------------------------------------------------------------------------------------
    # Resume: the run dir, the checkpoint, every piece of state (gancore/train/state.py)
    run_dir, resume_from = ckpt.resolve_run_dir(cfg, out, resume) if is_main else (None, None)
    run_dir, resume_from = broadcast_object_list([run_dir, resume_from])
    layout = RunDir(run_dir)  # its file names: step checkpoints, best.pt, snapshots, sample grids (rundir.py)
    run = ckpt.RunState() if resume_from is None else ckpt.RunState.restore(
        resume_from, cfg, family, accelerator, loader, fallback=resume == "auto" or Path(resume).is_dir())
    window = StatsAccumulator()  # per log window (run.epoch_stats: per epoch)
    tracker = make_tracker(cfg, is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        run.run_id = _start_tracking(tracker, cfg, run_dir, run.run_id, resume == "auto" and resume_from is None, {
            "gancore.world_size": str(accelerator.num_processes), "gancore.device": str(accelerator.device),
            "gancore.host": socket.gethostname(), **(tags or {})})
        tracker.log_dataset(cfg.data, x_all, y_all)  # name, split, subset and content digest as an MLflow input
        if run.step == 0:  # the report's export of real images, beside the generated grids
            plots.save_grid(x_all[: cfg.train.grid_size], run_dir / "real_samples.png")
            tracker.log_artifact(run_dir / "real_samples.png")

    def save_checkpoint(path: Path | None = None) -> Path | None:
        """Rank 0 writes; `path` (e.g. the best-FID checkpoint) is kept outside the step rotation. A step checkpoint
        of a multi-process run is a collective: every rank's own state is gathered to rank 0 first."""
        ranks = ckpt.gather_ranks(accelerator, run.rank_state(loader)) if path is None else None
        if not is_main:
            return None
        state = run.checkpoint(cfg, family, accelerator, loader, image_shape, num_classes, ranks)
        if path is not None:
            return ckpt.save(state, path)
        path = ckpt.save(state, layout.step_path(run.step))
        layout.prune(cfg.train.keep_checkpoints)
        return path

    def sample_grid() -> torch.Tensor:
        return family.to_uint8(family.sample(cfg.train.grid_size, inputs=fixed))

    def sampler_uint8() -> Callable[[int], torch.Tensor]:
        """b -> b generated uint8 images; the same seeded inputs at every evaluation (comparable across steps)."""
        g = torch.Generator().manual_seed(cfg.train.seed + 777)
        return lambda b: family.to_uint8(family.sample(b, inputs=family.fixed_inputs(b, g)))

    stamped = False  # the run's protocol tag is set (once per run)

    def evaluate_metrics(should_stop: Callable[[], bool]) -> dict[str, float]:
        """Sample-quality metrics (gancore.metrics) on the main process; the best-FID checkpoint is kept.
        `should_stop()` is asked before every extractor batch: True raises metrics.EvaluationStopped."""
        nonlocal stamped
        from gancore.metrics import evaluate, extractors, metric_key, protocol, protocol_tag

        with ckpt.isolated_rng():  # an extractor built or trained here draws nothing from the training's streams
            values = evaluate(cfg, sampler_uint8(), accelerator.device, metrics=cfg.eval.metrics,
                              stop=should_stop) if is_main else {}
        if values and not stamped:  # the protocol beside the numbers (gancore.metrics.protocol)
            tracker.set_tags(protocol_tag(protocol(cfg, ema=family.ema is not None)))
            stamped = True
        if values:  # the best-FID rule asks for the key it means: the run's extractor on eval.n_samples images
            fid = metric_key("fid", extractors.resolve(cfg, None, channels=image_shape[0]), cfg.eval.n_samples)
            if fid in values and values[fid] < run.best.get("value", float("inf")):
                run.best.update(key=fid, value=values[fid], step=run.step)
                save_checkpoint(layout.best)
        return values

    def evaluation(step: int, should_stop: Callable[[], bool]) -> bool:
        """The evaluation of `step` (every process calls it; the main process measures), logged and handed to
        on_eval; False when a stop request ended it. Until it is done run.eval_pending is set, so a checkpoint
        written meanwhile says so and a resume runs it first. Draws nothing from the training's random streams
        (its sampler has its own seeded generator)."""
        nonlocal last_metrics
        from gancore.metrics import EvaluationStopped

        run.eval_pending = True
        try:
            values = evaluate_metrics(should_stop)
        except EvaluationStopped:
            return False
        run.eval_pending = False
        last_metrics = values
        tracker.log_metrics(values, step)
        if on_eval is not None:
            on_eval(step, values, plan.images(step))
        return True

    step_fn = functools.partial(one_step, family, accelerator, gen_net)  # phases + EMA (below)

    def plain_step() -> None:
        step_fn(lambda: family.prepare(*loader.next()), lambda s: (window.add(s), run.epoch_stats.add(s)))

    # the fast path (train.compile=cudagraph): one_step over fixed buffers; on a GPU captured once and replayed as
    # one CUDA graph per step (gancore/train/fast.py)
    train_step = fast.StaticStep(step_fn, family, loader, draws, [window, run.epoch_stats], fast_plan.capture,
                                 cfg.train.compile, notify=print if is_main else lambda m: None) \
        if fast_plan.static_step else plain_step

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    stop = StopFlag(accelerator)
    stop.install()
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    progress = Bar(cfg.name, total_steps, enabled=is_main and cfg.train.progress, completed=run.step, elapsed=True,
                   stats="")
    last_ckpt: Path | None = layout.latest() if is_main else None
    t_window, steps_window = time.perf_counter(), 0
    status, t_loop, first_step = "finished", time.perf_counter(), run.step
    last_metrics: dict[str, float] = {}
    try:
        if run.eval_pending and cfg.eval.n_samples:  # the last session stopped during this step's evaluation
            stopped, completed = stop.evaluation_done(is_main, evaluation(run.step, stop.evaluating))
            if completed:
                last_ckpt = save_checkpoint() or last_ckpt  # the step's checkpoint now says its evaluation is done
            if stopped:
                status = "stopped"
        while status == "finished" and run.step < total_steps:
            train_step()  # D x d_iters, G, EMA (one_step below)
            run.step += 1
            step, steps_window = run.step, steps_window + 1
            epoch_end = step % steps_per_epoch == 0
            epoch = (step - 1) // steps_per_epoch + 1  # 1-based epoch this step belongs to
            stop_now = stop.requested(step)  # a signal arrived: finish this step, checkpoint, return "stopped"
            stop_here = stop_now or (stop_after is not None and step >= stop_after and step < total_steps)
            must_checkpoint = step % cfg.train.checkpoint_every == 0 or step == total_steps or stop_here

            # -- statistics: the only host sync, every log_every steps (and before any checkpoint)
            if step % cfg.train.log_every == 0 or must_checkpoint or epoch_end:
                values = window.read(reduce)
                bad = non_finite(values)
                if bad:
                    raise NonFiniteLossError(
                        f"non-finite {', '.join(bad)} at step {step}; the last good checkpoint is "
                        f"{last_ckpt or 'none (no checkpoint written yet)'}; lower the learning rate or resume from it")
                dt = time.perf_counter() - t_window
                values["images_per_s"] = steps_window * plan.images_per_step / max(dt, 1e-9)
                values["epoch"] = step / steps_per_epoch
                values["images_seen"] = float(plan.images(step))
                values.update({f"lr/{k}": o.param_groups[0]["lr"] for k, o in family.optimizers.items()})
                tracker.log_metrics(values, step)
                progress.update(step, stats=_headline(values, family.headline))
                t_window, steps_window = time.perf_counter(), 0

            # -- per-epoch history (loss plots per epoch range) and the report's snapshots
            if epoch_end:
                report.add_epoch(run.history, epoch, run.epoch_stats.read(reduce))
                if is_main and (epoch in cfg.train.snapshot_epochs or step == total_steps):
                    with ckpt.isolated_rng():
                        plots.save_grid(sample_grid(), layout.snapshot_grid(epoch))
                        layout.save_snapshot(family.generator_name, epoch, gen_net.state_dict())

            # -- fixed-noise sample grid into the tracker, by step
            if is_main and (step % cfg.track.image_every == 0 or step == total_steps):
                with ckpt.isolated_rng():
                    img = plots.save_grid(sample_grid(), layout.sample_grid(step))
                tracker.log_image(img, key="samples", step=step)

            # -- sample-quality metrics (FID, IS, KID, PR) on the budget's schedule (eval.every steps or
            #    eval.every_images images) and at the end. The final checkpoint
            #    comes first (an evaluation never costs training); a stop signal ends an evaluation within one
            #    extractor batch, and the step's checkpoint then says its evaluation is pending (a resume runs it)
            saved_first, completed = False, True
            if cfg.eval.n_samples and (plan.eval_due(step) or step == total_steps):
                if step == total_steps:
                    run.eval_pending = True
                    last_ckpt = save_checkpoint() or last_ckpt
                    saved_first = True
                # every rank leaves the evaluation with the same answers (stop now; the main process's completed)
                stopped, completed = stop.evaluation_done(is_main, evaluation(step, stop.evaluating))
                if stopped:  # a signal during the evaluation (on any rank): stop at this step
                    stop_here = must_checkpoint = True

            # -- checkpoint (every checkpoint_every, at the end, on a stop signal; not again when nothing changed
            #    since the final checkpoint before an evaluation that was stopped)
            if must_checkpoint and not (saved_first and not completed):
                last_ckpt = save_checkpoint() or last_ckpt
            if stop_here:
                status = "stopped"
                break
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        progress.close()
        stop.restore()
    loop_seconds = time.perf_counter() - t_loop

    # ------------------------------------------------------------------------------------------------------------
    # Done: the end-of-run report (gancore/train/report.py), the final checkpoint as an artifact
    metrics: dict[str, float] = dict(last_metrics)
    if run.best:
        from gancore.metrics import MetricKey

        metrics[MetricKey.parse(run.best["key"]).as_best().name] = run.best["value"]
    if status == "finished" and run.epoch_stats.counts:  # a run that ends mid-epoch: its last, partial epoch
        # (every rank: the read is a collective across processes)
        report.add_epoch(run.history, (run.step - 1) // steps_per_epoch + 1, run.epoch_stats.read(reduce))
    if is_main and status == "finished":
        metrics.update(report.end_of_run(cfg, family, run_dir, run.history, {"x": x_all, "y": y_all},
                                         sampler_uint8(), accelerator.device, tracker))
        end_metrics = {k: v for k, v in metrics.items() if k not in last_metrics}
        if end_metrics:
            tracker.log_metrics(end_metrics, run.step)
        if cfg.track.log_checkpoints != "none" and last_ckpt is not None:
            tracker.log_artifact(last_ckpt, "checkpoints")
        tracker.log_generator(family)  # runs:/<run id>/generator (gancore/tracking/models.py)
    tracker.finish("FINISHED" if status == "finished" else "KILLED")
    accelerator.wait_for_everyone()
    return RunResult(run_dir, run.run_id, run.step, total_steps, status, last_ckpt, metrics, loop_seconds,
                     run.step - first_step, stop_signal=stop.signal if status == "stopped" else None)


def _start_tracking(tracker: Any, cfg: Config, run_dir: Path, run_id: str | None, fresh_auto: bool,
                    tags: dict[str, str]) -> str | None:
    """Open (or reopen) the run's MLflow run and record it in the run dir before the first checkpoint exists, so
    a session killed before its first checkpoint is continued by `--resume auto` in the same MLflow run."""
    unsaved = None
    if fresh_auto and cfg.track.enabled:  # --resume auto without a checkpoint: a killed first session's run?
        unsaved = run_id = ckpt.unsaved_tracking_run(run_dir, resolve_uri(cfg.track.uri), cfg)
    try:
        run_id = tracker.start(cfg, run_dir, run_id, tags=tags)
    except TrackingError:
        if unsaved is None:
            raise
        run_id = tracker.start(cfg, run_dir, None, tags=tags)  # that run is gone from the store: a new one
    if run_id is not None:
        ckpt.record_tracking_run(run_dir, run_id, resolve_uri(cfg.track.uri), cfg)
    return run_id


def one_step(family: Family, accelerator: Accelerator, gen_net: torch.nn.Module, draw: Callable[[], Batch],
             report_stats: Callable[[dict], None], autocast: Any = None) -> None:
    """One training step: the family's phases, then the generator EMA. `draw()` gives the next real batch,
    `report_stats(stats)` takes each phase's statistics (0-d tensors, aggregated on the device)."""
    batch, ctx = None, StepContext()  # what this step's phases hand each other
    # -- the phases: GAN: D x d_iters (a fresh real batch each), then G (on the last batch); VAE/diffusion: one
    for phase in family.phases:
        opt = family.optimizers[phase.optimizer]
        for _ in range(phase.repeats):
            if phase.fresh_batch or batch is None:
                batch = draw()
            with accelerator.autocast(autocast):
                loss, stats = phase.loss(batch, ctx)
            opt.zero_grad(set_to_none=True)  # also clears grads other phases left on these params
            accelerator.backward(loss)
            opt.step()
            report_stats(stats)
    # -- generator EMA
    if family.ema is not None:
        family.ema.update(gen_net)


def _headline(values: dict[str, float], keys: tuple[str, ...]) -> str:
    """The progress bar's text: the family's headline statistics and images/s."""
    shown = " ".join(f"{k.split('/')[-1] if k.startswith('Loss/') else k} {values[k]:.3f}" for k in keys if k in values)
    return f"{shown}  {values.get('images_per_s', 0):.0f} img/s"
