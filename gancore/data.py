"""Datasets as uint8 tensors, and a loader that draws batches by an on-device permutation.

    config.data -> load_images() -> (x uint8 (N, C, H, W), y int64 (N,)) -> DeviceLoader -> family.prepare()

Data directory: `data.root`, else $GANCORE_DATA, else ./data. Two layouts are read for MNIST/CIFAR-10: the
prepared `.npz` files (mnist.npz, cifar10/{train_k,test}.npz) and torchvision's own folders.
Decoded arrays are cached as plain .npy (LZMA-compressed npz takes seconds to decode) under $GANCORE_CACHE.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gancore.config import DataConfig
from gancore.errors import DataError
from gancore.io import atomic_write, cache_dir, data_root
from gancore.registry import DATASETS

Arrays = tuple[np.ndarray, np.ndarray]  # x (N, H, W[, C]) uint8, y (N,) int


def _missing(name: str, looked: list[Path], hint: str) -> DataError:
    where = ", ".join(str(p) for p in looked)
    return DataError(f"dataset {name!r} not found (looked in {where}); {hint}")


def _root(cfg: DataConfig) -> Path:
    """The data directory; a file there is an error (not a silently empty dataset folder)."""
    root = data_root(cfg.root)
    if root.exists() and not root.is_dir():
        src = "data.root" if cfg.root else ("$GANCORE_DATA" if os.environ.get("GANCORE_DATA") else "./data")
        raise DataError(f"data directory {str(root)!r} ({src}) is a file; point {src} at the folder holding the "
                        "datasets")
    return root


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """np.load of an .npz archive (no pickles); anything else is a DataError naming the file."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}); check the path or recreate it "
                        "with numpy.savez") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a plain .npy array
        raise DataError(f"{path} is a single .npy array, not an .npz archive; save it with numpy.savez(path, x=...)")
    return z


def _cached_npz(path: Path, keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """np.load(path)[keys], decoded once and kept as uncompressed .npy (safe for concurrent writers)."""
    st = path.stat()
    tag = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = []
    for k in keys:
        f = cache_dir() / "npz" / f"{path.stem}-{tag}-{k}.npy"
        if f.is_file():
            out.append(np.load(f, mmap_mode="r"))
            continue
        with _open_npz(path) as z:
            if k not in z.files:
                raise DataError(f"{path} has no array {k!r} (found: {', '.join(z.files) or 'none'}); "
                                "replace it with the dataset's original file")
            try:
                arr = z[k]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"cannot read {k!r} from {path} ({type(e).__name__}); the file is damaged, "
                                "replace it") from None
        try:
            atomic_write(f, lambda fh: np.save(fh, arr))  # a concurrent reader sees no file or the whole one
        except OSError:
            pass  # a read-only cache is not an error
        out.append(arr)
    return tuple(out)


def _torchvision(cls_name: str, root: Path, train: bool, download: bool) -> Arrays | None:
    import torchvision.datasets as tvd

    try:
        ds = getattr(tvd, cls_name)(str(root), train=train, download=download)
    except RuntimeError:  # "Dataset not found or corrupted"
        return None
    except Exception as e:  # no internet: URLError, socket errors ...
        if download:
            raise DataError(f"{cls_name} download into {root} failed ({type(e).__name__}); "
                            f"put the files there by hand or set GANCORE_DATA") from None
        return None
    x = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    y = ds.targets.numpy() if torch.is_tensor(ds.targets) else np.asarray(ds.targets)
    return x, y


def _mnist_like(name: str, npz_name: str, tv_name: str) -> Callable[[DataConfig], Arrays]:
    def load(cfg: DataConfig) -> Arrays:
        root = _root(cfg)
        npz = root / npz_name
        if npz.is_file():
            s = "train" if cfg.split == "train" else "test"
            return _cached_npz(npz, (f"x_{s}", f"y_{s}"))
        got = _torchvision(tv_name, root, cfg.split == "train", cfg.download)
        if got is None:
            raise _missing(name, [npz, root / tv_name], "set GANCORE_DATA (or data.root) to the folder holding "
                           f"{npz_name}, or pass data.download=true on a machine with internet")
        return got

    return load


DATASETS.register("mnist")(_mnist_like("mnist", "mnist.npz", "MNIST"))
DATASETS.register("fashion_mnist")(_mnist_like("fashion_mnist", "fashion_mnist.npz", "FashionMNIST"))


@DATASETS.register("cifar10")
def _cifar10(cfg: DataConfig) -> Arrays:
    root = _root(cfg)
    d = root / "cifar10"
    files = [d / f"train_{k}.npz" for k in range(5)] if cfg.split == "train" else [d / "test.npz"]
    if all(f.is_file() for f in files):
        parts = [_cached_npz(f, ("x", "y")) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    got = _torchvision("CIFAR10", root, cfg.split == "train", cfg.download)
    if got is None:
        raise _missing("cifar10", [d, root / "cifar-10-batches-py"], "set GANCORE_DATA (or data.root) to the "
                       "folder holding cifar10/train_0.npz, or pass data.download=true on a machine with internet")
    return got


@DATASETS.register("npz")
def _npz(cfg: DataConfig) -> Arrays:
    """A generic .npz with `x` (N, H, W[, C]) uint8 and optionally `y` (N,); data.path names the file."""
    if not cfg.path:
        raise DataError("data.name=npz needs data.path=FILE.npz (arrays x and optionally y)")
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        raise DataError(f"data.path={p} is a folder; data.name=npz needs an .npz file (data.name=folder reads a "
                        "folder of images)")
    if not p.is_file():
        raise _missing("npz", [p], "check data.path")
    with _open_npz(p) as z:
        if "x" not in z.files:
            raise DataError(f"{p} has no array 'x' (found: {', '.join(z.files) or 'none'}); data.name=npz needs x "
                            "(N, H, W[, C]) uint8 and optionally y (N,)")
        try:
            x = z["x"]
            y = z["y"] if "y" in z.files else np.zeros(len(x), np.int64)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read the arrays of {p} ({type(e).__name__}); the file is damaged") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
        raise DataError(f"{p}: x is {x.dtype} {x.shape}; data.name=npz needs uint8 images (N, H, W) or "
                        "(N, H, W, C) with C = 1 or 3")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{p}: y is {y.dtype} {y.shape}; it must hold one integer label per image ({len(x)},)")
    return x, y


FOLDER_EXTS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


@DATASETS.register("folder")
def _folder(cfg: DataConfig) -> Arrays:
    """An image folder: images directly inside (label 0) or in one sub-folder per class (sorted names: label 0, 1,
    ...; images beside the sub-folders are label 0 too). Each image is made S x S (data.image_size) as data.resize
    says; with data.image_size=0 all images must already have one size."""
    from PIL import Image

    if not cfg.path:
        raise DataError("data.name=folder needs data.path=DIR")
    root = Path(cfg.path).expanduser()
    if root.is_file():
        raise DataError(f"data.path={root} is a file; data.name=folder needs a folder of images "
                        "(data.name=npz reads an .npz file)")
    if not root.is_dir():
        raise _missing("folder", [root], "check data.path")
    exts = set(FOLDER_EXTS)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(p, 0) for p in sorted(root.iterdir()) if p.suffix.lower() in exts]
    for i, c in enumerate(classes):
        items += [(p, i) for p in sorted((root / c).iterdir()) if p.suffix.lower() in exts]
    if not items:
        raise DataError(f"no images ({', '.join(sorted(exts))}) in {root}")
    imgs = []
    for p, _ in items:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
                a = np.asarray(im)
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image {p} ({type(e).__name__}); remove or replace it") from None
        if cfg.image_size:  # (H, W[, C]) -> (S, S[, C]), one image at a time (sizes may differ)
            t = torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)
            a = resize_uint8(t[None], cfg.image_size, cfg.resize)[0].permute(1, 2, 0).squeeze(-1).numpy()
        imgs.append(a)
    if len({a.shape[-1] if a.ndim == 3 else 1 for a in imgs}) > 1:  # some grey, some colour: all as colour
        imgs = [np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a for a in imgs]
    sizes = sorted({a.shape[:2] for a in imgs})
    if len(sizes) > 1 or (not cfg.image_size and sizes[0][0] != sizes[0][1]):
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:3]) + (" ..." if len(sizes) > 3 else "")
        raise DataError(f"images in {root} are {shown} (height x width); set data.image_size=S (e.g. 32 or 64) to "
                        "make them S x S; data.resize says how: center_crop (default), stretch or pad")
    return np.stack(imgs), np.array([c for _, c in items], np.int64)


def load_images(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured dataset as (x uint8 (N, C, H, W), y int64 (N,)) on the CPU."""
    x, y = DATASETS[cfg.name](cfg)
    y = np.asarray(y).astype(np.int64)
    if cfg.normal_class >= 0:
        keep = y == cfg.normal_class
        if not keep.any():
            raise DataError(f"data.normal_class={cfg.normal_class}: no image has that label")
        x, y = x[keep], y[keep]
    if cfg.subset:
        x, y = x[: cfg.subset], y[: cfg.subset]
    xt = torch.from_numpy(np.array(x, copy=True))  # own, writable memory (the cache is mmapped)
    xt = xt.unsqueeze(1) if xt.ndim == 3 else xt.permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    if cfg.image_size and tuple(xt.shape[-2:]) != (cfg.image_size, cfg.image_size):
        xt = resize_uint8(xt, cfg.image_size, cfg.resize)
    return xt, torch.from_numpy(y)


def resize_uint8(x: torch.Tensor, size: int, mode: str = "stretch") -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, C, size, size) by a bilinear (antialiased) resize, rounded back to uint8.

    How a non-square image becomes square (data.resize; all three are the same for square images):
    stretch      both sides to `size` (the aspect ratio changes)
    center_crop  the shorter side to `size`, then the centre `size` x `size` (torchvision's Resize + CenterCrop)
    pad          the longer side to `size`, then black borders on both sides of the shorter one
    """
    h, w = x.shape[-2:]
    if mode == "stretch" or h == w:
        hw = (size, size)
    else:  # center_crop: the shorter side becomes `size`; pad: the longer one (the other keeps the aspect ratio)
        fit = min(h, w) if mode == "center_crop" else max(h, w)
        hw = tuple(size if s == fit else max(1, int(s * size / fit)) for s in (h, w))  # torchvision truncates too
    out = []
    for chunk in x.split(4096):
        f = F.interpolate(chunk.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
        out.append(f.round_().clamp_(0, 255).to(torch.uint8))
    y = torch.cat(out)
    if hw[0] > size or hw[1] > size:  # center_crop: (N, C, >= size, >= size) -> the centre
        top, left = int(round((hw[0] - size) / 2)), int(round((hw[1] - size) / 2))  # torchvision's offsets
        y = y[..., top: top + size, left: left + size]
    elif hw != (size, size):  # pad: (N, C, <= size, <= size) -> centred on black
        top, left = (size - hw[0]) // 2, (size - hw[1]) // 2
        y = F.pad(y, (left, size - hw[1] - left, top, size - hw[0] - top), value=0)
    return y.contiguous()


class DeviceLoader:
    """Endless batches of (x uint8, y) drawn by a seeded permutation per epoch, without a DataLoader.

    The whole uint8 dataset lives on `device` when it fits (MNIST: 47 MB), so a batch is one index_select on
    the device. Batches have a static shape (the last partial batch of an epoch is dropped). Under DDP each
    process takes its strided share of the same permutation. `state_dict()` holds the exact data position.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, device: torch.device,
                 on_device: str = "auto", rank: int = 0, world: int = 1):
        if batch_size % world:
            raise DataError(f"optim.batch_size={batch_size} is not divisible by the {world} processes")
        self.local_batch = batch_size // world
        self.steps_per_epoch = len(x) // batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"dataset has {len(x)} images, fewer than one batch of {batch_size}; "
                            "lower optim.batch_size or raise data.subset")
        keep_on_device = on_device == "yes" or (on_device == "auto" and _fits(x, device))
        store = device if keep_on_device else torch.device("cpu")
        self.x, self.y = x.to(store), y.to(store)
        self.device, self.rank, self.world, self.batch_size = device, rank, world, batch_size
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.epoch, self.index = 0, 0
        self._epoch_start_state = self.gen.get_state()
        self._perm = self._new_perm()

    def _new_perm(self) -> torch.Tensor:
        self._epoch_start_state = self.gen.get_state()
        perm = torch.randperm(len(self.x), generator=self.gen)
        return perm[: self.steps_per_epoch * self.batch_size].to(self.x.device)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x uint8 (b, C, H, W), y (b,)) on the training device; rolls over to a new epoch."""
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._new_perm()
        lo = self.index * self.batch_size
        idx = self._perm[lo: lo + self.batch_size][self.rank:: self.world]
        self.index += 1
        xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
        return xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"gen": self._epoch_start_state, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self._perm = self._new_perm()
        self.epoch, self.index = int(s["epoch"]), int(s["index"])


def _fits(x: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # CPU: it is already in memory
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() < 0.25 * free
