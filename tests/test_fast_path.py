"""The fast path (train.compile) tracks the eager path; GPU-only parts skip with a reason on CPU machines."""

import pytest
import torch

from gancore import checkpoint as ckpt
from gancore.trainer import fit
from conftest import needs_mnist, tiny

pytestmark = needs_mnist

STEPS = 50
# Tolerance, stated: the compiled graph may reorder floating-point reductions, so after 50 Adam steps of a GAN
# (a chaotic system) weights may drift by a few ulps x growth. We accept a max abs weight difference of 1e-3 and
# per-step logged losses within 1e-3 relative.
ATOL_W, RTOL_LOSS = 1e-3, 1e-3


def _run(tmp_path, mode, *extra):
    cfg = tiny("model.arch=mlp", "data.subset=512", "optim.batch_size=32", f"train.max_steps={STEPS}",
               f"train.compile={mode}", "train.snapshot_epochs=[]", f"track.image_every={10**6}", *extra)
    r = fit(cfg, out=tmp_path / mode)
    return ckpt.load(r.checkpoint)


@pytest.mark.slow
def test_compiled_tracks_eager_fp32_cpu(tmp_path):
    eager, comp = _run(tmp_path, "none"), _run(tmp_path, "compile")
    for net in ("G", "D"):
        for k, v in eager["networks"][net].items():
            if v.is_floating_point():
                diff = (v - comp["networks"][net][k]).abs().max().item()
                assert diff <= ATOL_W, f"{net}.{k}: max |eager - compiled| = {diff:.2e}"
    for key in ("Loss/D", "Loss/G"):
        a, b = eager["history"][key], comp["history"][key]
        assert a == pytest.approx(b, rel=RTOL_LOSS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled GPU path)")
def test_compiled_tracks_eager_fp32_gpu(tmp_path):
    eager, comp = _run(tmp_path, "none"), _run(tmp_path, "compile")
    for k, v in eager["networks"]["G"].items():
        if v.is_floating_point():
            assert (v - comp["networks"]["G"][k]).abs().max().item() <= ATOL_W
