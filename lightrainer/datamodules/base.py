"""The base of every lightrainer datamodule: split, per-device batch, loaders, metadata."""

from __future__ import annotations

import logging
from pathlib import Path
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
from lightrainer.datamodules.stream import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    check_image_files,
    choose_decoder,
    decode_all,
    image_files,
    to_float,
)

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


def _as_numpy(labels: Optional[Sequence[int] | np.ndarray | Tensor]) -> Optional[np.ndarray]:
    """Labels to stratify by, as a numpy array (None: no stratification)."""
    if labels is None:
        return None
    return labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)


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
    stratify = _as_numpy(labels)
    try:
        train, val = train_test_split(np.arange(n), test_size=val_split, random_state=seed, stratify=stratify)
    except ValueError as err:
        raise ConfigError(
            f"val_split: cannot stratify {n} samples with val_split={val_split}: {err}. "
            "Use more samples per class, another val_split, or pass an explicit validation set"
        ) from None
    return np.sort(train), np.sort(val)


def split_indices(
    n: int, labels: Optional[Sequence[int] | np.ndarray | Tensor], val_split: float, test_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/val/test indices, stratified by ``labels`` where they are class labels.

    The test samples (``test_split`` of all) are drawn first, then the validation samples
    (``val_split`` of all) from the rest. With ``test_split`` 0 the train/val split is exactly
    :func:`stratified_split`'s and the test part is empty.

    Args:
        n: number of samples.
        labels: integer class labels of length ``n`` to stratify by, or None.
        val_split: fraction of all samples held out for validation, in (0, 1).
        test_split: fraction of all samples held out for testing, in [0, 1); 0 = none.
        seed: random seed.

    Returns:
        ``(train, val, test)`` indices, each sorted, pairwise disjoint.

    Raises:
        ConfigError: a split that leaves a part empty or a class too small to stratify.
    """
    from sklearn.model_selection import train_test_split

    if not test_split:
        train, val = stratified_split(n, labels, val_split, seed)
        return train, val, np.zeros(0, dtype=np.int64)
    if not 0 < test_split < 1 or val_split + test_split >= 1:
        raise ConfigError(f"test_split: must be in [0, 1) with val_split + test_split < 1, got {test_split!r} "
                          f"(val_split {val_split!r})")
    n_test, n_val = int(np.ceil(n * test_split)), int(np.ceil(n * val_split))
    if n_test + n_val >= n:
        raise ConfigError(f"test_split: {test_split} and val_split: {val_split} of {n} samples leave no training data")
    stratify = _as_numpy(labels)
    try:
        rest, test = train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=stratify)
        train, val = train_test_split(rest, test_size=n_val, random_state=seed,
                                      stratify=None if stratify is None else stratify[rest])
    except ValueError as err:
        raise ConfigError(
            f"test_split: cannot stratify {n} samples into test_split={test_split} and val_split={val_split}: "
            f"{err}. Use more samples per class or other fractions"
        ) from None
    return np.sort(train), np.sort(val), np.sort(test)


def is_class_labels(y: Optional[Tensor]) -> bool:
    """True for a 1-D integer tensor (labels a split can stratify by)."""
    return y is not None and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()


def once_shuffled(n: int, seed: int) -> list[int]:
    """The one seeded order in which validation and test samples are served, every epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class LightrainerDataModule(lightning.LightningDataModule):
    """Datamodule base: subclasses implement :meth:`load` and set the metadata fields.

    Tensor data are served by :class:`InMemoryBatchLoader` (whole batches by indexing, sharded
    across ranks, seeded per epoch); a ``collate_fn`` or Dataset data use a torch DataLoader with
    ``cfg.num_workers`` workers (Lightning adds its DistributedSampler under DDP). The
    per-device batch is ``cfg.batch // world_size``, world size from the attached trainer.

    Validation and test batches come in one seeded random order, the same every epoch, so the
    first batches (``limit_val_batches``) are a fair sample of every class. ``cfg.test_split`` > 0
    holds a stratified test split out of training and validation (:meth:`split`);
    ``test_dataloader`` serves it (without one, the validation split, with a warning), and
    ``predict_dataloader`` serves it or the images of :meth:`predict_on`.

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
        #: The held-out test split (None: no test split).
        self.test_data: Optional[SplitData] = None
        #: The images of :meth:`predict_on` (None: predict on the test split).
        self.predict_data: Optional[SplitData] = None
        #: What names each sample of a split in predictions: its index in the whole data set
        #: (:meth:`split`) or its file (image folders); a split without one: its position.
        self.sample_ids: dict[str, Sequence[Any]] = {}
        self._device_cache: dict[str, SplitData] = {}

    # --- what a subclass provides ------------------------------------------------------------
    def load(self) -> tuple[SplitData, ...]:
        """Return ``(train, val)`` or ``(train, val, test)`` splits; called once, on every rank, by
        :meth:`setup` (:meth:`split` keeps the test part of ``cfg.test_split`` itself)."""
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
        """Seeded train/val split of tensors by ``cfg.val_split``, stratified for class labels
        (:func:`split_indices`); with ``cfg.test_split`` the test part goes to ``test_data``.
        Each sample keeps its index in ``x`` as its id (``sample_ids``)."""
        labels = y if is_class_labels(y) else None
        parts = split_indices(len(x), labels, self.cfg.val_split, self.cfg.test_split, self.cfg.seed)
        pairs = []
        for stage, index in zip(("train", "val", "test"), parts):
            rows = torch.from_numpy(index)
            pairs.append((x[rows], None if y is None else y[rows]))
            self.sample_ids[stage] = index
        self.test_data = pairs[2] if len(parts[2]) else None
        return pairs[0], pairs[1]

    def predict_on(self, folder: Union[str, Path]) -> int:
        """Predict on the images under ``folder`` (any depth) instead of the test split: each is
        decoded, resized (shorter side) and centre-cropped to ``input_shape``, and normalised as
        this datamodule's images (``(x / 255 - mean) / std``). Unreadable files are skipped, with
        a warning naming them.

        Returns:
            The number of images.

        Raises:
            ConfigError: no such folder, no images in it, or data that are not images.
        """
        shape = tuple(self.input_shape or ())
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ConfigError(f"--source: {type(self).__name__} serves inputs of shape {shape or None}, not "
                              "1- or 3-channel images: predict on its test split (leave out --source)")
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise ConfigError(f"--source: image folder not found: {folder}")
        files = image_files(root, recursive=True)
        if not files:
            raise ConfigError(f"--source: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        scan = check_image_files([str(p) for p in files], skip_bad=True, num_workers=self.cfg.num_workers)
        if not scan.good:
            raise ConfigError(f"--source: none of the {len(files)} image files under {folder} can be read")
        size = (int(shape[1]), int(shape[2]))
        decoders = [choose_decoder(fmt, w, h, size) for fmt, (w, h) in zip(scan.formats, scan.sizes)]
        good = ImageFiles([files[i] for i in scan.good], None, size, shape[0], decoders)
        pixels, _ = decode_all(good, self.cfg.num_workers)
        self.predict_data = (to_float(pixels, self.mean, self.std, 255.0), None)
        self.sample_ids["predict"] = [str(f) for f in good.files]
        self._device_cache.pop("predict", None)
        log.info("predicting on %d images from %s", len(good), folder)
        return len(good)

    def scored_split(self) -> str:
        """The split ``lightrainer test`` scores: "test", or "val" when there is no test split."""
        if self.train_data is None:
            self.setup()
        return "test" if self.test_data is not None else "val"

    # --- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load the splits once (every rank holds its own copy)."""
        if self.train_data is None:
            splits = self.load()
            self.train_data, self.val_data = splits[0], splits[1]
            if len(splits) > 2 and splits[2] is not None:
                self.test_data = splits[2]
            test = f" and {len(self._first(self.test_data))} test" if self.test_data is not None else ""
            log.info("%s: %d training, %d validation%s samples", type(self).__name__,
                     len(self._first(self.train_data)), len(self._first(self.val_data)), test)
            check_shift(self.cfg.shift, self._first(self.train_data))

    def train_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """Shuffled, augmented training batches."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """Validation batches in one seeded order, each sample once across ranks."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """The test split; without one (``test_split: 0``), the validation split, with a warning."""
        return self._loader(self._scored_split_announced(), train=False)

    def predict_dataloader(self) -> Union[InMemoryBatchLoader, DataLoader]:
        """The images of :meth:`predict_on`, else the test split (else the validation split)."""
        return self._loader("predict" if self.predict_data is not None else self._scored_split_announced(), train=False)

    # --- internals -------------------------------------------------------------------------
    @staticmethod
    def _first(data: SplitData) -> Any:
        return data[0] if isinstance(data, tuple) else data

    def _scored_split_announced(self) -> str:
        split = self.scored_split()
        if split == "val":
            log.warning("no test split (test_split: 0): scoring the VALIDATION split, which also chose the best "
                        "epoch, so its numbers are optimistic; set test_split (e.g. 0.1) and retrain for a held-out score")
        return split

    def split_data(self, stage: str) -> Optional[SplitData]:
        """The data of ``stage``: "train", "val", "test" or "predict" (None: there is none)."""
        return {"train": self.train_data, "val": self.val_data, "test": self.test_data,
                "predict": self.predict_data}[stage]

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
        data = self.split_data(stage)
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
                data, batch, shuffle=stage != "predict", seed=self.cfg.seed, rank=rank, world_size=world_size,
                transform=self.train_transform() if train else None, equal_batches=train, reshuffle=train,
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
            # Validation and test: one seeded order (a fair first few batches); predict: in order.
            order = None if stage == "predict" else once_shuffled(len(dataset), self.cfg.seed)
            return DataLoader(dataset, batch_size=batch, sampler=order, **options)
        # Epoch-seeded order and a stateful loader: a run stopped mid-epoch resumes exactly.
        batches = ResumableBatchSampler(EpochRandomSampler(dataset, seed=self.cfg.seed), batch, drop_last=False)
        return ResumableDataLoader(dataset, batch_sampler=batches, **options)
