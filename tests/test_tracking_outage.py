"""The tracking server comes and goes (issue #20): a real `mlflow server` stopped while a training run logs to it.

Back a few seconds later -> the run trains on, warns once, and MLflow ends up with every metric step, image, param,
tag and artifact. Never back -> the run still ends with exit 0 and keeps an outbox in its run dir, which
`jobs/sync.py` delivers later, idempotently; a process killed with -9 during the outage loses nothing it had logged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import helpers
import pytest
from conftest import ROOT, needs_mnist
from mlflow.tracking import MlflowClient

pytestmark = needs_mnist

STEPS_PER_EPOCH = 10  # data.subset=320 / batch 32
EPOCHS = 4
TOTAL = STEPS_PER_EPOCH * EPOCHS
IMAGE_EVERY = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts) that can be stopped (kill -9, as a
    crash) and started again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.root / "server.log", "a") as log:  # own process group: stop() kills it and its workers only
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        helpers.wait_for(self._healthy, timeout=90, what=f"mlflow server answering {self.url}/health", proc=self.proc,
                         log=self.root / "server.log", interval=0.25)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        helpers.wait_exit(self.proc, timeout=30, what="the killed mlflow server", log=self.root / "server.log")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (a cold start migrates a fresh database: seconds); each test stops and restarts it."""
    s = _Server(tmp_path_factory.mktemp("server"))
    s.start()
    yield s
    s.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTEST_CURRENT_TEST")}
    return {**env, "GANCORE_TRACK_RETRY_MAX_S": "1", **extra}


HOLD_AT = 5  # the run waits at this step until the test releases it (after stopping the server)


def _train(run_dir: Path, url: str, finish_wait_s: int) -> subprocess.Popen:
    """A tiny MLP GAN run (40 steps, a metric every step, a grid every 2) tracked to `url`, in a subprocess, held at
    step HOLD_AT until `_release(run_dir)` (GANCORE_TEST_HOLD_AT_STEP, gancore/train/signals.py): however fast this
    machine, steps HOLD_AT.. come after whatever the test does before the release."""
    cmd = [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(ROOT / "configs" / "mnist_mlp_gan.yaml"),
           "--out", str(run_dir), "data.subset=320", "optim.batch_size=32", f"train.epochs={EPOCHS}",
           "train.log_every=1", "train.progress=false", "train.snapshot_epochs=[4]", "train.loss_ranges=[[1,4]]",
           "train.grid_size=16", f"track.image_every={IMAGE_EVERY}", "train.checkpoint_every=1000",
           "track.enabled=true", f"track.uri={url}", "track.experiment=outage"]
    env = _env(GANCORE_TRACK_FINISH_WAIT_S=str(finish_wait_s), GANCORE_TEST_HOLD_AT_STEP=str(HOLD_AT),
               GANCORE_TEST_HOLD_RELEASE=str(run_dir.parent / f"{run_dir.name}.release"))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _release(run_dir: Path) -> None:
    (run_dir.parent / f"{run_dir.name}.release").touch()


def _run_id_once_logging(run_dir: Path, url: str, proc: subprocess.Popen) -> str:
    """The run's id, once MLflow shows its first metric values (the tracker's outbox names the run)."""
    client, header = MlflowClient(tracking_uri=url), run_dir / "tracking_outbox" / "run.json"

    def logging() -> str | None:
        if header.is_file():
            run_id = json.loads(header.read_text())["run_id"]
            if client.get_metric_history(run_id, "Loss/D"):
                return run_id
        return None

    return helpers.wait_for(logging, timeout=120, what=f"the run's first Loss/D value in MLflow at {url}", proc=proc,
                            interval=0.1)


def _files(run_dir: Path, sub: str) -> list[str]:
    return sorted(f"{sub}/{p.name}" for p in (run_dir / sub).iterdir())


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out: list[str] = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def _assert_everything_in_mlflow(url: str, run_id: str, run_dir: Path) -> dict:
    """Every metric step, grid, param, tag and artifact of the run, compared with the run's own record."""
    from gancore.config import hyperparams, load_config

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: str(v) for k, v in hyperparams(load_config(run_dir / "config.yaml")).items()}
    assert run.data.tags["gancore.run_dir"] == str(run_dir.resolve()) and run.data.tags["gancore.family"] == "gan"
    histories = {}
    for key in ("Loss/D", "Loss/G", "D/real", "D/fake", "epoch", "images_per_s"):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in hist] == list(range(1, TOTAL + 1)), key  # each step once: none lost, none twice
        histories[key] = hist
    assert [m.value for m in histories["epoch"]] == [s / STEPS_PER_EPOCH for s in range(1, TOTAL + 1)]
    arts = _artifacts(client, run_id)
    # the grids the run saved (samples/step_N.png) are the image steps MLflow shows, each once
    grid_steps = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "samples").glob("step_*.png"))
    assert grid_steps == list(range(IMAGE_EVERY, TOTAL + 1, IMAGE_EVERY))
    logged = sorted(int(Path(a).name.split("+")[2]) for a in arts if a.startswith("images/") and a.endswith(".png"))
    assert logged == grid_steps
    want = {"config.yaml", "real_samples.png", f"checkpoints/step_{TOTAL:08d}.pt", *_files(run_dir, "snapshots"),
            *(f"plots/{p.name}" for p in (run_dir / "plots").glob("*.png")), "report/loss_report.json"}
    assert want <= set(arts), sorted(want - set(arts))
    return {k: [(m.step, m.value, m.timestamp) for m in h] for k, h in histories.items()} | {"arts": sorted(arts)}


def test_server_away_for_seconds_run_trains_on_and_mlflow_has_everything(server, tmp_path):
    run_dir = tmp_path / "run"
    server.start()  # (running already unless an earlier test left it stopped)
    proc = _train(run_dir, server.url, finish_wait_s=120)
    try:
        run_id = _run_id_once_logging(run_dir, server.url, proc)
        server.stop()
        down = time.time()
        _release(run_dir)  # steps HOLD_AT..TOTAL come while the server is away
        # the run trains on to its end without the server, logging metrics and grids into its outbox (it then waits
        # for the server, up to GANCORE_TRACK_FINISH_WAIT_S)
        final = run_dir / "checkpoints" / f"step_{TOTAL:08d}.pt"
        helpers.wait_for(final.exists, timeout=180, what=f"the run's last checkpoint ({final.name}) with the server "
                         "away", proc=proc, interval=0.1)
        up_started = time.time()
        server.start()
        out, err = helpers.finish(proc, timeout=180, what="the run once the server is back")
    finally:
        helpers.stop(proc, grace=0)
    assert proc.returncode == 0, err[-3000:]
    assert f"done: {TOTAL} steps" in out
    warnings = [line for line in err.splitlines() if "MLflow" in line]
    assert len(warnings) == 1, err[-3000:]
    assert warnings[0].startswith(f"MLflow server at {server.url} unreachable (")
    assert "training goes on" in warnings[0] and str(run_dir / "tracking_outbox") in warnings[0]
    got = _assert_everything_in_mlflow(server.url, run_id, run_dir)
    # the training did not wait for the server: steps were logged (timestamped) while it was away
    away = [s for s, _, ts in got["Loss/D"] if int(down * 1000) <= ts <= int(up_started * 1000)]  # ms, as logged
    # every step from the held one to the end; steps before it may be among them too (the server is stopped once
    # MLflow shows the first value, which can be before the run reaches its held step)
    assert away and away == list(range(away[0], TOTAL + 1)) and away[0] <= HOLD_AT, away
    assert not (run_dir / "tracking_outbox").exists()  # everything delivered: nothing kept


_KILLED = textwrap.dedent(
    """
    import select, sys, time
    from pathlib import Path
    import numpy as np
    from gancore.config import load_config
    from gancore.tracking import make_tracker
    cfg = load_config(None, ["track.experiment=outage", "name=killed", f"track.uri={sys.argv[1]}"])
    tr = make_tracker(cfg, True)
    print(tr.start(cfg, Path(sys.argv[2])), flush=True)
    tr.log_metrics({"x": 1.0}, 1)
    tr.flush()
    print("sent", flush=True)
    assert select.select([sys.stdin], [], [], 240)[0], "no go from the test within 240 s"
    sys.stdin.readline()  # the test stops the server, then says go
    for step in range(2, 21):
        tr.log_metrics({"x": float(step), "y": -step}, step)
    tr.log_image(np.full((8, 8, 3), 7, np.uint8), "samples", 20)
    print("logged", flush=True)
    time.sleep(600)  # killed with -9 here
    """
)


def test_server_never_back_outbox_then_sync(server, tmp_path):
    run_dir = tmp_path / "run"
    server.start()
    proc = _train(run_dir, server.url, finish_wait_s=1)
    killed_dir = tmp_path / "killed"  # a second process, killed with -9 during the same outage
    killed = subprocess.Popen([sys.executable, "-c", _KILLED, server.url, str(killed_dir)], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed_id = helpers.readline(killed, timeout=120, what="the second process's run id")
        assert helpers.readline(killed, timeout=120, what="the second process's 'sent'") == "sent"
        run_id = _run_id_once_logging(run_dir, server.url, proc)
        server.stop()
        _release(run_dir)  # the run's steps HOLD_AT.. and its end come while the server is away
        killed.stdin.write("go\n")
        killed.stdin.flush()
        assert helpers.readline(killed, timeout=120, what="the second process's 'logged'") == "logged"
        killed.send_signal(signal.SIGKILL)
        helpers.wait_exit(killed, timeout=30, what="the second process after kill -9")
        out, err = helpers.finish(proc, timeout=180, what="the run with the server away for good")
    finally:
        for p in (proc, killed):
            helpers.stop(p, grace=0)
    assert proc.returncode == 0, err[-3000:]
    assert f"done: {TOTAL} steps" in out
    lines = [line for line in err.splitlines() if "MLflow" in line]
    assert len(lines) == 2 and "unreachable" in lines[0], err[-3000:]
    assert lines[1].startswith(f"MLflow server at {server.url} did not come back: ")
    assert lines[1].endswith(f"kept in {run_dir / 'tracking_outbox'}; send them with: python jobs/sync.py {run_dir}")
    journal = (run_dir / "tracking_outbox" / "journal.jsonl").read_text().splitlines()
    assert json.loads(journal[-1]) == {"kind": "status", "status": "FINISHED"}
    sync = [sys.executable, str(ROOT / "jobs" / "sync.py")]

    # server still away: a one-line error, exit 2, the outbox untouched
    p = helpers.run([*sync, str(run_dir)], env=_env(), timeout=120, what="sync.py with the server away")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"error: cannot reach MLflow tracking server at {server.url} (")
    assert (run_dir / "tracking_outbox" / "journal.jsonl").read_text().splitlines() == journal
    # a run dir without an outbox
    p = helpers.run([*sync, str(tmp_path)], env=_env(), timeout=120, what="sync.py on a dir without an outbox")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nothing to sync in" in p.stderr, p.stderr

    server.start()
    for d, rid in ((run_dir, run_id), (killed_dir, killed_id)):
        p = helpers.run([*sync, str(d)], env=_env(), timeout=120, what=f"sync.py {d}")
        assert p.returncode == 0, p.stderr
        assert p.stdout.count("\n") == 1 and p.stdout.startswith(f"synced {d} to MLflow run {rid} at {server.url}: ")
    first = _assert_everything_in_mlflow(server.url, run_id, run_dir)
    client = MlflowClient(tracking_uri=server.url)
    x = sorted(client.get_metric_history(killed_id, "x"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in x] == [(s, float(s)) for s in range(1, 21)]  # nothing lost to the kill -9
    assert sorted(m.step for m in client.get_metric_history(killed_id, "y")) == list(range(2, 21))
    assert [a.path.split("+")[:3] for a in client.list_artifacts(killed_id, "images") if a.path.endswith(".png")] \
        == [["images/samples", "step", "20"]]

    # again: nothing left, nothing logged twice
    p = helpers.run([*sync, str(run_dir)], env=_env(), timeout=120, what="sync.py again")
    assert p.returncode == 0 and p.stdout.startswith("nothing to sync: all "), p.stderr
    # a sync that died after sending but before writing its cursor: the store's records are not sent twice
    (run_dir / "tracking_outbox" / "cursor.json").write_text('{"delivered": 0}')
    p = helpers.run([*sync, str(run_dir)], env=_env(), timeout=120, what="sync.py again")
    assert p.returncode == 0, p.stderr
    assert ": 0 metric values, 0 images, " in p.stdout and "; 0 already there" not in p.stdout
    assert _assert_everything_in_mlflow(server.url, run_id, run_dir) == first
