"""A finished run's generator as an MLflow model: logged into the run, loaded back by URI.

    mlflow.pytorch.load_model("runs:/<run id>/generator")   (or "models:/<registered name>/<version>")
    -> Generator: forward(z (B, nz) float32[, y (B,) int64 class labels]) -> uint8 images (B, C, H, W)

The output is uint8, exactly the images the checkpoint path writes (`family.to_uint8(family.sample(...))`), whatever
range a family's network produces (GAN: [-1, 1], VAE: [0, 1]). For [-1, 1] floats: `x.float() / 127.5 - 1`.

Which families: those that sample in one pass from a latent z (their `fixed_inputs` are z[, y]): GAN, VAE. A
diffusion or GANomaly run has no latent generator; nothing is logged for it (one info line).

Serialisation: mlflow.pytorch's pickle format (the module pickled by reference to gancore's classes: loading needs
gancore importable, nothing else). The run's own family object is not pickled: the model holds a stripped copy
with only the sampling network (the EMA copy when there is one) on the CPU. Like any pickle, load only models from a
store you trust. Registration (`track.register_model=NAME`) makes a version of the registered model NAME.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from gancore.errors import TrackingError
from gancore.tracking.store import (
    existing_client,
    get_run,
    one_line,
    resolve_uri,
    store_errors,
)

log = logging.getLogger(__name__)

MODEL_NAME = "generator"  # the model's name in its run: runs:/<run id>/generator
URI_PREFIXES = ("runs:/", "models:/")
EXAMPLE_BATCH = 2  # rows of the logged input example


def is_model_uri(s: str) -> bool:
    """Whether `s` names an MLflow model (runs:/... or models:/...) rather than a file."""
    return str(s).startswith(URI_PREFIXES)


def _latent_inputs(family: Any) -> dict[str, torch.Tensor] | None:
    """The family's sampling inputs for two images when they are a latent z (B, nz) [and labels y], else None."""
    inputs = family.fixed_inputs(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    z = inputs.get("z")
    if not set(inputs) <= {"z", "y"} or z is None or z.ndim != 2:
        return None
    return inputs


def _plain_copy(net: nn.Module) -> nn.Module:
    """A CPU copy of `net` for pickling, without the per-instance wrappers training adds (Accelerate's autocast
    `forward`, torch.compile's compiled call): those are closures over the training process's module."""
    net = copy.deepcopy(getattr(net, "_orig_mod", net)).cpu().eval().requires_grad_(False)
    for m in net.modules():
        m.__dict__.pop("forward", None)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    return net


class Generator(nn.Module):
    """A trained latent generator: forward(z (B, nz) float32[, y (B,) int64]) -> uint8 images (B, C, H, W).

    `y` is required for class-conditional models (`conditional`), ignored otherwise. `family` is a copy of the run's
    family holding only the sampling network (the same module as `net`), so sampling is the family's own code.
    """

    def __init__(self, family: Any) -> None:
        super().__init__()
        fam = copy.copy(family)  # shallow: config, shapes, loss objects are shared, networks replaced below
        self.net = _plain_copy(family.sampler_network())
        fam.networks, fam.optimizers, fam.phases, fam.ema = {family.generator_name: self.net}, {}, [], None
        for k, v in list(vars(fam).items()):  # private caches (a VAE's test split): rebuilt on demand, not pickled
            if k.startswith("_") and (torch.is_tensor(v) or (isinstance(v, (tuple, list)) and any(map(torch.is_tensor, v)))):
                setattr(fam, k, None)
        self.family = fam
        self.family_name = fam.cfg.family
        self.nz = int(fam.cfg.model.nz)
        self.num_classes = int(fam.num_classes)
        self.image_shape = tuple(int(s) for s in fam.image_shape)
        self.conditional = family.class_sampler() is not None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.nz:
            raise ValueError(f"z must be (B, {self.nz}) float32, got {tuple(z.shape)}")
        inputs = {"z": z}
        if self.conditional:
            if y is None:
                raise ValueError(f"this generator is class-conditional: pass labels y (B,) in [0, {self.num_classes})")
            inputs["y"] = torch.as_tensor(y, dtype=torch.long).reshape(-1)
        return self.family.to_uint8(self.family.sample(len(z), inputs=inputs))

    def metadata(self) -> dict[str, Any]:
        """What the MLflow model's metadata says about it (MLmodel `metadata:`)."""
        return {"family": self.family_name, "nz": self.nz, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "conditional": self.conditional,
                "output": "uint8 (B, C, H, W)", "gancore.model": "Generator"}


@contextlib.contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent model functions read the process-wide tracking URI: set it for the block, then restore it."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri also sets (None: unsets) this variable
    before = getattr(utils, "_tracking_uri", None)  # the process-wide URI itself, not one read from the variable
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers inside the block."""
    levels = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for lg, _ in levels:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in levels:
            lg.setLevel(level)


def log_generator_model(uri: str, run_id: str, family: Any, register: str | None = None) -> str | None:
    """Log `family`'s generator into run `run_id` as the MLflow model `generator` (signature, input example,
    metadata); register it as `register` when given. Returns the model URI, or None for a family without a latent
    generator. Does not touch the run's status (no fluent run is started)."""
    inputs = _latent_inputs(family)
    if inputs is None:
        log.info("family %s samples without a latent z: no generator model logged", family.cfg.family)
        return None
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    model = Generator(family)
    example: Any = inputs["z"].numpy().astype(np.float32)
    if model.conditional:
        example = {"z": example, "y": inputs["y"].numpy().astype(np.int64)}
        output = model(inputs["z"], inputs["y"]).numpy()
    else:
        output = model(inputs["z"]).numpy()
    client, uri = existing_client(uri)
    with store_errors(uri), _tracking_uri(uri):
        run = get_run(client, run_id, uri)
        logged = mlflow.initialize_logged_model(name=MODEL_NAME, source_run_id=run_id,
                                                experiment_id=run.info.experiment_id)
        # mlflow.pytorch's pickle-format caution is said in the docstring; mlflow.models.model's failed serving
        # check of a conditional model's {z, y} example: the pytorch flavour's pyfunc serves one array (z) only
        with _quiet("mlflow.pytorch", "mlflow.models.model"):
            info = mlflow.pytorch.log_model(
                model, name=MODEL_NAME, model_id=logged.model_id, serialization_format="pickle",
                signature=infer_signature(example, output), input_example=example, metadata=model.metadata(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "gancore"],  # no slow inference
                registered_model_name=register)
    return info.model_uri


def load_generator(model_uri: str, uri: str | None = None, device: str | torch.device = "cpu") -> Generator:
    """The Generator logged at `model_uri` (runs:/<run id>/generator, models:/<name>/<version>), or a one-line
    TrackingError (bad URI, no such run or model, not a gancore generator)."""
    scheme, _, rest = str(model_uri).partition(":/")
    parts = rest.strip("/").split("/")
    if scheme not in ("runs", "models") or not parts[0] or (scheme == "runs" and (len(parts) < 2 or not parts[1])):
        raise TrackingError(f"{model_uri!r} is not a model URI; use runs:/RUN_ID/{MODEL_NAME} or models:/NAME/VERSION")
    import mlflow.pytorch

    client, uri = existing_client(uri or resolve_uri(None))
    if model_uri.startswith("runs:/"):
        get_run(client, parts[0], uri)  # an unknown run id: its own one-line error
    try:
        with _tracking_uri(uri):
            model = mlflow.pytorch.load_model(model_uri, map_location=torch.device(device))
    except Exception as e:  # noqa: BLE001 - MLflow raises MlflowException, OSError, ... for a missing model
        raise TrackingError(f"cannot load MLflow model {model_uri} from {uri}: {one_line(e)}") from None
    if not isinstance(model, Generator):
        raise TrackingError(f"{model_uri} is a {type(model).__name__}, not a gancore generator model "
                            f"(logged by a finished gancore run as runs:/RUN_ID/{MODEL_NAME})")
    return model.eval()
