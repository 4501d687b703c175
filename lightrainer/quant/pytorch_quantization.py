"""Backend on NVIDIA's ``pytorch-quantization`` 2.1.3 (the seed's library)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn

from lightrainer.errors import ConfigError
from lightrainer.quant.base import NUM_BITS, QuantBackend, dist_version, quiet_import, register_backend

REAL_VERSION = "2.1.3"


class PytorchQuantizationBackend(QuantBackend):
    """``pytorch_quantization.nn.TensorQuantizer`` with its max and histogram calibrators."""

    name = "pytorch_quantization"
    module = "pytorch_quantization"

    def check_installed(self) -> None:
        version = dist_version("pytorch-quantization")
        if version is not None and _version_tuple(version) >= (2, 2):
            # PyPI's 2.2.x uploads are placeholders that fail on purpose.
            raise ConfigError(
                f"quant_backend: pytorch-quantization {version} is a placeholder package from PyPI that does not "
                f"work: pip install pytorch-quantization=={REAL_VERSION}"
            )
        super().check_installed()
        with quiet_import():
            import pytorch_quantization.calib  # noqa: F401  (the modules the backend uses)
            import pytorch_quantization.nn  # noqa: F401

    def make_quantizer(self, axis: int | None) -> nn.Module:
        from pytorch_quantization.nn import TensorQuantizer
        from pytorch_quantization.tensor_quant import QuantDescriptor

        desc = QuantDescriptor(
            num_bits=NUM_BITS,
            axis=None if axis is None else (axis,),
            calib_method="histogram" if axis is None else "max",
        )
        with self.quiet():
            return TensorQuantizer(desc)

    def make_calibrator(self, kind: str, axis: int | None, num_bins: int) -> Any:
        from pytorch_quantization import calib

        if kind == "max":
            return calib.MaxCalibrator(NUM_BITS, None if axis is None else (axis,), False)
        return calib.HistogramCalibrator(NUM_BITS, None, False, num_bins=num_bins)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        # The library logs every calibrator switch at WARNING through absl.
        from absl import logging as absl_logging

        level = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            yield
        finally:
            absl_logging.set_verbosity(level)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


register_backend(PytorchQuantizationBackend())
