"""Write samples of a trained model as a PNG folder, an .npz or an .h5 file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from gancore.device import torch_device
from gancore.errors import GancoreError


def sample_uint8(family, n: int, seed: int = 0, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray | None]:
    """n samples as uint8 (n, C, H, W) and their class labels (conditional models) or None."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for lo in range(0, n, batch_size):
        b = min(batch_size, n - lo)
        inputs = family.fixed_inputs(b, g)
        xs.append(family.to_uint8(family.sample(b, inputs=inputs)).cpu())
        if "y" in inputs:
            ys.append(inputs["y"][:b])
    x = torch.cat(xs).numpy()
    return x, (torch.cat(ys).numpy() if ys else None)


FORMATS = ("png", "npz", "h5")


def check_output(out: Path, fmt: str) -> None:
    """--out fits the format and can be written: png -> a folder, npz/h5 -> a file; checked before sampling."""
    if fmt not in FORMATS:
        raise GancoreError(f"unknown format {fmt!r}; use {', '.join(FORMATS)}")
    if fmt == "png" and out.exists() and not out.is_dir():
        raise GancoreError(f"--out {str(out)!r} is an existing file; png samples go into a folder (or name a "
                           "FILE.npz / FILE.h5 with --format npz|h5)")
    if fmt != "png" and out.is_dir():
        raise GancoreError(f"--out {str(out)!r} is a folder; --format {fmt} writes one file (e.g. samples.{fmt})")
    parent = out if fmt == "png" else out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GancoreError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GancoreError(f"cannot write {str(out)!r}: no write permission in {str(parent)!r}")


def generate(checkpoint: str | Path, n: int, out: str | Path, fmt: str | None = None, seed: int = 0,
             batch_size: int = 500, device: str = "cpu", uri: str | None = None) -> Path:
    """Load the checkpoint (a file; a run dir: the checkpoint it means, its best.pt when it has one, else its newest
    (gancore.train.rundir.RunDir.meant); or an MLflow model URI runs:/RUN_ID/generator | models:/NAME/VERSION read
    from the store `uri`), draw n samples, write them; returns the output path. Every argument is checked before
    the model is loaded; device "auto": cuda when available. The same seed gives the same images from a run's final
    checkpoint and from its MLflow model."""
    from gancore.tracking import is_model_uri, load_generator
    from gancore.train.state import checkpoint_file, load_family

    if n <= 0:
        raise GancoreError(f"-n {n}: the number of images must be positive")
    if batch_size <= 0:
        raise GancoreError(f"--batch-size {batch_size}: must be positive")
    out = Path(out)
    fmt = fmt or {".npz": "npz", ".h5": "h5", ".hdf5": "h5"}.get(out.suffix.lower(), "png")
    check_output(out, fmt)  # before the (possibly long) sampling
    dev = torch_device(device)
    if is_model_uri(str(checkpoint)):
        family = load_generator(str(checkpoint), uri, dev).family  # the run's family, its sampling network only
        cfg = family.cfg
    else:
        family, cfg, _ = load_family(checkpoint_file(checkpoint), dev)
    x, y = sample_uint8(family, n, seed, batch_size)
    if fmt == "png":
        from PIL import Image

        out.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(x):
            arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            Image.fromarray(arr).save(out / f"{i:06d}.png")
    elif fmt == "npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, x=x, **({"y": y} if y is not None else {}))
    elif fmt == "h5":
        import h5py

        out.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(out, "w") as f:
            f.create_dataset("images", data=x, compression="gzip")
            if y is not None:
                f.create_dataset("labels", data=y)
            f.attrs["preset"] = cfg.name
            f.attrs["family"] = cfg.family
    else:
        raise GancoreError(f"unknown format {fmt!r}; use png, npz or h5")
    return out
