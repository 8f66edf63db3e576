"""Lightning data module over in-memory image tensors, with on-device augmentation."""

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from lipexp.data.augment import augment
from lipexp.data.sources import ImageArrays
from lipexp.errors import require
from lipexp.resume import ResumableDataLoader


def to_unit(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Images as floats of ``dtype`` in [0, 1]: uint8 pixels are divided by 255 (in
    ``dtype``), floating-point pixels (already in [0, 1]) only converted; ``x`` itself when
    it is already of ``dtype``."""
    return x.to(dtype).div_(255.0) if x.dtype == torch.uint8 else x.to(dtype)


class InMemoryImages(Dataset):
    """Images ``x`` (N, C, H, W) and labels ``y`` (N,) held as two tensors, read a whole
    batch at a time.

    The DataLoader's sampler and batch sampler work as for any map-style data set (so the
    same seed gives the same first epoch as a ``TensorDataset``, and Lightning's distributed
    sampler still applies), but a batch of indices is fetched with ``__getitems__`` as one
    ``x[idx]``, ``y[idx]`` gather instead of B single reads collated image by image.
    ``collate_fn=keep_batch`` then passes the batch on unchanged.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        require(len(x) == len(y), f"{len(x)} images but {len(y)} labels")
        self.tensors = (x, y)

    def __len__(self) -> int:
        return len(self.tensors[1])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tensors[0][i], self.tensors[1][i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.tensors
        idx = torch.as_tensor(indices, dtype=torch.int64).to(y.device, non_blocking=True)
        return x.index_select(0, idx), y.index_select(0, idx)

    def to(self, device: torch.device) -> "InMemoryImages":
        self.tensors = tuple(t.to(device) for t in self.tensors)
        return self


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate_fn for ``InMemoryImages``: the batch is already whole."""
    return batch


class ImageDataModule(pl.LightningDataModule):
    """Whole image data set held in memory as tensors.

    Loaders yield x in its stored dtype (uint8 for the torchvision sets: 4x less memory
    and host-to-device traffic than float32) and y int64; `on_after_batch_transfer`
    converts x to float32 in [0, 1] on the device and, while training, augments it.
    Validation and test both use the test split. Batches are gathered whole from the
    tensors (``InMemoryImages``); in-memory sets need no worker processes (a gather of a
    batch costs microseconds; workers would only add copies): keep ``data.num_workers=0``,
    the default, which exact mid-epoch resume also needs (lipexp.resume).

    ``on_device``: the training split is moved to the training device (the trainer's root
    device, a GPU) in ``setup``, so a batch is gathered there and nothing crosses the bus
    (CIFAR's 50000 uint8 images are 150 MB). Refused without a GPU.
    """

    def __init__(
        self,
        source: Callable[[str, bool], ImageArrays],
        num_classes: int,
        in_channels: int,
        image_size: int,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_workers: int = 0,
        crop_padding: int = 0,
        flip: bool = False,
        cutout: int = 0,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        for name, value in [("num_classes", num_classes), ("in_channels", in_channels),
                            ("image_size", image_size), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size)]:
            require(value > 0, f"data.{name} must be > 0, got {value}")
        for name, value in [("num_workers", num_workers), ("crop_padding", crop_padding),
                            ("cutout", cutout)]:
            require(value >= 0, f"data.{name} must be >= 0, got {value}")
        require(not on_device or torch.cuda.is_available(),
                "data.on_device=true keeps the training set on the GPU, but no CUDA device is "
                "available: set data.on_device=false")
        self.source = source
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.crop_padding = crop_padding
        self.flip = flip
        self.cutout = cutout
        self.on_device = on_device
        self._arrays: ImageArrays | None = None
        self._train: InMemoryImages | None = None
        self._test: InMemoryImages | None = None

    def prepare_data(self) -> None:
        # Runs once per node (rank 0): download here; the arrays are kept for setup().
        if self.download:
            self._arrays = self.source(self.data_dir, True)

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._load()
        if self.on_device and stage in (None, "fit") and not self._train.tensors[0].is_cuda:
            # training only: an evaluation alone needs no copy of the training split
            device = (self.trainer.strategy.root_device if self.trainer is not None
                      else torch.device("cuda", torch.cuda.current_device()))
            require(device.type == "cuda", f"data.on_device=true needs training on a GPU, "
                    f"the trainer's device is {device}")
            self._train.to(device)

    def _load(self) -> None:
        """The two splits from the source, checked against the declared shape and classes."""
        # Other ranks (or download=False) load files that prepare_data already fetched.
        arrays = self._arrays if self._arrays is not None else self.source(self.data_dir, False)
        self._arrays = None  # the datasets below hold the tensors
        expected = (self.in_channels, self.image_size, self.image_size)
        for split, x, y in [
            ("train", arrays.train_x, arrays.train_y),
            ("test", arrays.test_x, arrays.test_y),
        ]:
            if tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"{split} images: expected shape (N, {', '.join(map(str, expected))}) "
                    f"from in_channels/image_size, found {tuple(x.shape)}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{split} labels: expected in [0, {self.num_classes}), "
                    f"found [{int(y.min())}, {int(y.max())}]"
                )
        self._train = InMemoryImages(arrays.train_x, arrays.train_y)
        self._test = InMemoryImages(arrays.test_x, arrays.test_y)

    @property
    def num_train(self) -> int:
        """Number of training examples (after setup)."""
        if self._train is None:
            raise RuntimeError("call setup() first")
        return len(self._train)

    @property
    def num_test(self) -> int:
        """Number of test examples (after setup)."""
        if self._test is None:
            raise RuntimeError("call setup() first")
        return len(self._test)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole test split (x in its stored dtype, y), in its fixed order (after setup)."""
        if self._test is None:
            raise RuntimeError("call setup() first")
        return self._test.tensors[0], self._test.tensors[1]

    def _loader(self, dataset: InMemoryImages, batch_size: int, train: bool,
                sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
        on_gpu = dataset.tensors[0].is_cuda
        loader = ResumableDataLoader if train else DataLoader  # exact mid-epoch resume
        return loader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            # Drop the last, smaller batch (uneven batch statistics), unless it is the only one.
            drop_last=train and len(dataset) > batch_size,
            collate_fn=keep_batch,  # __getitems__ returns the whole batch
            num_workers=0 if on_gpu else self.num_workers,
            persistent_workers=self.num_workers > 0 and not on_gpu,
            pin_memory=torch.cuda.is_available() and not on_gpu,
            # evaluation loaders draw their (unused) worker seed from a generator of their
            # own, not the global one: validating leaves training's random numbers as they
            # are, so a run resumed after an epoch's last step continues exactly
            generator=None if train else torch.Generator(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        """The test split. Under DDP each image goes to exactly one rank: Lightning's default
        DistributedSampler would pad the split with repeated images and bias the error."""
        world = self.trainer.world_size if self.trainer is not None else 1
        sampler = None if world == 1 else UnrepeatedDistributedSampler(
            self._test, num_replicas=world, rank=self.trainer.global_rank, shuffle=False)
        return self._loader(self._test, self.eval_batch_size, train=False, sampler=sampler)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Convert x to float32 in [0, 1] on the device; augment during training only."""
        x, y = batch
        x = to_unit(x)
        if self.trainer is not None and self.trainer.training:
            x = augment(x, self.crop_padding, self.flip, self.cutout)
        return x, y
