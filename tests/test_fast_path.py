"""The fast path (train.compile) tracks the eager path; GPU-only parts skip with a reason on CPU machines.

Stated tolerances. One step: the compiled networks' losses and gradients equal eager ones within 1e-4
(relative to the largest gradient) -- inductor may reorder floating-point reductions, nothing more. Fifty steps:
Adam turns last-bit differences in near-zero gradients into full +-lr updates, and a GAN amplifies them, so weights
are not compared there; the per-epoch mean losses agree within 5 % relative.
"""

import pytest
import torch

from gancore import checkpoint as ckpt
from gancore.config import load_config
from gancore.families.base import Batch
from gancore.registry import FAMILIES
from gancore.trainer import fit
from conftest import needs_mnist, tiny

STEPS = 50
RTOL_GRAD, RTOL_LOSS = 1e-4, 5e-2


def _grads(fam, batch):
    """Loss and flattened gradients of every phase of one step, without optimiser updates."""
    out = []
    for phase in fam.phases:
        for net in fam.networks.values():
            net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same noise inside each phase for both variants
        loss, _ = phase.loss(batch)
        loss.backward()
        params = [p for group in fam.optimizers[phase.optimizer].param_groups for p in group["params"]]
        out.append((loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    return out


def test_compiled_step_matches_eager_cpu():
    cfg = load_config(None, ["model.arch=mlp", "model.nz=16"])
    torch.manual_seed(0)
    eager = FAMILIES["gan"](cfg, (1, 28, 28), 10)
    torch.manual_seed(0)
    comp = FAMILIES["gan"](cfg, (1, 28, 28), 10)
    for net in comp.networks.values():
        net.compile()
    batch = Batch(torch.rand(32, 1, 28, 28) * 2 - 1, torch.zeros(32, dtype=torch.long))
    for (le, ge), (lc, gc) in zip(_grads(eager, batch), _grads(comp, batch)):
        assert lc.item() == pytest.approx(le.item(), rel=RTOL_GRAD)
        assert (ge - gc).abs().max().item() <= RTOL_GRAD * ge.abs().max().item()


def _run(tmp_path, mode):
    cfg = tiny("model.arch=mlp", "data.subset=512", "optim.batch_size=32", f"train.max_steps={STEPS}",
               f"train.compile={mode}", "train.snapshot_epochs=[]", f"track.image_every={10**6}")
    return ckpt.load(fit(cfg, out=tmp_path / mode).checkpoint)


@needs_mnist
@pytest.mark.slow
def test_compiled_training_tracks_eager_fp32_cpu(tmp_path):
    eager, comp = _run(tmp_path, "none"), _run(tmp_path, "compile")
    for key in ("Loss/D", "Loss/G"):
        assert comp["history"][key] == pytest.approx(eager["history"][key], rel=RTOL_LOSS), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the compiled GPU path)")
def test_compiled_training_tracks_eager_fp32_gpu(tmp_path):
    eager, comp = _run(tmp_path, "none"), _run(tmp_path, "compile")
    for key in ("Loss/D", "Loss/G"):
        assert comp["history"][key] == pytest.approx(eager["history"][key], rel=RTOL_LOSS), key
