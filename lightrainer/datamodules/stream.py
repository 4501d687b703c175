"""Images streamed from files: decoded in DataLoader workers, uint8 until they reach the device.

One decode function serves the streaming loader and the in-memory path of
:class:`~lightrainer.datamodules.ImageFolderDataModule`, so both see the same pixels: decode,
resize the shorter side to the target (antialiased bilinear, on uint8), centre-crop. The decoder
is chosen per file by measurement on this machine (``benchmarks/image_decode.py``): torchvision's
(libjpeg-turbo/libpng straight into a tensor, about 2x Pillow on small JPEGs) unless a JPEG is at
least twice the target size in both sides, where Pillow's ``draft`` decodes it already scaled down
by the DCT (faster than decoding it whole); Pillow for formats torchvision does not read. Both
decoders give identical pixels for a JPEG decoded at full size.

:class:`StreamBatchLoader` serves the same order, sharding and per-global-batch augmentation as
:class:`~lightrainer.datamodules.memory.InMemoryBatchLoader` (it is one, over sample indices):
workers decode the files of each batch (``num_workers``, persistent, pinned memory on a GPU),
the batch goes to the device as uint8 and becomes float and normalised there, then augmented.
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightrainer.config import ConfigError
from lightrainer.datamodules.memory import BatchTransform, InMemoryBatchLoader, global_batch_params
from lightrainer.errors import MissingDependencyError

log = logging.getLogger(__name__)

#: Decoders, chosen per file by :func:`choose_decoder`.
TORCHVISION, PIL_DRAFT, PIL = 0, 1, 2
#: Formats torchvision's ``decode_image`` reads.
TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")
#: Below this many files, scanning and decoding stay in this process (starting workers costs more).
PARALLEL_MIN_FILES = 1000
#: Bytes at the end of a file searched for the format's end marker.
_TAIL_BYTES = 1024
#: Pixels an image may have (width x height): Pillow's own default limit, about 89 million
#: (a 9459 x 9459 image). A 20000 x 20000 PNG of a few KB would need 1.6 GB to decode.
MAX_IMAGE_PIXELS = 89_478_485
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
#: The file name endings read as images.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def image_files(folder: Path, recursive: bool) -> list[Path]:
    """The image files (by :data:`IMAGE_EXTENSIONS`) in ``folder`` (or under it), sorted."""
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _pil() -> Any:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise MissingDependencyError("image folders are read with Pillow: pip install 'lightrainer[images]'") from None
    return Image, ImageOps


def _torchvision() -> Any:
    try:
        import torchvision.io
        import torchvision.transforms.v2.functional
    except ImportError:
        raise MissingDependencyError("image folders are decoded with torchvision: pip install 'lightrainer[images]'") from None
    return torchvision


# ---------------------------------------------------------------------------------- checking files
class BadImage(Exception):
    """A file that is not a readable image; the message names it and says why."""


def scan_image(path: str) -> tuple[str, int, int]:
    """(format, width, height) of an image file, from its header and its end.

    Catches what breaks a decode later: not an image, an empty file, an unknown format, a JPEG or
    PNG cut short (no end marker in its last kilobyte), and an image larger than
    :data:`MAX_IMAGE_PIXELS` (a decompression bomb: a few KB that decode to GBs), without decoding
    the pixels.

    Raises:
        BadImage: the file cannot be used, with the reason.
    """
    Image, _ = _pil()
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises above twice it; the limit here is ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt, (width, height) = image.format or "", image.size
    except Image.DecompressionBombError as err:
        raise BadImage(f"{path}: too large to decode ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"{path}: not a readable image ({err})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImage(f"{path}: {width}x{height} pixels, more than {MAX_IMAGE_PIXELS} (a decompression bomb?)")
    marker = _END_MARKERS.get(fmt)
    if marker is not None:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
            if marker not in f.read():
                raise BadImage(f"{path}: the {fmt} file is truncated (no end marker)")
    if width < 1 or height < 1:
        raise BadImage(f"{path}: the image has no pixels ({width}x{height})")
    return fmt, width, height


class _ScanFiles(Dataset):
    """Scans files in DataLoader workers: index -> (format, width, height) or the error message."""

    def __init__(self, files: np.ndarray) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, int, int] | str:
        try:
            return scan_image(str(self.files[i]))
        except BadImage as err:
            return str(err)


@dataclass
class ScanResult:
    """What :func:`scan_images` found: the usable files (in order), their format and size, the bad ones."""

    good: list[int]
    formats: list[str]
    sizes: list[tuple[int, int]]
    bad: list[str]


def scan_images(files: Sequence[str], num_workers: int = 0) -> ScanResult:
    """Check every file's header and end (in ``num_workers`` processes where there are many)."""
    dataset = _ScanFiles(np.asarray([str(f) for f in files]))
    workers = num_workers if len(files) >= PARALLEL_MIN_FILES else 0
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, collate_fn=list)
    result = ScanResult([], [], [], [])
    index = 0
    for chunk in loader:
        for item in chunk:
            if isinstance(item, str):
                result.bad.append(item)
            else:
                result.good.append(index)
                result.formats.append(item[0])
                result.sizes.append((item[1], item[2]))
            index += 1
    return result


# ---------------------------------------------------------------------------------- decoding
def choose_decoder(fmt: str, width: int, height: int, size: tuple[int, int]) -> int:
    """The decoder of a file: Pillow's draft for a JPEG at least twice the target in both sides,
    torchvision for the formats it reads, Pillow for the others."""
    if fmt == "JPEG" and width >= 2 * size[1] and height >= 2 * size[0]:
        return PIL_DRAFT
    return TORCHVISION if fmt in TORCHVISION_FORMATS else PIL


def resize_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """A uint8 (C, h, w) image with its shorter side resized to the target (antialiased bilinear)
    and centre-cropped to ``size`` = (height, width)."""
    height, width = size
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
        if (new_h, new_w) != (h, w):
            x = _torchvision().transforms.v2.functional.resize(x, [new_h, new_w], antialias=True)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        x = x[..., top:top + height, left:left + width]
    return x.contiguous()


def decode_image(path: str, size: tuple[int, int], channels: int, decoder: int = TORCHVISION) -> Tensor:
    """Decode an image file to a uint8 (channels, height, width) tensor (see :func:`resize_crop`).

    EXIF orientation is applied. Raises whatever the decoder raises on a broken file.
    """
    if decoder == TORCHVISION:
        torchvision = _torchvision()
        mode = torchvision.io.ImageReadMode.GRAY if channels == 1 else torchvision.io.ImageReadMode.RGB
        x = torchvision.io.decode_image(path, mode=mode, apply_exif_orientation=True)
        if x.dtype != torch.uint8:  # 16-bit PNG
            x = (x.to(torch.float32) / 257).round().to(torch.uint8)
    else:
        Image, ImageOps = _pil()
        with Image.open(path) as image:
            if decoder == PIL_DRAFT:
                image.draft("L" if channels == 1 else "RGB", (size[1], size[0]))
            image = ImageOps.exif_transpose(image).convert("L" if channels == 1 else "RGB")
            x = torch.from_numpy(np.array(image, dtype=np.uint8))
        x = x.unsqueeze(0) if channels == 1 else x.permute(2, 0, 1)
    return resize_crop(x, size)


def to_float(x: Tensor, mean: Sequence[float], std: Sequence[float], scale: float = 255.0) -> Tensor:
    """uint8 pixels -> ``(x / scale - mean) / std`` in float32 (where ``x`` lives: on the device)."""
    x = x.float().div_(scale)
    shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - mean_t) / std_t


class ImageFiles(Dataset):
    """Image files as uint8 tensors: index -> ``(image, label)`` (``(image,)`` without labels).

    The paths live in one numpy array (no per-path Python objects to copy into each worker).

    Args:
        files: the image paths.
        targets: a class index per file, or None.
        size: (height, width) of every image.
        channels: 1 or 3.
        decoders: the decoder of each file (:func:`choose_decoder`; default torchvision).
    """

    def __init__(self, files: Sequence[str], targets: Optional[Sequence[int]], size: tuple[int, int], channels: int,
                 decoders: Optional[Sequence[int]] = None) -> None:
        self.files = np.asarray([str(f) for f in files])
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.size = (int(size[0]), int(size[1]))
        self.channels = channels
        self.decoders = np.zeros(len(self.files), np.int8) if decoders is None else np.asarray(decoders, np.int8)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        """The files at ``indices`` (a split)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFiles(self.files[indices], None if self.targets is None else self.targets[indices], self.size,
                          self.channels, self.decoders[indices])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        path = str(self.files[i])
        try:
            x = decode_image(path, self.size, self.channels, int(self.decoders[i]))
        except Exception as err:  # noqa: BLE001 - a file broken in a way the scan did not see
            # Never a crash mid-epoch: a blank image stands in, and the log names the file.
            log.warning("cannot decode %s (%s): a blank image stands in for it", path, err)
            x = torch.zeros(self.channels, *self.size, dtype=torch.uint8)
        return (x,) if self.targets is None else (x, torch.tensor(self.targets[i]))


def decode_all(files: ImageFiles, num_workers: int = 0, batch_size: int = 256) -> tuple[Tensor, Optional[Tensor]]:
    """Every image of ``files`` as one uint8 (N, C, H, W) tensor (and the labels), decoded in
    ``num_workers`` processes (for :data:`PARALLEL_MIN_FILES` files or more)."""
    workers = num_workers if len(files) >= PARALLEL_MIN_FILES else 0
    batches = list(DataLoader(files, batch_size=batch_size, num_workers=workers))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]) if files.targets is not None else None
    return x, y


# ---------------------------------------------------------------------------------- the loader
class _IndexBatches:
    """The DataLoader's batch sampler: this rank's sample indices of each batch the loader serves
    next (an epoch, or what is left of a resumed one), followed by the partners a mixing transform
    asks for."""

    def __init__(self, loader: StreamBatchLoader) -> None:
        # A weak reference: no cycle loader -> DataLoader -> sampler -> loader, so a dropped loader
        # shuts its workers down at once (collected as a cycle, each worker waited 5 s).
        self.loader = weakref.ref(loader)
        self.epoch = 0
        self.ranges: list[tuple[int, int]] = list(loader._ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[list[int]]:
        # The loader is looked up per batch, never held across a yield (no cycle while suspended).
        order = self.loader().sampler.permutation(self.epoch)
        for start, end in self.ranges:
            yield order[start:end].tolist() + self.loader()._partner_rows(self.epoch, start, end)


class StreamBatchLoader(InMemoryBatchLoader):
    """Batches decoded from files by DataLoader workers, in the order and sharding of
    :class:`InMemoryBatchLoader` (see :mod:`lightrainer.datamodules.memory`), moved to ``device``
    as uint8 and made float and normalised there, then augmented (training).

    Iterating yields ``(x, y)`` (``(x,)`` without labels) like the in-memory loader, so a task,
    PTQ calibration, export and the plots read it the same way.

    Args:
        files: the split's files.
        batch_size: the per-device batch.
        mean, std: normalisation after dividing by 255.
        shuffle, seed, rank, world_size, equal_batches, transform, reshuffle: as :class:`InMemoryBatchLoader`.
        device: where batches go (None: stay on the CPU).
        num_workers: decoding processes (0: in this process); kept alive between epochs.
    """

    def __init__(
        self,
        files: ImageFiles,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        equal_batches: bool = True,
        transform: Optional[BatchTransform] = None,
        device: Optional[torch.device] = None,
        num_workers: int = 0,
        reshuffle: bool = True,
    ) -> None:
        super().__init__(torch.arange(len(files)), batch_size, shuffle=shuffle, seed=seed, rank=rank,
                         world_size=world_size, transform=transform, equal_batches=equal_batches,
                         reshuffle=reshuffle)
        self.files = files
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._index_batches = _IndexBatches(self)
        pin = self.device.type == "cuda"
        self._loader = DataLoader(files, batch_sampler=self._index_batches, num_workers=num_workers, pin_memory=pin,
                                  persistent_workers=num_workers > 0)
        self._partners: tuple[Tensor, ...] = ()

    def _partner_rows(self, epoch: int, start: int, end: int) -> list[int]:
        """Dataset indices of the partners a mixing transform wants for this batch (drawn as
        :meth:`_augment` will draw them)."""
        if not hasattr(self.transform, "partner_indices"):
            return []
        global_batch = self.batch_size * self.world_size
        index, first = divmod(start, global_batch)
        size = min(global_batch, self.sampler.n - index * global_batch)
        params = global_batch_params(self.transform, self.sampler.seed, epoch, index, size, self.device)
        wanted = self.transform.partner_indices(params[..., first:first + (end - start)], self.sampler.n)
        return [] if wanted is None else wanted.tolist()

    def _to_device(self, t: Tensor) -> Tensor:
        t = t.to(self.device, non_blocking=True)
        return to_float(t, self.mean, self.std) if t.dtype == torch.uint8 else t

    def _epoch_batches(self) -> Iterator[tuple[Tensor, ...]]:
        epoch, ranges = self._begin_epoch()  # the whole epoch, or the rest of a resumed one
        self._index_batches.epoch, self._index_batches.ranges = epoch, ranges
        for (start, end), batch in zip(ranges, self._loader):
            n = end - start
            batch = tuple(self._to_device(t) for t in batch)
            own, self._partners = tuple(t[:n] for t in batch), tuple(t[n:] for t in batch)
            yield own if self.transform is None else self._augment(own, epoch, start, end)

    def _fetch(self, rows: Tensor) -> tuple[Tensor, ...]:
        # The partners were decoded with the batch (the batch sampler asked for them).
        if len(self._partners[0]) != len(rows):
            raise RuntimeError(f"StreamBatchLoader: {len(self._partners[0])} partners decoded, {len(rows)} wanted")
        return self._partners


def check_image_files(files: Sequence[str], skip_bad: bool, num_workers: int = 0) -> ScanResult:
    """Scan ``files`` before training: bad ones are refused by name, or skipped and counted.

    Raises:
        ConfigError: bad files and ``skip_bad`` False (names up to 5 of them and how to skip them).
    """
    result = scan_images(files, num_workers)
    if result.bad and not skip_bad:
        shown = "; ".join(result.bad[:5]) + (f"; and {len(result.bad) - 5} more" if len(result.bad) > 5 else "")
        raise ConfigError(
            f"root: {len(result.bad)} of {len(files)} image files cannot be read: {shown}. Remove or replace them, "
            "or pass skip_bad_images=True (data: init_args: skip_bad_images: True) to train without them"
        )
    if result.bad:
        log.warning("skipped %d unreadable image file(s) of %d (skip_bad_images): %s", len(result.bad), len(files),
                    "; ".join(result.bad[:5]) + (" ..." if len(result.bad) > 5 else ""))
    return result


__all__ = [
    "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "BadImage", "ImageFiles", "image_files", "ScanResult", "StreamBatchLoader", "check_image_files", "choose_decoder", "decode_all",
    "decode_image", "resize_crop", "scan_image", "scan_images", "to_float",
]
