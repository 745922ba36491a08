"""Each CLI's success path run end to end at least once (issue #25 item 5), small: jobs/train_classifier.py (MNIST and
CIFAR-10 on a subset), jobs/anomaly_table.py, jobs/eval.py on a checkpoint file (domain and Inception), jobs/submit.py
--sweep-file. Every number a command prints is checked against a value recomputed here (tests/recompute.py, or by
hand). The sweep files and the make targets are in test_sweep_files.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from conftest import ROOT, needs_cifar, needs_inception, needs_mnist, tiny

PY = [sys.executable]


def _run(args, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    p = helpers.run([*PY, *map(str, args)], cwd=cwd, env=env, timeout=timeout, what=f"{Path(str(args[0])).name}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _accuracy_by_hand(name: str, path) -> float:
    """Top-1 accuracy on the whole test split of the weights at `path`, counted here."""
    from gancore.config import DataConfig
    from gancore.data import load_images
    from gancore.metrics.classifier import build, domain_spec, prepare

    spec = domain_spec(name)
    net = build(name)
    net.load_state_dict(torch.load(path, weights_only=True))
    x, y = load_images(DataConfig(name=spec.dataset, split="test"))
    with torch.no_grad():
        pred = torch.cat([net(prepare(c, spec)).argmax(1) for c in x.split(1000)])
    return (pred == y).double().mean().item()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("dataset, name, subset", [
    pytest.param("mnist", "lenet_mnist", 512, marks=needs_mnist),
    pytest.param("cifar10", "cifar_classifier", 256, marks=needs_cifar),
])
def test_train_classifier_on_a_subset(tmp_path, dataset, name, subset):
    out = tmp_path / f"{name}.pt"
    p = _run([ROOT / "jobs" / "train_classifier.py", "--dataset", dataset, "--epochs", "1", "--subset", subset,
              "--out", out], tmp_path)
    m = re.search(rf"^{name}: test accuracy ([0-9.]+) after 1 epochs \(\d+ s\) -> {re.escape(str(out))}$", p.stdout,
                  re.MULTILINE)
    assert m, p.stdout
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["epochs"], info["subset"], info["dataset"]) == (1, subset, dataset)
    acc = _accuracy_by_hand(name, out)
    assert float(m.group(1)) == pytest.approx(acc, abs=5e-5) and info["test_accuracy"] == pytest.approx(acc)


def test_train_classifier_subset_needs_out(tmp_path):
    p = helpers.run([*PY, str(ROOT / "jobs" / "train_classifier.py"), "--dataset", "mnist", "--subset", "10"],
                    cwd=tmp_path, timeout=120, what="train_classifier.py --subset without --out")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--out" in p.stderr, p.stderr


@needs_mnist
def test_anomaly_table_cli(tmp_path):
    from recompute import ganomaly_metrics_by_sklearn

    from gancore.train.rundir import checkpoint_file

    out = tmp_path / "table"
    p = _run([ROOT / "jobs" / "anomaly_table.py", "--config", ROOT / "configs/mnist_ganomaly.yaml", "--digits", "1",
              "--out", out, "model.ngf=8", "model.ndf=8",
              "model.nz=16", "ganomaly.test_subset=200", "data.subset=64", "optim.batch_size=32", "train.epochs=1",
              "train.progress=false", "track.enabled=false", "train.snapshot_epochs=[1]",
              "train.loss_ranges=[[1,1]]"], tmp_path)
    want = ganomaly_metrics_by_sklearn(checkpoint_file(out / "digit_1"))
    header, row = (out / "table.csv").read_text().splitlines()
    assert header.startswith("normal_digit,auroc,average_precision")
    digit, auroc, ap = row.split(",")[:3]
    assert digit == "1" and (float(auroc), float(ap)) == pytest.approx((want["auroc"], want["average_precision"]))
    assert f"{want['auroc']:.4f}" in p.stdout  # the printed table


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny MNIST run (8 steps), tracking off: what eval.py is pointed at."""
    from gancore.train.loop import fit

    return fit(tiny(), out=tmp_path_factory.mktemp("run") / "run")


def _printed(stdout: str, key: str) -> float:
    m = re.search(rf"^{key} = ([0-9.eE+-]+)$", stdout, re.MULTILINE)
    assert m, stdout
    return float(m.group(1))


@needs_mnist
def test_eval_on_a_checkpoint_file(trained, tmp_path):
    from recompute import checkpoint_eval

    p = _run([ROOT / "jobs" / "eval.py", trained.checkpoint, "-n", "100"], tmp_path)
    want = checkpoint_eval(trained.checkpoint, 100)
    for key, value in want.items():
        assert _printed(p.stdout, key) == pytest.approx(value, abs=6e-5), key  # printed with 4 decimals


@needs_mnist
@needs_inception
@pytest.mark.timeout(900)  # 50 Inception forward passes twice (the CLI, the recomputation) on a busy CPU core
def test_eval_with_the_inception_extractor(trained, tmp_path):
    from recompute import checkpoint_eval

    p = _run([ROOT / "jobs" / "eval.py", trained.checkpoint, "-n", "50", "--extractor", "inception"], tmp_path)
    want = checkpoint_eval(trained.checkpoint, 50, extractor="inception")
    assert "fid_inception_50" in want
    for key, value in want.items():
        assert _printed(p.stdout, key) == pytest.approx(value, abs=6e-5), key


@needs_mnist
@pytest.mark.timeout(600)
def test_submit_sweep_file_local(tmp_path):
    from gancore.train import state as ckpt

    sweep = tmp_path / "runs.txt"
    sweep.write_text("# two runs, one override set per line\noptim.lr_g=1e-4 model.nz=16\n\noptim.lr_g=3e-4  # faster\n")
    tiny_args = ["data.subset=64", "optim.batch_size=32", "train.epochs=1", "train.progress=false",
                 "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,1]]", "train.grid_size=16", "track.enabled=false",
                 "eval.n_samples=0", "eval.every=0"]  # 2 steps each
    p = _run([ROOT / "jobs" / "submit.py", "--cluster", "local", "--config", ROOT / "configs" / "quickstart.yaml",
              "--sweep-file", sweep, "--out", "runs/s", "--time", "20", "--wait", "--poll", "1", *tiny_args],
             tmp_path, timeout=500)
    assert len([ln for ln in p.stdout.splitlines() if ln.startswith("submitted ")]) == 2, p.stdout
    finished = [ln for ln in p.stdout.splitlines() if ": finished 2/2 steps;" in ln]
    assert len(finished) == 2, p.stdout
    runs = sorted((tmp_path / "runs").iterdir())
    assert [d.name for d in runs] == ["s-00", "s-01"]
    cfgs = [ckpt.load(ckpt.latest(d))["config"] for d in runs]  # what each run trained with, from its checkpoint
    assert [(c["optim"]["lr_g"], c["model"]["nz"]) for c in cfgs] == [(1e-4, 16), (3e-4, 100)]
