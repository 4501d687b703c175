"""A datamodule over a folder of the user's own images: held in memory when it fits, else streamed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from lightrainer.config import Config, ConfigError
from lightrainer.errors import closest_hint
from lightrainer.datamodules.augment import batch_augment
from lightrainer.datamodules.base import LightrainerDataModule, SplitData, split_indices
from lightrainer.datamodules.memory import BatchTransform, InMemoryBatchLoader
from lightrainer.datamodules.stream import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    StreamBatchLoader,
    check_image_files,
    choose_decoder,
    decode_all,
    image_files,
    to_float,
)

log = logging.getLogger(__name__)

class ImageFolderDataModule(LightrainerDataModule):
    """Images from ``root/<class>/*.png`` (labeled) or any images under ``root`` (unlabeled).

    Every image is decoded (:func:`lightrainer.datamodules.stream.decode_image`: ``channels``
    channels, shorter side resized to ``image_size``, centre-cropped) and normalised as
    ``(x / 255 - mean) / std``. When the decoded set fits ``max_memory_gb`` as float32 it is
    decoded once (in ``cfg.num_workers`` processes) and held in memory; otherwise, or always with
    ``stream=True``, it is streamed: workers decode each batch and it stays uint8 until it reaches
    the device (:class:`~lightrainer.datamodules.stream.StreamBatchLoader`). Both give the same
    batches for the same seed. Classes are the sorted subfolder names. The ``cfg.val_split``
    (and ``cfg.test_split``) split is stratified by class and seeded by ``cfg.seed``; a separate
    ``test_root`` folder of the same layout is the test split instead. Training batches get ``shift`` and
    the task's augmentation keys (:mod:`lightrainer.datamodules.augment`), on the device.

    Every file's header and end are checked before training: an unreadable or truncated file is
    refused by name, or skipped and counted in the log with ``skip_bad_images=True``.

    Args:
        cfg: the training config.
        root: the image folder.
        image_size: output size, an int (square) or ``(height, width)``.
        labels: one subfolder per class (True) or unlabeled images anywhere under ``root`` (False).
        channels: 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation after scaling to [0, 1] (default 0 and 1; with a
            pretrained backbone, its own, usually ImageNet's).
        max_memory_gb: the most float pixels to hold in memory; a larger set is streamed.
        collate_fn: optional custom collate (forces a torch DataLoader over the in-memory tensors).
        data_on_device: keep in-memory tensors on the trainer's GPU when it uses one.
        stream: True: always stream; False: never (refuse a set above ``max_memory_gb``); None: by size.
        skip_bad_images: skip unreadable files (counted in the log) instead of refusing them.
        test_root: a folder laid out as ``root`` (the same class names) held out as the test split
            (then ``test_split`` must be 0); None: the test split is ``test_split`` of ``root``.

    Raises:
        ConfigError: a missing folder, no images (or no class folders), a bad size or channel count,
            a test folder with a class the training folder lacks.
    """

    pixel_scale = 255.0

    def __init__(
        self,
        cfg: Config,
        root: Union[str, Path],
        image_size: Union[int, Sequence[int]] = 28,
        labels: bool = True,
        channels: int = 3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        max_memory_gb: float = 4.0,
        collate_fn: Optional[Callable[[list], Any]] = None,
        data_on_device: bool = True,
        stream: Optional[bool] = None,
        skip_bad_images: bool = False,
        test_root: Optional[Union[str, Path]] = None,
    ) -> None:
        super().__init__(cfg, collate_fn=collate_fn, data_on_device=data_on_device)
        # A string (plain data): the run's record keeps it, so `export --weights` rebuilds the data.
        self.root = str(Path(root).expanduser())
        self.test_root = None if test_root is None else str(Path(test_root).expanduser())
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(int(s) < 1 for s in size):
            raise ConfigError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
        if channels not in (1, 3):
            raise ConfigError(f"channels: must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        self.image_size = (int(size[0]), int(size[1]))
        self.labels = labels
        self.channels = channels
        self.mean = tuple(mean) if mean is not None else (0.0,) * channels
        self.std = tuple(std) if std is not None else (1.0,) * channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise ConfigError(f"mean/std: need {channels} values each (one per channel), got {self.mean} and {self.std}")
        self.max_memory_gb = max_memory_gb
        self.stream = stream
        self.skip_bad_images = skip_bad_images
        self._normalization_given = mean is not None or std is not None
        self.input_shape = (channels, *self.image_size)
        self.files, self.targets = self._index()
        if labels:
            self.num_classes = len(self.class_names)
        self.fill_value = float(-self.mean[0] / self.std[0])

    @property
    def black(self) -> tuple[float, ...]:
        """Black in normalised units, per channel (the background of shifts and warps)."""
        return tuple(-m / s for m, s in zip(self.mean, self.std))

    def adopt_normalization(self, mean: Sequence[float], std: Sequence[float]) -> bool:
        """Normalise as a pretrained network expects, unless ``mean``/``std`` were given.

        Called by a task's ``default_net`` before the data is loaded; values for 3 channels are
        averaged for grayscale images.

        Returns:
            Whether the normalisation changed.
        """
        if self._normalization_given or self.train_data is not None:
            return False
        if len(mean) != self.channels:
            mean, std = (sum(mean) / len(mean),) * self.channels, (sum(std) / len(std),) * self.channels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.fill_value = float(-self.mean[0] / self.std[0])
        log.info("%s: the pretrained network's normalisation, mean %s std %s", type(self).__name__,
                 [round(m, 4) for m in self.mean], [round(s, 4) for s in self.std])
        return True

    def _index(self) -> tuple[list[Path], Optional[list[int]]]:
        """The image files and their class indices; sets ``class_names`` for labeled folders."""
        root = Path(self.root)
        if not root.is_dir():
            raise ConfigError(f"root: image folder not found: {self.root}")
        if not self.labels:
            files = image_files(root, recursive=True)
            if not files:
                raise ConfigError(f"root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
            return files, None
        files, targets, names = [], [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            images = image_files(folder, recursive=True)
            if images:
                targets += [len(names)] * len(images)
                names.append(folder.name)
                files += images
        if not files:
            raise ConfigError(
                f"root: no class subfolders with images in {self.root}: expected root/<class>/*.png, "
                "or pass labels=False for a folder of unlabeled images"
            )
        self.class_names = names
        return files, targets

    def streams(self, n: int) -> bool:
        """Whether ``n`` images are streamed (``stream``, else: more float pixels than ``max_memory_gb``).

        Raises:
            ConfigError: ``stream=False`` and the set does not fit ``max_memory_gb``.
        """
        gigabytes = n * self.channels * self.image_size[0] * self.image_size[1] * 4 / 1e9
        if self.stream is not None:
            if not self.stream and gigabytes > self.max_memory_gb:
                raise ConfigError(
                    f"root: {n} images of {self.input_shape} need {gigabytes:.1f} GB in memory, above "
                    f"max_memory_gb={self.max_memory_gb}: stream them (stream=True), use a smaller image_size "
                    "or raise max_memory_gb"
                )
            return bool(self.stream)
        if gigabytes > self.max_memory_gb:
            log.info("%s: %d images need %.1f GB as float, above max_memory_gb=%g: streaming them from disk",
                     type(self).__name__, n, gigabytes, self.max_memory_gb)
            return True
        return False

    def load(self) -> tuple[SplitData, ...]:
        """Check every file, split, and decode everything (in memory) or index the splits (streamed)."""
        files = self._checked(self.files, self.targets)
        log.info("%s: %d images from %s", type(self).__name__, len(files), self.root)
        test_files = self._test_files()
        test_split = 0.0 if test_files is not None else self.cfg.test_split
        index = split_indices(len(files), files.targets, self.cfg.val_split, test_split, self.cfg.seed)
        parts = [files.subset(i) for i in index]
        if test_files is not None:
            parts[2] = test_files
        parts = [p if len(p) else None for p in parts]
        for stage, part in zip(("train", "val", "test"), parts):
            if part is not None:
                self.sample_ids[stage] = part.files.tolist()
        if self.streams(sum(len(p) for p in parts if p is not None)):
            if self.collate_fn is not None:
                raise ConfigError("collate_fn: a streamed image folder makes its own batches; hold the folder in "
                                  "memory (stream=False, raise max_memory_gb) to use a collate_fn")
            return tuple(parts)
        return tuple(None if p is None else self._decoded(p) for p in parts)

    def _checked(self, paths: Sequence[Path], targets: Optional[Sequence[int]]) -> ImageFiles:
        """The readable ones of ``paths`` (see ``skip_bad_images``), each with its decoder."""
        scan = check_image_files([str(p) for p in paths], self.skip_bad_images, self.cfg.num_workers)
        decoders = [choose_decoder(fmt, w, h, self.image_size) for fmt, (w, h) in zip(scan.formats, scan.sizes)]
        return ImageFiles([paths[i] for i in scan.good], None if targets is None else [targets[i] for i in scan.good],
                          self.image_size, self.channels, decoders)

    def _decoded(self, files: ImageFiles) -> tuple[Any, Any]:
        pixels, y = decode_all(files, self.cfg.num_workers)
        return to_float(pixels, self.mean, self.std, self.pixel_scale), y

    def _test_files(self) -> Optional[ImageFiles]:
        """The images of ``test_root`` (None without one), labeled by the training class names.

        Raises:
            ConfigError: with ``test_split`` too, no such folder, no images, an unknown class.
        """
        if self.test_root is None:
            return None
        if self.cfg.test_split:
            raise ConfigError(f"test_split: {self.cfg.test_split} and test_root both name a test split: "
                              "set test_split: 0 to test on test_root, or drop test_root")
        root = Path(self.test_root)
        if not root.is_dir():
            raise ConfigError(f"test_root: image folder not found: {self.test_root}")
        files, targets = image_files(root, recursive=True), None
        if self.labels:
            files, targets = [], []
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                images = image_files(folder, recursive=True)
                if images and folder.name not in self.class_names:
                    raise ConfigError(f"test_root: class folder {folder.name!r} is not one of the training classes "
                                      f"{', '.join(self.class_names)}" + closest_hint(folder.name, self.class_names))
                files += images
                targets += [self.class_names.index(folder.name)] * len(images)
        if not files:
            raise ConfigError(f"test_root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.test_root}"
                              + (" in class subfolders" if self.labels else ""))
        return self._checked(files, targets)

    def train_transform(self) -> Optional[BatchTransform]:
        """``shift`` and the task's augmentation keys, with black (per channel) as the background."""
        return batch_augment(self.cfg, mean=self.mean, std=self.std, fill=self.black, num_classes=self.num_classes)

    def _loader(self, stage: str, train: bool) -> Union[StreamBatchLoader, InMemoryBatchLoader, Any]:
        """The batches of ``stage``: streamed from the files, or from memory."""
        streamed = self._stream(stage)
        return streamed if streamed is not None else super()._loader(stage, train)

    def _stream(self, stage: str) -> Optional[StreamBatchLoader]:
        """The streaming loader of ``stage`` when the data is streamed (else None)."""
        if self.train_data is None:
            self.setup()
        files = self.split_data(stage)
        if not isinstance(files, ImageFiles):
            return None
        train = stage == "train"
        rank, world_size = self._distributed()
        device = self.trainer.strategy.root_device if self.trainer is not None and self._uses_cuda() else None
        return StreamBatchLoader(
            files, self.batch_per_device(), mean=self.mean, std=self.std, shuffle=stage != "predict", seed=self.cfg.seed,
            rank=rank, world_size=world_size, equal_batches=train, transform=self.train_transform() if train else None,
            device=device, num_workers=self.cfg.num_workers, reshuffle=train,
        )
