"""Pictures of a classifier at the end of fit: a confusion matrix and the worst-classified val images
(over the whole validation split, every rank's share of it); the per-class report of a test."""

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
    if not xs:  # a rank with no share of a tiny split
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(xs), torch.cat(ys), torch.cat(ps)


def confusion_matrix(targets: Tensor, preds: Tensor, num_classes: int) -> Tensor:
    """counts[i, j] = samples of class i predicted as j."""
    return torch.bincount(targets * num_classes + preds, minlength=num_classes**2).reshape(num_classes, num_classes)


def class_report(counts: Tensor, names: list[str]) -> list[dict[str, Any]]:
    """Per-class precision, recall, F1 and support from a confusion matrix, then the macro and
    support-weighted averages and the accuracy, laid out as sklearn's ``classification_report``
    (the accuracy row holds it in ``f1``; a class never predicted has precision 0).

    Args:
        counts: (K, K) counts, ``counts[i, j]`` = samples of class i predicted as j.
        names: a name per class.

    Returns:
        Rows ``{"class", "precision", "recall", "f1", "support"}``.
    """
    counts = counts.double()
    hits, support, predicted = counts.diag(), counts.sum(1), counts.sum(0)
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    recall = torch.where(support > 0, hits / support.clamp(min=1), torch.zeros_like(hits))
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), torch.zeros_like(hits))
    rows = [{"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(names, precision, recall, f1, support)]
    total = float(support.sum())
    weights = support / max(total, 1.0)
    for label, mean in (("macro avg", lambda t: float(t.mean())), ("weighted avg", lambda t: float((t * weights).sum()))):
        rows.append({"class": label, "precision": mean(precision), "recall": mean(recall), "f1": mean(f1),
                     "support": int(total)})
    rows.append({"class": "accuracy", "precision": None, "recall": None, "f1": float(hits.sum()) / max(total, 1.0),
                 "support": int(total)})
    return rows


def plot_confusion(counts: Tensor, names: list[str], path: Path, split: str = "val") -> Path:
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
    ax.set_title(f"Confusion matrix ({split} accuracy {100 * accuracy:.2f}%, {int(counts.sum())} samples)")
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


def gathered(trainer: L.Trainer, tensor: Tensor) -> Tensor:
    """``tensor`` of every rank stacked along a new first axis (shapes must agree), on the CPU."""
    if trainer.world_size == 1:
        return tensor[None]
    # On the strategy's device: NCCL gathers CUDA tensors only.
    return trainer.strategy.all_gather(tensor.to(trainer.strategy.root_device)).cpu()


def worst_over_ranks(
    trainer: L.Trainer, x: Tensor, y: Tensor, probs: Tensor, count: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``count`` samples whose true class got the lowest probability, over every rank's share."""
    true_prob = probs[torch.arange(len(y)), y] if len(y) else torch.zeros(0)
    order = true_prob.argsort()[:count]
    k = len(order)
    # Fixed shapes for the gather: pad with "best possible" samples (probability 2) and drop them after.
    shape = tuple(x.shape[1:]) if len(x) else tuple(getattr(trainer.datamodule, "input_shape", None) or ())
    px, py = torch.zeros(count, *shape), torch.zeros(count, dtype=torch.long)
    pp, score = torch.zeros(count, num_classes), torch.full((count,), 2.0)
    px[:k], py[:k], pp[:k], score[:k] = x[order], y[order], probs[order], true_prob[order]
    all_x, all_y, all_p, all_s = (gathered(trainer, t).flatten(0, 1) for t in (px, py, pp, score))
    keep = all_s.argsort()[:count]
    keep = keep[all_s[keep] <= 1.0]
    return all_x[keep], all_y[keep], all_p[keep]


class ClassificationPlots(Callback):
    """At the end of fit: ``confusion_matrix.png`` and ``worst_val.png`` from the best weights,
    over the whole validation split (each rank scores its share; rank 0 draws).

    Also sent to TensorBoard and wandb when those loggers are on.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.datamodule is None or getattr(pl_module.cfg, "run_dir", None) is None:
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
        shape = getattr(trainer.datamodule, "input_shape", None)
        num_classes = getattr(pl_module, "num_classes", None) or probs.shape[1]
        # Pictures of images only; by the datamodule's shape, so that every rank decides alike.
        if not (len(shape) == 3 if shape is not None else x.dim() in (3, 4)):
            return
        counts = gathered(trainer, confusion_matrix(y, probs.argmax(1), num_classes) if len(y)
                          else torch.zeros(num_classes, num_classes, dtype=torch.long)).sum(0)
        worst = worst_over_ranks(trainer, x, y, probs, 25, num_classes)
        if not trainer.is_global_zero:
            return
        names = getattr(trainer.datamodule, "class_names", None) or [str(i) for i in range(num_classes)]
        paths = [plot_confusion(counts, names, run_dir / "confusion_matrix.png"),
                 plot_worst(*worst, names, run_dir / "worst_val.png")]
        log_images(trainer, paths)
        log.info("classification plots over %d validation samples: %s", int(counts.sum()),
                 ", ".join(str(p) for p in paths))


