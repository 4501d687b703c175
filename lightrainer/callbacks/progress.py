"""Progress bar: epoch/epochs, running losses and device memory (the seed's ``get_memory``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar


def device_memory_gb() -> float:
    """Reserved CUDA memory in GB (0 on a CPU), as the seed's ``get_memory``."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.memory_reserved() / 1e9
    return 0.0


class LightrainerProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, showing ``Epoch e/E``, the epoch's running loss and GPU memory."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if torch.cuda.is_available():
            metrics["gpu_mem"] = f"{device_memory_gb():.3g}G"
        return metrics
