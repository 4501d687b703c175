"""Batched training augmentation from the flat YAML: one registry of keys, applied on the device.

Every key (``fliplr``, ``flipud``, ``degrees``, ``translate``, ``scale``, ``hsv_h``, ``hsv_s``,
``hsv_v``, ``erasing``, ``mixup``, ``cutmix``) is one entry of :data:`AUGMENTATIONS`: its
validator, its meaning and the function that applies it to a whole batch. A task that wants them
adds them to its keys with :class:`WithAugmentKeys` (the classification task does); a datamodule
builds the pipeline from the config with :func:`batch_augment`. Every key defaults to 0 (off), so
a config without them trains exactly as before (``shift`` alone stays the plain
:class:`~lightrainer.datamodules.memory.RandomShift`).

The pipeline follows the loaders' ``draw``/``apply`` protocol: all the randomness of a *global*
batch is drawn at once (``draw(n, generator) -> (rows, n)`` uniforms) and each rank applies its
columns, so a sample gets the same augmentation on 1 or N devices. Mixing keys (``mixup``,
``cutmix``) blend a sample with a *partner* drawn from the whole training set by the same
uniforms (:meth:`BatchAugment.partner_indices`), which the loader fetches for the samples that
mix: no rank needs another rank's samples. With mixing on, targets become class probabilities
(``(n, num_classes)``; ``F.cross_entropy`` takes them as they are).

Order of the stages (entries of a stage in registration order):

1. ``geometry``: a 3x3 matrix per sample (src -> dst pixel coordinates, pixel centres at
   0..W-1); the matrices are multiplied and the batch is warped once (kornia ``warp_affine``);
   pixels from outside take the data's background (``fill``).
2. ``flip``: ``fn(x, u, value) -> x``, exact pixel flips.
3. ``color``: ``fn(hsv, u, value) -> hsv`` on one RGB -> HSV conversion of the batch (kornia; hue
   in radians [0, 2*pi), saturation and value in [0, 1]); 1-channel images are their own value.
4. ``occlusion``: ``fn(x, u, value) -> x`` in normalised units (erased pixels become 0: the mean).
5. ``mix``: ``fn(image, partner, u, value) -> (image, own_weight)``; its first row is the draw of
   "does this sample mix" (``u[0] < value``).

Registering a new key is one :func:`register_augmentation` call; tests iterate the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from lightrainer.config import Config, ConfigError, at_least
from lightrainer.datamodules.memory import BatchTransform, RandomShift
from lightrainer.errors import MissingDependencyError
from lightrainer.registry import Registry
from lightrainer.task import TaskKey

STAGES = ("geometry", "flip", "color", "occlusion", "mix")
#: Stages that need kornia (the others are plain torch).
KORNIA_STAGES = ("geometry", "color")
#: Uniforms behind one Beta(32, 32) draw: the 32nd smallest of 63 uniforms is Beta(32, 32).
BETA32_ROWS = 63


@dataclass(frozen=True)
class Augmentation:
    """One augmentation key.

    Args:
        stage: one of :data:`STAGES` (what ``fn`` receives and returns; see the module docstring).
        rows: uniforms in [0, 1) it draws per sample.
        fn: the batched function of its stage.
        check: validator of the key's value (raises ConfigError naming the key).
        doc: one-line meaning (``--help``, README).
    """

    stage: str
    rows: int
    fn: Callable[..., Any]
    check: Callable[[str, Any], Any]
    doc: str

    @property
    def task_key(self) -> TaskKey:
        """The YAML key: a float, 0 (off) by default."""
        return TaskKey(float, 0.0, self.check, self.doc)


#: key -> Augmentation. The one place an augmentation key exists.
AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


def register_augmentation(name: str, augmentation: Augmentation, *, override: bool = False) -> Augmentation:
    """Add an augmentation key (it becomes a key of every task declaring :class:`WithAugmentKeys`).

    Raises:
        ValueError: an unknown stage, or a name already registered (without ``override``).
    """
    if augmentation.stage not in STAGES:
        raise ValueError(f"augmentation {name!r}: stage {augmentation.stage!r} is not one of {', '.join(STAGES)}")
    return AUGMENTATIONS.register(name, augmentation, override=override)


class WithAugmentKeys(Mapping[str, TaskKey]):
    """A task's own keys plus one key per registered augmentation, read from the registry when
    asked (so a key registered later is a key of the task too)."""

    def __init__(self, own: Mapping[str, TaskKey]) -> None:
        self._own = dict(own)

    def _all(self) -> dict[str, TaskKey]:
        return {**self._own, **{name: AUGMENTATIONS.get(name).task_key for name in AUGMENTATIONS}}

    def __getitem__(self, key: str) -> TaskKey:
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


# ---------------------------------------------------------------------------------- checks
def kornia() -> Any:
    """The kornia package, or one line naming the feature and the extra."""
    try:
        import kornia as module
    except ImportError:
        raise MissingDependencyError(
            "augmentation keys degrees, translate, scale and hsv_* run on kornia: pip install 'lightrainer[images]'"
        ) from None
    return module


def _range_check(low: float, high: float, high_open: bool = False, needs_kornia: bool = False) -> Callable[[str, Any], Any]:
    bracket = ")" if high_open else "]"

    def check(key: str, value: Any) -> Any:
        at_least(low)(key, value)
        if value > high or (high_open and value == high):
            raise ConfigError(f"{key}: must be in [{low}, {high}{bracket}, got {value!r}")
        if needs_kornia and value > 0:
            kornia()
        return value

    return check


probability = _range_check(0.0, 1.0)


# ---------------------------------------------------------------------------------- geometry
def _eye(u: Tensor) -> Tensor:
    return torch.eye(3, device=u.device, dtype=torch.float32).repeat(u.shape[1], 1, 1)


def resized_crop_matrix(u: Tensor, value: float, h: int, w: int) -> Tensor:
    """``scale``: a random crop of area fraction U[1 - scale, 1] of the image and aspect ratio
    log-uniform in [3/4, 4/3] (torchvision's RandomResizedCrop; Ultralytics' ``scale``), resized
    back to the full image. The crop is clipped to the image."""
    area = (1.0 - value + value * u[0]) * (h * w)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1]
    ratio = log_ratio.exp()
    crop_w = (area * ratio).sqrt().clamp(max=w)
    crop_h = (area / ratio).sqrt().clamp(max=h)
    cx = u[2] * (w - crop_w) + crop_w / 2 - 0.5
    cy = u[3] * (h - crop_h) + crop_h / 2 - 0.5
    m = _eye(u)
    m[:, 0, 0], m[:, 1, 1] = w / crop_w, h / crop_h
    m[:, 0, 2] = (w - 1) / 2 - m[:, 0, 0] * cx
    m[:, 1, 2] = (h - 1) / 2 - m[:, 1, 1] * cy
    return m


def rotation_matrix(u: Tensor, value: float, h: int, w: int) -> Tensor:
    """``degrees``: a rotation about the image centre by U[-degrees, degrees]."""
    angle = torch.deg2rad(value * (2 * u[0] - 1))
    cos, sin = angle.cos(), angle.sin()
    cx, cy = (w - 1) / 2, (h - 1) / 2
    m = _eye(u)
    m[:, 0, 0], m[:, 0, 1], m[:, 0, 2] = cos, -sin, cx - cos * cx + sin * cy
    m[:, 1, 0], m[:, 1, 1], m[:, 1, 2] = sin, cos, cy - sin * cx - cos * cy
    return m


def translation_matrix(u: Tensor, value: float, h: int, w: int) -> Tensor:
    """``translate``: a shift by U[-translate, translate] of the width and of the height."""
    m = _eye(u)
    m[:, 0, 2] = value * (2 * u[0] - 1) * w
    m[:, 1, 2] = value * (2 * u[1] - 1) * h
    return m


# ---------------------------------------------------------------------------------- flips
def flip_lr(x: Tensor, u: Tensor, value: float) -> Tensor:
    """``fliplr``: mirror left-right with probability ``fliplr``."""
    return torch.where((u[0] < value).view(-1, 1, 1, 1), x.flip(-1), x)


def flip_ud(x: Tensor, u: Tensor, value: float) -> Tensor:
    """``flipud``: mirror up-down with probability ``flipud``."""
    return torch.where((u[0] < value).view(-1, 1, 1, 1), x.flip(-2), x)


# ---------------------------------------------------------------------------------- colour
def _gain(u: Tensor, value: float) -> Tensor:
    return (1 + value * (2 * u[0] - 1)).view(-1, 1, 1)


def hue_shift(hsv: Tensor, u: Tensor, value: float) -> Tensor:
    """``hsv_h``: hue moved by U[-hsv_h, hsv_h] of the colour circle."""
    hue = torch.remainder(hsv[:, 0] + 2 * math.pi * value * (2 * u[0] - 1).view(-1, 1, 1), 2 * math.pi)
    return torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)


def saturation_gain(hsv: Tensor, u: Tensor, value: float) -> Tensor:
    """``hsv_s``: saturation times U[1 - hsv_s, 1 + hsv_s] (clipped to [0, 1])."""
    return torch.stack([hsv[:, 0], (hsv[:, 1] * _gain(u, value)).clamp(0, 1), hsv[:, 2]], dim=1)


def value_gain(hsv: Tensor, u: Tensor, value: float) -> Tensor:
    """``hsv_v``: brightness (HSV value) times U[1 - hsv_v, 1 + hsv_v] (clipped to [0, 1])."""
    return torch.stack([hsv[:, 0], hsv[:, 1], (hsv[:, 2] * _gain(u, value)).clamp(0, 1)], dim=1)


# ---------------------------------------------------------------------------------- occlusion
def _spans(size: int, length: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Start and end of a span of ``length`` placed uniformly in [0, size)."""
    start = (u * (size - length + 1)).floor().clamp(max=size - length)
    return start, start + length


def _box_mask(h: int, w: int, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    rows = torch.arange(h, device=y0.device).view(1, h, 1)
    cols = torch.arange(w, device=y0.device).view(1, 1, w)
    inside = ((rows >= y0.view(-1, 1, 1)) & (rows < y1.view(-1, 1, 1))
              & (cols >= x0.view(-1, 1, 1)) & (cols < x1.view(-1, 1, 1)))
    return inside.unsqueeze(1)


def random_erasing(x: Tensor, u: Tensor, value: float) -> Tensor:
    """``erasing``: with probability ``erasing``, a rectangle of 2-33% of the image (aspect ratio
    log-uniform in [0.3, 3.3]) becomes 0, the mean after normalisation (torchvision's
    RandomErasing after Normalize, as Ultralytics applies it)."""
    h, w = x.shape[-2:]
    area = (0.02 + 0.31 * u[1]) * (h * w)
    ratio = (math.log(0.3) + (math.log(3.3) - math.log(0.3)) * u[2]).exp()
    eh = (area * ratio).sqrt().round().clamp(1, h)
    ew = (area / ratio).sqrt().round().clamp(1, w)
    y0, y1 = _spans(h, eh, u[3])
    x0, x1 = _spans(w, ew, u[4])
    mask = _box_mask(h, w, y0, y1, x0, x1) & (u[0] < value).view(-1, 1, 1, 1)
    return x.masked_fill(mask, 0.0)


# ---------------------------------------------------------------------------------- mixing
def mixup(image: Tensor, partner: Tensor, u: Tensor, value: float) -> tuple[Tensor, Tensor]:
    """``mixup``: with probability ``mixup``, ``lam * image + (1 - lam) * partner`` with
    lam ~ Beta(32, 32) (Ultralytics' MixUp); the targets mix with the same weights."""
    active = u[0] < value
    lam = u[1:].kthvalue(BETA32_ROWS // 2 + 1, dim=0).values  # Beta(32, 32) from order statistics
    lam = torch.where(active, lam, torch.ones_like(lam))
    mixed = lam.view(-1, 1, 1, 1) * image + (1 - lam).view(-1, 1, 1, 1) * partner
    return mixed, lam


def cutmix(image: Tensor, partner: Tensor, u: Tensor, value: float) -> tuple[Tensor, Tensor]:
    """``cutmix``: with probability ``cutmix``, a box of the partner (area 1 - lam, lam ~ U(0, 1),
    clipped to the image) replaces that region (Ultralytics' and timm's CutMix); the targets mix
    by the pasted area."""
    h, w = image.shape[-2:]
    side = (1 - u[1]).sqrt()
    cut_h, cut_w = (side * h).round(), (side * w).round()
    cy, cx = (u[2] * h).floor(), (u[3] * w).floor()
    y0, y1 = (cy - cut_h // 2).clamp(0, h), (cy + cut_h // 2).clamp(0, h)
    x0, x1 = (cx - cut_w // 2).clamp(0, w), (cx + cut_w // 2).clamp(0, w)
    active = u[0] < value
    mask = _box_mask(h, w, y0, y1, x0, x1) & active.view(-1, 1, 1, 1)
    pasted = torch.where(active, (y1 - y0) * (x1 - x0) / (h * w), torch.zeros_like(y0))
    return torch.where(mask, partner, image), 1 - pasted


# ---------------------------------------------------------------------------------- registry
for _name, _entry in {
    "scale": Augmentation("geometry", 4, resized_crop_matrix, _range_check(0.0, 1.0, high_open=True, needs_kornia=True),
                          "random resized crop: area fraction U[1 - scale, 1], aspect 3/4-4/3, resized back (0-1)"),
    "degrees": Augmentation("geometry", 1, rotation_matrix, _range_check(0.0, 180.0, needs_kornia=True),
                            "random rotation by U[-degrees, degrees] (0-180)"),
    "translate": Augmentation("geometry", 2, translation_matrix, _range_check(0.0, 1.0, high_open=True, needs_kornia=True),
                              "random shift by U[-translate, translate] of the image size (0-1)"),
    "fliplr": Augmentation("flip", 1, flip_lr, probability, "probability of a left-right flip (0-1)"),
    "flipud": Augmentation("flip", 1, flip_ud, probability, "probability of an up-down flip (0-1)"),
    "hsv_h": Augmentation("color", 1, hue_shift, _range_check(0.0, 0.5, needs_kornia=True),
                          "random hue shift, fraction of the colour circle (0-0.5)"),
    "hsv_s": Augmentation("color", 1, saturation_gain, _range_check(0.0, 1.0, needs_kornia=True),
                          "random saturation gain U[1 - hsv_s, 1 + hsv_s] (0-1)"),
    "hsv_v": Augmentation("color", 1, value_gain, _range_check(0.0, 1.0, needs_kornia=True),
                          "random brightness (HSV value) gain U[1 - hsv_v, 1 + hsv_v] (0-1)"),
    "erasing": Augmentation("occlusion", 5, random_erasing, probability,
                            "probability of erasing a random rectangle (2-33% of the image) to the mean (0-1)"),
    "mixup": Augmentation("mix", 1 + BETA32_ROWS, mixup, probability,
                          "probability of blending with a random training image, lam ~ Beta(32, 32) (0-1)"),
    "cutmix": Augmentation("mix", 4, cutmix, probability,
                           "probability of pasting a box of a random training image, labels by area (0-1)"),
}.items():
    register_augmentation(_name, _entry)


# ---------------------------------------------------------------------------------- pipeline
Fill = Union[float, Sequence[float]]


class BatchAugment:
    """The augmentation of the enabled keys (and ``shift``), in the order of :data:`STAGES`.

    Works on float batches in the data's normalised units (``(x / pixel_scale - mean) / std``):
    colour keys undo the normalisation around their HSV conversion, geometry fills with ``fill``.

    Args:
        values: key -> value of each enabled key (value > 0), keys of :data:`AUGMENTATIONS`.
        shift: ``cfg.shift``: random +-shift pixels first (0: none).
        mean, std: the data's per-channel normalisation.
        fill: background value(s) in normalised units (one, or one per channel).
        num_classes: classes, for the probability targets of the mixing keys.

    Raises:
        ConfigError: a mixing key without class labels; colour keys on images that are neither
            1- nor 3-channel (checked when applied).
    """

    def __init__(
        self,
        values: Mapping[str, float],
        shift: int = 0,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        fill: Fill = 0.0,
        num_classes: Optional[int] = None,
    ) -> None:
        registered = AUGMENTATIONS.names()
        # Stage order, then registration order: the same rows for the same keys however they are listed.
        self.entries = sorted(((AUGMENTATIONS.canonical(k), float(v)) for k, v in values.items() if v),
                              key=lambda kv: (STAGES.index(AUGMENTATIONS.get(kv[0]).stage), registered.index(kv[0])))
        self.shift = int(shift)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.fill = tuple(float(f) for f in fill) if isinstance(fill, Sequence) else (float(fill),)
        self.num_classes = num_classes
        self.mixing = [(k, v) for k, v in self.entries if AUGMENTATIONS.get(k).stage == "mix"]
        self.per_sample = [(k, v) for k, v in self.entries if AUGMENTATIONS.get(k).stage != "mix"]
        if self.mixing and not num_classes:
            raise ConfigError(
                f"{self.mixing[0][0]}: mixing images needs class labels, and this data has none: set it to 0"
            )
        self.sample_rows = (2 if self.shift else 0) + sum(AUGMENTATIONS.get(k).rows for k, _ in self.per_sample)
        mix_rows = 1 + sum(AUGMENTATIONS.get(k).rows for k, _ in self.mixing) if self.mixing else 0
        self.rows = self.sample_rows * (2 if self.mixing else 1) + mix_rows

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}={v:g}" for k, v in self.entries)
        return f"BatchAugment({'shift=%d, ' % self.shift if self.shift else ''}{keys})"

    # --- the loaders' protocol ------------------------------------------------------------
    def draw(self, n: int, generator: torch.Generator) -> Tensor:
        """All uniforms of a global batch of ``n`` samples: a (rows, n) float tensor."""
        return torch.rand(self.rows, n, generator=generator, device=generator.device)

    def apply(self, x: Tensor, params: Tensor) -> Tensor:
        """The per-sample keys (every stage but ``mix``) on images ``x`` with their ``params`` columns."""
        return self._per_sample(x, params[: self.sample_rows])

    def partner_indices(self, params: Tensor, population: int) -> Optional[Tensor]:
        """Dataset indices (of ``population`` training samples) of the partners of the samples that
        mix, in sample order; None when no key mixes."""
        if not self.mixing:
            return None
        return self._partner_index(params, population)[self._mix_mask(params)]

    def apply_batch(self, batch: tuple, params: Tensor, partners: Optional[tuple]) -> tuple:
        """Augment a batch ``(x, y, ...)``: per-sample keys, then mixing with ``partners`` (the
        samples at :meth:`partner_indices`, un-augmented), whose targets become probabilities."""
        x = self.apply(batch[0], params)
        if not self.mixing:
            return (x,) + tuple(batch[1:])
        return self._mix(x, batch[1], params, partners) + tuple(batch[2:])

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(len(x), generator))

    # --- internals ------------------------------------------------------------------------
    def _mix(self, x: Tensor, y: Optional[Tensor], params: Tensor, partners: Optional[tuple]) -> tuple[Tensor, Tensor]:
        """The samples that mix blended with their partners (augmented with the partners' own
        per-sample draws), and the targets as class probabilities."""
        if y is None or y.dim() != 1:
            raise ConfigError(f"{self.mixing[0][0]}: mixing images needs integer class labels")
        chosen = self._mix_mask(params).nonzero().squeeze(1)
        own_weight = torch.ones(len(x), device=x.device)
        partner_y = y
        if len(chosen):
            if partners is None or len(partners[0]) != len(chosen):
                raise RuntimeError("BatchAugment mixes samples: the loader must pass the samples at partner_indices()")
            image = x[chosen]
            partner = self._per_sample(partners[0].to(x.device), params[self.sample_rows: 2 * self.sample_rows, chosen])
            weight = own_weight[chosen]
            row = 2 * self.sample_rows + 1
            for key, value in self.mixing:
                entry = AUGMENTATIONS.get(key)
                image, kept = entry.fn(image, partner, params[row: row + entry.rows, chosen], value)
                weight = weight * kept
                row += entry.rows
            x = x.index_copy(0, chosen, image)
            own_weight = own_weight.index_copy(0, chosen, weight)
            partner_y = y.index_copy(0, chosen, partners[1].to(y.device))
        own = torch.nn.functional.one_hot(y, self.num_classes).float()
        other = torch.nn.functional.one_hot(partner_y, self.num_classes).float()
        return x, own_weight.view(-1, 1) * own + (1 - own_weight).view(-1, 1) * other

    def _partner_index(self, params: Tensor, population: int) -> Tensor:
        return (params[2 * self.sample_rows] * population).long().clamp(max=population - 1)

    def _mix_mask(self, params: Tensor) -> Tensor:
        row = 2 * self.sample_rows + 1
        mask = torch.zeros_like(params[row], dtype=torch.bool)
        for key, value in self.mixing:
            mask |= params[row] < value  # each mixing entry's first row: does this sample mix
            row += AUGMENTATIONS.get(key).rows
        return mask

    def _fill(self, x: Tensor) -> Tensor:
        return torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    def _per_sample(self, x: Tensor, u: Tensor) -> Tensor:
        row = 0
        if self.shift:
            offsets = (u[:2] * (2 * self.shift + 1)).long().clamp(max=2 * self.shift)
            fill = self._fill(x)
            x = RandomShift(self.shift).apply(x - fill, offsets) + fill
            row = 2
        matrices, hsv = [], []
        for key, value in self.per_sample:
            entry = AUGMENTATIONS.get(key)
            rows = u[row: row + entry.rows]
            row += entry.rows
            if entry.stage == "geometry":
                matrices.append(entry.fn(rows, value, x.shape[-2], x.shape[-1]))
                continue
            if matrices:
                x, matrices = self._warp(x, matrices), []
            if entry.stage == "color":
                hsv.append((key, entry, rows, value))
                continue
            if hsv:
                x, hsv = self._color(x, hsv), []
            x = entry.fn(x, rows, value)
        if matrices:
            x = self._warp(x, matrices)
        if hsv:
            x = self._color(x, hsv)
        return x

    def _warp(self, x: Tensor, matrices: list[Tensor]) -> Tensor:
        total = matrices[0]
        for m in matrices[1:]:
            total = m @ total
        fill = self._fill(x)
        warp_affine = kornia().geometry.transform.warp_affine
        warped = warp_affine(x - fill, total[:, :2].to(x.dtype), (x.shape[-2], x.shape[-1]), align_corners=True)
        return warped + fill

    def _color(self, x: Tensor, adjustments: list[tuple[str, Augmentation, Tensor, float]]) -> Tensor:
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ConfigError(f"{adjustments[0][0]}: the hsv_* keys need 1- or 3-channel images, got {channels} channels")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        unit = (x * std + mean).clamp(0, 1)
        color = kornia().color
        if channels == 3:
            hsv = color.rgb_to_hsv(unit)
        else:  # a grey image is its own HSV value: hue and saturation 0
            hsv = torch.cat([torch.zeros_like(unit), torch.zeros_like(unit), unit], dim=1)
        for _, entry, rows, value in adjustments:
            hsv = entry.fn(hsv, rows, value)
        unit = color.hsv_to_rgb(hsv) if channels == 3 else hsv[:, 2:]
        return (unit - mean) / std


# ---------------------------------------------------------------------------------- from the config
def augment_values(cfg: Config) -> dict[str, float]:
    """The augmentation keys the config's task declares, with their values (0: off)."""
    return {name: float(cfg.extra(name)) for name in AUGMENTATIONS if name in cfg.task_specs}


def batch_augment(
    cfg: Config, *, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), fill: Fill = 0.0,
    num_classes: Optional[int] = None,
) -> Optional[BatchTransform]:
    """The training augmentation a config asks for: None (nothing on), the plain
    :class:`RandomShift` (``shift`` alone, as before these keys existed), or a :class:`BatchAugment`.

    Args:
        cfg: the config (``shift`` and the augmentation keys its task declares).
        mean, std: the data's normalisation; fill: its background in normalised units.
        num_classes: classes of the data (None: unlabeled; mixing keys are then refused).
    """
    values = {k: v for k, v in augment_values(cfg).items() if v > 0}
    if not values:
        scalar = fill if not isinstance(fill, Sequence) else fill[0]
        return RandomShift(cfg.shift, fill=scalar) if cfg.shift > 0 else None
    return BatchAugment(values, shift=cfg.shift, mean=mean, std=std, fill=fill, num_classes=num_classes)


__all__ = [
    "AUGMENTATIONS", "Augmentation", "BatchAugment", "STAGES", "WithAugmentKeys", "augment_values", "batch_augment",
    "register_augmentation",
]
