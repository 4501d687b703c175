"""Backend on NVIDIA ModelOpt (``nvidia-modelopt``), the maintained successor of pytorch-quantization.

Only ModelOpt's ``TensorQuantizer`` and calibrators are used: ``mtq.quantize`` is avoided because
its histogram calibration fails there, and its MSE amax is wrong (the project computes MSE itself).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightrainer.errors import ConfigError
from lightrainer.quant.base import INSTALL_HINT, NUM_BITS, QuantBackend, quiet_import, register_backend


class ModelOptBackend(QuantBackend):
    """``modelopt.torch.quantization.nn.TensorQuantizer`` with its max and histogram calibrators."""

    name = "modelopt"
    module = "modelopt"

    def check_installed(self) -> None:
        try:
            with quiet_import():
                import modelopt.torch.quantization  # noqa: F401
        except ImportError as err:
            # ModelOpt imports requests and huggingface_hub without declaring them.
            raise ConfigError(f"quant_backend: modelopt is not usable ({err}): {INSTALL_HINT}") from None

    def make_quantizer(self, axis: int | None) -> nn.Module:
        from modelopt.torch.quantization.config import QuantizerAttributeConfig
        from modelopt.torch.quantization.nn import TensorQuantizer

        return TensorQuantizer(
            QuantizerAttributeConfig(
                num_bits=NUM_BITS,
                axis=axis,
                calibrator="histogram" if axis is None else "max",
                # Clipped straight-through estimator, as pytorch-quantization: ModelOpt's default
                # passes gradients through clipped values and QAT then barely learns.
                pass_through_bwd=False,
            )
        )

    def make_calibrator(self, kind: str, axis: int | None, num_bins: int) -> Any:
        from modelopt.torch.quantization import calib

        if kind == "max":
            return calib.MaxCalibrator(NUM_BITS, axis, False)
        return calib.HistogramCalibrator(NUM_BITS, None, False, num_bins=num_bins)


register_backend(ModelOptBackend())
