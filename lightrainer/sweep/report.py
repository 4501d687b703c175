"""The callback that reports a trial's fitness to Optuna each epoch and stops a pruned trial."""

from __future__ import annotations

import math
from typing import Any

import lightning as L

from lightrainer.callbacks.checkpoint import fitness_of


class TrialReport(L.Callback):
    """Reports the fitness of each validated epoch to an Optuna trial and stops the Trainer
    cleanly (after the epoch's checkpoint) when the pruner says so, or when the fitness is not
    finite (a diverged run is pruned).

    Args:
        trial: the Optuna trial.
    """

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.monitor, self.mode = "val/loss", "min"
        self.values: list[float] = []
        #: Epochs validated (a non-finite fitness included).
        self.epochs = 0
        self.pruned_at: int | None = None
        self.diverged: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.monitor, self.mode = fitness_of(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value, epoch = float(value), trainer.current_epoch
        self.epochs += 1
        if not math.isfinite(value):
            self.diverged = f"epoch {epoch + 1}: {self.monitor} is {value}"
            self.pruned_at, trainer.should_stop = epoch, True
            return
        self.values.append(value)
        self.trial.report(value, epoch)
        # A trial that reached its last epoch is complete: pruning it would save nothing.
        if epoch + 1 < (trainer.max_epochs or 0) and self.trial.should_prune():
            self.pruned_at, trainer.should_stop = epoch, True

    @property
    def best(self) -> float | None:
        if not self.values:
            return None
        return max(self.values) if self.mode == "max" else min(self.values)
