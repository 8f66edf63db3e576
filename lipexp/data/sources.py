"""Loaders of whole image data sets as in-memory tensors.

Every loader has the signature ``(data_dir, download) -> ImageArrays``. Images are kept
in their stored dtype (uint8 pixels 0..255 for the torchvision sets, 4x smaller than
float32); the data module converts them to float32 in [0, 1] on the device.
"""

import os
from dataclasses import dataclass

import torch
import torchvision.datasets as tvd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torchvision.datasets.utils import check_integrity, extract_archive


class DataNotFoundError(FileNotFoundError):
    """A data set's files are missing and could not be downloaded."""


class DataCorruptError(ValueError):
    """A data set's files are there but cannot be read: damaged, truncated or not the
    official files (their checksums differ)."""


@dataclass(frozen=True)
class ImageArrays:
    """Train and test splits: x (N, C, H, W), uint8 or float32 in [0, 1]; y int64 (N,)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def digits(data_dir: str, download: bool) -> ImageArrays:
    """scikit-learn's 8x8 digits (1797 images, ships with sklearn; arguments ignored).

    Pixel values 0..16 are scaled to float32 in [0, 1]. The split is fixed (stratified
    80/20, random_state=0) so that every run sees the same test set.
    """
    del data_dir, download  # nothing to download
    bunch = load_digits()
    x = torch.from_numpy(bunch.data).float().div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target).long()
    train_x, test_x, train_y, test_y = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0
    )
    return ImageArrays(train_x, train_y, test_x, test_y)


def mnist(data_dir: str, download: bool) -> ImageArrays:
    """MNIST, (N, 1, 28, 28) uint8, 60000 train / 10000 test."""
    return _torchvision(tvd.MNIST, data_dir, download)


def fashion_mnist(data_dir: str, download: bool) -> ImageArrays:
    """Fashion-MNIST, (N, 1, 28, 28) uint8, 60000 train / 10000 test."""
    return _torchvision(tvd.FashionMNIST, data_dir, download)


def cifar10(data_dir: str, download: bool) -> ImageArrays:
    """CIFAR-10, (N, 3, 32, 32) uint8, 50000 train / 10000 test."""
    return _torchvision(tvd.CIFAR10, data_dir, download)


def cifar100(data_dir: str, download: bool) -> ImageArrays:
    """CIFAR-100 (fine labels), (N, 3, 32, 32) uint8, 50000 train / 10000 test."""
    return _torchvision(tvd.CIFAR100, data_dir, download)


def _torchvision(cls: type, data_dir: str, download: bool) -> ImageArrays:
    """Load both splits of torchvision data set `cls` (MNIST-like or CIFAR-like) as tensors."""
    root = os.fspath(data_dir)
    if issubclass(cls, tvd.MNIST) and not download:
        _extract_mnist_archives(cls, root)
    try:
        # .data/.targets directly: no per-item PIL conversion or transforms.
        splits = [cls(root=root, train=train, download=download) for train in (True, False)]
    except (RuntimeError, OSError, ValueError, AssertionError) as err:
        # Offline, torchvision raises RuntimeError ("Dataset not found or corrupted", or
        # MNIST's "Error downloading ...") or, for CIFAR with download=True, urllib's
        # URLError; a damaged file raises one of these too: say which it is.
        folder, files = _expected_files(cls, root)
        if all(_present(folder, f) for f in files):
            bad = [f for f, md5 in _checksums(cls) if os.path.exists(os.path.join(folder, f))
                   and not check_integrity(os.path.join(folder, f), md5)]
            raise DataCorruptError(
                f"{cls.__name__} files in {folder} are corrupt"
                + (f" (checksum differs from the official file: {', '.join(bad)})" if bad
                   else "") + ": delete them and download again (download=True with network "
                f"access). Original error: {type(err).__name__}: {err}") from err
        raise DataNotFoundError(
            f"{cls.__name__} data not found in {folder} (expected files: {', '.join(files)}). "
            f"Run once with network access and download=True, or place the files there. "
            f"Original error: {type(err).__name__}: {err}"
        ) from err
    arrays = []
    for split in splits:
        x = torch.as_tensor(split.data)
        # MNIST-like: (N, H, W) -> (N, 1, H, W); CIFAR: numpy HWC -> NCHW.
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        arrays += [x, torch.as_tensor(split.targets, dtype=torch.int64)]
    return ImageArrays(*arrays)


def _extract_mnist_archives(cls: type, root: str) -> None:
    """Extract verified `.gz` archives already in `<root>/<Name>/raw`.

    torchvision only extracts inside download(); with download=False it reports the set
    missing although the official archives are there. Extracting local files needs no
    network, so do it here (only archives whose md5 matches torchvision's).
    """
    raw = os.path.join(root, cls.__name__, "raw")
    for filename, md5 in cls.resources:
        archive = os.path.join(raw, filename)
        if os.path.exists(os.path.splitext(archive)[0]) or not os.path.exists(archive):
            continue
        if not check_integrity(archive, md5):
            raise DataCorruptError(f"{archive} is corrupt (its checksum differs from the "
                                   "official file's): delete it and download it again")
        extract_archive(archive, raw)


def _present(folder: str, name: str) -> bool:
    """Whether ``name`` is in ``folder``, or (MNIST's archives) its extracted version."""
    path = os.path.join(folder, name)
    return os.path.exists(path) or (name.endswith(".gz") and os.path.exists(path[:-3]))


def _checksums(cls: type) -> list[tuple[str, str]]:
    """``(file name, md5)`` of the official files of ``cls``, as torchvision lists them."""
    if issubclass(cls, tvd.MNIST):
        return list(cls.resources)
    return [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]


def _expected_files(cls: type, root: str) -> tuple[str, list[str]]:
    """The folder where torchvision looks for `cls`'s files, and their names."""
    if issubclass(cls, tvd.MNIST):
        # The .gz archives (or their extracted versions, without .gz).
        return os.path.join(root, cls.__name__, "raw"), [name for name, _ in cls.resources]
    # CIFAR-like: the unpacked pickled batches and the class-name file.
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return os.path.join(root, cls.base_folder), files
