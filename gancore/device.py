"""The torch device a user names (--device auto | cpu | cuda[:N]): the floor evaluation, generation and the
classifier job all stand on (it imports nothing of gancore's but its errors)."""

from __future__ import annotations

import torch

from gancore.errors import GancoreError


def torch_device(device: str) -> torch.device:
    """A usable torch device from a user's string (auto, cpu, cuda, cuda:1), or a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise GancoreError(f"--device {device!r} is not a torch device; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise GancoreError(f"--device {device}: no such CUDA device on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise GancoreError(f"--device {device!r} is not supported; use cpu or cuda[:N]")
    return dev
