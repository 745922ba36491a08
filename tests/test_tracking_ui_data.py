"""What the MLflow UI shows beyond losses, read back through MlflowClient: sample quality by step, system metrics
(track.system_metrics), the training data as a dataset input with a content digest (issue #16)."""

import hashlib
import threading
import types

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gancore.config import DataConfig
from gancore.data import load_images
from gancore.tracking.tracker import dataset_entry
from gancore.train.loop import fit
from conftest import needs_mnist, tiny

pytestmark = needs_mnist


def _uri(tmp_path):
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _sha1_32(x, y):
    """The digest computed here independently: sha1 of shapes, image bytes, label bytes."""
    h = hashlib.sha1(f"{tuple(x.shape)}|{tuple(y.shape)}|".encode())
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
    h.update(np.ascontiguousarray(y.numpy()).tobytes())
    return h.hexdigest()[:32]


class _Sensors:
    """psutil as MLflow's CPU monitor sees it, reading 1.0, 2.0, 3.0, ... percent and 1001, 1002, ... MB in use:
    every logged system metric is then known here (one sample per logged value: MLflow's default)."""

    def __init__(self):
        self.cpu, self.mem = 0, 0

    def cpu_percent(self, *a, **k):
        self.cpu += 1
        return float(self.cpu)

    def virtual_memory(self):
        self.mem += 1
        return types.SimpleNamespace(used=(1000 + self.mem) * 1e6, total=8000e6)


def test_run_logs_fid_by_step_system_metrics_and_its_dataset(tmp_path, monkeypatch):
    from mlflow.system_metrics.metrics import cpu_monitor

    from gancore.tracking import system
    from recompute import sample_quality

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # MLflow's default: 10 s
    monkeypatch.setattr(cpu_monitor, "psutil", _Sensors())
    # held at step 4 until the first system value is logged (GANCORE_TEST_HOLD_AT_STEP, gancore/train/signals.py);
    # the stop logs one more: at least two values however fast the run
    release = tmp_path / "release"
    monkeypatch.setenv("GANCORE_TEST_HOLD_AT_STEP", "4")
    monkeypatch.setenv("GANCORE_TEST_HOLD_RELEASE", str(release))
    init = system.SystemMetrics.__init__

    def releasing(self, log_metrics, *args, **kw):
        init(self, lambda values, step: (log_metrics(values, step), release.touch()), *args, **kw)

    monkeypatch.setattr(system.SystemMetrics, "__init__", releasing)
    cfg = tiny("track.enabled=true", f"track.uri={_uri(tmp_path)}", "eval.n_samples=200", "eval.every=4",
               "eval.extractor=lenet_mnist", "eval.metrics=[fid,kid]", "train.checkpoint_every=4")
    r = fit(cfg, out=tmp_path / "run")
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    run = client.get_run(r.run_id)
    # sample quality by step (8 steps, eval.every 4), named by protocol; the last value is the run's result
    fid = _history(client, r.run_id, "fid_lenet_200")
    assert [s for s, _ in fid] == [4, 8]
    for step, value in fid:  # each evaluation recomputed from that step's checkpoint
        assert value == pytest.approx(sample_quality(r.run_dir / f"checkpoints/step_{step:08d}.pt")["fid_lenet_200"],
                                      rel=1e-6), step
    assert [s for s, _ in _history(client, r.run_id, "kid_lenet_200")] == [4, 8]
    assert r.metrics["fid_lenet_200"] == pytest.approx(fid[-1][1])
    # system metrics: MLflow's names under system/, numbered 0, 1, 2, ... and the sampler thread gone
    cpu = _history(client, r.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [s for s, _ in cpu] == list(range(len(cpu)))
    assert [v for _, v in cpu] == [float(i) for i in range(1, len(cpu) + 1)]  # the sensor's readings, in order
    mem = _history(client, r.run_id, "system/system_memory_usage_megabytes")
    assert [v for _, v in mem] == [1000.0 + i for i in range(1, len(cpu) + 1)]
    pct = _history(client, r.run_id, "system/system_memory_usage_percentage")
    assert [v for _, v in pct] == [round((1000 + i) * 1e6 / 8000e6 * 100, 1) for i in range(1, len(cpu) + 1)]
    assert run.data.tags["gancore.system_metrics_node"].startswith("node0 (")
    assert not [t for t in threading.enumerate() if t.name == "gancore-system-metrics"]
    # the data it trained on: one input, named by split and subset, digest of exactly those images and labels
    (inp,) = run.inputs.dataset_inputs
    x, y = load_images(cfg.data)
    assert inp.dataset.name == "mnist-train-first128"
    assert inp.dataset.digest == _sha1_32(x, y)
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "train")]
    assert '"num_images": 128' in inp.dataset.profile


def test_system_metrics_off_and_other_data_other_digest(tmp_path):
    cfg = tiny("track.enabled=true", f"track.uri={_uri(tmp_path)}", "track.system_metrics=false",
               "data.subset=64", "train.epochs=1")
    r = fit(cfg, out=tmp_path / "run")
    run = MlflowClient(tracking_uri=_uri(tmp_path)).get_run(r.run_id)
    assert "Loss/D" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/")]
    assert "gancore.system_metrics_node" not in run.data.tags
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "mnist-train-first64"
    assert inp.dataset.digest == _sha1_32(*load_images(cfg.data))


def test_dataset_digest_tells_subsets_classes_and_sizes_apart():
    entries = {}
    for data in (DataConfig(subset=128), DataConfig(subset=64), DataConfig(subset=128, normal_class=3),
                 DataConfig(subset=128, image_size=32), DataConfig(split="test", subset=128)):
        x, y = load_images(data)
        entries[data] = dataset_entry(data, x, y)
        assert entries[data]["digest"] == _sha1_32(x, y)
        assert entries[data]["profile"]["num_images"] == len(x)
    assert len({e["digest"] for e in entries.values()}) == 5
    assert sorted(e["name"] for e in entries.values()) == [
        "mnist-test-first128", "mnist-train-class3-first128", "mnist-train-first128", "mnist-train-first128-32px",
        "mnist-train-first64"]
    # the first 64 of a 128-image subset are the same images, yet the digest differs: it covers the whole set
    small, big = load_images(DataConfig(subset=64))[0], load_images(DataConfig(subset=128))[0]
    assert bool((small == big[:64]).all())
