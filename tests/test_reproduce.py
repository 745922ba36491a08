"""`make reproduce`: the suite's tables read back from MLflow, finished runs reused, an interrupted suite continued."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import helpers
import pytest
from conftest import ROOT, needs_inception, needs_mnist

from gancore.experiments import reproduce as rp
from gancore.train import state as ckpt

pytestmark = needs_mnist

# the mnist suite's two presets, shrunk: 256 images, batch 32 -> 8 steps per epoch, a small DCGAN on 16x16
SMALL = ["data.subset=256", "optim.batch_size=32", "model.arch=dcgan", "data.image_size=16", "model.nz=16",
         "model.ngf=8", "model.ndf=8", "train.progress=false", "train.checkpoint_every=4", "train.log_every=4",
         "track.image_every=8", "track.system_metrics=false", "train.snapshot_epochs=[1]", "train.loss_ranges=[[1,2]]"]


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _all_runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_tables_are_read_back_from_mlflow_and_finished_runs_are_reused(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    plans = rp.plan("mnist", "domain", epochs=2, n_samples=200, overrides=(*SMALL, f"track.uri={uri}"),
                    runs_root=tmp_path / "runs")
    assert [p.preset for p in plans] == ["mnist_dcgan", "mnist_dcgan_plus"] and [p.steps for p in plans] == [16, 16]
    assert all(p.cfg.eval.every == 8 and p.cfg.eval.extractor == "lenet_mnist" for p in plans)
    rows, complete = rp.reproduce(plans, tmp_path / "results", "mnist", "domain", progress=lambda m: None)
    assert complete and [r["experiment"] for r in rows] == ["mnist_dcgan", "mnist_dcgan_plus"]

    client = _client(uri)
    with open(tmp_path / "results" / "mnist.csv") as f:
        table = list(csv.DictReader(f))
    for row, p in zip(table, plans):
        run = client.get_run(row["run_id"])
        hist = sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], "fid_lenet_200"))
        assert [s for s, _ in hist] == [8, 16]  # every epoch
        best = min(hist, key=lambda sv: sv[1])
        assert float(row["fid_best"]) == pytest.approx(best[1]) and int(row["fid_best_step"]) == best[0]
        assert float(row["fid_last"]) == pytest.approx(hist[-1][1])
        assert float(row["is_last"]) == pytest.approx(run.data.metrics["is_lenet_200"])
        assert row["protocol"] == "domain: fid_lenet_200" and row["steps"] == "16"
        assert "gancore.protocol.lenet_200" in run.data.tags and run.data.tags["gancore.reproduce"] == "mnist"
    assert float(table[0]["report_fid"]) == 40.65 and table[1]["report_fid"] == ""  # the report's own column
    md = (tmp_path / "results" / "mnist.md").read_text()
    assert "Protocol of gancore's columns: **domain**" in md and table[0]["run_id"] in md
    assert "- mnist_dcgan_plus: fid_inception_10k <= 5 (beats Lucic et al." in md  # its goal, named
    assert (tmp_path / "results" / "mnist_fid.png").stat().st_size > 5000
    from PIL import Image

    grids = Image.open(tmp_path / "results" / "mnist_grids.png")  # both runs' last sample grids, side by side
    assert grids.size[0] > grids.size[1] > 200

    # run again: nothing is trained, no MLflow run is added, the same rows come back
    import gancore.train.loop

    monkeypatch.setattr(gancore.train.loop, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
    rows2, complete2 = rp.reproduce(plans, tmp_path / "results", "mnist", "domain", progress=lambda m: None)
    assert complete2 and [r["run_id"] for r in rows2] == [r["run_id"] for r in rows]
    assert len(_all_runs(client)) == 2


def test_seeds_give_one_row_each_and_a_mean_row(tmp_path):
    """--seeds 0,1: each experiment once per seed (distinct runs, the seed in MLflow), plus mean ± sd per preset;
    seed 0 is the same experiment (same run dir) as the preset run without --seeds."""
    import statistics

    from gancore.errors import ConfigError

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    kw = dict(epochs=1, n_samples=100, overrides=(*SMALL, f"track.uri={uri}"), runs_root=tmp_path / "runs")
    plans = [p for p in rp.plan("mnist", "domain", seeds=(0, 1), **kw) if p.preset == "mnist_dcgan"]
    assert [p.label for p in plans] == ["mnist_dcgan (seed 0)", "mnist_dcgan (seed 1)"]
    assert plans[0].run_dir == rp.plan("mnist", "domain", **kw)[0].run_dir != plans[1].run_dir
    rows, complete = rp.reproduce(plans, tmp_path / "results", "mnist", "domain", progress=lambda m: None)
    assert complete
    client = _client(uri)
    assert [client.get_run(r["run_id"]).data.params["train.seed"] for r in rows] == ["0", "1"]
    fids = [r["fid_best"] for r in rows]
    assert fids[0] != fids[1]  # two different trainings
    md = (tmp_path / "results" / "mnist.md").read_text()
    mean_row = next(line for line in md.splitlines() if line.startswith("| mnist_dcgan (mean of 2 seeds) |"))
    assert f"| {statistics.mean(fids):.2f} ± {statistics.stdev(fids):.2f} |" in mean_row
    with open(tmp_path / "results" / "mnist.csv") as f:
        assert [r["experiment"] for r in csv.DictReader(f)] == ["mnist_dcgan (seed 0)", "mnist_dcgan (seed 1)"]
    with pytest.raises(ConfigError, match="distinct seeds"):
        rp.plan("mnist", "domain", seeds=(1, 1), **kw)


@needs_inception
def test_final_inception_columns_measure_the_best_checkpoint_once(tmp_path, monkeypatch):
    """`--final inception`: the best (domain-FID) checkpoint gets an Inception FID at the end, logged into its run
    with the protocol stamp, shown in its own columns headed by the metric; a rerun does not measure it again."""
    import json

    from gancore.errors import ConfigError
    from gancore.train import state

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    plans = rp.plan("mnist", "domain", epochs=2, n_samples=40, overrides=(*SMALL, f"track.uri={uri}"),
                    runs_root=tmp_path / "runs")[:1]
    rows, complete = rp.reproduce(plans, tmp_path / "results", "mnist", "domain", progress=lambda m: None,
                                  final="inception")
    assert complete
    client = _client(uri)
    run_id = rows[0]["run_id"]
    run = client.get_run(run_id)
    (fid,) = client.get_metric_history(run_id, "fid_inception_40")
    best_step = state.load(plans[0].run_dir / state.CKPT_DIR / state.BEST)["step"]
    assert fid.step == best_step == rows[0]["fid_best_step"]  # best.pt, at its own step
    from recompute import checkpoint_eval

    best = plans[0].run_dir / state.CKPT_DIR / state.BEST  # measured again here, without eval's feature cache
    assert fid.value == pytest.approx(checkpoint_eval(best, 40, extractor="inception")["fid_inception_40"], rel=1e-6)
    stamp = json.loads(run.data.tags["gancore.protocol.inception_40"])
    assert stamp["extractor"] == "inception" and len(stamp["weights_sha256"]) == 64 and stamp["ema"] is False
    with open(tmp_path / "results" / "mnist.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["fid_inception_40"]) == pytest.approx(fid.value) and int(row["fid_inception_40_step"]) == fid.step
    assert float(row["kid_inception_40"]) == pytest.approx(run.data.metrics["kid_inception_40"])
    assert float(row["fid_best"]) == pytest.approx(rows[0]["fid_best"])  # the domain column is still lenet's
    md = (tmp_path / "results" / "mnist.md").read_text()
    assert "| fid_inception_40 | kid_inception_40 | fid_inception_40_step |" in md

    assert rp.estimate_final_seconds(plans, "inception") == 0.0  # nothing left to measure
    fresh = rp.plan("mnist", "domain", epochs=1, n_samples=40, overrides=(*SMALL, f"track.uri={uri}"),
                    runs_root=tmp_path / "runs")
    assert 0 < rp.estimate_final_seconds(fresh, "inception") < 120  # 80 generated images; real statistics cached

    import gancore.evaluation

    monkeypatch.setattr(gancore.evaluation, "evaluate_checkpoint", lambda *a, **k: pytest.fail("measured twice"))
    rows2, _ = rp.reproduce(plans, tmp_path / "results", "mnist", "domain", progress=lambda m: None,
                            final="inception")
    assert rows2[0]["final_fid"] == pytest.approx(fid.value)
    same = rp.plan("mnist", "inception", epochs=2, n_samples=40, overrides=(*SMALL, f"track.uri={uri}"),
                   runs_root=tmp_path / "runs")
    with pytest.raises(ConfigError, match="protocol's own extractor"):
        rp.reproduce(same, tmp_path / "results", "mnist", "inception", final="inception")


def test_an_interrupted_suite_continues_where_it_stopped(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    cmd = [sys.executable, str(ROOT / "jobs" / "reproduce.py"), "mnist", "--epochs", "3", "--n-samples", "200",
           "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), *SMALL, f"track.uri={uri}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    dry = helpers.run([*cmd, "--dry-run"], timeout=240, env=env, what="reproduce.py --dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(" train ") == 2 and "24 steps" in dry.stdout and "estimated training time" in dry.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing

    log = tmp_path / "first.log"
    # held at step 7 (GANCORE_TEST_HOLD_AT_STEP, gancore/train/signals.py) until the signal: after the checkpoint at
    # step 4, and beyond the 6 steps of a time-estimate probe; however fast this machine, the first experiment is
    # still under way when the SIGTERM comes
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**env, "GANCORE_TEST_HOLD_AT_STEP": "7"})
    plans = rp.plan("mnist", "domain", 3, 200, (*SMALL, f"track.uri={uri}"), tmp_path / "runs")
    try:
        helpers.wait_for(lambda: ckpt.latest(plans[0].run_dir) is not None, timeout=240, interval=0.01,
                         what=f"the first experiment's first checkpoint in {plans[0].run_dir}", proc=proc, log=log)
        proc.send_signal(signal.SIGTERM)
        assert helpers.wait_exit(proc, timeout=120, what="the suite after SIGTERM", log=log) == 75, \
            log.read_text()[-3000:]
    finally:
        helpers.stop(proc, grace=0)
    assert 4 < ckpt.load(ckpt.latest(plans[0].run_dir))["step"] <= 7  # stopped after the checkpoint, by the hold
    assert rp.finished_run(plans[0]) is None and not rp.finished_run(plans[1])
    first_run = ckpt.load(ckpt.latest(plans[0].run_dir))["run_id"]

    again = helpers.run(cmd, timeout=400, env=env, what="the continued suite")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2/2 experiments" in again.stdout
    client = _client(uri)
    runs = _all_runs(client)
    assert len(runs) == 2 and first_run in {r.info.run_id for r in runs}  # continued in the same MLflow run
    assert all(r.info.status == "FINISHED" for r in runs)
    with open(tmp_path / "results" / "mnist_3ep.csv") as f:  # --epochs 3: its own table (table_name)
        assert [r["experiment"] for r in csv.DictReader(f)] == ["mnist_dcgan", "mnist_dcgan_plus"]


def test_tables_are_named_by_budget_and_protocol_and_keep_rows_measured_earlier(tmp_path):
    """A table measured elsewhere (committed; its runs are not in this machine's MLflow store) survives a rerun that
    measures nothing (an interrupted first experiment) and one that measures one of its rows again: the other row's
    cells, its extra --final columns included, come back as they were."""
    assert rp.table_name("mnist") == "mnist"
    assert rp.table_name("mnist", "domain", 1) == "mnist_1ep" != rp.table_name("mnist", "domain", 3) == "mnist_3ep"
    assert rp.table_name("mnist", "inception", 3) == "mnist_3ep_inception"
    out = tmp_path / "results"
    out.mkdir()
    header = [*rp.COLUMNS, "fid_inception_10k", "kid_inception_10k", "fid_inception_10k_step"]
    earlier = {"experiment": "mnist_dcgan", "report_fid": "40.65", "report_is": "4.85", "fid_best": "23.11108566957273",
               "fid_best_step": "2811", "fid_last": "23.11108566957273", "is_last": "7.5", "kid_last": "196.6",
               "protocol": "domain: fid_lenet_10k", "steps": "2811", "wall_min": "16.3", "device": "cpu",
               "run_id": "acf53b3846844a8b8af8732a261e4075", "fid_inception_10k": "22.803810613235754",
               "kid_inception_10k": "0.0172", "fid_inception_10k_step": "2811"}
    with open(out / "mnist_3ep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerow(earlier)
    plans = rp.plan("mnist", "domain", epochs=3, n_samples=200, overrides=SMALL, runs_root=tmp_path / "runs")
    rp.write_tables([], out, "mnist", "domain", plans, name="mnist_3ep")  # stopped before anything finished
    with open(out / "mnist_3ep.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [earlier]
    md = (out / "mnist_3ep.md").read_text()
    assert "| mnist_dcgan | 40.65 | 4.85 | 23.11 | 2811 |" in md and "22.80" in md and "acf53b38" in md
    assert "| mnist_dcgan_plus | open |" in md and "| mnist_dcgan | open" not in md
    # measured again here: the new row replaces it (the plus row stays open)
    new = {**{c: None for c in rp.COLUMNS}, "experiment": "mnist_dcgan", "fid_best": 19.5, "steps": 24, "protocol": "domain: fid_lenet_200",
           "run_id": "0123456789abcdef", "history": [], "run_dir": tmp_path}
    rp.write_tables([new], out, "mnist", "domain", plans, name="mnist_3ep")
    with open(out / "mnist_3ep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["experiment"], r["fid_best"], r["run_id"]) for r in rows] == [("mnist_dcgan", "19.5", "0123456789abcdef")]
