"""Write samples of a trained model as a PNG folder, an .npz or an .h5 file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


def generate(checkpoint: str | Path, n: int, out: str | Path, fmt: str | None = None, seed: int = 0,
             batch_size: int = 500, device: str = "cpu") -> Path:
    """Load the checkpoint, draw n samples, write them; returns the output path."""
    from gancore.train.state import load_family

    if n <= 0:
        raise GancoreError("-n must be positive")
    out = Path(out)
    fmt = fmt or {".npz": "npz", ".h5": "h5", ".hdf5": "h5"}.get(out.suffix.lower(), "png")
    family, cfg, _ = load_family(checkpoint, device)
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
