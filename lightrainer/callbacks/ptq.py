"""Post-training quantization after fit (``ptq: True``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightrainer.plots import log_images
from lightrainer.config import Config
from lightrainer.export.pipeline import export_int8
from lightrainer.quant.workflow import PTQResult, best_weights, check_quant_config, post_training_quantize

log = logging.getLogger(__name__)


class PTQCallback(Callback):
    """At the end of fit, on the best weights: calibrate int8, compare FP32 vs INT8, save, export.

    Writes ``ptq_results.csv/.md``, ``quant_sensitivity.csv/.png``, ``weights/best_int8.pt`` and
    ``weights/best_int8.onnx`` to the run folder (see
    :func:`lightrainer.quant.workflow.post_training_quantize`). Runs on global rank 0 only.

    Args:
        cfg: the config (``method``, ``num_batches``, ``percentile``, ``quant_backend``).
        sensitivity: also write the per-layer sensitivity report.
    """

    def __init__(self, cfg: Config, sensitivity: bool = True) -> None:
        self.cfg = cfg
        self.sensitivity = sensitivity
        self.result: PTQResult | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before training, not after it.
        check_quant_config(self.cfg, pl_module.net)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        run_dir = Path(self.cfg.run_dir or trainer.default_root_dir)
        state = best_weights(run_dir, pl_module.device)
        train_loader, val_loader = fit_loaders(trainer)
        self.result = post_training_quantize(
            pl_module, train_loader, val_loader, self.cfg, run_dir, state_dict=state, sensitivity=self.sensitivity,
            exporter=export_int8,
        )
        chart = run_dir / "quant_sensitivity.png"
        log_images(trainer, [chart] if chart.is_file() else [])


def fit_loaders(trainer: L.Trainer) -> tuple[Any, Any]:
    """The fit's train and val loaders (the datamodule's where there is one)."""
    datamodule = trainer.datamodule
    if datamodule is not None:
        return datamodule.train_dataloader(), datamodule.val_dataloader()
    return trainer.train_dataloader, trainer.val_dataloaders
