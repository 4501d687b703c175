"""A datamodule over a user's own tensors or numpy arrays."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightrainer.config import Config, ConfigError
from lightrainer.datamodules.base import LightrainerDataModule, SplitData, TensorPair, is_class_labels, stratified_split

log = logging.getLogger(__name__)


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}")


def as_images(name: str, x: Any) -> Tensor:
    """Inputs as a float tensor: features N,F or images N,C,H,W (N,H,W gains C=1; uint8 is
    scaled to [0, 1]).

    Raises:
        ValueError: not 2-D, 3-D or 4-D, or empty.
    """
    x = _as_tensor(name, x)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() not in (2, 4):
        raise ValueError(
            f"{name}: inputs must be features N,F or images N,C,H,W or N,H,W, got shape {tuple(x.shape)}"
        )
    if len(x) == 0:
        raise ValueError(f"{name}: no samples (first dimension is 0)")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def as_targets(name: str, y: Any, n: int) -> Optional[Tensor]:
    """Targets as a tensor with ``n`` rows (integer labels become int64), or None.

    Raises:
        ValueError: the number of targets differs from the number of images.
    """
    if y is None:
        return None
    y = _as_tensor(name, y)
    if y.dim() == 0 or len(y) != n:
        raise ValueError(f"{name}: {0 if y.dim() == 0 else len(y)} targets for {n} images; x and y must have the same length")
    return y.long() if is_class_labels(y) else y


def _pair(name: str, data: Any) -> tuple[Any, Any]:
    if isinstance(data, (Tensor, np.ndarray)):
        return data, None
    if isinstance(data, Sequence) and not isinstance(data, str) and len(data) in (1, 2):
        return data[0], (data[1] if len(data) == 2 else None)
    raise TypeError(f"{name}: expected (x, y), (x,) or x (tensors or numpy arrays), got {type(data).__name__}")


class ArrayDataModule(LightrainerDataModule):
    """Train on tensors or numpy arrays held in memory.

    Args:
        cfg: the training config.
        train: ``(x, y)`` with images N,C,H,W or N,H,W and N targets, or ``(x,)``/``x`` for
            image-only data (autoencoders). uint8 images are scaled to [0, 1].
        val: the same for validation, or None to split ``train`` by ``cfg.val_split`` (stratified
            for integer labels, seeded by ``cfg.seed``).
        test: the same for ``lightrainer test``, or None: ``cfg.test_split`` of ``train`` (none
            when it is 0).
        num_classes: classes (default: ``max(y) + 1`` for integer labels).
        class_names: a name per class.
        collate_fn: optional custom collate (forces a torch DataLoader).
        data_on_device: keep the tensors on the trainer's GPU when it uses one.

    Raises:
        ValueError: wrong image dimensions, x/y length mismatch, train and val that disagree.
        TypeError: something other than tensors or arrays.
    """

    def __init__(
        self,
        cfg: Config,
        train: Any,
        val: Any = None,
        test: Any = None,
        num_classes: Optional[int] = None,
        class_names: Optional[list[str]] = None,
        collate_fn: Optional[Callable[[list], Any]] = None,
        data_on_device: bool = True,
    ) -> None:
        super().__init__(cfg, collate_fn=collate_fn, data_on_device=data_on_device)
        self._train = self._validated("train", train)
        self._val = None if val is None else self._validated("val", val)
        self._test = None if test is None else self._validated("test", test)
        x, y = self._train
        for name, part in (("val", self._val), ("test", self._test)):
            if part is None:
                continue
            px, py = part
            if px.shape[1:] != x.shape[1:]:
                raise ValueError(f"{name}: image shape {tuple(px.shape[1:])} differs from train's {tuple(x.shape[1:])}")
            if (py is None) != (y is None):
                raise ValueError(f"{name}: give targets for both train and {name}, or for neither")
        self.input_shape = tuple(x.shape[1:])
        if num_classes is None and is_class_labels(y):
            num_classes = int(y.max()) + 1
        self.num_classes = num_classes
        self.class_names = class_names or ([str(i) for i in range(num_classes)] if num_classes else None)

    @staticmethod
    def _validated(name: str, data: Any) -> TensorPair:
        x, y = _pair(name, data)
        x = as_images(f"{name} x", x)
        return x, as_targets(f"{name} y", y, len(x))

    def load(self) -> tuple[SplitData, ...]:
        """The given splits, or splits of ``train`` (``cfg.val_split``, ``cfg.test_split``)."""
        if self._val is None:
            train, val = self.split(*self._train)
            if self._test is not None:
                if self.cfg.test_split:
                    raise ConfigError(f"test_split: {self.cfg.test_split} and an explicit test set both name a "
                                      "test split: set test_split: 0, or leave test out")
                self.sample_ids.pop("test", None)
                return train, val, self._test
            return train, val
        train, test = self._train, self._test
        if test is None and self.cfg.test_split:
            x, y = train
            keep, held = stratified_split(len(x), y if is_class_labels(y) else None, self.cfg.test_split, self.cfg.seed)
            rows, held_rows = torch.from_numpy(keep), torch.from_numpy(held)
            train = (x[rows], None if y is None else y[rows])
            test = (x[held_rows], None if y is None else y[held_rows])
            self.sample_ids.update(train=keep, test=held)
        return train, self._val, test
