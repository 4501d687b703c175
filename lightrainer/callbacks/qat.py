"""Quantization-aware training (``qat: True``)."""

from __future__ import annotations

import copy
import itertools
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightrainer.callbacks.ptq import fit_loaders
from lightrainer.config import Config
from lightrainer.export.pipeline import export_int8
from lightrainer.quant.base import iter_quantizers
from lightrainer.quant.calibrate import CalibrationResult, calibrate, refresh_weight_amax, set_amax
from lightrainer.quant.replace import quantize_model
from lightrainer.quant.workflow import REPORT_BATCHES, best_weights, check_quant_config, save_quantized

log = logging.getLogger(__name__)

#: QAT trains at lr0 * 0.1, as the seed did.
QAT_LR_SCALE = 0.1


class QATCallback(Callback):
    """Train int8 fake-quantized: quantize at setup, calibrate before the first step, export at the end.

    - ``setup("fit")``: the network's Conv/Linear layers become quantized layers (same parameters,
      so the optimizer is unaffected) and ``pl_module.lr_scale`` is set to 0.1. This runs before
      Lightning restores a checkpoint, so a resumed run loads its amax into the quantizers.
    - ``on_train_start``: calibration with ``method`` on ``num_batches`` training batches, unless
      the quantizers already hold amax (a resumed run); with several processes rank 0's amax is
      broadcast. Activation amax then stay fixed; weight amax follow the weights (per-channel
      max, refreshed before every batch).
    - ``on_fit_end`` (rank 0): the best weights are saved as ``weights/best_int8.pt`` and exported
      as the Q/DQ ``weights/best_int8.onnx``, checked against PyTorch in ONNX Runtime.

    Args:
        cfg: the config.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.calibration: CalibrationResult | None = None
        self.onnx: dict[str, float] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        backend = check_quant_config(self.cfg, pl_module.net)
        if not any(True for _ in iter_quantizers(pl_module.net)):
            pl_module.net = quantize_model(pl_module.net, backend)
        pl_module.lr_scale = QAT_LR_SCALE
        if trainer.is_global_zero:
            count = sum(1 for _ in iter_quantizers(pl_module.net))
            log.info("QAT: %d int8 quantizers inserted (%s); training at lr0 x %g", count, backend.name, QAT_LR_SCALE)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        quantizers = [q for _, q in iter_quantizers(pl_module.net)]
        if all("_amax" in q._buffers for q in quantizers):
            log.info("QAT: quantizers hold amax (resumed run): calibration skipped")
            return
        self.calibration = calibrate(
            pl_module.net, trainer.train_dataloader, self.cfg.method, num_batches=self.cfg.num_batches,
            percentile=self.cfg.percentile, to_input=pl_module.example_input,
        )
        if trainer.is_global_zero:  # the calibration logged its own line (method, batches, time)
            log.info("QAT: training with int8 fake-quant (activation amax from the %s calibration, fixed; "
                     "weight amax follow the weights)", self.calibration.method)
        if trainer.world_size > 1:
            # Each rank saw its own shard: all take rank 0's amax.
            amax = {name: q._buffers.get("_amax") for name, q in iter_quantizers(pl_module.net)}
            amax = trainer.strategy.broadcast(amax, src=0)
            for name, quantizer in iter_quantizers(pl_module.net):
                if amax[name] is not None:
                    set_amax(quantizer, amax[name].to(pl_module.device))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        refresh_weight_amax(pl_module.net)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        run_dir = Path(self.cfg.run_dir or trainer.default_root_dir)
        net = copy.deepcopy(pl_module.net)
        state = best_weights(run_dir, pl_module.device)
        if state is not None:
            net.load_state_dict(state)
        save_quantized(net, run_dir, self.cfg, extra={"qat": True})
        _, val_loader = fit_loaders(trainer)
        inputs = [pl_module.example_input(b) for b in itertools.islice(val_loader, REPORT_BATCHES)]
        _, self.onnx = export_int8(pl_module, net, inputs, run_dir, self.cfg)

    def state_dict(self) -> dict[str, Any]:
        # The quantizer amax live in the module's state_dict; this records how they were made.
        return {"method": self.cfg.method, "quant_backend": self.cfg.quant_backend}
