"""Calibration: the amax methods (a registry) and the one calibration loop both backends share."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from lightrainer.constraints import apply_constraints_
from lightrainer.errors import ConfigError
from lightrainer.quant.base import backend_of, is_weight_quantizer, iter_quantizers
from lightrainer.registry import CALIBRATION_METHODS

log = logging.getLogger(__name__)

DEFAULT_NUM_BINS = 2048


@dataclass(frozen=True)
class CalibMethod:
    """How a method gets the activation amax.

    Attributes:
        calibrator: "max" or "histogram": what the input quantizers collect.
        amax: ``amax(quantizer, percentile) -> Tensor`` from the collected statistics.
    """

    calibrator: str
    amax: Callable[[nn.Module, float], Tensor]


def register_calib_method(name: str, method: CalibMethod, *, override: bool = False) -> CalibMethod:
    """Add an amax method to the registry (``method: <name>`` in a YAML then selects it)."""
    if not isinstance(method, CalibMethod):
        raise TypeError(f"register_calib_method: {name!r} must be a CalibMethod(calibrator, amax)")
    return CALIBRATION_METHODS.register(name, method, override=override)


def list_calib_methods() -> list[str]:
    """The registered amax method names."""
    return CALIBRATION_METHODS.names()


def get_calib_method(name: str) -> CalibMethod:
    """The method called ``name``.

    Raises:
        ConfigError: unknown method, naming the known ones.
    """
    return CALIBRATION_METHODS.get(name, "method")


def _histogram(quantizer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    calibrator = quantizer._calibrator
    hist, edges = calibrator._calib_hist, calibrator._calib_bin_edges
    if hist is None:
        raise RuntimeError("the histogram calibrator has seen no tensor")
    hist = hist.cpu().numpy() if isinstance(hist, Tensor) else np.asarray(hist)
    edges = edges.cpu().numpy() if isinstance(edges, Tensor) else np.asarray(edges)
    return hist.astype(np.float64), edges.astype(np.float64)


def mse_amax(hist: np.ndarray, edges: np.ndarray, num_bits: int = 8, start_bin: int = 128) -> float:
    """The amax minimising the mean squared error of symmetric fake quantization over a histogram.

    Each bin's count is spread evenly over points inside the bin (a bin is wider than a
    quantization step when the histogram is coarse, so its centre alone misjudges the error);
    the candidates are the bin edges from ``start_bin`` on. Written here because
    pytorch-quantization's version calls ``.cuda()`` and ModelOpt's passes ``num_bits`` into the
    wrong argument.

    Args:
        hist: counts of |x| per bin.
        edges: bin edges (``len(hist) + 1`` values, or more after the histogram grew).
        num_bits: quantization bits (signed, zero point 0).
        start_bin: the first candidate bin.

    Returns:
        The amax.
    """
    edges = edges[: len(hist) + 1]
    per_bin = max(1, 4096 // len(hist))
    offsets = (np.arange(per_bin) + 0.5) / per_bin
    points = (edges[:-1, None] + offsets[None] * np.diff(edges)[:, None]).reshape(-1)
    weights = np.repeat(hist / per_bin, per_bin)
    candidates = edges[min(start_bin, len(hist) - 1) + 1 :]
    bound = 2 ** (num_bits - 1) - 1
    errors = np.empty(len(candidates))
    for start in range(0, len(candidates), 64):  # chunks keep the (candidates x points) matrix small
        amax = candidates[start : start + 64, None]
        quantized = np.clip(np.round(points[None] * bound / amax), 0, bound) * amax / bound
        errors[start : start + 64] = ((quantized - points[None]) ** 2 * weights[None]).sum(axis=1)
    return float(candidates[int(np.argmin(errors))])


def _mse(quantizer: nn.Module, percentile: float) -> Tensor:
    return torch.tensor(mse_amax(*_histogram(quantizer), num_bits=quantizer.num_bits))


def _library_amax(method: str) -> Callable[[nn.Module, float], Tensor]:
    def amax(quantizer: nn.Module, percentile: float) -> Tensor:
        calibrator = quantizer._calibrator
        if method == "max":
            return calibrator.compute_amax()
        return calibrator.compute_amax(method, percentile=percentile)

    return amax


def _entropy(quantizer: nn.Module, percentile: float) -> Tensor:
    hist, edges = _histogram(quantizer)
    occupied = np.flatnonzero(hist)
    if len(occupied) <= 2 ** (quantizer.num_bits - 1):
        # Few distinct levels (e.g. 8-bit images of sklearn digits: 17 values): KL divergence over
        # such a sparse histogram picks the first level and clips everything; max loses nothing.
        return torch.tensor(float(edges[occupied[-1] + 1]) if len(occupied) else 0.0)
    # Point masses (the normalised background pixel of MNIST, and each channel's response to it in
    # the next layer) hold most of the counts: KL divergence then only sees the spike and clips the
    # rest (73 points of MNIST accuracy lost). A spike's own rounding error is at most half a step
    # whatever the amax, so the divergence is taken over the histogram with spikes cut down.
    capped = np.minimum(hist, SPIKE_CAP * np.median(hist[occupied]))
    calibrator = quantizer._calibrator
    original = calibrator._calib_hist
    calibrator._calib_hist = torch.as_tensor(capped) if isinstance(original, Tensor) else capped
    try:
        return _library_amax("entropy")(quantizer, percentile)
    finally:
        calibrator._calib_hist = original


#: a histogram bin holding more than this many times the median occupied bin is a point mass
SPIKE_CAP = 20.0

register_calib_method("entropy", CalibMethod("histogram", _entropy))
register_calib_method("max", CalibMethod("max", _library_amax("max")))
register_calib_method("percentile", CalibMethod("histogram", _library_amax("percentile")))
register_calib_method("mse", CalibMethod("histogram", _mse))


def set_amax(quantizer: nn.Module, amax: Tensor) -> None:
    """Set (or create) a quantizer's ``_amax`` buffer."""
    quantizer._buffers.pop("_amax", None)
    quantizer.register_buffer("_amax", torch.as_tensor(amax, dtype=torch.float32).detach().clone())


def _default_input(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@dataclass
class CalibrationResult:
    """What a calibration did: method, batches seen, seconds, and layers left in float."""

    method: str
    batches: int
    seconds: float
    uncalibrated: list[str]


@torch.no_grad()
def calibrate(
    net: nn.Module,
    batches: Iterable[Any],
    method: str = "entropy",
    *,
    num_batches: int | None = None,
    percentile: float = 99.99,
    to_input: Callable[[Any], Tensor] = _default_input,
    num_bins: int = DEFAULT_NUM_BINS,
) -> CalibrationResult:
    """Calibrate every quantizer of a quantized ``net``.

    Quantization off and calibration on, ``num_batches`` batches through the net in eval mode,
    amax loaded by ``method`` (activations) and per-channel max (weights), quantization back on.
    The net's train/eval mode is restored. A layer whose quantizers see no tensor (never called,
    or a forward that bypasses them) is left in float, with a warning.

    Args:
        net: a network from :func:`quantize_model`.
        batches: an iterable of batches (a DataLoader).
        method: an amax method name (:func:`list_calib_methods`).
        num_batches: how many batches (None = all).
        percentile: the percentile method's percentile.
        to_input: batch -> network input (default: ``batch[0]`` of a tuple/list, else the batch).
        num_bins: activation histogram bins.

    Returns:
        A :class:`CalibrationResult`.

    Raises:
        ConfigError: unknown method, ``num_batches`` < 1, or no batch at all.
    """
    calib_method = get_calib_method(method)
    if num_batches is not None and num_batches < 1:
        raise ConfigError(f"num_batches: must be >= 1 or None, got {num_batches}")
    backend = backend_of(net)
    # Constrained (max-norm) layers: the weight amax must be that of the projected weights the
    # layer computes with.
    apply_constraints_(net)
    quantizers = list(iter_quantizers(net))
    device = next(net.parameters()).device
    was_training = net.training
    start = time.perf_counter()
    with backend.quiet():
        for name, quantizer in quantizers:
            weight = is_weight_quantizer(name)
            kind = "max" if weight else calib_method.calibrator
            quantizer._calibrator = backend.make_calibrator(kind, 0 if weight else None, num_bins)
            quantizer.enable()
            quantizer.disable_quant()
            quantizer.enable_calib()
        net.eval()
        seen = 0
        try:
            for batch in itertools.islice(batches, num_batches):
                net(to_input(batch).to(device))
                seen += 1
        finally:
            net.train(was_training)
        if seen == 0:
            raise ConfigError("ptq/qat: the calibration data loader gave no batch")
        uncalibrated = []
        for name, quantizer in quantizers:
            quantizer.disable_calib()
            if _empty(quantizer._calibrator):
                quantizer.disable()
                uncalibrated.append(name.rsplit(".", 1)[0])
                continue
            if is_weight_quantizer(name):
                amax = quantizer._calibrator.compute_amax()
            else:
                amax = calib_method.amax(quantizer, percentile)
            set_amax(quantizer, amax.to(device))
            quantizer.enable_quant()
    seconds = time.perf_counter() - start
    uncalibrated = sorted(set(uncalibrated))
    if uncalibrated:
        log.warning(
            "quantization: %s saw no data during calibration (not called, or its forward bypasses the "
            "quantizers): kept in float", ", ".join(uncalibrated)
        )
    log.info("calibrated %d quantizers with %s on %d batches in %.2f s", len(quantizers), method, seen, seconds)
    return CalibrationResult(method, seen, seconds, uncalibrated)


def _empty(calibrator: Any) -> bool:
    if hasattr(calibrator, "_calib_hist"):
        return calibrator._calib_hist is None
    return calibrator._calib_amax is None


@torch.no_grad()
def refresh_weight_amax(net: nn.Module) -> None:
    """Set each weight quantizer's amax to its weight's current per-channel max (axis 0).

    QAT calls this before every step: the weights move during training, and an amax frozen at
    the start would clip (and stop the gradients of) every weight that outgrows it. Max-norm
    layers are projected first, so the amax is that of the weights the forward pass will use.
    """
    apply_constraints_(net)
    for name, quantizer in iter_quantizers(net):
        amax = getattr(quantizer, "_amax", None)
        if not is_weight_quantizer(name) or amax is None:
            continue
        weight = net.get_submodule(name.rpartition(".")[0]).weight
        amax.copy_(weight.detach().abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).reshape(amax.shape))
