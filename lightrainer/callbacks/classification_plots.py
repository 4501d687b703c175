"""Pictures of a classifier at the end of fit: a confusion matrix and the worst-classified val images."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightrainer.plots import _pyplot, log_images, save_figure

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_all(pl_module: L.LightningModule, loader: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, targets, probabilities) over a loader, on the CPU."""
    was_training = pl_module.training
    pl_module.eval()
    xs, ys, ps = [], [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        logits = pl_module(x.to(pl_module.device))
        xs.append(x.cpu())
        ys.append(y.cpu())
        ps.append(logits.float().softmax(1).cpu())
    pl_module.train(was_training)
    return torch.cat(xs), torch.cat(ys), torch.cat(ps)


def confusion_matrix(targets: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """counts[i, j] = samples of class i predicted as j."""
    return torch.bincount(targets * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion(counts: Tensor, names: list[str], path: Path) -> Path:
    plt = _pyplot()
    n = len(names)
    size = max(4.5, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    image = ax.imshow(counts.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0)
        ax.set_yticks(range(n), names)
        threshold = counts.max().item() / 2
        for i in range(n):
            for j in range(n):
                value = int(counts[i, j])
                if value:
                    ax.text(j, i, value, ha="center", va="center", fontsize=8,
                            color="white" if value > threshold else "black")
    accuracy = counts.diag().sum().item() / max(counts.sum().item(), 1)
    ax.set_title(f"Confusion matrix (val accuracy {100 * accuracy:.2f}%)")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return save_figure(fig, path)


def plot_worst(images: Tensor, targets: Tensor, probs: Tensor, names: list[str], path: Path, count: int = 25) -> Path:
    """The val images whose true class got the lowest probability, with true/predicted labels."""
    plt = _pyplot()
    true_prob = probs[torch.arange(len(targets)), targets]
    order = true_prob.argsort()[:count]
    cols = min(5, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist()):
        image = images[i]
        if image.dim() == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.squeeze(-1) if image.dim() == 3 and image.shape[-1] == 1 else image
        image = (image - image.min()) / (image.max() - image.min() + 1e-8)
        ax.imshow(image.numpy(), cmap="gray" if image.dim() == 2 else None)
        pred = int(probs[i].argmax())
        ax.set_title(f"true {names[int(targets[i])]} ({true_prob[i]:.2f})\npred {names[pred]} ({probs[i, pred]:.2f})",
                     fontsize=8, color="crimson" if pred != int(targets[i]) else "black")
    fig.suptitle("Worst-classified validation images (probability in brackets)")
    return save_figure(fig, path)


class ClassificationPlots(Callback):
    """At the end of fit, on rank 0: ``confusion_matrix.png`` and ``worst_val.png`` from the best weights.

    Also sent to TensorBoard and wandb when those loggers are on.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None or getattr(pl_module.cfg, "run_dir", None) is None:
            return
        run_dir = Path(pl_module.cfg.run_dir)
        best = run_dir / "weights" / "best.pt"
        state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        if best.is_file():
            pl_module.net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
        try:
            x, y, probs = predict_all(pl_module, trainer.datamodule.val_dataloader())
        finally:
            pl_module.net.load_state_dict(state)
        if x.dim() not in (3, 4):
            return
        num_classes = probs.shape[1]
        names = getattr(trainer.datamodule, "class_names", None) or [str(i) for i in range(num_classes)]
        counts = confusion_matrix(y, probs.argmax(1), num_classes)
        paths = [plot_confusion(counts, names, run_dir / "confusion_matrix.png"),
                 plot_worst(x, y, probs, names, run_dir / "worst_val.png")]
        log_images(trainer, paths)
        log.info("classification plots: %s", ", ".join(str(p) for p in paths))


