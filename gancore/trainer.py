"""The one training loop (shared/STYLE.md #1).

    setup -> resume -> loop { phases (GAN: D x d_iters, then G), EMA, stats, grids, snapshots, metrics,
    checkpoint } -> done

The loop drives a family object (gancore/families/) and never asks which family, model or loss it runs.
The step has no host synchronisation: statistics stay on the device until every `train.log_every` steps.
With `train.compile=cudagraph` the same step runs as gancore.fast.StaticStep (fixed buffers; on a GPU one CUDA
graph replay per step); everything around the step is unchanged.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed

from gancore import checkpoint as ckpt
from gancore import fast, plots
from gancore.config import Config, from_dict, resume_differences, save_yaml, to_dict
from gancore.data import DeviceLoader, load_images
from gancore.ema import EMA
from gancore.errors import CheckpointError, NonFiniteLossError
from gancore.families.base import Batch, Family
from gancore.registry import FAMILIES
from gancore.stats import StatsAccumulator, non_finite
from gancore.tracking import check_reachable, make_tracker, resolve_uri


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


class StopFlag:
    """Set by SIGUSR1 (Slurm's warning before the time limit / preemption), SIGUSR2 (submitit's) or SIGTERM.

    `requested(step)` is checked once per step. With several processes every rank must stop at the same step (a
    rank that stops alone leaves the others blocked in a collective), so there the ranks agree with one tiny
    all-reduce every SYNC_EVERY steps instead of a host sync per step.
    """

    SYNC_EVERY = 10

    def __init__(self, accelerator: Accelerator | None = None) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}
        self._acc = accelerator if accelerator is not None and accelerator.num_processes > 1 else None

    def install(self) -> None:
        if hasattr(signal, "SIGUSR1") and _in_main_thread():
            for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def requested(self, step: int) -> bool:
        if self._acc is None:
            return self.signal is not None
        if step % self.SYNC_EVERY:
            return False
        flag = torch.tensor([float(self.signal is not None)], device=self._acc.device)
        return bool(self._acc.reduce(flag, "sum").item() > 0)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def build_family(cfg: Config, image_shape: tuple[int, int, int], num_classes: int) -> Family:
    return FAMILIES[cfg.family](cfg, image_shape, num_classes)


def _accelerator(cfg: Config) -> Accelerator:
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, cfg.train.mixed_precision) and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(True)  # a second run in one process (tests, sweeps) with another precision
    return Accelerator(mixed_precision=cfg.train.mixed_precision)


def resolve_run_dir(cfg: Config, out: str | Path | None, resume: str | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from or None). Never reuses a run dir that holds checkpoints by accident."""
    if resume and resume != "auto":
        path = Path(resume)
        if path.is_dir():
            found = ckpt.latest(path)
            if found is None:
                raise CheckpointError(f"no checkpoints in {path}/{ckpt.CKPT_DIR}; pass a checkpoint file or a run dir")
            return path, found
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} not found")
        return (Path(out) if out else path.parent.parent), path
    if resume == "auto":
        if out:
            return Path(out), ckpt.latest(out)
        candidates = sorted(Path("runs").glob(f"{cfg.name}-*"), key=lambda p: p.stat().st_mtime)
        with_ckpt = [p for p in candidates if ckpt.latest(p)]
        if with_ckpt:
            return with_ckpt[-1], ckpt.latest(with_ckpt[-1])
    run_dir = Path(out) if out else Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if ckpt.latest(run_dir) is not None and resume != "auto":
        raise CheckpointError(f"{run_dir} already holds checkpoints; pass --resume auto to continue that run "
                              "or --out NEW_DIR for a new one")
    return run_dir, None


def fit(cfg: Config, out: str | Path | None = None, resume: str | None = None,
        stop_after: int | None = None, on_eval: Callable[[int, dict[str, float]], None] | None = None,
        tags: dict[str, str] | None = None) -> RunResult:
    """Train `cfg` to the end (or until a stop signal / `stop_after` steps), writing everything under the run dir.

    `on_eval(step, metrics)` is called after every sample-quality evaluation (sweeps report and prune there);
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
    family = build_family(cfg, image_shape, num_classes)
    fast_plan = fast.plan(cfg.train.compile, accelerator.device, accelerator.num_processes, cfg.train.mixed_precision)
    for notice in (fast_plan.notice, fast.precision_notice(accelerator.device, cfg.train.mixed_precision)):
        if is_main and notice:
            print(notice, flush=True)
    if cfg.train.channels_last:
        fast.to_channels_last(family.networks)
    if fast_plan.compile:
        _compile_networks(family, is_main, cfg.train.compile)
    if accelerator.device.type == "cuda" and cfg.train.compile != "none":
        torch.backends.cudnn.benchmark = True  # static shapes: autotune each convolution once

    names = list(family.networks)
    opt_names = list(family.optimizers)
    prepared = accelerator.prepare(*[family.networks[k] for k in names], *[family.optimizers[k] for k in opt_names])
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
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    fixed = family.fixed_inputs(cfg.train.grid_size, torch.Generator().manual_seed(cfg.train.seed + 12345))

    # ------------------------------------------------------------------------------------------------------------
    # Resume: the run dir, the checkpoint, every piece of state
    run_dir, resume_from = resolve_run_dir(cfg, out, resume) if is_main else (None, None)
    run_dir, resume_from = broadcast_object_list([run_dir, resume_from])
    step, run_id, history, best = 0, None, {}, {}
    window, epoch_stats = StatsAccumulator(), StatsAccumulator()  # per log window / per epoch
    if resume_from is not None:
        state = ckpt.load(resume_from)
        diffs = resume_differences(state["config"], cfg)
        if diffs:
            raise CheckpointError(f"{resume_from} was trained with other hyper-parameters ({'; '.join(diffs)}); "
                                  "use the same config or start a new run")
        for k in names:
            accelerator.unwrap_model(family.networks[k]).load_state_dict(state["networks"][k])
        for k in opt_names:
            family.optimizers[k].load_state_dict(state["optimizers"][k])
            fast.restore_adam_options(family.optimizers[k], family.adam_options)
        if family.ema is not None and state.get("ema") is not None:
            family.ema.load_state_dict(state["ema"])
        if accelerator.scaler is not None and state.get("scaler"):
            accelerator.scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before the loop
        if accelerator.process_index > 0:  # only rank 0's RNG is saved: other ranks re-derive distinct streams
            torch.manual_seed(cfg.train.seed + 7919 * accelerator.process_index + 104729 * int(state["step"]))
        step, run_id, history = int(state["step"]), state.get("run_id"), state.get("history", {})
        epoch_stats.load_state_dict(state["epoch_stats"])
        best = state.get("best", {})

    tracker = make_tracker(cfg, is_main)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
        run_id = tracker.start(cfg, run_dir, run_id, tags={
            "gancore.world_size": str(accelerator.num_processes),
            "gancore.device": str(accelerator.device), "gancore.host": socket.gethostname(), **(tags or {})})
        if step == 0:  # the report's export of real images, beside the generated grids
            plots.save_grid(x_all[: cfg.train.grid_size], run_dir / "real_samples.png")
            tracker.log_artifact(run_dir / "real_samples.png")

    def save_checkpoint(path: Path | None = None) -> Path | None:
        if not is_main:
            return None
        state = {
            "version": 1,
            "step": step,
            "run_id": run_id,
            "config": to_dict(cfg),
            "image_shape": list(image_shape),
            "num_classes": num_classes,
            "networks": {k: accelerator.unwrap_model(family.networks[k]).state_dict() for k in names},
            "optimizers": {k: family.optimizers[k].state_dict() for k in opt_names},
            "ema": family.ema.state_dict() if family.ema is not None else None,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "rng": ckpt.rng_state(),
            "loader": loader.state_dict(),
            "history": history,
            "epoch_stats": epoch_stats.state_dict(),  # a mid-epoch stop keeps the epoch's partial sums
            "best": best,
        }
        if path is not None:  # e.g. the best-FID checkpoint, kept outside the step rotation
            return ckpt.save(state, path)
        path = ckpt.save(state, ckpt.step_path(run_dir, step))
        ckpt.prune(run_dir, cfg.train.keep_checkpoints)
        return path

    def sample_grid() -> torch.Tensor:
        return family.to_uint8(family.sample(cfg.train.grid_size, inputs=fixed))

    def sampler_uint8() -> Callable[[int], torch.Tensor]:
        """b -> b generated uint8 images; the same seeded inputs at every evaluation (comparable across steps)."""
        g = torch.Generator().manual_seed(cfg.train.seed + 777)
        return lambda b: family.to_uint8(family.sample(b, inputs=family.fixed_inputs(b, g)))

    def evaluate_metrics() -> dict[str, float]:
        """Sample-quality metrics (gancore.metrics) on the main process; the best-FID checkpoint is kept."""
        from gancore.metrics import evaluate

        values = evaluate(cfg, sampler_uint8(), accelerator.device, metrics=cfg.eval.metrics) if is_main else {}
        fid = sorted(k for k in values if k.startswith("fid_"))
        if fid and values[fid[0]] < best.get("value", float("inf")):
            best.update(key=fid[0], value=values[fid[0]], step=step)
            save_checkpoint(run_dir / ckpt.CKPT_DIR / "best.pt")
        return values

    # ------------------------------------------------------------------------------------------------------------
    # One training step
    def one_step(draw: Callable[[], Batch], report: Callable[[dict], None], autocast: Any = None) -> None:
        """One training step: the family's phases, then the generator EMA. `draw()` gives the next real batch,
        `report(stats)` takes each phase's statistics (0-d tensors, aggregated on the device)."""
        batch = None
        # -- the phases: GAN: D x d_iters (a fresh real batch each), then G (on the last batch); VAE/diffusion: one
        for phase in family.phases:
            opt = family.optimizers[phase.optimizer]
            for _ in range(phase.repeats):
                if phase.fresh_batch or batch is None:
                    batch = draw()
                with accelerator.autocast(autocast):
                    loss, stats = phase.loss(batch)
                opt.zero_grad(set_to_none=True)  # also clears grads other phases left on these params
                accelerator.backward(loss)
                opt.step()
                report(stats)
        # -- generator EMA
        if family.ema is not None:
            family.ema.update(gen_net)

    def plain_step() -> None:
        one_step(lambda: family.prepare(*loader.next()), lambda stats: (window.add(stats), epoch_stats.add(stats)))

    # the fast path (train.compile=cudagraph): one_step over fixed buffers; on a GPU captured once and replayed as
    # one CUDA graph per step (gancore/fast.py)
    train_step = fast.StaticStep(one_step, family, loader, draws, [window, epoch_stats], fast_plan.capture,
                                 cfg.train.compile, notify=print if is_main else lambda m: None) \
        if fast_plan.static_step else plain_step

    # ------------------------------------------------------------------------------------------------------------
    # The loop
    stop = StopFlag(accelerator)
    stop.install()
    reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
    progress = _Progress(enabled=is_main and cfg.train.progress, total=total_steps, start=step, name=cfg.name)
    last_ckpt: Path | None = ckpt.latest(run_dir) if is_main else None
    t_window, steps_window = time.perf_counter(), 0
    status = "finished"
    t_loop, first_step = time.perf_counter(), step
    last_metrics: dict[str, float] = {}
    try:
        while step < total_steps:
            train_step()  # D x d_iters, G, EMA (one_step above)
            step += 1
            steps_window += 1
            epoch_end = step % steps_per_epoch == 0
            epoch = (step - 1) // steps_per_epoch + 1  # 1-based epoch this step belongs to
            stop_now = stop.requested(step)  # a signal arrived: finish this step, checkpoint, return "stopped"
            must_checkpoint = step % cfg.train.checkpoint_every == 0 or step == total_steps or \
                stop_now or (stop_after is not None and step >= stop_after)

            # -- statistics: the only host sync, every log_every steps (and before any checkpoint)
            if step % cfg.train.log_every == 0 or must_checkpoint or epoch_end:
                values = window.read(reduce)
                bad = non_finite(values)
                if bad:
                    raise NonFiniteLossError(
                        f"non-finite {', '.join(bad)} at step {step}; the last good checkpoint is "
                        f"{last_ckpt or 'none (no checkpoint written yet)'}; lower the learning rate or resume from it")
                dt = time.perf_counter() - t_window
                values["images_per_s"] = steps_window * cfg.optim.batch_size * draws / max(dt, 1e-9)
                values["epoch"] = step / steps_per_epoch
                values.update({f"lr/{k}": o.param_groups[0]["lr"] for k, o in family.optimizers.items()})
                tracker.log_metrics(values, step)
                progress.update(step, values, family.headline)
                t_window, steps_window = time.perf_counter(), 0

            # -- per-epoch history (loss plots per epoch range) and the report's snapshots
            if epoch_end:
                means = epoch_stats.read(reduce)
                history.setdefault("epoch", []).append(epoch)
                for k, v in means.items():
                    history.setdefault(k, []).append(v)
                if is_main and (epoch in cfg.train.snapshot_epochs or step == total_steps):
                    plots.save_grid(sample_grid(), run_dir / "snapshots" / f"epoch_{epoch:03d}.png")
                    torch.save(gen_net.state_dict(), run_dir / "snapshots" / f"{family.generator_name}_epoch_{epoch:03d}.pt")

            # -- fixed-noise sample grid into the tracker, by step
            if is_main and (step % cfg.track.image_every == 0 or step == total_steps):
                img = plots.save_grid(sample_grid(), run_dir / "samples" / f"step_{step:08d}.png")
                tracker.log_image(img, key="samples", step=step)

            # -- sample-quality metrics (FID, IS, KID, PR) every eval.every steps and at the end
            if cfg.eval.n_samples and ((cfg.eval.every and step % cfg.eval.every == 0) or step == total_steps):
                values = evaluate_metrics()
                tracker.log_metrics(values, step)
                if on_eval is not None:
                    on_eval(step, values)
                last_metrics = values

            # -- checkpoint (every checkpoint_every, at the end, on a stop signal)
            if must_checkpoint:
                last_ckpt = save_checkpoint() or last_ckpt
                if stop_now or (stop_after is not None and step >= stop_after and step < total_steps):
                    status = "stopped"
                    break
    except BaseException as e:
        progress.close()
        stop.restore()
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    progress.close()
    stop.restore()
    loop_seconds = time.perf_counter() - t_loop

    # ------------------------------------------------------------------------------------------------------------
    # Done: report outputs (loss plots per range, loss report), family figures, artifacts
    metrics: dict[str, float] = dict(last_metrics)
    if best:
        metrics[f"best_{best['key']}"] = best["value"]
    if is_main and status == "finished":
        if epoch_stats.counts:  # a run that ends mid-epoch (or is shorter than one): its last, partial epoch
            history.setdefault("epoch", []).append((step - 1) // steps_per_epoch + 1)
            for k, v in epoch_stats.read(reduce).items():
                history.setdefault(k, []).append(v)
        out_plots = plots.loss_plots(history, cfg.train.loss_ranges, run_dir / "plots")
        plots.loss_report(history, cfg.train.loss_ranges, run_dir / "loss_report.json")
        figures = family.figures(run_dir / "figures", {"x": x_all, "y": y_all})
        if cfg.eval.n_samples:  # figures of the metrics layer: t-SNE of features; per-class accuracy (conditional)
            from gancore.metrics import class_accuracy, tsne_plot

            figures.append(tsne_plot(cfg, sampler_uint8(), accelerator.device, run_dir / "figures" / "tsne.png",
                                     n=min(500, cfg.eval.n_samples)))
            if (by_class := family.class_sampler()) is not None:
                metrics.update(class_accuracy(by_class, cfg, accelerator.device, n_per_class=50,
                                              path=run_dir / "figures" / "class_accuracy.png"))
                figures.append(run_dir / "figures" / "class_accuracy.png")
        family_metrics = family.evaluate({"x": x_all, "y": y_all})
        metrics.update(family_metrics)
        end_metrics = {k: v for k, v in metrics.items() if k not in last_metrics}
        if end_metrics:
            tracker.log_metrics(end_metrics, step)
        for p in [*out_plots, run_dir / "loss_report.json", run_dir / "loss_report.md", *figures]:
            if p.is_file():
                tracker.log_artifact(p, "report" if "loss_report" in p.name else "plots")
        tracker.log_artifact(run_dir / "snapshots", "snapshots")
        if cfg.track.log_checkpoints != "none" and last_ckpt is not None:
            tracker.log_artifact(last_ckpt, "checkpoints")
    tracker.finish("FINISHED" if status == "finished" else "KILLED")
    accelerator.wait_for_everyone()
    return RunResult(run_dir, run_id, step, total_steps, status, last_ckpt, metrics, loop_seconds, step - first_step,
                     stop_signal=stop.signal if status == "stopped" else None)


def _compile_networks(family: Family, notify: bool, mode: str) -> None:
    """torch.compile every network's forward in place (state_dict keys stay unchanged for checkpoints).

    Where compilation is impossible (no C++ compiler, an unsupported op), dynamo falls back to eager per graph.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # fall back to eager instead of failing the run
    for net in family.networks.values():
        net.compile()
    if notify:
        print(f"train.compile={mode}: networks compiled with torch.compile (first steps are slow while it compiles)")


class _Progress:
    """A rich progress bar with the headline statistics and ETA (main process only)."""

    def __init__(self, enabled: bool, total: int, start: int, name: str):
        self.p = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))
        self.p.start()
        self.task = self.p.add_task(name, total=total, completed=start, stats="")

    def update(self, step: int, values: dict[str, float], keys: tuple[str, ...]) -> None:
        if self.p is None:
            return
        shown = " ".join(f"{k.split('/')[-1] if k.startswith('Loss/') else k} {values[k]:.3f}" for k in keys if k in values)
        self.p.update(self.task, completed=step, stats=f"{shown}  {values.get('images_per_s', 0):.0f} img/s")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


def load_family(path: str | Path, device: str | torch.device = "cpu") -> tuple[Family, Config, dict]:
    """A trained family (networks and EMA restored, eval mode) from a checkpoint file or a run dir."""
    path = Path(path)
    if path.is_dir():
        found = ckpt.latest(path)
        if found is None:
            raise CheckpointError(f"no checkpoints in {path}/{ckpt.CKPT_DIR}")
        path = found
    state = ckpt.load(path, map_location=device)
    cfg = from_dict(state["config"])
    family = build_family(cfg, tuple(state["image_shape"]), int(state["num_classes"]))
    for k, net in family.networks.items():
        net.load_state_dict(state["networks"][k])
        net.to(device).eval()
    if state.get("ema") is not None:
        family.ema = EMA(family.networks[family.generator_name], cfg.train.ema_decay)
        family.ema.load_state_dict(state["ema"])
        family.ema.to(device)
    return family, cfg, state
