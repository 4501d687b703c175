"""Early stopping on the task's fitness: stop after ``patience`` epochs without improvement."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

from lightrainer.callbacks.checkpoint import fitness_of


class FitnessEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping, monitoring the module's fitness (read when the fit starts).

    Args:
        patience: epochs without improvement before stopping.
    """

    def __init__(self, patience: int) -> None:
        super().__init__(monitor="val/loss", mode="min", patience=patience, strict=False)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.monitor, self.mode = fitness_of(pl_module)
        self.min_delta = 0.0
        self.best_score = torch.tensor(-torch.inf if self.mode == "max" else torch.inf)
