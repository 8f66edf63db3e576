"""Tests of lipexp.data: loaders, augmentation, data module (offline; augmentation and the
batches of a training split held on a device also on CUDA, under pytest -m gpu)."""

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from lipexp.data.augment import augment
from lipexp.data.datamodule import ImageDataModule
from lipexp.data.sources import DataNotFoundError, cifar10, digits, fashion_mnist, mnist

from ..helpers import SHARED_DATASETS

# ---------------------------------------------------------------- sources


def test_digits():
    a, b = digits("unused", False), digits("unused", False)
    for x in (a.train_x, a.test_x):
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        assert x.min() >= 0 and x.max() <= 1
    assert len(a.train_x) + len(a.test_x) == 1797
    assert a.train_y.dtype == torch.int64
    # Fixed split.
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    # Disjoint (the digits set has no duplicate images, so compare rows).
    train_rows = {r.numpy().tobytes() for r in a.train_x}
    assert not any(r.numpy().tobytes() in train_rows for r in a.test_x)
    assert set(a.train_y.tolist()) == set(a.test_y.tolist()) == set(range(10))


@pytest.mark.parametrize("loader, name", [(mnist, "MNIST"), (fashion_mnist, "FashionMNIST")])
def test_mnist_like_real_files(tmp_path, loader, name):
    src = SHARED_DATASETS / name / "raw"
    if not src.is_dir():
        pytest.skip(f"no shared copy of {name} at {src}")
    raw = tmp_path / name / "raw"
    raw.mkdir(parents=True)
    for f in src.glob("*.gz"):
        shutil.copy(f, raw)  # extraction writes next to the archives: never in shared/
    a = loader(tmp_path, download=False)
    assert (len(a.train_x), len(a.test_x)) == (60000, 10000)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (1, 28, 28)
    assert a.test_x.shape[1:] == (1, 28, 28)
    assert a.train_y.dtype == torch.int64
    assert set(a.train_y.tolist()) == set(a.test_y.tolist()) == set(range(10))


def _write_fake_cifar10(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    """A tiny cifar-10-batches-py folder in the official pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return written


def test_cifar10_fake_folder(tmp_path, monkeypatch):
    # torchvision checks the md5 of every batch and of batches.meta, which a fake folder
    # cannot match: accept any existing file instead.
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file()
    )
    written = _write_fake_cifar10(tmp_path)
    a = cifar10(tmp_path, download=False)
    assert a.train_x.shape == (15, 3, 32, 32) and a.test_x.shape == (3, 3, 32, 32)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    data, labels = written["data_batch_2"]  # images 3..5 of the train split
    img = data[1].reshape(3, 32, 32)  # channel, row, col
    assert a.train_x[4, 2, 7, 11] == img[2, 7, 11]
    assert torch.equal(a.train_x[4], torch.from_numpy(img))
    assert a.train_y[4] == labels[1]
    data, labels = written["test_batch"]
    assert torch.equal(a.test_x, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert a.test_y.tolist() == labels


@pytest.mark.parametrize(
    "loader, folder, file",
    [
        (mnist, "MNIST/raw", "train-images-idx3-ubyte.gz"),
        (cifar10, "cifar-10-batches-py", "data_batch_1"),
    ],
)
def test_missing_data(tmp_path, loader, folder, file):
    with pytest.raises(DataNotFoundError) as info:
        loader(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / folder) in message and file in message


# ---------------------------------------------------------------- augment


def _batch(b=8, c=3, h=10, w=12, device="cpu"):
    return (torch.rand(b, c, h, w) * 0.5 + 0.5).to(device)  # in [0.5, 1]: no zeros


def test_augment_off_is_identity(device):
    x = _batch(device=device)
    assert torch.equal(augment(x, 0, False, 0), x)


def test_augment_flip(device):
    torch.manual_seed(0)  # the random numbers of the device's generator (CUDA: its own)
    x = _batch(b=256, h=4, w=5, device=device)
    y = augment(x, 0, True, 0)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def _shift(x, dy, dx):
    """x (C, H, W) shifted down by dy and right by dx, zeros entering."""
    out = torch.zeros_like(x)
    h, w = x.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_augment_crop_is_a_shift_per_image(device):
    torch.manual_seed(0)
    p = 2
    x = _batch(b=16, device=device)
    y = augment(x, p, False, 0)
    shifts = []
    for xi, yi in zip(x, y, strict=True):
        found = [
            (dy, dx)
            for dy in range(-p, p + 1)
            for dx in range(-p, p + 1)
            if torch.equal(yi, _shift(xi, dy, dx))
        ]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # independent parameters per image


def test_augment_cutout_square(device):
    torch.manual_seed(0)
    s, h, w = 4, 10, 12
    x = _batch(b=64, h=h, w=w, device=device)
    y = augment(x, 0, False, s)
    clipped = 0
    boxes = set()
    for xi, yi in zip(x, y, strict=True):
        zero = (yi == 0).all(0)  # (H, W); same square in every channel
        assert ((yi == 0) == zero).all()
        assert torch.equal(yi[:, ~zero], xi[:, ~zero])  # unchanged elsewhere
        rows, cols = zero.any(1).nonzero()[:, 0], zero.any(0).nonzero()[:, 0]
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert zero[r0:r1, c0:c1].all() and zero.sum() == (r1 - r0) * (c1 - c0)  # a rectangle
        # Side s, or shorter only where clipped by a border.
        assert r1 - r0 == s or (r1 - r0 < s and (r0 == 0 or r1 == h))
        assert c1 - c0 == s or (c1 - c0 < s and (c0 == 0 or c1 == w))
        clipped += int((r1 - r0) * (c1 - c0) < s * s)
        boxes.add((int(r0), int(c0)))
    assert 0 < clipped < len(x) and len(boxes) > 1


def test_augment_device_dtype_and_seed(device):
    x = _batch(device=device)
    torch.manual_seed(123)
    a = augment(x, 4, True, 3)
    torch.manual_seed(123)
    b = augment(x, 4, True, 3)
    assert torch.equal(a, b)
    assert a.dtype == x.dtype and a.device == x.device and a.shape == x.shape


# ---------------------------------------------------------------- data module


def _digits_module(**kwargs):
    args = dict(source=digits, num_classes=10, in_channels=1, image_size=8, download=False)
    return ImageDataModule(**{**args, **kwargs})


def test_datamodule_digits():
    dm = _digits_module(batch_size=32, eval_batch_size=100)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_train == 1437
    x, y = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert x.dtype == torch.float32 and x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert x.min() >= 0 and x.max() <= 1
    val = list(dm.val_dataloader())
    assert sum(len(yb) for _, yb in val) == 360
    assert torch.equal(torch.cat([xb for xb, _ in val]), digits("", False).test_x)


def test_datamodule_uint8_to_unit_float(device):
    dm = _digits_module()
    x = torch.tensor([0, 51, 255], dtype=torch.uint8, device=device)
    out, _ = dm.on_after_batch_transfer((x, torch.zeros(3, device=device)), 0)
    assert out.dtype == torch.float32 and out.device == x.device
    torch.testing.assert_close(out.cpu(), torch.tensor([0.0, 0.2, 1.0]))


def test_datamodule_validation():
    with pytest.raises(ValueError, match="in_channels"):
        _digits_module(in_channels=3).setup("fit")
    with pytest.raises(ValueError, match=r"labels: expected in \[0, 5\)"):
        _digits_module(num_classes=5).setup("fit")
    with pytest.raises(ValueError, match="data.batch_size must be > 0"):
        _digits_module(batch_size=0)
    with pytest.raises(ValueError, match="data.cutout must be >= 0"):
        _digits_module(cutout=-1)


# ---------------------------------------------------------------- batch loader


def _fit_loader(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm.train_dataloader()


def _seeded_batches(*loaders, seed: int = 7) -> list[list]:
    """Each loader's batches of one epoch, each drawn after ``torch.manual_seed(seed)``."""
    out = []
    for loader in loaders:
        torch.manual_seed(seed)
        out.append(list(loader))
    return out


def test_batch_loader_yields_the_batches_of_a_tensor_dataset_loader():
    """Same seed, same batches as the former per-image loader (TensorDataset + collate)."""
    dm = _digits_module(batch_size=100)
    loader = _fit_loader(dm)
    x, y = dm._train.tensors
    old = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100,
                                      shuffle=True, drop_last=True)
    new_batches, old_batches = _seeded_batches(loader, old)
    assert len(new_batches) == len(old_batches) == 1437 // 100
    for (xn, yn), (xo, yo) in zip(new_batches, old_batches, strict=True):
        assert torch.equal(xn, xo) and torch.equal(yn, yo)


def test_batch_loader_covers_each_image_once_and_drops_the_last_partial_batch():
    dm = _digits_module(batch_size=100)
    loader = _fit_loader(dm)
    x = dm._train.tensors[0].flatten(1)
    seen = []
    for xb, yb in loader:
        assert xb.shape == (100, 1, 8, 8) and yb.shape == (100,)
        # each row of the batch is the image whose index the row matches
        seen += [int((x == row).all(1).nonzero()[0]) for row in xb.flatten(1)]
    assert len(seen) == len(set(seen)) == 1400  # 14 full batches; the 37 left are dropped
    torch.manual_seed(1)
    first = next(iter(loader))[1]
    torch.manual_seed(2)
    assert not torch.equal(first, next(iter(loader))[1])  # reshuffled each epoch


def test_batch_loader_reads_whole_batches(monkeypatch):
    """One gather per batch: __getitem__ (one image) is never called while training."""
    from lipexp.data.datamodule import InMemoryImages

    dm = _digits_module(batch_size=64)
    loader = _fit_loader(dm)
    monkeypatch.setattr(InMemoryImages, "__getitem__",
                        lambda self, i: pytest.fail("per-image read"))
    assert sum(len(yb) for _, yb in loader) == 1437 // 64 * 64
    assert sum(len(yb) for _, yb in dm.val_dataloader()) == 360


def test_a_batch_larger_than_the_set_is_kept_whole():
    dm = _digits_module(batch_size=5000)
    (xb, yb), = list(_fit_loader(dm))
    assert len(yb) == 1437


def test_training_batches_come_from_where_the_training_split_lives(device):
    """The batches of a split held on ``device`` (on CUDA by data.on_device=true) are those of
    the split on the CPU, the same seed giving the same batches, gathered on the device."""
    reference = _fit_loader(_digits_module(batch_size=100))
    dm = _digits_module(batch_size=100, on_device=device.type == "cuda")
    loader = _fit_loader(dm)
    assert dm._train.tensors[0].device.type == dm._train.tensors[1].device.type == device.type
    if device.type == "cuda":  # in-process gathers, nothing to pin
        assert loader.num_workers == 0 and not loader.pin_memory
    expected, batches = _seeded_batches(reference, loader)
    assert len(batches) == len(expected) == 1437 // 100
    for (x, y), (xe, ye) in zip(batches, expected, strict=True):
        assert x.device.type == y.device.type == device.type
        assert torch.equal(x.cpu(), xe) and torch.equal(y.cpu(), ye)
        unit, _ = dm.on_after_batch_transfer((x, y), 0)
        assert unit.device.type == device.type and unit.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPU")
def test_on_device_without_gpu_is_refused():
    with pytest.raises(ValueError, match="data.on_device=true"):
        _digits_module(on_device=True)
