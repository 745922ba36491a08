"""A training run as MLflow sees it, read back through MlflowClient: params, metric steps, grids, artifacts, resume."""

import helpers
import pytest
from mlflow.tracking import MlflowClient

from gancore.config import hyperparams
from gancore.train.loop import fit
from conftest import needs_mnist, tiny

pytestmark = needs_mnist


def _uri(tmp_path):
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _artifacts(client, run_id, path=None):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_training_run_is_fully_recorded(tmp_path):
    cfg = tiny("track.enabled=true", f"track.uri={_uri(tmp_path)}", "track.experiment=e2e", "train.log_every=2",
               "track.log_checkpoints=final")
    r = fit(cfg, out=tmp_path / "run")
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    run = client.get_run(r.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "quickstart"
    assert run.data.params == {k: str(v) for k, v in hyperparams(cfg).items()}
    assert run.data.tags["gancore.preset"] == "quickstart"
    # 8 steps, log_every 2 -> a value at steps 2, 4, 6, 8 (epoch ends at 4 and 8 coincide)
    for key in ("Loss/D", "Loss/G", "D/real", "D/fake", "D/acc", "images_per_s", "epoch", "lr/G"):
        assert _steps(client, r.run_id, key) == [2, 4, 6, 8], key
    assert [m.value for m in sorted(client.get_metric_history(r.run_id, "epoch"), key=lambda m: m.step)] == [0.5, 1.0, 1.5, 2.0]
    arts = _artifacts(client, r.run_id)
    grids = sorted(a for a in arts if a.startswith("images/samples") and a.endswith(".png"))
    assert len(grids) == 2 and "step+4+" in grids[0] and "step+8+" in grids[1]  # track.image_every=4
    for want in ("config.yaml", "real_samples.png", "plots/loss_all.png", "report/loss_report.json",
                 "snapshots/epoch_002.png", "snapshots/G_epoch_002.pt", "checkpoints/step_00000008.pt"):
        assert want in arts, (want, arts)


def test_resumed_run_keeps_one_run_id_and_no_duplicate_steps(tmp_path):
    cfg = tiny("track.enabled=true", f"track.uri={_uri(tmp_path)}", "train.log_every=1", "train.epochs=3")
    part = fit(cfg, out=tmp_path / "run", stop_after=5)
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    assert client.get_run(part.run_id).info.status == "KILLED"
    assert _steps(client, part.run_id, "Loss/D") == [1, 2, 3, 4, 5]
    done = fit(cfg, out=tmp_path / "run", resume="auto")
    assert done.run_id == part.run_id
    assert _steps(client, done.run_id, "Loss/D") == list(range(1, 13))
    assert client.get_run(done.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_run(done.run_id).info.experiment_id])) == 1


def test_metrics_during_training_and_eval_job(tmp_path):
    """eval.every -> fid_* by step in MLflow, best-FID checkpoint kept; jobs/eval.py logs into the same run."""
    import sys

    from conftest import ROOT

    cfg = tiny("track.enabled=true", f"track.uri={_uri(tmp_path)}", "model.conditional=true",
               "eval.n_samples=200", "eval.every=4", "eval.extractor=lenet_mnist")
    r = fit(cfg, out=tmp_path / "run")
    client = MlflowClient(tracking_uri=_uri(tmp_path))
    assert _steps(client, r.run_id, "fid_lenet_200") == [4, 8]
    assert _steps(client, r.run_id, "kid_lenet_200") == [4, 8]
    fids = {m.step: m.value for m in client.get_metric_history(r.run_id, "fid_lenet_200")}
    assert r.metrics["best_fid_lenet_200"] == pytest.approx(min(fids.values()))
    assert (r.run_dir / "checkpoints" / "best.pt").is_file()
    from recompute import class_accuracy_by_hand, sample_quality

    by_hand = class_accuracy_by_hand(r.checkpoint)  # the end-of-run figure's numbers, counted from the final weights
    assert {k: v for k, v in r.metrics.items() if k.startswith("class_acc_")} == pytest.approx(by_hand)
    assert fids[8] == pytest.approx(sample_quality(r.checkpoint, ("fid",))["fid_lenet_200"], rel=1e-6)
    arts = _artifacts(client, r.run_id)
    assert "plots/tsne.png" in arts and "plots/class_accuracy.png" in arts

    p = helpers.run([sys.executable, str(ROOT / "jobs" / "eval.py"), r.run_id, "-n", "100", "--uri", _uri(tmp_path)],
                    timeout=300, what="eval.py on the run")
    assert p.returncode == 0, p.stderr
    assert "fid_lenet_100 = " in p.stdout
    hist = client.get_metric_history(r.run_id, "fid_lenet_100")
    best_step = int(__import__("torch").load(r.run_dir / "checkpoints/best.pt", weights_only=True)["step"])
    assert [m.step for m in hist] == [best_step]  # evaluated from the best-FID checkpoint, logged at its step
    assert client.get_run(r.run_id).info.status == "FINISHED"


def test_unreachable_server_fails_before_writing_anything(tmp_path):
    import socket

    from gancore.errors import TrackingError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingError, match=f"cannot reach MLflow tracking server at http://127.0.0.1:{port}"):
        fit(tiny("track.enabled=true", f"track.uri=http://127.0.0.1:{port}"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_quickstart_logs_sample_quality_by_step_and_ends_its_summary_with_it(tmp_path):
    """`make train` as a new user runs it (the quickstart preset, its own eval settings), shortened to 200 steps:
    domain FID/KID/IS on 1,000 samples at steps 100 and 200 in MLflow, FID falling, the summary's last lines."""
    import sys

    from conftest import ROOT

    uri = _uri(tmp_path)
    r = helpers.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "quickstart.yaml"),
                     "train.max_steps=200", "train.progress=false", f"track.uri={uri}", "--out", str(tmp_path / "run")],
                    timeout=280, what="train.py, 200 steps tracked")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    fid = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "fid_lenet_1k")}
    assert sorted(fid) == [100, 200] and 0 < fid[200] < fid[100], fid  # the UI's chart: FID falls
    for key in ("kid_lenet_1k", "is_lenet_1k"):
        assert _steps(client, run.info.run_id, key) == [100, 200], key
    # IS floor a generator that does not learn fails: 200 steps gave 3.83 here, the same run with G frozen
    # (optim.lr_g=1e-8) 1.0045
    assert run.data.metrics["is_lenet_1k"] > 2.0
    import hashlib
    import json

    from gancore.metrics import extractor_path

    proto = json.loads(run.data.tags["gancore.protocol.lenet_1k"])  # how those numbers were measured
    sha = hashlib.sha256(extractor_path("lenet_mnist").read_bytes()).hexdigest()
    assert proto == {"extractor": "lenet_mnist", "weights_sha256": sha, "generated": 1000, "reference": "mnist train",
                     "reference_count": 1000, "resize": "none: the extractor takes (1, 28, 28)", "kid_pr_count": 1000,
                     "torch_fidelity": proto["torch_fidelity"], "ema": False}
    lines = r.stdout.strip().splitlines()
    block = lines[lines.index(next(ln for ln in lines if ln.startswith("sample quality at step 200"))):]
    assert block[1:] == [f"  {k} = {run.data.metrics[k]:.4f}" for k in
                         ("fid_lenet_1k", "best_fid_lenet_1k", "kid_lenet_1k", "is_lenet_1k")], lines[-6:]


def test_a_metric_of_another_protocol_is_refused_and_never_shares_a_row(tmp_path):
    """log_to_run refuses numbers measured under another protocol for a key the run already has; --compare splits
    such a key into one row per protocol."""
    import json

    from gancore.errors import TrackingError
    from gancore.tracking import log_to_run
    from gancore.tracking.runs import compare_runs

    uri = _uri(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("protocols")
    proto = {"extractor": "lenet_mnist", "generated": 10000, "reference": "mnist train", "weights_sha256": "aa"}
    key = "gancore.protocol.lenet_10k"
    runs = []
    for sha in ("aa", "bb"):
        run = client.create_run(exp).info.run_id
        log_to_run(run, {"fid_lenet_10k": 5.0}, 100, uri, protocol=(key, json.dumps({**proto, "weights_sha256": sha})))
        runs.append(run)
    assert json.loads(client.get_run(runs[1]).data.tags[key])["weights_sha256"] == "bb"
    with pytest.raises(TrackingError, match="another protocol .*weights_sha256 'bb' -> 'aa'"):
        log_to_run(runs[1], {"fid_lenet_10k": 1.0}, 200, uri, protocol=(key, json.dumps(proto)))
    assert _steps(client, runs[1], "fid_lenet_10k") == [100]  # nothing logged
    log_to_run(runs[0], {"fid_lenet_10k": 4.0}, 200, uri, protocol=(key, json.dumps(proto)))  # same protocol: fine
    rows = compare_runs(runs[0], runs[1], uri)["metrics"]
    assert rows == {"fid_lenet_10k (A's protocol)": (4.0, None), "fid_lenet_10k (B's protocol)": (None, 5.0)}


def test_an_interrupted_evaluation_continues_from_its_cached_chunks(tmp_path, monkeypatch):
    """jobs/eval.py's evaluation caches features per chunk: stopped in its third chunk of generated images, a rerun
    computes only the missing chunks and gives exactly the numbers of an uninterrupted evaluation."""
    from gancore import evaluation
    from gancore.io import cache_dir
    from gancore.metrics import fidelity

    monkeypatch.setattr(fidelity, "CHUNK", 100)
    r = fit(tiny(), out=tmp_path / "run")
    sampled = []
    original = evaluation.chunk_sampler

    def counting(family, seed):
        inner = original(family, seed)

        def chunk(i):
            sampled.append(i)
            if i == 2 and sampled.count(2) == 1:
                raise KeyboardInterrupt  # Ctrl-C in the third chunk
            return inner(i)
        return chunk

    monkeypatch.setattr(evaluation, "chunk_sampler", counting)
    ckpt_file = str(r.checkpoint)
    with pytest.raises(KeyboardInterrupt):
        evaluation.evaluate_checkpoint(ckpt_file, n=500, extractor="lenet_mnist", log=False)
    assert sampled == [0, 1, 2]
    values, _ = evaluation.evaluate_checkpoint(ckpt_file, n=500, extractor="lenet_mnist", log=False)
    assert sampled == [0, 1, 2, 2, 3, 4]  # chunks 0 and 1 came from the cache

    fresh = tmp_path / "fresh-cache"  # nothing cached but the extractor: one uninterrupted pass
    fresh.mkdir()
    (fresh / "extractors").symlink_to(cache_dir() / "extractors", target_is_directory=True)
    monkeypatch.setenv("GANCORE_CACHE", str(fresh))
    again, _ = evaluation.evaluate_checkpoint(ckpt_file, n=500, extractor="lenet_mnist", log=False)
    assert again == values and set(values) == {"fid_lenet_500", "is_lenet_500", "kid_lenet_500",
                                               "precision_lenet_500", "recall_lenet_500"}
