"""A sweep in images with its confirmation (#26): trials report at the scheduled image counts, a trial's value is
the best of its evaluations, and `--confirm` retrains the winner on fresh seeds beside a baseline, commits a small
generator per run whose re-measurement gives the table's number, and summarises mean ± sd by hand-checkable rules."""

import csv
import shutil
import statistics

import helpers
import optuna
import pytest
import torch
import yaml

from gancore import sweep as sw
from gancore.errors import SweepError
from gancore.evaluation import evaluate_checkpoint
from gancore.sweep import load_sweep
from gancore.sweep.confirm import summary
from conftest import ROOT, needs_mnist
from test_sweep import cli, finish

OBJ = "fid_lenet_200"


def budget_sweep(tmp_path, **top):
    overrides = {
        "data.subset": 128, "optim.batch_size": 32, "model.ngf": 16, "model.ndf": 16, "train.max_images": 256,
        "train.log_every": 2, "train.checkpoint_every": 2, "train.snapshot_epochs": [1], "train.loss_ranges": [[1, 1]],
        "train.grid_size": 16, "track.image_every": 8, "track.uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
        "track.experiment": "budget", "eval.every": 0, "eval.every_images": 128, "eval.n_samples": 200,
        "eval.extractor": "lenet_mnist", "eval.metrics": ["fid"], "eval.real_split": "train",
    }
    d = {"study": "tinybudget", "base": str(ROOT / "configs" / "quickstart.yaml"), "overrides": overrides,
         "objective": OBJ, "value": "best",
         "space": {"optim.lr_g": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True},
                   "optim.d_iters": {"type": "int", "low": 1, "high": 2}},
         "budget": {"n_trials": 2}, "sampler": {"name": "random", "seed": 0},
         "pruner": {"name": "hyperband", "reduction_factor": 2}, "workers": 1, "out": str(tmp_path / "sweeps"),
         "confirm": {"seeds": [1, 2], "baseline": str(ROOT / "configs" / "quickstart.yaml"), "baseline_seeds": [1, 2],
                     "overrides": {"train.max_images": 384}, "extractor": "lenet_mnist", "real_split": "test",
                     "anchor": {"name": "a published number", "fid": 100.0}, "results": str(tmp_path / "results")},
         **top}
    path = tmp_path / "tinybudget.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.parametrize("change, message", [
    ({"seeds": [0, 1]}, "confirm.seeds: 0 is the search's own train.seed"),
    ({"seeds": [1, 1]}, "expected a list of distinct seeds"),
    ({"baseline": "nope.yaml"}, "confirm.baseline:"),
    ({"real_split": "data"}, "confirm.real_split: expected train or test"),
    ({"extractor": "lenet"}, "confirm.extractor: 'lenet' is not one of auto, inception, lenet_mnist, "),
    ({"overrides": {"train.max_imagez": 5}}, "confirm.overrides:"),
    ({"seed": [1]}, "confirm: unknown key 'seed'"),
])
def test_the_confirm_section_is_checked_before_anything_runs(tmp_path, change, message):
    path = budget_sweep(tmp_path)
    d = yaml.safe_load(path.read_text())
    d["confirm"].update(change)
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(SweepError, match=message) as e:
        load_sweep(path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "sweeps").exists()


def test_summary_by_hand():
    rows = [{"role": "winner", "final_fid": v} for v in (5.0, 6.0, 7.0)] + \
           [{"role": "baseline", "final_fid": v} for v in (10.0, 12.0)]
    lines = summary(rows, {"name": "Lucic", "fid": 6.8})
    sd_w, sd_b = 1.0, statistics.stdev([10.0, 12.0])  # 1.414...
    assert lines[0] == "- winner: 6.00 ± 1.00 (mean ± sd of 3 seeds)"
    assert lines[1] == "- baseline: 11.00 ± 1.41 (mean ± sd of 2 seeds)"
    assert lines[2] == f"- difference winner - baseline: -5.00; it exceeds the seed-to-seed spread ({sd_w + sd_b:.2f} = sum of the two sds)"
    assert lines[3] == "- anchor: Lucic: 6.8; the winner's mean is -0.80 from it"
    close = summary([{"role": "winner", "final_fid": 10.0}, {"role": "winner", "final_fid": 12.0},
                     {"role": "baseline", "final_fid": 11.5}, {"role": "baseline", "final_fid": 12.5}], {})
    assert "does not exceed" in close[2]
    one = summary([{"role": "winner", "final_fid": 6.5}, {"role": "baseline", "final_fid": 10.64},
                   {"role": "baseline", "final_fid": 9.5}, {"role": "winner", "final_fid": float("nan")}], {})
    assert one[0] == "- winner: 6.50 (one seed so far: no sd yet)"  # not "± nan"; a NaN row is not a seed
    assert one[2] == "- difference winner - baseline: -3.57; it cannot be judged yet (one role has a single seed)"


@needs_mnist
@pytest.mark.timeout(900)  # a sweep, four confirmation runs and eight evaluations: about 2 minutes on 2 idle cores
def test_a_budget_sweep_then_its_confirmation_on_fresh_seeds(tmp_path):
    path = budget_sweep(tmp_path)
    finish(cli(str(path), cwd=tmp_path))
    sweep = load_sweep(path)
    study = optuna.load_study(study_name=sweep.study, storage=sw.open_storage(sweep.storage_url))
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert done
    for t in done:  # reported at the scheduled image counts whatever d_iters; the value is the best of them
        assert sorted(t.intermediate_values) == [128, 256]
        assert t.value == min(t.intermediate_values.values())
    best = min(done, key=lambda t: (t.value, t.number))

    early = cli(str(path), "--confirm", "--n-trials", "3", cwd=tmp_path)  # one trial still to run: refused
    early_out, _ = helpers.finish(early, timeout=120, what="--confirm with a trial still to run")
    assert early.returncode == 2 and "the search has 1 trial(s) left" in early_out
    # a share of the runs (one process, machine or Slurm job per seed): the winner's seed 2 alone; the table has its
    # row and the other three open. A seed the confirmation does not have, or no seed: one line, exit 2, nothing run
    for bad, message in (("7", "--confirm-seeds 7: not among the seeds of the winner confirmation runs (1, 2)"),
                         ("1,x", "expected seeds separated by commas (e.g. 1,2), got '1,x'")):
        p = cli(str(path), "--confirm", "--confirm-runs", "winner", "--confirm-seeds", bad, cwd=tmp_path)
        bad_out, _ = helpers.finish(p, timeout=120, what=f"--confirm-seeds {bad}")
        assert p.returncode == 2 and message in bad_out and not (tmp_path / "sweeps" / "tinybudget" / "confirm").exists()
    share = finish(cli(str(path), "--confirm", "--confirm-runs", "winner", "--confirm-seeds", "2", cwd=tmp_path))
    assert share.count("training ") == 1 and "winner (seed 2): training" in share
    with open(tmp_path / "results" / "tinybudget_confirm.csv") as f:
        assert [(r["role"], r["seed"]) for r in csv.DictReader(f)] == [("winner", "2")]
    partial = (tmp_path / "results" / "tinybudget_confirm.md").read_text()
    assert all(f"| {label} | open |" in partial for label in ("winner (seed 1)", "quickstart (seed 1)",
                                                                "quickstart (seed 2)"))
    out = finish(cli(str(path), "--confirm", cwd=tmp_path), timeout=600)  # the rest: seed 2's run is reused
    assert f"trial {best.number}" in out and out.count("training ") == 3 and "winner (seed 2): training" not in out
    tests, trains = (out.count(f"{OBJ}_{s} of ") for s in ("test", "train"))
    assert tests == trains == 3 and out.rindex(f"{OBJ}_test of ") < out.index(f"{OBJ}_train of ")  # the final split first
    with open(tmp_path / "results" / "tinybudget_confirm.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["role"], r["seed"]) for r in rows] == [("winner", "1"), ("winner", "2"), ("baseline", "1"),
                                                       ("baseline", "2")]
    runs = tmp_path / "sweeps" / "tinybudget" / "confirm"
    for r in rows:
        cfg = yaml.safe_load((runs / f"{r['role']}_seed{r['seed']}" / "config.yaml").read_text())
        assert cfg["train"]["seed"] == int(r["seed"]) and cfg["train"]["max_images"] == 384
        if r["role"] == "winner":  # the best trial's params, not the baseline's
            assert (cfg["optim"]["lr_g"], cfg["optim"]["d_iters"]) == (best.params["optim.lr_g"], best.params["optim.d_iters"])
        # the baseline keeps its preset's batch (64): the sweep's batch_size override is a searched-over setting
        per_step = cfg["optim"]["batch_size"] * cfg["optim"]["d_iters"]
        assert cfg["optim"]["batch_size"] == (32 if r["role"] == "winner" else 64)
        assert int(r["images"]) == int(r["steps"]) * per_step >= 384 > (int(r["steps"]) - 1) * per_step
        # the committed generator: sampling weights only, and re-measuring it gives the table's number
        gen = tmp_path / r["generator"]
        state = torch.load(gen, weights_only=True)
        assert state["sampling_only"] and "D" not in state["networks"]
        values, _ = evaluate_checkpoint(str(gen), n=200, extractor="lenet_mnist", real_split="test", log=False)
        assert values["fid_lenet_200_test"] == pytest.approx(float(r["fid_lenet_200_test"]), abs=5e-3)
        assert float(r["fid_lenet_200_test"]) != float(r["fid_lenet_200_train"])
    md = (tmp_path / "results" / "tinybudget_confirm.md").read_text()
    w = [float(r["fid_lenet_200_test"]) for r in rows if r["role"] == "winner"]
    assert f"- winner: {statistics.mean(w):.2f} ± {statistics.stdev(w):.2f} (mean ± sd of 2 seeds)" in md
    assert "anchor: a published number: 100" in md
    assert "- floor: " in md and "FID of 200 mnist training images against the test images" in md

    again = finish(cli(str(path), "--confirm", cwd=tmp_path))  # everything finished and measured: nothing retrained
    assert "training" not in again
    assert list(csv.DictReader(open(tmp_path / "results" / "tinybudget_confirm.csv"))) == rows
    assert [r["trial"] for r in rows] == [str(best.number)] * 2 + [""] * 2

    # a fresh clone: the committed table, generator files and study, but no run directories and no MLflow store.
    # Every row is kept, nothing is trained again; a row whose measurement is missing (interrupted on the machine
    # that trained it) gets it from its committed file, the same number as measured there
    shutil.rmtree(runs)
    shutil.rmtree(tmp_path / "mlruns")
    table = tmp_path / "results" / "tinybudget_confirm.csv"
    cut = [dict(r) for r in rows]
    cut[3]["fid_lenet_200_train"] = ""
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(cut)
    fresh = finish(cli(str(path), "--confirm", cwd=tmp_path))
    assert "training" not in fresh and fresh.count("kept, not trained again") == 4
    assert fresh.count("fid_lenet_200_train of baseline_seed2.pt") == 1 and "of baseline_seed1.pt" not in fresh
    assert list(csv.DictReader(open(tmp_path / "results" / "tinybudget_confirm.csv"))) == rows
    assert (tmp_path / "results" / "tinybudget_confirm.md").read_text() == md
    assert not runs.exists()

    # winner rows of another trial (the search went on and found a new best): refused in one line, nothing written
    text = table.read_text()
    table.write_text(text.replace(f"winner,{best.number},", f"winner,{best.number + 100},"))
    changed = table.read_text()
    assert changed != text
    other = cli(str(path), "--confirm", cwd=tmp_path)
    other_out, _ = helpers.finish(other, timeout=120, what="--confirm with another trial's winner rows")
    assert other.returncode == 2 and f"its winner rows are trial {best.number + 100}'s" in other_out
    assert table.read_text() == changed and not runs.exists()
