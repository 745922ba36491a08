import numpy as np
import pytest
import torch

from gancore.config import DataConfig
from gancore.data import DeviceLoader, load_images
from gancore.errors import DataError
from conftest import needs_cifar, needs_mnist


@needs_mnist
def test_shared_mnist_npz():
    x, y = load_images(DataConfig(name="mnist"))
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]  # the original order (shared/data/README.md)
    assert x.float().mean().item() / 255 == pytest.approx(0.1307, abs=1e-4)
    xt, yt = load_images(DataConfig(name="mnist", split="test", subset=10))
    assert xt.shape == (10, 1, 28, 28) and yt.tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@needs_mnist
def test_normal_class_and_resize():
    x, y = load_images(DataConfig(name="mnist", normal_class=3, subset=50, image_size=32))
    assert x.shape == (50, 1, 32, 32) and set(y.tolist()) == {3}


@needs_cifar
def test_shared_cifar10():
    x, y = load_images(DataConfig(name="cifar10", split="test"))
    assert x.shape == (10000, 3, 32, 32)
    assert y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(y.numpy()).tolist() == [1000] * 10


def test_missing_dataset_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(DataConfig(name="cifar10", root=str(tmp_path)))
    msg = str(e.value)
    assert "not found" in msg and str(tmp_path) in msg and "GANCORE_DATA" in msg and "\n" not in msg


def test_synthetic_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x=x, y=np.arange(20) % 4)
    xt, yt = load_images(DataConfig(name="npz", path=str(tmp_path / "s.npz")))
    assert xt.shape == (20, 3, 8, 8)
    assert torch.equal(xt[5].permute(1, 2, 0), torch.from_numpy(x[5]))
    assert yt.tolist() == (np.arange(20) % 4).tolist()


def test_image_folder(tmp_path):
    from PIL import Image

    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), i * 40, np.uint8)).save(tmp_path / c / f"{i}.png")
    x, y = load_images(DataConfig(name="folder", path=str(tmp_path), image_size=8))
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(x[1, 0, 4, 4]) == 40


def test_loader_epochs_are_permutations_and_resume_exactly():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    a = DeviceLoader(x, y, batch_size=3, seed=1, device=torch.device("cpu"))
    assert a.steps_per_epoch == 3
    seen = [a.next()[1] for _ in range(3)]
    ep0 = torch.cat(seen).tolist()
    assert len(set(ep0)) == 9  # drop_last: 9 distinct of 10
    a.next()  # into epoch 1
    state = a.state_dict()
    rest = [a.next()[1].tolist() for _ in range(5)]
    b = DeviceLoader(x, y, batch_size=3, seed=1, device=torch.device("cpu"))
    b.load_state_dict(state)
    assert [b.next()[1].tolist() for _ in range(5)] == rest
    assert b.epoch == a.epoch and b.index == a.index


def test_loader_shards_across_processes():
    x = torch.zeros(16, 1, 1, 1, dtype=torch.uint8)
    y = torch.arange(16)
    shards = [DeviceLoader(x, y, batch_size=8, seed=0, device=torch.device("cpu"), rank=r, world=2) for r in range(2)]
    b0, b1 = shards[0].next()[1], shards[1].next()[1]
    assert len(b0) == len(b1) == 4 and not set(b0.tolist()) & set(b1.tolist())


@pytest.mark.parametrize("arrays,message", [
    ({"y": np.zeros(3, np.int64)}, "has no array 'x' (found: y)"),
    ({"x": np.zeros((3, 8, 8), np.float32)}, "x is float32 (3, 8, 8); data.name=npz needs uint8 images"),
    ({"x": np.zeros((3, 8, 8, 2), np.uint8)}, "with C = 1 or 3"),
    ({"x": np.zeros((3, 8, 8), np.uint8), "y": np.zeros(2, np.int64)}, "one integer label per image (3,)"),
])
def test_npz_with_wrong_arrays_is_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "s.npz", **arrays)
    with pytest.raises(DataError) as e:
        load_images(DataConfig(name="npz", path=str(tmp_path / "s.npz")))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_paths_are_one_line(tmp_path):
    (tmp_path / "f.npz").write_text("not an archive")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"\x89PNG broken")
    cases = [(DataConfig(name="npz", path=str(tmp_path / "f.npz")), "is not a readable .npz file"),
             (DataConfig(name="npz", path=str(tmp_path)), "is a folder; data.name=npz needs an .npz file"),
             (DataConfig(name="folder", path=str(tmp_path / "f.npz")), "is a file; data.name=folder needs a folder"),
             (DataConfig(name="folder", path=str(tmp_path / "imgs")), "cannot read image"),
             (DataConfig(name="mnist", root=str(tmp_path / "f.npz")), "(data.root) is a file")]
    for cfg, message in cases:
        with pytest.raises(DataError) as e:
            load_images(cfg)
        assert message in str(e.value) and "\n" not in str(e.value), (cfg, str(e.value))


def test_resize_modes_by_hand():
    """center_crop keeps the centre, pad adds black borders, stretch changes the aspect ratio (a 2x4 image; the
    fitted side already has the target size, so no interpolation blurs the expected values)."""
    from gancore.data import resize_uint8

    x = torch.arange(1, 9, dtype=torch.uint8).view(1, 1, 2, 4)  # rows [1 2 3 4], [5 6 7 8]
    assert resize_uint8(x, 2, "center_crop")[0, 0].tolist() == [[2, 3], [6, 7]]
    assert resize_uint8(x, 4, "pad")[0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]]
    tall = x.transpose(2, 3).contiguous()  # 4x2: the crop keeps the middle rows
    assert resize_uint8(tall, 2, "center_crop")[0, 0].tolist() == [[2, 6], [3, 7]]
    stretched = resize_uint8(x, 4, "stretch")
    ref = torch.nn.functional.interpolate(x.float(), size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    assert stretched.shape == (1, 1, 4, 4) and torch.equal(stretched, ref.round().to(torch.uint8))
    import torchvision.transforms.functional as TF  # centre crop as torchvision users know it: Resize + CenterCrop

    for shape, size in [((37, 53), 32), ((61, 40), 16), ((33, 47), 8), ((64, 41), 64)]:
        img = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8)
        ref = TF.center_crop(TF.resize(img.float(), size, antialias=True), size).round().to(torch.uint8)
        assert torch.equal(resize_uint8(img, size, "center_crop"), ref), shape
    sq = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8)  # square: the three modes agree
    assert torch.equal(resize_uint8(sq, 4, "pad"), resize_uint8(sq, 4, "center_crop"))
    assert torch.equal(resize_uint8(sq, 4, "stretch"), resize_uint8(sq, 4, "center_crop"))


def test_image_folder_layouts_and_sizes(tmp_path):
    from PIL import Image

    from gancore.errors import DataError

    flat = tmp_path / "flat"
    flat.mkdir()
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 200  # a 20x40 image whose centre 20x20 is bright, the sides dark
    Image.fromarray(a).save(flat / "wide.png")
    Image.fromarray(np.full((30, 30), 90, np.uint8)).save(flat / "grey.jpg")  # greyscale beside colour: as colour
    x, y = load_images(DataConfig(name="folder", path=str(flat), image_size=10))
    assert x.shape == (2, 3, 10, 10) and y.tolist() == [0, 0]  # sorted names: grey.jpg, wide.png
    assert int(x[1, :, :, 1:-1].min()) == 200 and int(x[1].min()) > 150  # centre crop (default): the bright middle
    x, _ = load_images(DataConfig(name="folder", path=str(flat), image_size=10, resize="pad"))
    assert x[1, :, :2].max() == 0 and x[1, :, -2:].max() == 0 and int(x[1, 0, 5, 5]) == 200  # black bands
    x, _ = load_images(DataConfig(name="folder", path=str(flat), image_size=10, resize="stretch"))
    assert int(x[1, 0, 5, 0]) == 0 and int(x[1, 0, 5, 5]) == 200  # the dark sides squeezed in
    with pytest.raises(DataError, match=r"are 20x40, 30x30 \(height x width\); set data.image_size=S .* "
                                        "center_crop \\(default\\), stretch or pad"):
        load_images(DataConfig(name="folder", path=str(flat)))


def test_arch_size_error_lists_the_archs_that_fit():
    from gancore.config import ModelConfig
    from gancore.errors import ConfigError
    from gancore.registry import MODELS

    for arch, shape, fit, near in [("dcgan_mnist", (3, 32, 32), "dcgan, mlp, sndcgan", 28),
                                   ("dcgan", (3, 28, 28), "dcgan_mnist, mlp", 32), ("sndcgan", (3, 48, 32), "mlp", 32)]:
        with pytest.raises(ConfigError) as e:
            MODELS[arch](ModelConfig(arch=arch), shape, 10)
        h, w = shape[1:]
        assert str(e.value).startswith(f"model.arch={arch} makes ") and f"for {h}x{w} use model.arch={fit}, or " \
            f"resize the data with data.image_size={near} (" in str(e.value), str(e.value)
        for name in fit.split(", "):  # every arch named builds for that shape
            nets = MODELS[name](ModelConfig(arch=name, ngf=8, ndf=8), shape, 10)
            assert nets["G"](torch.zeros(2, 100)).shape == (2, *shape)
