"""The budget protocol (#26): a run's length and evaluations in real images shown to D, checked by hand and on a
real run with d_iters > 1 and an odd batch size; the best of the evaluations is the checkpoint kept; the sweep
reports every trial at the same image counts."""

import pytest
import torch

from gancore.config import load_config
from gancore.errors import ConfigError
from gancore.sweep.objective import report_point
from gancore.train import state as ckpt
from gancore.train.budget import budget
from gancore.train.loop import fit
from conftest import ROOT, needs_mnist, tiny


def cfg_of(*overrides):
    return load_config(ROOT / "configs/mnist_dcgan.yaml", ["eval.every=0", *overrides])


def test_a_budget_in_images_fixes_the_images_not_the_steps():
    # Lucic et al.: 1.0M images at batch 64 = 15,625 D steps
    b = budget(cfg_of("train.max_images=1000000"), steps_per_epoch=937, draws=1)
    assert (b.images_per_step, b.total_steps) == (64, 15625)
    # two D steps per step, each on a fresh batch: 128 images a step, half the steps, the same images
    b = budget(cfg_of("train.max_images=1000000", "optim.d_iters=2"), 468, draws=2)
    assert (b.images_per_step, b.total_steps, b.images(7813)) == (128, 7813, 1000064)  # ceil(1e6 / 128) = 7813
    b = budget(cfg_of("train.max_images=1000", "optim.batch_size=48"), 1250, draws=1)
    assert b.total_steps == 21 and b.images(20) == 960 < 1000 <= b.images(21)  # at least the budget
    # without it: max_steps, else epochs x steps per epoch
    assert budget(cfg_of("train.max_steps=50"), 937, 1).total_steps == 50
    assert budget(cfg_of("train.epochs=3"), 937, 1).total_steps == 2811


def test_evaluations_fall_on_the_first_step_past_each_multiple_of_every_images():
    b = budget(cfg_of("train.max_images=1000", "optim.batch_size=48", "eval.every_images=250", "eval.n_samples=10"),
               1250, draws=1)
    due = [s for s in range(1, b.total_steps + 1) if b.eval_due(s)]
    assert due == [6, 11, 16, 21]  # 288, 528, 768, 1008 images: the first steps past 250, 500, 750, 1000
    b = budget(cfg_of("eval.every=5", "eval.n_samples=10"), 10, 1)
    assert [s for s in range(1, 16) if b.eval_due(s)] == [5, 10, 15]


@pytest.mark.parametrize("overrides, message", [
    (["train.max_images=1000", "train.max_steps=5"], "train.max_images=1000 and train.max_steps=5 both set"),
    (["eval.every=5", "eval.every_images=100", "eval.n_samples=10"], "eval.every=5 and eval.every_images=100"),
    (["eval.every_images=100", "eval.n_samples=0"], "eval.every_images=100 evaluates nothing"),
    (["train.max_images=-1"], "train.max_images=-1 is out of range"),
])
def test_contradicting_budget_keys_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        cfg_of(*overrides)
    assert "\n" not in str(e.value)


def test_a_sweep_reports_every_trial_at_the_scheduled_image_counts():
    base = cfg_of("train.max_images=250000", "eval.every_images=62500", "eval.n_samples=10")
    # batch 64 x 1 D step and batch 64 x 2 D steps pass 62.5k images at different steps and image counts
    assert report_point(base, 977, 62528) == (62500, False)
    assert report_point(base, 489, 62592) == (62500, False)
    assert report_point(base, 1954, 125056) == (125000, False)
    assert report_point(base, 3907, 250048) == (250000, True)  # the last evaluation: never pruned
    steps = cfg_of("train.max_steps=40", "eval.every=10", "eval.n_samples=10")
    assert report_point(steps, 10, 640) == (10, False) and report_point(steps, 40, 2560) == (40, True)


@needs_mnist
def test_a_run_in_images_with_two_d_steps_evaluates_at_the_schedule_and_keeps_the_best(tmp_path):
    seen = []
    cfg = tiny("train.max_images=1000", "optim.batch_size=24", "optim.d_iters=2", "eval.every_images=300",
               "eval.n_samples=100", "eval.extractor=lenet_mnist", "eval.metrics=[fid]", "train.epochs=1")
    result = fit(cfg, out=tmp_path / "run", on_eval=lambda step, m, images: seen.append((step, images, m)))
    # 48 real images per step: ceil(1000 / 48) = 21 steps; evaluations at the first steps past 300, 600, 900, end
    assert result.total_steps == result.step == 21
    assert [(s, i) for s, i, _ in seen] == [(7, 336), (13, 624), (19, 912), (21, 1008)]
    fids = [m["fid_lenet_100"] for _, _, m in seen]
    best = torch.load(ckpt.best_path(result.run_dir), weights_only=True, map_location="cpu")
    assert best["best"]["value"] == min(fids) and best["step"] == seen[fids.index(min(fids))][0]
    assert result.metrics["best_fid_lenet_100"] == min(fids)
