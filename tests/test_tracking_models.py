"""A finished run's generator as an MLflow model (runs:/RUN_ID/generator), generate.py from a model URI, and
`jobs/runs.py --compare`: two tiny tracked runs, read back through mlflow's own loaders."""

import sys

import mlflow
import mlflow.pytorch
import numpy as np
import helpers
import pytest
import torch
from conftest import ROOT, needs_mnist, tiny

pytestmark = needs_mnist


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: EMA on. Run B: another lr_g, no EMA, registered as `tiny_gen`."""
    from gancore.train.loop import fit

    root = tmp_path_factory.mktemp("models")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # system metrics off: with them on, a tracked tiny run took ~290 s instead of ~13 s here (2 loaded cores)
        common = ("track.enabled=true", f"track.uri={uri}", "train.epochs=1", "train.snapshot_epochs=[1]",
                  "train.loss_ranges=[[1,1]]", "track.system_metrics=false")
        a = fit(tiny(*common, "train.ema_decay=0.9"), out=root / "a")
        b = fit(tiny(*common, "optim.lr_g=0.001", "track.register_model=tiny_gen"),
                out=root / "b")
    return {"uri": uri, "a": a, "b": b}


@pytest.fixture
def store(runs, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["uri"])  # for mlflow's own loaders below
    return runs


def _checkpoint_family(result):
    from gancore.train.state import load_family

    family, _, _ = load_family(result.checkpoint)
    return family


def test_generator_model_samples_like_the_checkpoint_ema(store):
    a = store["a"]
    model = mlflow.pytorch.load_model(f"runs:/{a.run_id}/generator")
    z = torch.randn(6, 100, generator=torch.Generator().manual_seed(3))
    x = model(z)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and int(x.max()) > int(x.min())
    family = _checkpoint_family(a)
    assert family.ema is not None
    assert torch.equal(x, family.to_uint8(family.sample(6, inputs={"z": z, "y": torch.zeros(6, dtype=torch.long)})))
    raw = family.networks["G"].eval()
    with torch.no_grad():
        assert not torch.equal(x, family.to_uint8(raw(z, None)))  # the EMA copy, not the last G weights
    with pytest.raises(ValueError, match=r"z must be \(B, 100\)"):
        model(torch.randn(2, 7))
    info = mlflow.models.get_model_info(f"runs:/{a.run_id}/generator")
    assert info.metadata["nz"] == 100 and info.metadata["num_classes"] == 10
    assert info.metadata["family"] == "gan" and info.metadata["image_shape"] == [1, 28, 28]
    assert info.metadata["conditional"] is False
    assert info.signature.inputs.to_dict()[0]["tensor-spec"] == {"dtype": "float32", "shape": (-1, 100)}
    assert info.signature.outputs.to_dict()[0]["tensor-spec"] == {"dtype": "uint8", "shape": (-1, 1, 28, 28)}


def test_registered_model_loads_by_name(store):
    b = store["b"]
    model = mlflow.pytorch.load_model("models:/tiny_gen/1")
    z = torch.randn(5, 100, generator=torch.Generator().manual_seed(4))
    family = _checkpoint_family(b)
    assert family.ema is None
    assert torch.equal(model(z), family.to_uint8(family.sample(5, inputs={"z": z, "y": torch.zeros(5).long()})))
    assert model.metadata()["conditional"] is False


def test_conditional_model_takes_labels(store):
    """A class-conditional generator (built, not trained: what is logged does not depend on training)."""
    from mlflow.tracking import MlflowClient

    from gancore.tracking import log_generator_model
    from gancore.train.state import build_family

    family = build_family(tiny("model.conditional=true"), (1, 28, 28), 10)
    client = MlflowClient(store["uri"])
    run_id = client.create_run(client.get_experiment_by_name("gancore").experiment_id).info.run_id
    assert log_generator_model(store["uri"], run_id, family) == mlflow.models.get_model_info(
        f"runs:/{run_id}/generator").model_uri
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/generator")
    z, y = torch.randn(5, 100, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 1, 2, 3, 9])
    assert torch.equal(model(z, y), family.to_uint8(family.sample(5, inputs={"z": z, "y": y})))
    assert not torch.equal(model(z, y), model(z, torch.tensor([9, 3, 2, 1, 0])))  # the labels matter
    with pytest.raises(ValueError, match="class-conditional"):
        model(z)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/generator")
    assert info.metadata["conditional"] is True and info.metadata["num_classes"] == 10
    assert [i["name"] for i in info.signature.inputs.to_dict()] == ["z", "y"]
    assert client.get_run(run_id).info.status == "RUNNING"  # logging the model leaves the run's status alone


def test_generate_from_a_run_uri_equals_the_checkpoint(store, tmp_path):
    from gancore.generate import generate

    a = store["a"]
    from_model = generate(f"runs:/{a.run_id}/generator", 20, tmp_path / "m.npz", seed=5, batch_size=8,
                          uri=store["uri"])
    from_ckpt = generate(a.checkpoint, 20, tmp_path / "c.npz", seed=5, batch_size=8)
    xm, xc = np.load(from_model)["x"], np.load(from_ckpt)["x"]
    assert xm.shape == (20, 1, 28, 28) and xm.dtype == np.uint8
    np.testing.assert_array_equal(xm, xc)
    with np.load(generate("models:/tiny_gen/1", 12, tmp_path / "b.npz", uri=store["uri"])) as f:
        assert f["x"].shape == (12, 1, 28, 28) and list(f["y"]) == [i % 10 for i in range(12)]


@pytest.mark.parametrize("bad, says", [
    ("runs:/0123456789abcdef/generator", "MLflow run '0123456789abcdef' not found"),
    ("runs:/", "is not a model URI; use runs:/RUN_ID/generator"),
    ("models:/no_such_model/1", "cannot load MLflow model models:/no_such_model/1"),
])
def test_generate_bad_uri_is_a_one_line_error(store, tmp_path, bad, says):
    from gancore.errors import TrackingError
    from gancore.generate import generate

    with pytest.raises(TrackingError, match=says.replace("(", r"\(")) as e:
        generate(bad, 4, tmp_path / "x.npz", uri=store["uri"])
    assert "\n" not in str(e.value) and not (tmp_path / "x.npz").exists()


def test_generate_cli_bad_uri_exits_2(store, tmp_path):
    out = tmp_path / "x.npz"
    p = helpers.run([sys.executable, str(ROOT / "jobs" / "generate.py"), "runs:/0123456789abcdef/generator",
                     "-n", "4", "--out", str(out), "--uri", store["uri"]],
                    timeout=120, what="generate.py runs:/0123456789abcdef/generator")
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        f"error: MLflow run '0123456789abcdef' not found in {store['uri']}"]
    assert not out.exists()


def _runs_cli(argv, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "jobs"))
    monkeypatch.setenv("COLUMNS", "200")
    import runs as runs_cli

    code = runs_cli.main(argv)
    return code, capsys.readouterr()


def test_compare_shows_differing_params_and_both_metric_columns(store, capsys, monkeypatch):
    a, b = store["a"], store["b"]
    code, out = _runs_cli(["--compare", a.run_id, b.run_id, "--uri", store["uri"]], capsys, monkeypatch)
    assert code == 0, out.err
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in out.out.splitlines() if line.count("│") >= 4}
    assert rows["optim.lr_g"] == ["0.0002", "0.001"]
    assert rows["train.ema_decay"] == ["0.9", "0.0"]
    assert "optim.lr_d" not in rows and "model.nz" not in rows  # equal params are left out
    from mlflow.tracking import MlflowClient

    ma, mb = (MlflowClient(store["uri"]).get_run(r.run_id).data.metrics for r in (a, b))
    assert rows["Loss/D"] == [f"{ma['Loss/D']:.6g}", f"{mb['Loss/D']:.6g}"]
    assert rows["Loss/G"] == [f"{ma['Loss/G']:.6g}", f"{mb['Loss/G']:.6g}"]


def test_compare_takes_the_runs_tables_short_ids(store, capsys, monkeypatch):
    """The runs table shows 8 characters of each id; --compare takes them (and any unique prefix)."""
    a, b = store["a"], store["b"]
    code, full = _runs_cli(["--compare", a.run_id, b.run_id, "--uri", store["uri"]], capsys, monkeypatch)
    code2, short = _runs_cli(["--compare", a.run_id[:8], b.run_id[:6], "--uri", store["uri"]], capsys, monkeypatch)
    assert code == code2 == 0 and short.out == full.out


def test_compare_unknown_run_is_one_line_exit_2(store, capsys, monkeypatch):
    code, out = _runs_cli(["--compare", store["a"].run_id, "feedbeef", "--uri", store["uri"]], capsys, monkeypatch)
    assert code == 2
    assert out.err.strip().splitlines() == [
        f"error: no MLflow run 'feedbeef' in {store['uri']}; list runs with: python jobs/runs.py --uri {store['uri']}"]
