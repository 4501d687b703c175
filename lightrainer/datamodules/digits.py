"""sklearn's 8x8 handwritten digits (1,797 images, 10 classes), offline."""

from __future__ import annotations

import torch

from lightrainer.datamodules.base import LightrainerDataModule, SplitData


class DigitsDataModule(LightrainerDataModule):
    """sklearn ``load_digits``: 1x8x8 images with values 0..16 scaled by 1/16 to [0, 1].

    Stratified, seeded ``cfg.val_split`` split; random ``+-cfg.shift`` shifts on training batches.

    Args:
        cfg: the training config.
        collate_fn: optional custom collate (forces a torch DataLoader).
        data_on_device: keep the tensors on the trainer's GPU when it uses one.
    """

    num_classes = 10
    class_names = [str(i) for i in range(10)]
    input_shape = (1, 8, 8)
    pixel_scale = 16.0

    def load(self) -> tuple[SplitData, SplitData]:
        """Read sklearn's copy, scale, split."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float().unsqueeze(1) / self.pixel_scale
        return self.split(x, torch.from_numpy(digits.target).long())
