"""Q/DQ ONNX for TensorRT explicit quantization: exportable quantize-dequantize modules.

TensorRT wants QuantizeLinear/DequantizeLinear pairs with symmetric int8 scales (amax / 127),
zero point 0 (int8) and per-channel weight scales along axis 0. During export each quantizer is
swapped for a module built on torch's own quantize ops, so the same graph comes out of both
libraries: ``fake_quantize_*`` for the TorchScript exporter, ``quantized_decomposed`` ops with a
custom translation table for the dynamo exporter (whose tracer cannot run fake_quantize with a
dynamic batch). :func:`lightrainer.export.export_onnx` enters :func:`qdq_export_context` for
any network holding quantizers, so a quantized network exports (and is verified) like any other.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from lightrainer.quant.base import is_weight_quantizer, iter_quantizers

QMIN, QMAX = -128, 127
#: smallest scale written: a dead channel (amax 0) must not give a zero scale
MIN_SCALE = 1e-12


class QDQ(nn.Module):
    """Symmetric int8 quantize-dequantize with a fixed scale, written with exportable torch ops."""

    def __init__(self, amax: Tensor, axis: int | None, dynamo: bool) -> None:
        super().__init__()
        scale = (amax.detach().float() / QMAX).clamp_min(MIN_SCALE)
        self.register_buffer("scale", scale.reshape(-1) if axis is not None else scale.reshape(()))
        self.axis = axis
        self.dynamo = dynamo

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamo:
            return self._decomposed(x)
        if self.axis is None:
            zero = torch.zeros((), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_tensor_affine(x, self.scale, zero, QMIN, QMAX)
        zero = torch.zeros_like(self.scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(x, self.scale, zero, self.axis, QMIN, QMAX)

    def _decomposed(self, x: Tensor) -> Tensor:
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers the ops)

        ops = torch.ops.quantized_decomposed
        if self.axis is None:
            zero = torch.zeros((), dtype=torch.int64, device=x.device)
            q = ops.quantize_per_tensor.tensor(x, self.scale, zero, QMIN, QMAX, torch.int8)
            return ops.dequantize_per_tensor.tensor(q, self.scale, zero, QMIN, QMAX, torch.int8)
        zero = torch.zeros_like(self.scale, dtype=torch.int64)
        q = ops.quantize_per_channel(x, self.scale, zero, self.axis, QMIN, QMAX, torch.int8)
        return ops.dequantize_per_channel(q, self.scale, zero, self.axis, QMIN, QMAX, torch.int8)


def qdq_translation_table() -> dict:
    """ONNX translations of torch's ``quantized_decomposed`` ops for ``torch.onnx.export(dynamo=True,
    custom_translation_table=...)``: QuantizeLinear/DequantizeLinear with an int8 zero point."""
    import onnx
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    from onnxscript import opset18 as op

    int8 = onnx.TensorProto.INT8

    def quantize(x, scale, zero_point, quant_min, quant_max, dtype):
        return op.QuantizeLinear(x, scale, op.Cast(zero_point, to=int8))

    def dequantize(x, scale, zero_point, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(x, scale, op.Cast(zero_point, to=int8))

    def quantize_axis(x, scale, zero_point, axis, quant_min, quant_max, dtype):
        return op.QuantizeLinear(x, scale, op.Cast(zero_point, to=int8), axis=axis)

    def dequantize_axis(x, scale, zero_point, axis, quant_min, quant_max, dtype, out_dtype=None):
        return op.DequantizeLinear(x, scale, op.Cast(zero_point, to=int8), axis=axis)

    ops = torch.ops.quantized_decomposed
    return {
        ops.quantize_per_tensor.tensor: quantize,
        ops.dequantize_per_tensor.tensor: dequantize,
        ops.quantize_per_channel.default: quantize_axis,
        ops.dequantize_per_channel.default: dequantize_axis,
    }


def _quantizer_is_on(quantizer: nn.Module) -> bool:
    return not getattr(quantizer, "_disabled", False) and getattr(quantizer, "_if_quant", True)


@contextlib.contextmanager
def qdq_export_context(net: nn.Module, dynamo: bool = False) -> Iterator[nn.Module]:
    """Swap every quantizer of ``net`` for an exportable :class:`QDQ` (disabled ones for Identity).

    Args:
        net: a calibrated quantized network.
        dynamo: build for the dynamo exporter (pass :func:`qdq_translation_table` to it).

    Yields:
        ``net``, ready for ``torch.onnx.export``; the quantizers are put back on exit.

    Raises:
        ValueError: a quantizer that is on has no amax (not calibrated).
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, quantizer in list(iter_quantizers(net)):
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name)
            replacement: nn.Module = nn.Identity()
            if _quantizer_is_on(quantizer):
                amax = getattr(quantizer, "_amax", None)
                if amax is None:
                    raise ValueError(f"{name} is not calibrated: run lightrainer.quant.calibrate first")
                replacement = QDQ(amax, 0 if is_weight_quantizer(name) else None, dynamo).to(amax.device)
            swapped.append((parent, child, quantizer))
            setattr(parent, child, replacement)
        yield net
    finally:
        for parent, child, quantizer in reversed(swapped):
            setattr(parent, child, quantizer)
