"""Tuning before training: an lr range test for ``lr0`` and AutoBatch for ``batch: -1``.

Lightning's ``Tuner`` does not fit this engine: its lr finder steps a scheduler that manual
optimisation never steps, and its batch-size scaler looks for a ``batch_size`` attribute, while
lightrainer derives accumulation and weight decay from ``batch``. So both are written here, on
the same Trainer and task:

- :func:`lr_find` trains ``num_steps`` optimizer steps with lr0 rising exponentially from
  ``min_lr`` to ``max_lr`` (warmup off), records the smoothed training loss, stops early when it
  diverges, restores the weights, and suggests the lr of the steepest descent of the loss (the
  rule of Lightning's and fastai's finders). The module is left as it was.
- :func:`autobatch` sizes ``batch`` to a fraction of a CUDA GPU's memory from the memory of a few
  trial steps (Ultralytics' AutoBatch: a straight line through (batch, memory)).
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch

from lightrainer.config import Config, ConfigError
from lightrainer.io import atomic_write
from lightrainer.plots import _pyplot, save_figure

log = logging.getLogger(__name__)


@dataclass
class LRFindResult:
    """The sweep: each step's lr and smoothed loss, and the suggested ``lr0``."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    suggestion: float | None = None
    files: list[Path] = field(default_factory=list)


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 5, skip_end: int = 2) -> float | None:
    """The lr where the smoothed loss falls fastest (its most negative slope in log lr).

    A pure decision (tested on its own): None when the sweep is too short to tell.
    """
    lrs_, losses_ = np.asarray(lrs[skip_begin:len(lrs) - skip_end]), np.asarray(losses[skip_begin:len(losses) - skip_end])
    keep = np.isfinite(losses_)
    lrs_, losses_ = lrs_[keep], losses_[keep]
    if len(lrs_) < 3:
        return None
    slopes = np.gradient(losses_, np.log(lrs_))
    return float(lrs_[int(np.argmin(slopes))])


class _LRSweep(L.Callback):
    """Sets every group's lr before each optimizer step of the sweep and records the loss."""

    def __init__(self, min_lr: float, max_lr: float, num_steps: int, beta: float = 0.98, diverge: float = 4.0) -> None:
        self.min_lr, self.max_lr, self.num_steps = min_lr, max_lr, num_steps
        self.beta, self.diverge = beta, diverge
        self.result = LRFindResult()
        self._avg = 0.0
        self._best = math.inf

    def lr_at(self, step: int) -> float:
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / max(self.num_steps - 1, 1))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        lr = self.lr_at(len(self.result.lrs))
        optimizer = pl_module.optimizers()
        for group in getattr(optimizer, "optimizer", optimizer).param_groups:
            group["lr"] = lr
        self._lr = lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else math.nan
        step = len(self.result.lrs)
        self._avg = self.beta * self._avg + (1 - self.beta) * value
        smoothed = self._avg / (1 - self.beta ** (step + 1))
        self.result.lrs.append(self._lr)
        self.result.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if step + 1 >= self.num_steps or not math.isfinite(smoothed) or smoothed > self.diverge * self._best:
            trainer.should_stop = True


def lr_find(
    cfg: Config,
    module: L.LightningModule,
    datamodule: L.LightningDataModule | None,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    out_dir: str | Path | None = None,
    **trainer_args: Any,
) -> LRFindResult:
    """An lr range test of the task as configured (warmup off); the module is restored after.

    Args:
        cfg: the validated config (its Trainer decisions apply: devices, precision).
        module: the task module; its weights and optimizer state are restored after the sweep.
        datamodule: its data.
        min_lr, max_lr: the sweep's range.
        num_steps: optimizer steps (batches: accumulation is off during the sweep).
        out_dir: where ``lr_find.csv`` and ``lr_find.png`` go (default: no files).
        **trainer_args: further Trainer arguments.

    Raises:
        ConfigError: several devices or QAT (the sweep needs one process and a float network), or
            a bad range.
    """
    if not 0 < min_lr < max_lr:
        raise ConfigError(f"lr_find: need 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    if cfg.qat:
        raise ConfigError("lr_find: qat: True trains a quantized network at lr0 x 0.1: find lr0 for the float run (qat: False)")
    if (cfg.devices or 1) > 1 or (isinstance(cfg.device, list) and len(cfg.device) > 1) or cfg.num_nodes > 1:
        raise ConfigError("lr_find: runs in one process: set devices: 1 (the lr0 found holds for the global batch)")
    saved = copy.deepcopy(module.state_dict())
    sweep_cfg = cfg.replace(warmup_epochs=0.0, nbs=cfg.batch, epochs=max(1, cfg.epochs), patience=0, plots=False)
    previous_cfg = module.cfg
    module.cfg = sweep_cfg
    sweep = _LRSweep(min_lr, max_lr, num_steps)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu", devices=1,
        max_steps=num_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[sweep], **trainer_args,
    )
    try:
        with warnings.catch_warnings():
            # The sweep has no logger on purpose; the task's epoch means have nowhere to go.
            warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
            trainer.fit(module, datamodule=datamodule)
    finally:
        module.cfg = previous_cfg
        module.load_state_dict(saved)
    result = sweep.result
    result.suggestion = suggest_lr(result.lrs, result.losses)
    if out_dir is not None:
        result.files = _write_sweep(result, Path(out_dir))
    return result


def _write_sweep(result: LRFindResult, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{lr:.6g},{loss:.6g}\n" for lr, loss in zip(result.lrs, result.losses))
    csv_path = atomic_write(out_dir / "lr_find.csv", "lr,smoothed_loss\n" + rows)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses)
    ax.set_xscale("log")
    ax.set_xlabel("lr0")
    ax.set_ylabel("training loss (smoothed)")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="red", linestyle="--", label=f"suggested lr0 {result.suggestion:.3g}")
        ax.legend()
    ax.set_title("lr range test")
    png = save_figure(fig, out_dir / "lr_find.png")
    return [csv_path, Path(png)]


def autobatch_size(points: Sequence[tuple[int, float]], free_bytes: float, fraction: float = 0.6,
                   limits: tuple[int, int] = (1, 1024)) -> int:
    """The batch whose memory is ``fraction`` of ``free_bytes``, on the line through (batch, bytes).

    A pure decision (Ultralytics' AutoBatch): fit memory = a * batch + b by least squares.

    Raises:
        ConfigError: memory that does not grow with the batch (cannot be sized).
    """
    batches = np.asarray([p[0] for p in points], dtype=float)
    memory = np.asarray([p[1] for p in points], dtype=float)
    slope, intercept = np.polyfit(batches, memory, 1)
    if slope <= 0:
        raise ConfigError("batch: -1 (AutoBatch) could not size the batch: memory did not grow with it; give a number")
    best = int(np.floor((fraction * free_bytes - intercept) / slope + 1e-6))  # not below by rounding error
    return int(min(max(best, limits[0]), limits[1]))


def autobatch(cfg: Config, module: L.LightningModule, datamodule: Any, trial: Sequence[int] = (1, 2, 4, 8, 16),
              fraction: float = 0.6) -> int:
    """``batch: -1``: the batch for ``fraction`` of the free memory of the one CUDA GPU, measured
    on a few trial steps of the task (forward and backward on a batch of the data).

    Raises:
        ConfigError: no CUDA GPU, several devices, or QAT (one clear message each).
    """
    if not torch.cuda.is_available() or cfg.device == "cpu":
        raise ConfigError("batch: -1 (AutoBatch) sizes the batch to a CUDA GPU's memory; on the CPU give a number (batch: 32)")
    if (cfg.devices or 1) > 1 or (isinstance(cfg.device, list) and len(cfg.device) > 1) or cfg.num_nodes > 1:
        raise ConfigError("batch: -1 (AutoBatch) sizes one GPU's batch: give a number with several devices")
    if cfg.qat:
        raise ConfigError("batch: -1 (AutoBatch) with qat: True: find the batch of the float run, then give it")
    device = torch.device("cuda", cfg.device[0] if isinstance(cfg.device, list) else 0)
    datamodule.setup("fit")
    sample = next(iter(datamodule.train_dataloader()))
    module.to(device).train()
    points = []
    for size in trial:
        batch = _take(sample, size, device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss, _ = module.step(batch, "train")
        loss.backward()
        module.zero_grad(set_to_none=True)
        points.append((size, float(torch.cuda.max_memory_allocated(device) - base)))
    free, _ = torch.cuda.mem_get_info(device)
    size = autobatch_size(points, free, fraction)
    log.info("AutoBatch: batch %d for %.0f%% of %.1f GiB free on %s", size, 100 * fraction, free / 2**30, device)
    return size


def _take(batch: Any, size: int, device: torch.device) -> Any:
    """The first ``size`` samples of a batch (repeated when it is shorter), on ``device``."""
    if isinstance(batch, torch.Tensor):
        reps = -(-size // batch.shape[0])
        return batch.repeat(reps, *([1] * (batch.dim() - 1)))[:size].to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take(b, size, device) for b in batch)
    return batch
