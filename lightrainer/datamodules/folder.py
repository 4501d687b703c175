"""A datamodule over a folder of the user's own images, decoded once and held in memory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from lightrainer.config import Config, ConfigError
from lightrainer.datamodules.base import LightrainerDataModule, SplitData

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class ImageFolderDataModule(LightrainerDataModule):
    """Images from ``root/<class>/*.png`` (labeled) or any images under ``root`` (unlabeled).

    Every image is decoded with Pillow, converted to ``channels`` channels, resized to
    ``image_size`` and kept in memory as float tensors ``(x - mean) / std`` with x in [0, 1], so
    batches come from the in-memory batch loader. Classes are the sorted subfolder names. The
    ``cfg.val_split`` split is stratified by class and seeded by ``cfg.seed``.

    Args:
        cfg: the training config.
        root: the image folder.
        image_size: output size, an int (square) or ``(height, width)``.
        labels: one subfolder per class (True) or unlabeled images anywhere under ``root`` (False).
        channels: 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation after scaling to [0, 1].
        max_memory_gb: refuse to decode more than this many GB of float pixels.
        collate_fn: optional custom collate (forces a torch DataLoader).
        data_on_device: keep the tensors on the trainer's GPU when it uses one.

    Raises:
        ConfigError: a missing folder, no images (or no class folders), a bad size or channel count.
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
    ) -> None:
        super().__init__(cfg, collate_fn=collate_fn, data_on_device=data_on_device)
        self.root = Path(root).expanduser()
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
        self.input_shape = (channels, *self.image_size)
        self.files, self.targets = self._index()
        if labels:
            self.num_classes = len(self.class_names)
        self.fill_value = float(-self.mean[0] / self.std[0])

    def _index(self) -> tuple[list[Path], Optional[list[int]]]:
        """The image files and their class indices; sets ``class_names`` for labeled folders."""
        if not self.root.is_dir():
            raise ConfigError(f"root: image folder not found: {self.root}")
        if not self.labels:
            files = _image_files(self.root, recursive=True)
            if not files:
                raise ConfigError(f"root: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
            return files, None
        files, targets, names = [], [], []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = _image_files(folder, recursive=True)
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

    def _decode(self, path: Path) -> np.ndarray:
        from PIL import Image

        height, width = self.image_size
        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                return np.asarray(image, dtype=np.uint8)
        except OSError as err:
            raise ConfigError(f"root: cannot decode image {path}: {err}") from None

    def load(self) -> tuple[SplitData, SplitData]:
        """Decode every image, normalise, split."""
        n = len(self.files)
        gigabytes = n * self.channels * self.image_size[0] * self.image_size[1] * 4 / 1e9
        if gigabytes > self.max_memory_gb:
            raise ConfigError(
                f"root: {n} images of {self.input_shape} need {gigabytes:.1f} GB in memory, above "
                f"max_memory_gb={self.max_memory_gb}: use a smaller image_size or raise max_memory_gb"
            )
        pixels = np.stack([self._decode(p) for p in self.files])
        x = torch.from_numpy(pixels).float().div_(self.pixel_scale)
        x = x.unsqueeze(1) if self.channels == 1 else x.permute(0, 3, 1, 2).contiguous()
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        x = (x - mean) / std
        y = None if self.targets is None else torch.tensor(self.targets, dtype=torch.long)
        log.info("%s: %d images from %s", type(self).__name__, n, self.root)
        return self.split(x, y)
