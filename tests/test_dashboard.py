"""`make dashboard`: optuna-dashboard on a gancore study (issue #16 item 5), started the way the Makefile starts it
(`jobs/sweep.py SWEEP --dashboard --port N`), queried through its HTTP API; trials and MLflow runs link both ways."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import helpers
import optuna
import pytest
from conftest import ROOT, needs_mnist
from mlflow.tracking import MlflowClient
from test_sweep import OBJ, child_runs, sweep_file, trials

from gancore import sweep as sw
from gancore.sweep import load_sweep
from gancore.sweep import run as sweep_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dashboard_cmd(path: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "sweep.py"), str(path), "--dashboard", "--port", str(port), *args]


def get(port: int, route: str, host: str = "127.0.0.1") -> dict:
    with urllib.request.urlopen(f"http://{host}:{port}{route}", timeout=10) as r:
        assert r.status == 200
        return json.loads(r.read())


class Dashboard:
    """The dashboard as `make dashboard` starts it, in a subprocess; its output goes to a file (a pipe nobody reads
    could fill up and block the server). Stopped on exit, with a bounded wait."""

    def __init__(self, path: Path, tmp_path: Path, *args: str):
        self.port, self.log = free_port(), tmp_path / "dashboard.log"
        with self.log.open("w") as f:
            self.p = subprocess.Popen(dashboard_cmd(path, self.port, *args), cwd=tmp_path, stdout=f,
                                      stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> Dashboard:
        helpers.wait_for(self._answers, timeout=60, what=f"the dashboard answering on port {self.port}", proc=self.p,
                         log=self.log, interval=0.2)
        return self

    def _answers(self) -> bool:
        try:
            get(self.port, "/api/meta")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def __exit__(self, *exc) -> None:
        helpers.stop(self.p)

    def study(self, name: str) -> dict:
        """The study's detail (trials included) as the dashboard serves it, found by name in /api/studies."""
        ids = {s["study_name"]: s["study_id"] for s in get(self.port, "/api/studies")["study_summaries"]}
        assert name in ids, ids
        return get(self.port, f"/api/studies/{ids[name]}")


def attrs(items: list[dict]) -> dict[str, str]:
    return {a["key"]: a["value"] for a in items}


def refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, port)) != 0


@needs_mnist
def test_dashboard_shows_a_real_sweep_and_trials_link_to_their_mlflow_runs(tmp_path):
    path = sweep_file(tmp_path, study="dash", n_trials=2, steps=4)  # evaluations at steps 2 and 4
    sweep = load_sweep(path)
    _, parent = sweep_run.prepare(sweep)  # what jobs/sweep.py does, with its one worker in this process
    assert sw.worker(sw.WorkerContext(sweep, parent, index=0, stream=0)) == 0
    expected = trials(sweep)
    assert [t.state.name for t in expected] == ["COMPLETE", "COMPLETE"]

    with Dashboard(path, tmp_path) as d:  # the sweep file's default storage: sqlite:///<sweep dir>/optuna.db
        detail = d.study("dash")
        if sys.platform == "linux":  # all of 127/8 is loopback: a server on 0.0.0.0 would answer on 127.0.0.2 too
            assert not refused("127.0.0.1", d.port) and refused("127.0.0.2", d.port)
    assert detail["directions"] == ["minimize"]
    assert attrs(detail["user_attrs"])[sw.PARENT_ATTR] == parent
    shown = {t["number"]: t for t in detail["trials"]}
    assert sorted(shown) == [0, 1]

    client = MlflowClient(sweep.base.track.uri)
    assert len(child_runs(client, parent)) == 2
    for t in expected:
        s = shown[t.number]
        assert s["state"] == "Complete" and s["values"] == [t.value]
        # the FIDs reported during training, as Optuna stored them and as MLflow logged them
        iv = [(v["step"], v["value"]) for v in s["intermediate_values"]]
        assert iv == sorted(t.intermediate_values.items()) and [step for step, _ in iv] == [2, 4]
        assert iv[-1][1] == t.value
        params = {p["name"]: p["param_external_value"] for p in s["params"]}
        assert params == {k: str(v) for k, v in t.params.items()} and set(params) == {"lr", "model.nz",
                                                                                      "optim.d_iters"}
        # trial -> MLflow run (user attr) -> trial (tags)
        run_id = attrs(s["user_attrs"])["mlflow.run_id"]
        run = client.get_run(run_id)
        assert run.data.tags["optuna.study"] == "dash" and run.data.tags["optuna.trial"] == str(t.number)
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["optuna.state"] == "COMPLETE"
        assert {k: run.data.params[f"optuna.{k}"] for k in params} == params
        assert run.data.params["optim.lr_g"] == run.data.params["optim.lr_d"] == params["lr"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, OBJ))
        assert history == iv


def test_dashboard_reads_a_journal_storage(tmp_path):
    """A study on a journal file (what sweeps on NFS use), with gancore's storage and study helpers, no training."""
    journal = tmp_path / "study.log"
    path = sweep_file(tmp_path, study="dashj", storage=f"journal:{journal}")
    sweep = load_sweep(path)
    study = sw.open_study(sweep, sw.open_storage(sweep.storage_url), create=True)
    for i, fids in enumerate([[50.0, 40.0], [60.0, 55.0]]):
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in sweep.space}
        trial.set_user_attr("mlflow.run_id", f"run{i}")
        for step, fid in zip((2, 4), fids):
            trial.report(fid, step)
        study.tell(trial, fids[-1])
        assert trial.params == params

    with Dashboard(path, tmp_path) as d:
        detail = d.study("dashj")
    got = {t["number"]: ([(v["step"], v["value"]) for v in t["intermediate_values"]], t["values"],
                         attrs(t["user_attrs"])["mlflow.run_id"]) for t in detail["trials"]}
    assert got == {0: ([(2, 50.0), (4, 40.0)], [40.0], "run0"), 1: ([(2, 60.0), (4, 55.0)], [55.0], "run1")}
    assert [t["params"] for t in detail["trials"]] != [[], []]
    assert detail["best_trials"][0]["number"] == 0


def test_dashboard_without_a_study_is_one_line_exit_2_and_creates_nothing(tmp_path):
    path = sweep_file(tmp_path, study="nostudy")
    db = tmp_path / "sweeps" / "nostudy" / "optuna.db"
    p = helpers.run(dashboard_cmd(path, free_port()), cwd=tmp_path, timeout=120, what="the dashboard without a study")
    assert p.returncode == 2 and p.stdout == "", p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [(f"error: no study storage at {db} (study 'nostudy'); run the "
                                             f"sweep first (`python jobs/sweep.py {path}`) or give its storage with "
                                             "--storage")]
    assert not (tmp_path / "sweeps").exists()

    # a storage that exists but holds another study: Optuna's storage is opened, the study is not created
    other = tmp_path / "other.db"
    optuna.create_study(study_name="else", storage=f"sqlite:///{other}")
    p = helpers.run(dashboard_cmd(path, free_port(), "--storage", f"sqlite:///{other}"), cwd=tmp_path, timeout=120,
                    what="the dashboard on another study's storage")
    assert p.returncode == 2 and p.stderr.startswith("error: no study 'nostudy' in sqlite:///"), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert optuna.get_all_study_names(f"sqlite:///{other}") == ["else"]


def test_dashboard_on_a_busy_port_is_one_line_exit_2(tmp_path):
    path = sweep_file(tmp_path, study="busy")
    sweep = load_sweep(path)
    sw.open_study(sweep, sw.open_storage(sweep.storage_url), create=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = helpers.run(dashboard_cmd(path, port), cwd=tmp_path, timeout=120, what="the dashboard on a busy port")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [(f"error: cannot listen on 127.0.0.1:{port} (Address already in "
                                             "use); pick another port with PORT=... (make) or --port")]


@pytest.mark.parametrize("args, message", [
    (["--port", "8080"], "--port goes with --dashboard"),
    (["--dashboard", "--port", "0"], "expected a positive integer, got '0'"),
])
def test_dashboard_flags_are_checked(tmp_path, args, message):
    p = helpers.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), str(sweep_file(tmp_path)), *args], cwd=tmp_path,
                    timeout=120, what=f"sweep.py {' '.join(args)}")
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
