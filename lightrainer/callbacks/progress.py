"""What a run shows while it trains: a live bar on a terminal, a line per epoch in a log file.

``progress: auto`` (the default) picks the bar when standard output is a terminal (or a notebook)
and the lines otherwise (``> train.log``, ``nohup``, SLURM), where every refresh of a bar would
become text: a 10-epoch MNIST run wrote 160 KB of bar frames, the lines write about 2 KB.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Mapping, Sequence, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.trainer.states import TrainerFn

from lightrainer.callbacks.checkpoint import fitness_of, improves

log = logging.getLogger(__name__)


def device_memory_gb() -> float:
    """Reserved CUDA memory in GB (0 on a CPU), as the seed's ``get_memory``."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_reserved() / 1e9
    return 0.0


def resolve_progress(mode: str | None, stream: TextIO | None = None, notebook: bool | None = None) -> str:
    """The ``progress`` key -> "bar", "lines" or "off"; "auto" is the bar on a terminal or in a
    notebook, the lines anywhere else (a file, a pipe, a batch job). A pure decision.

    Args:
        mode: "auto", "bar", "lines", "off" or None (off).
        stream: where the bar would write (default: standard output).
        notebook: running in a Jupyter kernel (None: look).
    """
    if mode is None:
        return "off"
    if mode != "auto":
        return mode
    stream = sys.stdout if stream is None else stream
    notebook = "ipykernel" in sys.modules if notebook is None else notebook
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        terminal = False
    return "bar" if terminal or notebook else "lines"


class LightrainerProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, showing ``Epoch e/E``, the epoch's running loss and GPU memory."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        # Lightning's own hook draws a frame titled "Epoch {0-based}" before ours could rename it:
        # set the title without drawing, then reset (which draws once).
        bar = self.train_progress_bar
        bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if torch.cuda.is_available():
            metrics["gpu_mem"] = f"{device_memory_gb():.3g}G"
        return metrics


# ---------------------------------------------------------------------------------- lines
def format_duration(seconds: float) -> str:
    """``14.2s``, ``2m05s``, ``1h02m``: a duration that reads at a glance."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _number(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{float(value):.4g}"


def epoch_columns(
    epoch: int, epochs: int, seconds: float, row: Mapping[str, float], lr: float | None,
    gpu_mem: float | None, best: bool,
) -> list[tuple[str, str]]:
    """The (header, value) columns of one epoch's line.

    Args:
        epoch: 1-based epoch.
        epochs: the run's epochs.
        seconds: the epoch's wall time (training and validation).
        row: the epoch's train means (``train/loss``) and val metrics (``val/acc``), as results.csv.
        lr: the learning rate of the decayed group (None: no optimizer).
        gpu_mem: reserved GPU memory in GB (None: not on a GPU, no column).
        best: this epoch improved the fitness.
    """
    columns = [("Epoch", f"{epoch}/{epochs}"), ("Time", format_duration(seconds))]
    if gpu_mem is not None:
        columns.append(("GPU_mem", f"{gpu_mem:.3g}G"))
    train = [(k.split("/", 1)[1], _number(v)) for k, v in row.items() if k.startswith("train/")]
    others = [(k, _number(v)) for k, v in row.items() if not k.startswith(("train/", "lr/"))]
    columns += train + others
    if lr is not None:
        columns.append(("lr", f"{lr:.3g}"))
    columns.append(("best", "*" if best else ""))
    return columns


def format_columns(columns: Sequence[tuple[str, str]], header: bool) -> str:
    """One line of right-aligned columns (each as wide as its header, at least 9), or their header."""
    widths = [max(9, len(name), len(value)) for name, value in columns]
    cells = [name if header else value for name, value in columns]
    return "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)).rstrip()


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``val/loss 0.574  val/acc 0.986``: named values on one line."""
    return "  ".join(f"{name} {_number(value)}" for name, value in metrics.items())


def decayed_lr(lrs: Mapping[str, float]) -> float | None:
    """The lr a line shows: the decayed group's (``lr/decay``), else the first group's."""
    if not lrs:
        return None
    return lrs.get("lr/decay", next(iter(lrs.values())))


class EpochLines(ProgressBar):
    """The progress display of a log file: one line per epoch (``progress: lines``).

    Each epoch ends with a line of its wall time, train losses, validation metrics, the decayed
    group's lr, GPU memory (on a GPU) and ``*`` where the fitness improved, under a header
    written before the first line (Ultralytics' columns). A validation that does not end a
    training epoch (``lightrainer validate``, ``test``, a mid-epoch ``val_check_interval``) gets
    a line of its own. An epoch that runs longer than :attr:`heartbeat_s` also logs where it is
    at that interval, so a long job's log shows life. Only global rank 0 writes.
    """

    #: Seconds between two in-epoch lines of a long epoch.
    heartbeat_s = 300.0

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._columns: list[str] | None = None
        self._epoch_start = self._stage_start = self._last_line = time.monotonic()
        self._pending: str | None = None
        self.best: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:  # a validation in the middle of the epoch: training goes on
            log.info("%s", self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if not self._enabled or now - self._last_line < self.heartbeat_s:
            return
        self._last_line = now
        total = convert_inf(self.total_train_batches)
        loss = trainer.progress_bar_metrics.get("loss")
        log.info("Epoch %d/%d: batch %d/%s, %s%s", trainer.current_epoch + 1, trainer.max_epochs, batch_idx + 1,
                 total if total is not None else "?", format_duration(now - self._epoch_start),
                 f", loss {_number(loss)}" if loss is not None else "")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None  # the epoch's line carries the validation that ended the epoch
        if trainer.sanity_checking:
            return
        # Every rank: the means are reduced over the ranks (a collective), cached for the epoch.
        train = pl_module.train_epoch_means() if hasattr(pl_module, "train_epoch_means") else {}
        monitor, mode = fitness_of(pl_module)
        value = trainer.callback_metrics.get(monitor)
        current = None if value is None else float(value)
        better = current is not None and improves(current, self.best, mode)
        if better:
            self.best = current
        if not self._enabled:
            return
        row = {f"train/{k}": v for k, v in train.items()}
        row.update({k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")})
        lrs = pl_module.current_lrs() if hasattr(pl_module, "current_lrs") else {}
        gpu = device_memory_gb() if pl_module.device.type == "cuda" else None
        columns = epoch_columns(trainer.current_epoch + 1, trainer.max_epochs, time.monotonic() - self._epoch_start,
                                row, decayed_lr(lrs), gpu, better)
        names = [name for name, _ in columns]
        if names != self._columns:
            self._columns = names
            log.info("%s", format_columns(columns, header=True))
        log.info("%s", format_columns(columns, header=False))

    # ------------------------------------------------------------------ evaluation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._enabled:
            return
        line = self._evaluation_line(trainer, "Validation", "val/")
        if trainer.state.fn == TrainerFn.FITTING:
            self._pending = line  # written only if training goes on before the epoch's line
        else:
            log.info("%s", line)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stage_start = time.monotonic()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            log.info("%s", self._evaluation_line(trainer, "Test", "test/"))

    def _evaluation_line(self, trainer: L.Trainer, name: str, prefix: str) -> str:
        metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(prefix)}
        fitting = trainer.state.fn == TrainerFn.FITTING
        where = f" (epoch {trainer.current_epoch + 1}, step {trainer.global_step})" if fitting else ""
        return f"{name}{where}: {format_duration(time.monotonic() - self._stage_start)}  {format_metrics(metrics)}"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
