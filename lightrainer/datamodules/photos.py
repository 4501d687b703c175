"""Patches of the photographs that ship inside installed packages (no download).

Training: random square crops, flipped left-right at random (optionally with their colour channels
permuted), from ``skimage.data`` and matplotlib photos. Validation:
a fixed grid of non-overlapping crops of photos *not* used for training (by default scikit-learn's
two sample images, ``china`` and ``flower``), so the validation PSNR measures generalisation to
unseen images. Pixels are float32 in [0, 1]; batches are 1-tuples ``(x,)`` (image-only data, like
a DataLoader over a one-tensor TensorDataset), so ``batch[0]`` is the image batch everywhere.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightrainer.config import Config, ConfigError
from lightrainer.datamodules.base import LightrainerDataModule, SplitData, stratified_split
from lightrainer.datamodules.memory import _mix_seed

log = logging.getLogger(__name__)

def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        try:
            import skimage.data
        except ImportError:
            raise ImportError('photo patches need scikit-image: pip install "lightrainer[vqvae]"') from None
        image = getattr(skimage.data, name)()
        return image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity)

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook
        import matplotlib.image

        return matplotlib.image.imread(matplotlib.cbook.get_sample_data(name))

    return load


#: Photographs that ship inside installed packages and load offline: name -> loader.
#: (skimage's ``cat`` is ``chelsea``; its other images are synthetic or need a download.)
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    # colour
    "astronaut": _skimage("astronaut"),
    "chelsea": _skimage("chelsea"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "motorcycle": _skimage("stereo_motorcycle"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "grace_hopper": _matplotlib("grace_hopper.jpg"),
    "china": _sklearn("china"),
    "flower": _sklearn("flower"),
    # grayscale
    "camera": _skimage("camera"),
    "coins": _skimage("coins"),
    "moon": _skimage("moon"),
    "brick": _skimage("brick"),
    "grass": _skimage("grass"),
    "gravel": _skimage("gravel"),
    "clock": _skimage("clock"),
}
DEFAULT_TRAIN_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry",
    "retina", "grace_hopper", "camera", "coins", "moon", "brick", "grass", "gravel", "clock",
)  # fmt: skip
#: scikit-learn's two sample images: never trained on by default.
DEFAULT_VAL_PHOTOS = ("china", "flower")


def load_photo(name: str, channels: int = 3, max_side: Optional[int] = 512) -> Tensor:
    """One packaged photo as a uint8 tensor (channels, H, W).

    Args:
        name: a key of :data:`PHOTOS`.
        channels: 3 (grayscale photos are repeated) or 1 (colour photos are converted to luma).
        max_side: downscale (anti-aliased) so the longer side is at most this; None keeps the size.

    Raises:
        ConfigError: an unknown name or a bad channel count.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels: must be 1 or 3, got {channels!r}")
    if name not in PHOTOS:
        raise ConfigError(f"photo {name!r} is not packaged offline; choose from {', '.join(PHOTOS)}")
    image = np.asarray(PHOTOS[name]())
    if image.ndim == 2:
        image = image[..., None]
    image = image[..., :3]
    if max_side is not None and max(image.shape[:2]) > max_side:
        from skimage.transform import resize

        scale = max_side / max(image.shape[:2])
        size = (round(image.shape[0] * scale), round(image.shape[1] * scale))
        image = (resize(image, size, anti_aliasing=True, preserve_range=True) + 0.5).clip(0, 255).astype(np.uint8)
    if channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 1 and image.shape[2] == 3:
        luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        image = (luma + 0.5).clip(0, 255).astype(np.uint8)[..., None]
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def grid_patches(image: Tensor, patch: int, stride: Optional[int] = None) -> Tensor:
    """All ``patch`` x ``patch`` crops of ``image`` (C, H, W) on a grid of step ``stride`` (default: patch)."""
    stride = stride or patch
    tiles = image.unfold(1, patch, stride).unfold(2, patch, stride)  # C, nh, nw, P, P
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, image.shape[0], patch, patch)


class RandomPatchLoader:
    """Batches of random crops (and left-right flips) of photos held in memory.

    Every crop position of every photo is equally likely. Crops come from a generator seeded by
    ``(seed, epoch, rank)``: runs are reproducible and each rank draws different crops; every rank
    yields ``batches_per_epoch`` batches, so DDP ranks stay in step. The epoch advances at each new
    iteration; :meth:`state_dict` carries it for resuming.

    Args:
        photos: uint8 tensors (C, H, W), each at least ``patch`` on both sides, on one device.
        patch: crop size.
        batch_size: crops per batch (per device).
        batches_per_epoch: batches one iteration yields.
        seed: base seed.
        rank: this process's rank.
        hflip: flip half of the crops left-right.
        channel_shuffle: permute the colour channels of each crop at random (widens the colours
            seen in training, so colours absent from the training photos still reconstruct).
    """

    def __init__(
        self,
        photos: Sequence[Tensor],
        patch: int,
        batch_size: int,
        batches_per_epoch: int,
        seed: int = 0,
        rank: int = 0,
        hflip: bool = True,
        channel_shuffle: bool = False,
    ) -> None:
        small = [tuple(p.shape[1:]) for p in photos if min(p.shape[1:]) < patch]
        if small:
            raise ConfigError(f"patch_size: {patch} is larger than photos of size {small}; use a smaller patch_size")
        self.patch = patch
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.hflip = hflip
        self.channel_shuffle = channel_shuffle
        self.epoch = 0
        height = max(p.shape[1] for p in photos)
        width = max(p.shape[2] for p in photos)
        # One padded stack, so a whole batch is one gather.
        self.stack = torch.zeros(len(photos), photos[0].shape[0], height, width, dtype=torch.uint8, device=photos[0].device)
        for i, p in enumerate(photos):
            self.stack[i, :, : p.shape[1], : p.shape[2]] = p
        self.max_top = torch.tensor([p.shape[1] - patch for p in photos])
        self.max_left = torch.tensor([p.shape[2] - patch for p in photos])
        positions = (self.max_top + 1) * (self.max_left + 1)
        self.weights = positions.double() / positions.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration serves."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[Tensor]]:
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator[tuple[Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, self.rank))
        for _ in range(self.batches_per_epoch):
            yield (self.sample(generator),)

    def sample(self, generator: torch.Generator) -> Tensor:
        """One batch (B, C, patch, patch) of float crops in [0, 1]."""
        n, p = self.batch_size, self.patch
        image = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        top = (torch.rand(n, generator=generator, dtype=torch.float64) * (self.max_top[image] + 1)).long()
        left = (torch.rand(n, generator=generator, dtype=torch.float64) * (self.max_left[image] + 1)).long()
        flip = torch.rand(n, generator=generator) < 0.5 if self.hflip else torch.zeros(n, dtype=torch.bool)
        offsets = torch.arange(p)
        rows = top[:, None] + offsets  # (n, p)
        cols = left[:, None] + torch.where(flip[:, None], offsets.flip(0), offsets)  # flipped = read backwards
        device = self.stack.device
        image, rows, cols = image.to(device), rows.to(device), cols.to(device)
        # Advanced indices around a slice put the indexed dims first: (n, p, p, C).
        crops = self.stack[image[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        if self.channel_shuffle:
            order = torch.rand(n, crops.shape[-1], generator=generator).argsort(dim=1).to(device)
            crops = crops.gather(3, order[:, None, None, :].expand_as(crops))
        return crops.permute(0, 3, 1, 2).float().div_(255.0)


class PhotoPatchesDataModule(LightrainerDataModule):
    """Random crops of packaged photos for training; fixed crops of other photos for validation.

    Batches are ``(x,)`` with x float32 (B, C, patch_size, patch_size) in [0, 1]. ``cfg.val_split``
    does not apply: validation photos are separate images. ``cfg.test_split`` holds that fraction
    of the validation photos' crops out (seeded) as the test split: photos never trained on, crops
    never validated on.

    Args:
        cfg: the config: ``batch``, ``seed`` and the keys ``patch_size`` and ``patches_per_epoch``
            (declared by the VQ-VAE task).
        patch_size: crop size (default: ``cfg`` key ``patch_size``).
        patches_per_epoch: training crops per epoch over all devices (default: ``cfg`` key).
        train_photos: names of :data:`PHOTOS` to train on.
        val_photos: names to validate on; must not overlap ``train_photos``.
        channels: 3 (RGB) or 1 (grayscale).
        max_side: photos are downscaled so their longer side is at most this (None: keep).
        val_stride: step of the validation crop grid (default: ``patch_size``, no overlap).
        channel_shuffle: permute each training crop's colour channels at random (default: ``cfg``
            key ``channel_shuffle``).
        data_on_device: keep the photos on the trainer's GPU when it uses one.

    Raises:
        ConfigError: unknown photo names, overlapping train/val photos, a bad size or channel count.
    """

    pixel_scale = 255.0

    def __init__(
        self,
        cfg: Config,
        patch_size: Optional[int] = None,
        patches_per_epoch: Optional[int] = None,
        train_photos: Sequence[str] = DEFAULT_TRAIN_PHOTOS,
        val_photos: Sequence[str] = DEFAULT_VAL_PHOTOS,
        channels: int = 3,
        max_side: Optional[int] = 512,
        val_stride: Optional[int] = None,
        channel_shuffle: Optional[bool] = None,
        data_on_device: bool = True,
    ) -> None:
        super().__init__(cfg, data_on_device=data_on_device)
        self.channel_shuffle = bool(cfg.extra("channel_shuffle") if channel_shuffle is None else channel_shuffle)
        self.patch_size = int(patch_size if patch_size is not None else cfg.extra("patch_size"))
        self.patches_per_epoch = int(patches_per_epoch if patches_per_epoch is not None else cfg.extra("patches_per_epoch"))
        if self.patch_size < 1:
            raise ConfigError(f"patch_size: must be >= 1, got {self.patch_size}")
        if self.patches_per_epoch < 1:
            raise ConfigError(f"patches_per_epoch: must be >= 1, got {self.patches_per_epoch}")
        if channels not in (1, 3):
            raise ConfigError(f"channels: must be 1 or 3, got {channels!r}")
        for key, names in (("train_photos", train_photos), ("val_photos", val_photos)):
            unknown = [n for n in names if n not in PHOTOS]
            if unknown or not names:
                raise ConfigError(f"{key}: {list(names)!r} must be a non-empty list of {', '.join(PHOTOS)}")
        overlap = sorted(set(train_photos) & set(val_photos))
        if overlap:
            raise ConfigError(f"train_photos and val_photos share {overlap}: validation must use other photos")
        self.train_photos = tuple(train_photos)
        self.val_photos = tuple(val_photos)
        self.channels = channels
        self.max_side = max_side
        self.val_stride = val_stride or self.patch_size
        self.input_shape = (channels, self.patch_size, self.patch_size)
        self.mean = (0.0,) * channels
        self.std = (1.0,) * channels
        self._photos: Optional[list[Tensor]] = None

    def load(self) -> tuple[SplitData, SplitData]:
        """Training photos (kept whole, crops drawn per batch) and the fixed validation crops."""
        self._photos = [load_photo(n, self.channels, self.max_side) for n in self.train_photos]
        val = [grid_patches(load_photo(n, self.channels, self.max_side), self.patch_size, self.val_stride)
               for n in self.val_photos]
        val_x = torch.cat(val).float().div_(255.0)
        # The base class counts "samples": one crop position per training pixel grid cell.
        train_x = torch.cat([grid_patches(p, self.patch_size) for p in self._photos])
        if not self.cfg.test_split:
            return (train_x, None), (val_x, None)
        keep, held = stratified_split(len(val_x), None, self.cfg.test_split, self.cfg.seed)
        self.sample_ids.update(val=keep, test=held)
        return (train_x, None), (val_x[torch.from_numpy(keep)], None), (val_x[torch.from_numpy(held)], None)

    def train_dataloader(self) -> RandomPatchLoader:
        """``patches_per_epoch / batch`` batches of fresh random crops each epoch (per device)."""
        if self._photos is None:
            self.setup()
        rank, world_size = self._distributed()
        batch = self.batch_per_device()
        batches = max(round(self.patches_per_epoch / (batch * world_size)), 1)
        device = self._target_device()
        photos = [p.to(device) for p in self._photos] if device is not None else self._photos
        return RandomPatchLoader(
            photos, self.patch_size, batch, batches, seed=self.cfg.seed, rank=rank, channel_shuffle=self.channel_shuffle
        )
