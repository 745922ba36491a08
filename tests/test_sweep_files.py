"""Every shipped sweep file (sweeps/*.yaml) builds its trial configs at each parameter's low and high (every
choice of a categorical one) and passes `jobs/sweep.py FILE --prepare`; the make targets users type expand to the commands they document (`make -n`), and `make sweep SMOKE=1` runs for real, its 6 trials on 2 workers."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import yaml

import helpers
from conftest import ROOT, needs_mnist

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _extremes(sweep):
    """One params dict per (parameter, end): that parameter at its low, then its high (each choice of a categorical
    one), the others at their low / first choice."""
    def end(p, hi):
        if p.kind == "categorical":
            return p.choices[-1 if hi else 0]
        v = p.high if hi else p.low
        return int(v) if p.kind == "int" else v

    base = {p.name: end(p, False) for p in sweep.space}
    cases = []
    for p in sweep.space:
        values = list(p.choices) if p.kind == "categorical" else [end(p, False), end(p, True)]
        cases += [(p, v, {**base, p.name: v}) for v in values]
    return cases


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_trial_configs_at_every_parameters_ends_build(path):
    from gancore.config import flat
    from gancore.registry import FAMILIES
    from gancore.sweep import load_sweep
    from gancore.sweep.spec import trial_config

    sweep = load_sweep(path)
    cases = _extremes(sweep)
    assert len(cases) >= 2 * len(sweep.space)
    for p, value, params in cases:
        cfg = trial_config(sweep, params, number=0)  # range checks of every key: a ConfigError fails here
        got = flat(cfg, include_infra=True)
        assert all(got[k] == value for k in p.keys), (p.name, value, {k: got[k] for k in p.keys})
        c, h, _ = SHAPES[cfg.data.name]
        side = cfg.data.image_size or h
        torch.manual_seed(0)
        fam = FAMILIES[cfg.family](cfg, (c, side, side), 10)
        G = fam.networks[fam.generator_name]
        with torch.no_grad():  # the GAN sweeps: one sample at this end of the range
            x = G.eval()(torch.randn(2, cfg.model.nz), torch.zeros(2, dtype=torch.long) if cfg.model.conditional
                         else None)
        assert x.shape == (2, c, side, side), (p.name, value)


# What a make that runs this suite (`make test ARGS=...`, as .ci/run does) hands down to the makes started here: its
# command-line variables, both in the environment (ARGS=...) and in MAKEFLAGS, would make `make -n train` expand
# with the suite's ARGS.
_MAKE_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "MAKE_TERMOUT", "MAKE_TERMERR")


def _user_env() -> dict:
    """os.environ less what an enclosing make put there: its MAKE* variables and its command-line variables (the
    names after ` -- ` in MAKEFLAGS, whose values escape spaces as `\\ `)."""
    flags = os.environ.get("MAKEFLAGS", "")
    given = flags.split(" -- ", 1)[1] if " -- " in flags else ""
    names = {re.split(r":?=", w, maxsplit=1)[0] for w in re.split(r"(?<!\\) ", given) if "=" in w}
    return {k: v for k, v in os.environ.items() if k not in _MAKE_ENV and k not in names}


def _make(*args, cwd=ROOT, timeout=60, env=None):
    """`make ARGS` in the checkout with this interpreter standing in for the .venv (PY, and STAMP made up to date),
    as a user's shell starts it: nothing inherited from a make that may be running this suite (`env`: set on top)."""
    return helpers.run(["make", "--no-print-directory", *args], cwd=cwd, timeout=timeout,
                       env={**_user_env(), **(env or {})}, what=f"make {' '.join(args)}")


@pytest.fixture
def stamp(tmp_path):
    s = tmp_path / "installed"
    s.touch()
    os.utime(s, (2**31, 2**31))  # newer than pyproject.toml: make does not reinstall
    return [f"PY={sys.executable}", f"STAMP={s}"]


@pytest.mark.parametrize("target, want", [
    (["train"], "{py} jobs/train.py --config configs/quickstart.yaml"),
    (["train", "CONFIG=configs/mnist_vae.yaml", "ARGS=train.epochs=1"],
     "{py} jobs/train.py --config configs/mnist_vae.yaml train.epochs=1"),
    (["test"], "{py} -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder"),
    (["sweep", "SMOKE=1"], "{py} jobs/sweep.py sweeps/mnist_dcgan_smoke.yaml"),
    (["sweep", "WORKERS=3", "ARGS=--n-trials 5"], "{py} jobs/sweep.py sweeps/mnist_dcgan.yaml --workers 3 --n-trials 5"),
    (["reproduce", "SUITE=cifar10", "ARGS=--epochs 3"], "{py} jobs/reproduce.py cifar10 --epochs 3"),
    (["dashboard", "SMOKE=1"], "{py} jobs/sweep.py sweeps/mnist_dcgan_smoke.yaml --dashboard --port 8080"),
    # ARGS reaches every target that runs a command (it was silently dropped by test, test-fast, ui and dashboard)
    (["test", "ARGS=-x -k sweep"], "{py} -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder -x -k sweep"),
    (["test-fast", "ARGS=-x"], '{py} -m pytest -q -ra -n 2 --dist loadfile -m "not slow and not slurm" -x'),
    (["dashboard", "SMOKE=1", "ARGS=--storage sqlite:///s.db"],
     "{py} jobs/sweep.py sweeps/mnist_dcgan_smoke.yaml --dashboard --port 8080 --storage sqlite:///s.db"),
], ids=lambda v: "-".join(v) if isinstance(v, list) else "")
def test_make_targets_expand_to_their_commands(stamp, target, want):
    p = _make("-n", *target, *stamp)
    assert p.returncode == 0, p.stderr
    assert " ".join(p.stdout.replace("\\\n", " ").split()) == want.format(py=sys.executable), p.stdout  # make -n keeps backslash-newlines


@needs_mnist
@pytest.mark.timeout(900)  # 3 trials of 60 steps on 2 workers: 173 s with both on one core shared with another job
def test_make_sweep_smoke_runs_for_real(stamp, tmp_path):
    """`make sweep SMOKE=1` as a user types it (ARGS moves its output and storage into tmp_path, and cuts its 6
    trials to 3, for time: one more than its 2 workers, so one worker takes a second trial and the median pruner,
    which starts after 2 trials, can act): every trial ends COMPLETE or PRUNED, each complete trial's value is its
    MLflow run's last objective, and the best trial's preset is written."""
    import optuna
    from mlflow.tracking import MlflowClient

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["SMOKE=1", f"ARGS=--out {tmp_path / 'sweeps'} --storage {storage} --n-trials 3"]
    p = _make("sweep", *args, *stamp, timeout=840, env={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    study = optuna.load_study(study_name="mnist_dcgan_smoke", storage=storage)
    assert len(study.trials) == 3 and {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    client = MlflowClient(uri)
    for t in study.trials:
        if t.state.name == "COMPLETE":
            run = client.get_run(t.user_attrs["mlflow.run_id"])
            assert run.data.metrics["fid_lenet_500"] == pytest.approx(t.value, rel=1e-12)
            assert sorted(t.intermediate_values) == [20, 40, 60]
    best = yaml.safe_load((tmp_path / "sweeps" / "mnist_dcgan_smoke" / "best.yaml").read_text())
    assert best["model"]["nz"] == study.best_trial.params["model.nz"]
    assert best["optim"]["lr_g"] == best["optim"]["lr_d"] == pytest.approx(study.best_trial.params["lr"], rel=1e-12)


@needs_mnist
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_prepare_every_shipped_sweep_file(path, tmp_path):
    """`jobs/sweep.py FILE --prepare` on every shipped sweep file: the objective checked, the metric caches warmed,
    the study created under the file's own name and definition with no trial run, and the parent MLflow run made.
    The CIFAR-10 sweep's domain extractor is a quick one (1 epoch on 512 images, in this test's own cache: the
    recipe's takes many minutes on a CPU); what --prepare does with it is the same."""
    import optuna

    from gancore.metrics.classifier import extractor_path, train_classifier
    from gancore.sweep import load_sweep

    sweep = load_sweep(path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    if sweep.base.data.name == "cifar10":
        env["GANCORE_CACHE"] = str(tmp_path / "cache")  # not linked to the shared cache: nothing else sees this one
        os.environ["GANCORE_CACHE"], before = env["GANCORE_CACHE"], os.environ["GANCORE_CACHE"]
        try:
            train_classifier(sweep.base.eval.extractor, epochs=1, subset=512, out=extractor_path(
                sweep.base.eval.extractor), progress=False)
        finally:
            os.environ["GANCORE_CACHE"] = before
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    p = helpers.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), str(path), "--prepare", "--out",
                     str(tmp_path / "sweeps"), "--storage", storage], env=env, timeout=840,
                    what=f"sweep.py {path.name} --prepare")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "prepared:" in p.stdout, p.stdout
    study = optuna.load_study(study_name=sweep.study, storage=storage)
    assert study.trials == [] and study.direction == optuna.study.StudyDirection.MINIMIZE
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.tags.get("optuna.study") == sweep.study, [r.data.tags for r in runs]
