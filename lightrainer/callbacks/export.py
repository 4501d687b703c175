"""Export the best weights at the end of fit: verified ONNX, and a TensorRT engine on request."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightrainer.callbacks.ptq import fit_loaders
from lightrainer.config import Config
from lightrainer.export.errors import ExportError, MissingDependencyError
from lightrainer.export.graph import require_onnx
from lightrainer.export.pipeline import export_from_weights
from lightrainer.export.verify import require_onnxruntime
from lightrainer.quant.workflow import check_quant_config, ptq_network
from lightrainer.registry import EXPORT_FORMATS

log = logging.getLogger(__name__)


def export_format(cfg: Config) -> str | None:
    """The format a run exports after fit: "engine" for ``export: engine`` or ``trt_quant``, else
    ``cfg.export`` (None: nothing to export)."""
    if cfg.export == "engine" or cfg.trt_quant:
        return "engine"
    return cfg.export


def check_export_dependencies(cfg: Config) -> None:
    """What the export after fit needs, checked before any work (``build_trainer`` calls it before
    the run folder exists): onnx and onnxruntime, and the format's registered ``check`` (TensorRT
    and a GPU for an engine).

    Raises:
        MissingDependencyError: one line naming what is missing and how to install it.
    """
    fmt = export_format(cfg)
    if fmt is None:
        return
    require_onnx()
    require_onnxruntime()
    check = EXPORT_FORMATS.get(fmt, "export").check
    if check is not None:
        check()


class ExportCallback(Callback):
    """After ``fit``, export ``weights/best.pt`` as ``weights/best.onnx`` (verified on the val split).

    ``export: onnx`` writes the ONNX model (a VQ-VAE also its encoder and decoder) with a
    ``.verify.json`` report beside each; ``export: engine`` or ``trt_quant: True`` also builds
    ``weights/best.engine``. With ``trt_quant`` the engine is int8, built from a Q/DQ model: the
    QAT network's own ``best.onnx``, the PTQ callback's ``best_int8.onnx``, or, when neither
    ``ptq`` nor ``qat`` is on, ``best_int8.onnx`` from PTQ run here (``method``, ``num_batches``
    on the training batches), as the seed's ``trtexec --int8`` calibrated a float model.
    Only rank 0 exports.

    Failures raise: a wrong or missing export is never reported as a success. The trained weights
    are already on disk when this runs, and the error message says how to retry with
    ``lightrainer export``. What can be checked before training is checked at the start of fit
    (onnx/onnxruntime installed; TensorRT and a GPU for an engine; the quantization settings when
    this callback runs PTQ), so a missing dependency stops the run before any epoch instead of
    after the last.

    Args:
        cfg: the run's config (``export``, ``trt_quant``, ``run_dir``).
        quantize: ``quantize(module, datamodule) -> fake-quant net`` for ``trt_quant`` with a float
            network (default: PTQ by :func:`lightrainer.quant.workflow.ptq_network`).
        max_batches: validation batches the verification runs on (None = all).
    """

    def __init__(self, cfg: Config, quantize: Any = None, max_batches: int | None = 32) -> None:
        self.cfg = cfg
        self.quantize = quantize
        self.max_batches = max_batches

    @property
    def format(self) -> str | None:
        """"engine", "onnx" or None (nothing to export)."""
        return export_format(self.cfg)

    @property
    def runs_ptq(self) -> bool:
        """Whether this callback calibrates the network itself (``trt_quant`` without ``ptq``/``qat``)."""
        return bool(self.cfg.trt_quant) and not (self.cfg.ptq or self.cfg.qat) and self.quantize is None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.format is None:
            return
        check_export_dependencies(self.cfg)
        if self.runs_ptq:
            # trt_quant alone runs PTQ after fit: its settings, backend and layers are checked now.
            check_quant_config(self.cfg.replace(ptq=True, qat=False), pl_module.net)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.format is None or not trainer.is_global_zero:
            return
        run_dir = Path(self.cfg.run_dir or trainer.default_root_dir)
        weights = run_dir / "weights" / "best.pt"
        if not weights.is_file():
            weights = run_dir / "weights" / "last.pt"
        val_inputs = None
        if trainer.datamodule is None:  # fit(model, train_dataloaders, val_dataloaders)
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            val_inputs = [pl_module.example_input(b) for b in itertools.islice(loader, self.max_batches)]
        quantize = self.quantize
        if self.runs_ptq:
            train_loader, _ = fit_loaders(trainer)

            def quantize(module: Any, datamodule: Any) -> Any:
                return ptq_network(module, train_loader, self.cfg)

        try:
            result = export_from_weights(
                pl_module, trainer.datamodule, self.cfg, weights, self.format,
                int8=self.cfg.trt_quant, quantize=quantize, max_batches=self.max_batches, val_inputs=val_inputs,
            )
        except (ExportError, MissingDependencyError):
            log.error(
                "export failed; the trained weights are safe in %s. Retry with: lightrainer export --weights %s --format %s",
                weights.parent, weights, self.format,
            )
            raise
        for path in result.onnx + ([result.engine] if result.engine else []):
            log.info("exported %s", path)
