"""results.csv (a row per epoch: time, train means, val metrics, lr of each group) and results.png."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightrainer.io import atomic_write
from lightrainer.tables import csv_text
from lightrainer.plots import plot_results

log = logging.getLogger(__name__)


class ResultsCSV(Callback):
    """Writes ``results.csv`` each epoch (atomically) and plots ``results.png`` when training ends.

    ``time`` is the seconds of training (validation included) from the start of the run to the
    end of the epoch; a resumed run continues the count of the run it resumes (the time the run
    was stopped is not counted).

    Args:
        run_dir: the run folder.
        plots: draw results.png.
    """

    def __init__(self, run_dir: str | os.PathLike, plots: bool = True) -> None:
        self.path = Path(run_dir) / "results.csv"
        self.plots = plots
        self.rows: list[dict[str, Any]] = []
        #: Seconds trained before this process started training (a resumed run's earlier part).
        self.elapsed_before = 0.0
        self._start: float | None = None

    @property
    def elapsed(self) -> float:
        """Seconds of training so far, over every part of a resumed run."""
        return self.elapsed_before + (time.monotonic() - self._start if self._start is not None else 0.0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        train = pl_module.train_epoch_means() if hasattr(pl_module, "train_epoch_means") else {}
        if not trainer.is_global_zero:
            return
        row: dict[str, Any] = {"epoch": trainer.current_epoch + 1, "time": round(self.elapsed, 2)}
        row.update({f"train/{k}": v for k, v in train.items()})
        for key, value in sorted(trainer.callback_metrics.items()):
            if key.startswith(("val/", "test/")):
                row[key] = float(value)
        if hasattr(pl_module, "current_lrs"):
            row.update(pl_module.current_lrs())
        self.rows = [r for r in self.rows if r["epoch"] < row["epoch"]] + [row]
        self._write()

    def _write(self) -> None:
        # csv's own line ending, as results.csv has always had
        atomic_write(self.path, csv_text(self.rows, _fmt, lineterminator="\r\n"))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._plot(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._plot(trainer)

    def _plot(self, trainer: L.Trainer) -> None:
        if self.plots and trainer.is_global_zero and self.path.is_file():
            path = plot_results(self.path)
            log.info("results plotted to %s", path)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "elapsed": self.elapsed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
        last_time = self.rows[-1].get("time", 0.0) if self.rows else 0.0
        self.elapsed_before = float(state_dict.get("elapsed", last_time) or 0.0)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
