"""Figures written to the run folder (matplotlib, no display needed)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from lightrainer.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: float = 110) -> Path:
    """Save a figure atomically (:func:`lightrainer.io.atomic_path`) and close it.

    Args:
        fig: the matplotlib figure.
        path: the image file; its suffix names the format ("png", "pdf", ...).
        dpi: resolution.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    path = Path(path)
    try:
        # The temporary name hides the suffix from matplotlib: say the format.
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or None)
    finally:
        plt.close(fig)
    return path


def read_results(path: str | os.PathLike) -> dict[str, list[float]]:
    """results.csv -> column name -> values (missing cells as NaN)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            columns.setdefault(key, []).append(float(value) if value not in ("", None) else math.nan)
    return columns


def plot_results(csv_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Plot every column of results.csv against the epoch: one panel per metric, lrs together.

    Args:
        csv_path: the run's results.csv.
        png_path: where to write the figure (default: results.png beside the CSV).

    Returns:
        The PNG path.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    columns = read_results(csv_path)
    png_path = Path(png_path) if png_path else Path(csv_path).with_name("results.png")
    epochs = columns.pop("epoch", [])
    columns.pop("time", None)  # the clock, not a curve of the training
    lrs = {k: v for k, v in columns.items() if k.startswith("lr/")}
    metrics = {k: v for k, v in columns.items() if not k.startswith("lr/")}
    # Pair train/x with val/x in one panel so over-fitting shows at a glance.
    panels: dict[str, dict[str, list[float]]] = {}
    for key, values in metrics.items():
        stage, _, name = key.partition("/")
        panels.setdefault(name or stage, {})[key] = values
    if lrs:
        panels["learning rate"] = lrs
    n = max(len(panels), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items()):
        for label, values in series.items():
            ax.plot(epochs, values, marker="." if len(epochs) < 30 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, png_path)


def log_images(trainer: Any, paths: list[Path], step: int | None = None) -> None:
    """Send PNG files to the TensorBoard and wandb loggers, where on."""
    step = trainer.current_epoch if step is None else step
    for logger in trainer.loggers:
        name = type(logger).__name__
        if name == "TensorBoardLogger":
            from PIL import Image  # matplotlib's dependency; only TensorBoard images need it here

            for path in paths:
                image = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image(path.stem, image, step, dataformats="HWC")
        elif name == "WandbLogger":
            logger.log_image(key="plots", images=[str(p) for p in paths], step=None)
