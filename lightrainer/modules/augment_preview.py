"""``aug_preview.png``: the first augmented training batch of a fit, as the network sees it."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightrainer.plots import _pyplot, log_images, save_figure

log = logging.getLogger(__name__)


def _label(target: Tensor, names: Sequence[str]) -> str:
    """A class name, or the two largest shares of a mixed (probability) target."""
    if target.dim() == 0:
        return names[int(target)] if int(target) < len(names) else str(int(target))
    shares, classes = target.float().topk(min(2, len(target)))
    if shares[0] > 0.995:  # not mixed
        return names[int(classes[0])]
    return " + ".join(f"{names[int(c)]} {s:.2f}" for s, c in zip(shares.tolist(), classes.tolist()))


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(values)
    return values * channels if len(values) == 1 else values


def plot_augment_preview(
    images: Tensor, targets: Optional[Tensor], mean: Sequence[float], std: Sequence[float], names: Sequence[str],
    path: Path, title: str = "",
) -> Path:
    """A grid of normalised images ``(x - mean) / std`` shown in [0, 1], each titled with its target."""
    plt = _pyplot()
    count = len(images)
    cols = min(8, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows + 0.4), squeeze=False)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:count]):
        image = (images[i].float() * std_t + mean_t).clamp(0, 1)
        if image.shape[0] == 1:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(image[:3].permute(1, 2, 0).numpy())
        if targets is not None:
            ax.set_title(_label(targets[i], names), fontsize=7)
    fig.suptitle(title or "Augmented training images (first batch)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


class AugmentPreview(Callback):
    """On rank 0, at the first training batch of a fit whose loader augments (``shift`` or an
    augmentation key): ``aug_preview.png`` in the run folder, from that very batch (up to
    ``count`` images, denormalised with the datamodule's mean and std).

    Args:
        count: images shown.
    """

    def __init__(self, count: int = 32) -> None:
        self.count = count
        self._done = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._done:
            return
        self._done = True
        transform = getattr(trainer.train_dataloader, "transform", None)
        run_dir = getattr(getattr(pl_module, "cfg", None), "run_dir", None)
        if not trainer.is_global_zero or transform is None or run_dir is None:
            return
        x = pl_module.example_input(batch)
        if x.dim() != 4:
            return
        targets = batch[1][: self.count].cpu() if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        data = trainer.datamodule
        channels = x.shape[1]
        mean = _per_channel(getattr(data, "mean", None) or (0.0,), channels)
        std = _per_channel(getattr(data, "std", None) or (1.0,), channels)
        names = getattr(data, "class_names", None) or [str(i) for i in range(getattr(pl_module, "num_classes", 1000))]
        path = plot_augment_preview(x[: self.count].detach().cpu(), targets, mean, std, names,
                                    Path(run_dir) / "aug_preview.png", title=f"Augmented training images: {transform!r}")
        log_images(trainer, [path])
        log.info("augmentation preview: %s", path)
