"""VQ-VAE pictures: reconstruction grids and the codebook-usage histogram, each validation epoch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightrainer.config import Config
from lightrainer.plots import _pyplot, save_figure

log = logging.getLogger(__name__)


def _fixed_val_samples(trainer: L.Trainer, num: int) -> Optional[Tensor]:
    """``num`` validation images spread evenly over an in-memory validation set, or None."""
    data = getattr(trainer.datamodule, "val_data", None) if trainer.datamodule is not None else None
    x = data[0] if isinstance(data, tuple) else None
    if not isinstance(x, Tensor) or x.dim() != 4:
        return None
    index = torch.linspace(0, len(x) - 1, min(num, len(x))).round().long().unique()
    return x[index.to(x.device)].detach().cpu().clone()


def _to_numpy_image(x: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) float array."""
    image = x.clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def reconstruction_grid(inputs: Tensor, recons: Tensor, pad: int = 2) -> Tensor:
    """One (C, H, W) image: the inputs in the top row, their reconstructions below, white padding."""
    n, c, h, w = inputs.shape
    grid = torch.ones(c, 2 * h + 3 * pad, n * (w + pad) + pad)
    for row, images in enumerate((inputs, recons.clamp(0, 1))):
        top = pad + row * (h + pad)
        for i, image in enumerate(images):
            left = pad + i * (w + pad)
            grid[:, top : top + h, left : left + w] = image
    return grid


class ReconstructionGrid(Callback):
    """Each validation epoch: ``recon_epoch{N}.png`` (fixed val inputs above their reconstructions)
    and ``codebook_usage.png`` (codes sorted by how often the val epoch used them), rank 0 only.

    The grid also goes to TensorBoard (``add_image``) and wandb (``log_image``) when those loggers
    are on. The samples are spread evenly over the datamodule's in-memory validation set (else the
    first validation batch), chosen once, so every epoch shows the same images.

    Args:
        cfg: the config (``run_dir``).
        num_samples: images in the grid.
    """

    def __init__(self, cfg: Config, num_samples: int = 12) -> None:
        self.cfg = cfg
        self.num_samples = num_samples
        self._samples: Optional[Tensor] = None

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._samples is None and batch_idx == 0 and trainer.is_global_zero:
            self._samples = _fixed_val_samples(trainer, self.num_samples)
            if self._samples is None:  # not in-memory data: the first validation batch
                x = pl_module.example_input(batch) if hasattr(pl_module, "example_input") else batch[0]
                self._samples = x[: self.num_samples].detach().cpu().clone()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not ..._epoch_end: only here are this epoch's metrics in callback_metrics.
        if trainer.sanity_checking or not trainer.is_global_zero or self._samples is None:
            return
        epoch = trainer.current_epoch + 1
        run_dir = Path(self.cfg.run_dir or trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        grid = self._grid(pl_module)
        self._save_grid(grid, run_dir / f"recon_epoch{epoch}.png", epoch, trainer)
        self._log_grid(grid, trainer, epoch)
        counts = getattr(pl_module, "code_counts", None)
        if counts is not None:
            ppl = trainer.callback_metrics.get("val/perplexity")
            plot_codebook_usage(counts.detach().cpu(), run_dir / "codebook_usage.png", epoch,
                                None if ppl is None else float(ppl))

    @torch.no_grad()
    def _grid(self, pl_module: L.LightningModule) -> Tensor:
        was_training = pl_module.training
        pl_module.eval()
        out = pl_module(self._samples.to(pl_module.device))
        pl_module.train(was_training)
        recon = out[0] if isinstance(out, (tuple, list)) else out
        return reconstruction_grid(self._samples.float(), recon.detach().float().cpu())

    def _save_grid(self, grid: Tensor, path: Path, epoch: int, trainer: L.Trainer) -> None:
        save_grid(grid, path, f"epoch {epoch}: top = validation input, bottom = reconstruction"
                  + metrics_note(trainer, "val"))

    @staticmethod
    def _log_grid(grid: Tensor, trainer: L.Trainer, epoch: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/reconstruction", grid, global_step=epoch)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="val/reconstruction", images=[_to_numpy_image(grid)], step=trainer.global_step)


def metrics_note(trainer: L.Trainer, stage: str) -> str:
    """"   (val PSNR 24.10 dB, SSIM 0.812)" from the logged metrics of ``stage``, or ""."""
    psnr = trainer.callback_metrics.get(f"{stage}/psnr")
    ssim = trainer.callback_metrics.get(f"{stage}/ssim")
    if psnr is None or ssim is None:
        return ""
    return f"   ({stage} PSNR {float(psnr):.2f} dB, SSIM {float(ssim):.3f})"


def save_grid(grid: Tensor, path: Path, title: str) -> Path:
    """A :func:`reconstruction_grid` as a PNG at 4 screen pixels per image pixel, with a title."""
    plt = _pyplot()
    height, width = grid.shape[1:]
    scale = 4.0 / 100  # 4 screen pixels per image pixel at dpi 100
    fig = plt.figure(figsize=(width * scale + 0.2, height * scale + 0.5), dpi=100)
    ax = fig.add_axes((0.1 / (width * scale + 0.2), 0.05 / (height * scale + 0.5),
                       width * scale / (width * scale + 0.2), height * scale / (height * scale + 0.5)))
    ax.imshow(_to_numpy_image(grid), interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / (height * scale + 0.5), va="top")
    return save_figure(fig, path, dpi=fig.dpi)


def plot_codebook_usage(counts: Tensor, path: Path, epoch: int, perplexity: Optional[float] = None) -> Path:
    """Bar chart of how often each code was chosen, codes sorted from most to least used.

    Args:
        counts: (K,) times each code was chosen.
        path: the PNG to write.
        epoch: for the title.
        perplexity: the logged val perplexity, for the title.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    counts = counts.double()
    size = len(counts)
    used = int((counts > 0).sum())
    share = (counts / counts.sum().clamp(min=1)).sort(descending=True).values.numpy() * 100
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    # A step curve on a log scale: hundreds of one-pixel bars would render unevenly, and the few
    # most used codes would flatten the rest on a linear scale.
    ranks = np.arange(1, used + 1)
    ax.fill_between(ranks, share[:used], share[:used].min() / 2, step="mid", color="tab:blue", alpha=0.8,
                    label="share of vectors")
    ax.axhline(100 / size, color="tab:orange", linestyle="--", linewidth=1, label=f"uniform (1/{size})")
    ax.axvline(used, color="grey", linestyle=":", linewidth=1, label=f"last used code ({used})")
    ax.set_yscale("log")
    ax.set_xlim(0, size)
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("% of validation vectors (log)")
    title = f"codebook usage, epoch {epoch}: {used}/{size} codes used ({100 * used / size:.0f}%)"
    if perplexity is not None:
        title += f", perplexity {perplexity:.0f}"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=fig.dpi)
