"""PTQ and QAT around a LightrainerModule: checks, evaluation, and what goes to the run folder.

Shared by :class:`~lightrainer.callbacks.ptq.PTQCallback`, :class:`~lightrainer.callbacks.qat.QATCallback`
and ``lightrainer ptq`` (:func:`lightrainer.export.run_ptq`). The Q/DQ ONNX export sits a layer
above (:func:`lightrainer.export.export_int8`); :func:`post_training_quantize` calls it through
its ``exporter`` argument.
"""

from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import itertools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torchmetrics
from torch import Tensor, nn

from lightrainer.config import Config, ConfigError
from lightrainer.io import atomic_torch_save, atomic_write
from lightrainer.quant.base import QuantBackend, get_backend
from lightrainer.quant.calibrate import CalibrationResult, calibrate, get_calib_method
from lightrainer.quant.replace import is_quantized_state_dict, quantizable_layers, quantize_model
from lightrainer.quant.sensitivity import quant_sensitivity, write_sensitivity
from lightrainer.weights import apply_weights

log = logging.getLogger(__name__)

#: validation batches used for the sensitivity report and the ONNX Runtime verification of the Q/DQ model
REPORT_BATCHES = 8

#: ``exporter(module, qnet, inputs, run_dir, cfg) -> (onnx path, parity)``: writes the verified Q/DQ
#: model of a calibrated network (:func:`lightrainer.export.export_int8`).
Int8Exporter = Callable[[Any, nn.Module, list[Tensor], Path, Config], tuple[Path, dict[str, float]]]


def check_quant_config(cfg: Config, net: nn.Module | None = None) -> QuantBackend | None:
    """Check everything PTQ/QAT need before any work (call it before the run folder is made).

    Args:
        cfg: the config (``ptq``, ``qat``, ``method``, ``num_batches``, ``quant_backend``).
        net: the float network, to check it has something to quantize.

    Returns:
        The backend, or None when neither ptq nor qat is on.

    Raises:
        ConfigError: ptq and qat both on, unknown method, num_batches < 1, no usable backend
            (one line naming the pip command), a network with nothing to quantize.
    """
    if not (cfg.ptq or cfg.qat):
        return None
    if cfg.ptq and cfg.qat:
        raise ConfigError("ptq and qat are both True: choose one (qat trains quantized; ptq calibrates after fit)")
    get_calib_method(cfg.method)
    if cfg.num_batches is not None and cfg.num_batches < 1:
        raise ConfigError(f"num_batches: must be >= 1 or None, got {cfg.num_batches}")
    backend = get_backend(cfg.quant_backend)
    if net is not None and not quantizable_layers(net):
        raise ConfigError(
            f"{'ptq' if cfg.ptq else 'qat'}: {type(net).__name__} has no Conv/Linear layer to quantize: "
            "register your layer type with lightrainer.quant.register_quant_layer, or set ptq/qat False"
        )
    return backend


def _to_device(batch: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


@torch.no_grad()
def evaluate(module: Any, net: nn.Module, loader: Iterable[Any], stage: str = "val") -> dict[str, float]:
    """Every metric ``module.step(batch, stage)`` returns, over ``loader``, with ``net`` as the network.

    Scalars are averaged weighted by batch size and torchmetrics Metrics computed over all
    batches, as the base module logs them. ``module.net`` is restored afterwards.

    Returns:
        ``{"val/loss": ..., "val/acc": ...}``.
    """
    original, was_training = module.net, module.training
    module.net = net
    module.eval()
    device = next(net.parameters()).device
    sums: dict[str, float] = {}
    metrics: dict[str, torchmetrics.Metric] = {}
    count = 0
    # Only one rank may run PTQ: a metric must not wait for the others to sync.
    syncs = {metric: metric._to_sync for metric in _metrics_of(module)}
    try:
        for metric in syncs:
            metric.reset()
            metric._to_sync = False
        for batch in loader:
            batch = _to_device(batch, device)
            loss, items = module.step(batch, stage)
            n = int(module.example_input(batch).shape[0])
            for name, value in {"loss": loss, **dict(items)}.items():
                if isinstance(value, torchmetrics.Metric):
                    metrics[name] = value
                else:
                    sums[name] = sums.get(name, 0.0) + float(value.detach().float()) * n
            count += n
        results = {f"{stage}/{name}": total / max(count, 1) for name, total in sums.items()}
        results.update({f"{stage}/{name}": float(metric.compute()) for name, metric in metrics.items()})
    finally:
        for metric, sync in syncs.items():
            metric.reset()
            metric._to_sync = sync
        module.net = original
        module.train(was_training)
    return results


def _metrics_of(module: nn.Module) -> list[torchmetrics.Metric]:
    return [m for m in module.modules() if isinstance(m, torchmetrics.Metric)]


@dataclass
class PTQResult:
    """What a PTQ run measured and wrote."""

    method: str
    backend: str
    calibration: CalibrationResult
    fp32: dict[str, float]
    int8: dict[str, float]
    onnx: dict[str, float] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def quantize_calibrated(
    net: nn.Module, loader: Iterable[Any], cfg: Config, to_input: Any, backend: QuantBackend | None = None
) -> tuple[nn.Module, CalibrationResult]:
    """Quantize ``net`` in place with ``cfg.quant_backend`` and calibrate it by ``cfg.method``."""
    backend = backend or get_backend(cfg.quant_backend)
    net = quantize_model(net, backend)
    result = calibrate(
        net, loader, cfg.method, num_batches=cfg.num_batches, percentile=cfg.percentile, to_input=to_input
    )
    return net, result


def ptq_network(module: Any, train_loader: Iterable[Any], cfg: Config) -> nn.Module:
    """A calibrated fake-quant copy of ``module.net`` (``module.net`` itself stays float).

    What an int8 TensorRT engine of a float network is built from (``trt_quant`` without
    ``ptq``, ``lightrainer export --format engine --int8``).

    Raises:
        ConfigError: a bad quantization setting, no backend, nothing to quantize.
    """
    backend = check_quant_config(cfg.replace(ptq=True, qat=False), module.net)
    net = copy.deepcopy(module.net).eval()
    net, calibration = quantize_calibrated(net, train_loader, cfg, module.example_input, backend)
    log.info("PTQ: %s calibration on %d batches took %.2f s", cfg.method, calibration.batches, calibration.seconds)
    return net


def post_training_quantize(
    module: Any,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    cfg: Config,
    run_dir: str | os.PathLike,
    state_dict: dict[str, Tensor] | None = None,
    sensitivity: bool = True,
    exporter: Int8Exporter | None = None,
) -> PTQResult:
    """PTQ of ``module.net`` (or of ``state_dict`` loaded into a copy): calibrate, compare, save.

    Writes to ``run_dir``: ``ptq_results.csv`` / ``ptq_results.md`` (FP32 vs INT8 for every val
    metric), ``quant_sensitivity.csv`` / ``.png``, ``weights/best_int8.pt`` (state_dict with amax,
    ``torch.load(..., weights_only=True)``) and, with ``exporter``
    (:func:`lightrainer.export.export_int8`), ``weights/best_int8.onnx`` (Q/DQ for TensorRT).

    Returns:
        A :class:`PTQResult`.

    Raises:
        ConfigError: a bad quantization setting, quantized weights.
        WeightsError: ``state_dict`` was saved by another network.
    """
    backend = check_quant_config(cfg.replace(ptq=True, qat=False), module.net)
    run_dir = Path(run_dir)
    fp32 = copy.deepcopy(module.net)
    if state_dict is not None:
        if is_quantized_state_dict(state_dict):
            raise ConfigError(
                "ptq: these weights are quantized already (a QAT run or best_int8.pt): export them with "
                "lightrainer export --weights ... (the ONNX model is Q/DQ)"
            )
        apply_weights(fp32, state_dict)
    fp32.eval()
    qnet, calibration = quantize_calibrated(copy.deepcopy(fp32), train_loader, cfg, module.example_input, backend)
    log.info("PTQ: %s calibration on %d batches took %.2f s", cfg.method, calibration.batches, calibration.seconds)
    result = PTQResult(
        cfg.method, backend.name, calibration, evaluate(module, fp32, val_loader), evaluate(module, qnet, val_loader)
    )
    inputs = [module.example_input(b) for b in itertools.islice(val_loader, REPORT_BATCHES)]
    if sensitivity:
        rows = quant_sensitivity(qnet, inputs)
        result.files.append(write_sensitivity(rows, run_dir, plot=cfg.plots))
    result.files += save_quantized(qnet, run_dir, cfg, extra={"ptq": _summary(result)})
    if exporter is not None:
        onnx_path, result.onnx = exporter(module, qnet, inputs, run_dir, cfg)
        result.files.append(onnx_path)
    result.files += write_ptq_table(result, run_dir)
    return result


def _summary(result: PTQResult) -> dict[str, Any]:
    return {
        "method": result.method,
        "backend": result.backend,
        "calibration_batches": result.calibration.batches,
        "calibration_seconds": result.calibration.seconds,
        "fp32": result.fp32,
        "int8": result.int8,
    }


def best_weights(run_dir: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, Tensor] | None:
    """The network state_dict of the run's ``weights/best.pt``, or None (with a warning) when absent."""
    best = Path(run_dir) / "weights" / "best.pt"
    if not best.is_file():
        log.warning("%s not found: using the network's final weights", best)
        return None
    return torch.load(best, map_location=device, weights_only=True)["model"]


def save_quantized(net: nn.Module, run_dir: Path, cfg: Config, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write ``weights/best_int8.pt``: the quantized state_dict (amax included), loadable with
    ``weights_only=True`` and :func:`lightrainer.quant.load_quantized_state_dict`."""
    path = run_dir / "weights" / "best_int8.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "quant": {"backend": get_backend(cfg.quant_backend).name, "method": cfg.method, "percentile": cfg.percentile},
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    atomic_torch_save(payload, path)
    return [path]


def write_ptq_table(result: PTQResult, run_dir: Path) -> list[Path]:
    """``ptq_results.csv`` and ``ptq_results.md``: FP32 vs INT8 per val metric; also logged."""
    rows = []
    for key in result.fp32:
        fp32, int8 = result.fp32[key], result.int8.get(key, math.nan)
        rows.append((key, fp32, int8, int8 - fp32))
    csv_path, md_path = run_dir / "ptq_results.csv", run_dir / "ptq_results.md"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["metric", "fp32", "int8", "delta"])
    writer.writerows([key, f"{a:.6g}", f"{b:.6g}", f"{d:+.6g}"] for key, a, b, d in rows)
    atomic_write(csv_path, table.getvalue())
    lines = [
        f"PTQ int8 ({result.backend}, method {result.method}, {result.calibration.batches} calibration batches, "
        f"{result.calibration.seconds:.2f} s)",
        "",
        "| metric | FP32 | INT8 | delta |",
        "|---|---|---|---|",
        *(f"| {key} | {a:.4f} | {b:.4f} | {d:+.4f} |" for key, a, b, d in rows),
    ]
    if result.onnx:
        lines += ["", "Q/DQ ONNX (ONNX Runtime) vs PyTorch fake-quant: "
                  + ", ".join(f"{k} {v:.4g}" for k, v in result.onnx.items())]
    atomic_write(md_path, "\n".join(lines) + "\n")
    log.info("\n%s", "\n".join(lines))
    return [csv_path, md_path]
