"""MLflow tracking: values are read back through MlflowClient, from a SQLite store and from a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import importlib.util
import shutil

import helpers
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from gancore import tracking
from gancore.config import hyperparams, load_config
from gancore.errors import TrackingError
from gancore.tracking import MLflowTracker, NullTracker, make_tracker, sender

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow database, made once: creating one takes seconds (dozens of schema migrations)."""
    root = tmp_path_factory.mktemp("template")
    tracking.open_store(f"sqlite:///{root / 'mlflow.db'}", "template")
    return root / "mlflow.db"


@pytest.fixture
def store(tmp_path, monkeypatch, template_db):
    """A default store under a tmp cwd (a copy of the empty template); no tracking URI from the environment."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlruns").mkdir()
    shutil.copy(template_db, tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sender, "FLUSH_EVERY_S", 3600.0)  # only size or flush() send: deterministic batching
    return tmp_path


def _cfg(*overrides):
    return load_config(None, ["track.experiment=test", "name=mnist_test", *overrides])


def _client(root: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")


def _steps(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _assert_git_tags(tags: dict[str, str]) -> None:
    """The commit tags equal `git rev-parse HEAD` / `git status` run here in gancore's own checkout (CI's clean
    clone is one); "unknown" only where gancore is not in a git checkout."""
    import gancore

    src = Path(gancore.__file__).resolve().parent

    def git(*args):
        return helpers.run(["git", *args], cwd=src, timeout=30, what=f"git {' '.join(args)}")

    head = git("rev-parse", "HEAD")
    if not (src.parent / ".git").exists():
        assert tags["gancore.git_commit"] == "unknown" and tags["gancore.git_dirty"] == "unknown", tags
        return
    assert head.returncode == 0, head.stderr
    assert tags["gancore.git_commit"] == tags["mlflow.source.git.commit"] == head.stdout.strip()
    status = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    assert tags["gancore.git_dirty"] == ("true" if status else "false"), status


def test_null_tracker_when_disabled_or_not_main(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert isinstance(make_tracker(_cfg("track.enabled=false"), is_main=True), NullTracker)
    assert isinstance(make_tracker(_cfg(), is_main=False), NullTracker)
    tr = make_tracker(_cfg(), is_main=True)
    assert isinstance(tr, MLflowTracker)
    assert not (tmp_path / "mlruns").exists()  # nothing is created before start()


def test_run_params_tags_metrics_images_artifacts(store, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setattr(sender, "FLUSH_EVERY_METRICS", 5)
    cfg = _cfg("optim.lr_g=1e-4", "model.nz=64")
    tr = make_tracker(cfg, is_main=True)
    run_id = tr.start(cfg, store / "runs" / "a", tags={"gancore.extra": "x"})
    client = _client(store)

    tr.log_metrics({"Loss/D": 1.0, "Loss/G": 2.0}, step=1)
    assert client.get_metric_history(run_id, "Loss/D") == []  # queued, not sent per step
    for step in range(2, 11):
        tr.log_metrics({"Loss/D": 1.0 / step, "Loss/G": 2.0 / step, "lr/G": 1e-4}, step=step)
    grid = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tr.log_image(grid, "samples", step=5)
    tr.log_image(grid[..., :1], "samples", step=10)  # grayscale HxWx1 (MNIST grids)
    ckpt = store / "runs" / "a" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / "last.pt").write_bytes(b"weights")
    note = store / "note.txt"
    note.write_text("hello")
    tr.log_artifact(note)
    tr.log_artifact(ckpt, "checkpoints")
    tr.set_tags({"gancore.best_step": 10})
    tr.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mnist_test"
    assert run.data.params == {k: str(v) for k, v in hyperparams(cfg).items()}
    assert not any(k.startswith(("diffusion.", "vae.", "ganomaly.")) for k in run.data.params)  # a GAN run
    assert run.data.params["optim.lr_g"] == "0.0001" and run.data.params["model.nz"] == "64"
    tags = run.data.tags
    assert tags["gancore.preset"] == "mnist_test" and tags["gancore.family"] == "gan"
    assert tags["gancore.world_size"] == "4" and tags["gancore.slurm_job_id"] == "1234"
    assert tags["gancore.mixed_precision"] == "no" and tags["gancore.extra"] == "x"
    assert tags["gancore.best_step"] == "10"
    _assert_git_tags(tags)
    assert _steps(client, run_id, "Loss/D") == list(range(1, 11))
    assert _steps(client, run_id, "lr/G") == list(range(2, 11))
    assert client.get_metric_history(run_id, "Loss/G")[0].value == 2.0
    assert run.data.metrics["Loss/D"] == pytest.approx(0.1)

    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"config.yaml", "note.txt", "checkpoints", "images"}
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/last.pt"]
    images = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    # MLflow 3: per logged image a full PNG and a compressed WebP, named <key>+step+<N>+timestamp+<ms>+<uuid>
    pngs = sorted(n for n in images if n.endswith(".png"))
    assert [n.split("+")[:3] for n in pngs] == [["samples", "step", "10"], ["samples", "step", "5"]]
    assert sum(n.endswith("+compressed.webp") for n in images) == 2
    assert tags["mlflow.loggedImages"] == "True"
    local = client.download_artifacts(run_id, "config.yaml", str(store))
    assert load_config(local) == cfg


def test_resume_logs_each_step_once(store):
    cfg = _cfg()
    tr = make_tracker(cfg, is_main=True)
    run_id = tr.start(cfg, store / "run")
    for step in range(1, 6):
        tr.log_metrics({"Loss/D": float(step)}, step)
    tr.log_image(np.zeros((8, 8, 3), np.uint8), "samples", 4)
    tr.finish("KILLED")
    client = _client(store)
    assert client.get_run(run_id).info.status == "KILLED"

    # The job is requeued and resumes from its step-2 checkpoint: steps 3..5 are replayed.
    cfg2 = _cfg("train.max_steps=8")  # run length may change on resume; params stay immutable
    tr2 = make_tracker(cfg2, is_main=True)
    assert tr2.start(cfg2, store / "run", run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(3, 9):
        tr2.log_metrics({"Loss/D": 10.0 + step, "Loss/G": float(step)}, step)
        tr2.log_image(np.full((8, 8, 3), step, np.uint8), "samples", step)
    tr2.finish()

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run_id, "Loss/D"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 9))
    assert [m.value for m in history] == [1, 2, 3, 4, 5, 16, 17, 18]  # the first session's values are kept
    assert _steps(client, run_id, "Loss/G") == list(range(3, 9))  # a new key is logged from its first step
    assert run.data.params["train.max_steps"] == "0"
    assert run.data.tags["gancore.resume_count"] == "1"
    image_steps = sorted(
        int(Path(a.path).name.split("+")[2]) for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")
    )
    assert image_steps == [4, 5, 6, 7, 8]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_resume_unknown_run_is_one_line(store):
    with pytest.raises(TrackingError, match="cannot resume MLflow run 0123") as e:
        make_tracker(_cfg(), True).start(_cfg(), store, run_id="0123456789abcdef0123456789abcdef")
    assert "\n" not in str(e.value)


_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gancore.config import load_config
    from gancore.tracking import make_tracker
    i = int(sys.argv[1])
    cfg = load_config(None, ["track.experiment=sweep", f"name=trial{i}"])
    tr = make_tracker(cfg, True)
    import mlflow.tracking  # imported before the barrier, so the processes reach the store together
    Path(f"ready{i}").touch()
    end = time.monotonic() + 240
    while not Path("go").exists():  # start all workers at the same moment: the race under test
        assert time.monotonic() < end, f"worker {i}: no go from the test within 240 s"
        time.sleep(0.01)
    tr.start(cfg, Path("runs") / str(i))
    for step in range(1, 4):
        tr.log_metrics({"Loss/D": step * 0.5}, step)
    tr.finish()
    """
)


def test_concurrent_workers_share_a_fresh_store(tmp_path, monkeypatch):
    store = tmp_path  # no template copy: creating the database is part of the race
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(i)], cwd=store, env=env, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    try:
        # a hang guard: four processes importing MLflow on one busy core can take a minute
        helpers.wait_for(lambda: all((store / f"ready{i}").exists() for i in range(4)), timeout=180,
                         what="4 workers ready (ready0..3)", proc=procs)
        (store / "go").touch()
        end = time.monotonic() + 200  # all four, together: a hang guard (they race on one SQLite file)
        for i, p in enumerate(procs):
            _, err = helpers.finish(p, timeout=end - time.monotonic(), what=f"worker {i}")
            assert p.returncode == 0, err
    finally:
        for p in procs:
            helpers.stop(p, grace=0)
    client = _client(store)
    exps = [e for e in client.search_experiments() if e.name == "sweep"]
    assert len(exps) == 1
    assert exps[0].artifact_location == (store / "mlruns" / "artifacts").resolve().as_uri()
    runs = client.search_runs([exps[0].experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["trial0", "trial1", "trial2", "trial3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert all(_steps(client, r.info.run_id, "Loss/D") == [1, 2, 3] for r in runs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts in tmp); killed afterwards."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runners to spawn
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "server_artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "w")
    # Own process group: the finaliser kills the server and the workers it forked, nothing else.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except OSError:
            return False

    try:
        helpers.wait_for(healthy, timeout=60, what=f"mlflow server answering {url}/health", proc=proc,
                         log=tmp_path / "server.log", interval=0.5)
        yield url
    finally:
        with_group = [signal.SIGTERM, signal.SIGKILL]
        for sig in with_group:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def test_logs_to_a_real_tracking_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(f"track.uri={mlflow_server}", "model.nz=32")
    tr = make_tracker(cfg, is_main=True)
    run_id = tr.start(cfg, tmp_path / "run")
    for step in (10, 20, 30):
        tr.log_metrics({"Loss/D": 0.7, "D/real": 0.9, "images_per_s": 1e4}, step)
    tr.log_image(np.zeros((16, 16, 3), np.uint8), "samples", 30)
    tr.finish()

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "mnist_test"
    assert run.data.params["model.nz"] == "32"
    assert _steps(client, run_id, "D/real") == [10, 20, 30]
    assert run.data.metrics["images_per_s"] == 1e4
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "images"}
    assert len(client.list_artifacts(run_id, "images")) == 2
    assert not (tmp_path / "mlruns").exists()  # everything went to the server


def test_unreachable_server_fails_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{_free_port()}"  # bound then released: nothing listens there
    cfg = _cfg(f"track.uri={url}")
    # fast: one probe with the probe's own short timeout, and no call through MLflow's client (which retries for
    # minutes); counted, not timed
    import mlflow.utils.rest_utils

    from gancore.tracking import store as tracking_store

    probes, rest_calls, urlopen = [], [], urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda u, *a, **kw: probes.append((u, kw.get("timeout"))) or urlopen(u, *a, **kw))
    monkeypatch.setattr(mlflow.utils.rest_utils, "http_request", lambda *a, **kw: rest_calls.append(a))
    with pytest.raises(TrackingError) as e:
        make_tracker(cfg, is_main=True).start(cfg, tmp_path)
    assert probes == [(f"{url}/health", tracking_store.PROBE_TIMEOUT_S)] and rest_calls == []
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot reach MLflow tracking server at {url} (")
    assert msg.endswith("start it, fix track.uri / MLFLOW_TRACKING_URI, or run with track.enabled=false")


def test_env_uri_is_used(tmp_path, monkeypatch, template_db):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "elsewhere" / "x.db"
    db.parent.mkdir()
    shutil.copy(template_db, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    tr = make_tracker(_cfg(), is_main=True)
    run_id = tr.start(_cfg(), tmp_path)
    tr.finish()
    assert db.is_file() and not (tmp_path / "mlruns").exists()
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status == "FINISHED"
    assert (tmp_path / "elsewhere" / "artifacts" / run_id / "artifacts" / "config.yaml").is_file()


def test_runs_table_and_cli(store):
    for i, (lr, fids) in enumerate([(1e-4, [30.0, 12.5, 20.0]), (2e-4, [])]):
        cfg = _cfg(f"optim.lr_g={lr}", f"name=run{i}")
        tr = make_tracker(cfg, is_main=True)
        tr.start(cfg, store / f"r{i}")
        tr.log_metrics({"Loss/D": 0.5 + i, "Loss/G": 1.5 + i}, 1)
        for step, fid in enumerate(fids, 1):
            tr.log_metrics({"fid_lenet_10k": fid}, step)
        tr.finish()
    rows = tracking.list_runs("test", sort="Loss/D")
    assert [r["name"] for r in rows] == ["run0", "run1"]
    assert rows[0]["params"]["optim.lr_g"] == "0.0001" and rows[0]["params"]["family"] == "gan"
    assert rows[0]["best_fid"] == ("fid_lenet_10k", 12.5) and rows[1]["best_fid"] is None
    assert [r["name"] for r in tracking.list_runs("test", sort="-Loss/D", limit=1)] == ["run1"]
    info = tracking.open_run_info(rows[0]["run_id"])
    assert info["params"]["optim.lr_g"] == "0.0001" and info["run_dir"] == str((store / "r0").resolve())

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["COLUMNS"] = "250"
    cli = [sys.executable, str(REPO / "jobs" / "runs.py"), "--experiment", "test"]
    out = helpers.run(cli, cwd=store, env=env, timeout=60, what="jobs/runs.py --experiment test")
    assert out.returncode == 0, out.stderr
    assert "run0" in out.stdout and "run1" in out.stdout and "fid_lenet_10k" in out.stdout  # one key: in the header
    assert [line.split()[-1] for line in out.stdout.splitlines() if "run0" in line] == ["12.5"]


def test_runs_cli_user_error_is_one_line_exit_2(store, capsys):
    spec = importlib.util.spec_from_file_location("runs_cli", REPO / "jobs" / "runs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tr = make_tracker(_cfg(), is_main=True)
    tr.start(_cfg(), store)
    tr.finish()
    assert cli.main(["--experiment", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no experiment 'nope'" in err and "known: " in err and "test" in err


def test_runs_without_store_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="no MLflow store at"):
        tracking.list_runs("gancore")
    assert not (tmp_path / "mlruns").exists()


def test_runs_table_shows_the_budget_trained_and_fits_80_columns(store):
    """Default columns fit an 80-column terminal (no cell cut to '…'); the budget is what was set (steps or epochs)
    and, short of it, how far the run got; --columns adds params and metrics."""
    from rich.console import Console

    runs = [("name=folder-cats", "train.max_steps=30", [(10, 1 / 3), (30, 1.0)], 41.5),
            ("name=mnist", "train.epochs=5", [(400, 4.0), (500, 5.0)], 12.25),
            ("name=quickstart", "train.epochs=5", [(100, 1.0), (150, 1.5)], None)]  # stopped at 1.5 of 5 epochs
    for name, budget, epochs, fid in runs:
        cfg = _cfg(name, budget, "optim.lr_g=1e-4" if "cats" in name else "optim.lr_g=2e-4")
        tr = make_tracker(cfg, is_main=True)
        tr.start(cfg, store / name)
        for step, ep in epochs:
            tr.log_metrics({"Loss/D": 1.25, "Loss/G": 0.75, "epoch": ep}, step)
        if fid is not None:
            tr.log_metrics({"fid_lenet_1k": fid}, epochs[-1][0])
        tr.finish("KILLED" if fid is None else "FINISHED")
    by_name = {r["name"]: r for r in tracking.list_runs("test")}
    assert by_name["folder-cats"]["budget"] == "30 steps" and by_name["mnist"]["budget"] == "5 epochs"
    assert by_name["quickstart"]["budget"] == "1.5/5 epochs"
    console = Console(width=80, record=True)
    console.print(tracking.runs_table("test"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text, text
    for cell in ("folder-cats", "30 steps", "1.5/5 epochs", "KILLED", "41.5", "12.25", "fid_lenet_1k"):
        assert cell in text, (cell, text)
    assert "optim.lr_g" not in text  # params only on request
    wide = Console(width=200, record=True)
    wide.print(tracking.runs_table("test", columns=("all", "epoch")))
    text = wide.export_text()
    assert "optim.lr_g" in text and "0.0001" in text and "model.arch" in text and "epoch" in text
    with pytest.raises(TrackingError, match="--columns optim.lrg: no listed run has a param or metric 'optim.lrg'"):
        tracking.runs_table("test", columns=("optim.lrg",))
