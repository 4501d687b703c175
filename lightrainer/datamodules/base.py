"""The base of every lightrainer datamodule: split, per-device batch, loaders, metadata."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence, Union

import lightning
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightrainer.config import Config, ConfigError
from lightrainer.datamodules.augment import batch_augment
from lightrainer.datamodules.memory import BatchTransform, InMemoryBatchLoader
from lightrainer.datamodules.resumable import EpochRandomSampler, ResumableBatchSampler, ResumableDataLoader

log = logging.getLogger(__name__)

TensorPair = tuple[Tensor, Optional[Tensor]]
SplitData = Union[TensorPair, Dataset]
"""A split is ``(x, y)`` tensors (``y`` None for image-only data) or any map-style Dataset."""


def check_shift(shift: int, images: Any) -> None:
    """``shift`` must move an image by less than its size (``shift: 1000`` on 8x8 digits shifts
    every image out of view).

    Raises:
        ConfigError: a shift as large as the images.
    """
    shape = getattr(images, "shape", None)
    if shift and shape is not None and len(shape) == 4 and shift >= min(shape[2], shape[3]):
        raise ConfigError(
            f"shift: {shift} pixels moves {shape[2]}x{shape[3]} images out of view: "
            f"use less than {min(shape[2], shape[3])} (about a tenth of the side is usual)"
        )


def stratified_split(
    n: int, labels: Optional[Sequence[int] | np.ndarray | Tensor], val_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/val indices, stratified by ``labels`` where they are class labels.

    Args:
        n: number of samples.
        labels: integer class labels of length ``n`` to stratify by, or None (plain seeded split).
        val_split: fraction held out for validation, in (0, 1).
        seed: random seed.

    Returns:
        ``(train_indices, val_indices)``, each sorted.

    Raises:
        ConfigError: the split leaves a side empty or some class too small to stratify.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < val_split < 1:
        raise ConfigError(f"val_split: must be in (0, 1), got {val_split!r}")
    n_val = int(np.ceil(n * val_split))
    if n < 2 or n_val >= n:
        raise ConfigError(f"val_split: {val_split} of {n} samples leaves no training or validation data")
    stratify = None
    if labels is not None:
        stratify = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    try:
        train, val = train_test_split(np.arange(n), test_size=val_split, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise ConfigError(
            f"val_split: cannot stratify {n} samples with val_split={val_split}: {err}. "
            "Use more samples per class, another val_split, or pass an explicit validation set"
        ) from None
    return np.sort(train), np.sort(val)


def is_class_labels(y: Optional[Tensor]) -> bool:
    """True for a 1-D integer tensor (labels a split can stratify by)."""
    return y is not None and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()


class LightrainerDataModule(lightning.LightningDataModule):
    """Datamodule base: subclasses implement :meth:`load` and set the metadata fields.

    Tensor data are served by :class:`InMemoryBatchLoader` (whole batches by indexing, sharded
    across ranks, seeded per epoch); a ``collate_fn`` or Dataset data use a torch DataLoader with
    ``cfg.num_workers`` workers (Lightning adds its DistributedSampler under DDP). The
    per-device batch is ``cfg.batch // world_size``, world size from the attached trainer.

    Attributes:
        num_classes: classes (None for unlabeled data).
        class_names: a name per class.
        input_shape: ``(C, H, W)`` of one input.
        mean, std: per-channel normalisation applied after dividing raw pixels by ``pixel_scale``
            (metadata for export: ``x = (raw / pixel_scale - mean) / std``).
        pixel_scale: raw pixel value range divisor (255 for 8-bit images).
        fill_value: the background value, in normalised units, used by random shifts.

    Args:
        cfg: the training config (batch, seed, val_split, shift, num_workers).
        collate_fn: a custom collate function; forces a torch DataLoader.
        data_on_device: move in-memory tensors once to the trainer's GPU (when it uses one).
    """

    num_classes: Optional[int] = None
    class_names: Optional[list[str]] = None
    input_shape: Optional[tuple[int, ...]] = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pixel_scale: float = 1.0
    fill_value: float = 0.0

    def __init__(self, cfg: Config, collate_fn: Optional[Callable[[list], Any]] = None, data_on_device: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.collate_fn = collate_fn
        self.data_on_device = data_on_device
        self.train_data: Optional[SplitData] = None
        self.val_data: Optional[SplitData] = None
        self._device_cache: dict[str, SplitData] = {}

    # --- what a subclass provides ------------------------------------------------------------
    def load(self) -> tuple[SplitData, SplitData]:
        """Return ``(train, val)`` splits; called once, on every rank, by :meth:`setup`."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def train_transform(self) -> Optional[BatchTransform]:
        """The training-batch augmentation of image tensors: ``cfg.shift`` and the augmentation
        keys of the config's task (:func:`lightrainer.datamodules.augment.batch_augment`)."""
        if isinstance(self.train_data, tuple) and self.train_data[0].dim() == 4:
            return batch_augment(self.cfg, mean=self.mean, std=self.std, fill=self.fill_value,
                                 num_classes=self.num_classes)
        return None

    # --- helpers for subclasses ------------------------------------------------------------
    def split(self, x: Tensor, y: Optional[Tensor]) -> tuple[TensorPair, TensorPair]:
        """Seeded train/val split of tensors by ``cfg.val_split``, stratified for class labels."""
        train, val = stratified_split(len(x), y if is_class_labels(y) else None, self.cfg.val_split, self.cfg.seed)
        train_t, val_t = torch.from_numpy(train), torch.from_numpy(val)
        pick = (lambda idx: None) if y is None else (lambda idx: y[idx])
        return (x[train_t], pick(train_t)), (x[val_t], pick(val_t))

    # --- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits once (every rank holds its own copy)."""
        if self.train_data is None:
            self.train_data, self.val_data = self.load()
            log.info("%s: %d training and %d validation samples", type(self).__name__,
                     len(self._first(self.train_data)), len(self._first(self.val_data)))
            check_shift(self.cfg.shift, self._first(self.train_data))

    def train_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """Shuffled, augmented training batches."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """Validation batches in order, each sample once across ranks."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """The validation split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """The validation split."""
        return self.val_dataloader()

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _first(data: SplitData) -> Any:
        return data[0] if isinstance(data, tuple) else data

    def _distributed(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def batch_per_device(self) -> int:
        """``cfg.batch // world_size`` (at least 1)."""
        _, world_size = self._distributed()
        if self.cfg.batch % world_size:
            log.warning("batch=%d is not divisible by %d devices: each takes %d", self.cfg.batch, world_size,
                        max(self.cfg.batch // world_size, 1))
        return max(self.cfg.batch // world_size, 1)

    def _uses_cuda(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return torch.cuda.is_available()
        return trainer.strategy.root_device.type == "cuda"

    def _target_device(self) -> Optional[torch.device]:
        if not self.data_on_device or self.trainer is None or not self._uses_cuda():
            return None
        return self.trainer.strategy.root_device

    def _tensors(self, stage: str) -> SplitData:
        data = self.train_data if stage == "train" else self.val_data
        device = self._target_device()
        if device is None or not isinstance(data, tuple):
            return data
        if stage not in self._device_cache:  # move once, not every time Lightning asks for a loader
            self._device_cache[stage] = tuple(None if t is None else t.to(device) for t in data)
        return self._device_cache[stage]

    def _loader(self, stage: str, train: bool) -> Union[InMemoryBatchLoader, DataLoader]:
        if self.train_data is None:
            self.setup()
        data = self._tensors(stage)
        batch = self.batch_per_device()
        if isinstance(data, tuple) and self.collate_fn is None:
            rank, world_size = self._distributed()
            return InMemoryBatchLoader(
                data, batch, shuffle=train, seed=self.cfg.seed, rank=rank, world_size=world_size,
                transform=self.train_transform() if train else None, equal_batches=train,
            )
        dataset = TensorDataset(*(t for t in data if t is not None)) if isinstance(data, tuple) else data
        workers = self.cfg.num_workers
        options = dict(
            num_workers=workers,
            collate_fn=self.collate_fn,
            pin_memory=self._uses_cuda(),
            persistent_workers=workers > 0,
            # A generator of its own: making an iterator never draws from the global one, which a
            # resumed run restores from its checkpoint.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        if not train:
            return DataLoader(dataset, batch_size=batch, **options)
        # Epoch-seeded order and a stateful loader: a run stopped mid-epoch resumes exactly.
        batches = ResumableBatchSampler(EpochRandomSampler(dataset, seed=self.cfg.seed), batch, drop_last=False)
        return ResumableDataLoader(dataset, batch_sampler=batches, **options)
