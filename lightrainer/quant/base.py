"""The quantization backend interface and the backend registry.

A backend supplies NVIDIA-style ``TensorQuantizer`` modules and calibrators (per-tensor histogram
for activations, per-channel max for weights, symmetric int8, zero point 0). Everything else
(module replacement, the calibration loop, amax methods, Q/DQ export) is written once against the
calibration API both libraries share: ``disable_quant`` / ``enable_calib`` / forward passes /
``load_calib_amax`` / ``enable_quant``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import warnings
from abc import ABC, abstractmethod
from typing import Any, Iterator

from torch import nn

from lightrainer.errors import ConfigError
from lightrainer.registry import QUANT_BACKENDS

INSTALL_HINT = 'pip install "lightrainer[quant]"'
NUM_BITS = 8


class QuantBackend(ABC):
    """One quantization library behind the project's quantizer interface."""

    #: the ``quant_backend`` key's value naming this backend
    name: str = ""
    #: the import name of the library
    module: str = ""

    def check_installed(self) -> None:
        """Raise :class:`ConfigError` in one line (naming the pip command) where the library is unusable.

        The default imports :attr:`module`; a backend adds its own checks (versions, extra imports).
        """
        try:
            with quiet_import():
                importlib.import_module(self.module)
        except ImportError as err:
            raise ConfigError(f"quant_backend: {self.name} is not installed ({err}): {INSTALL_HINT}") from None

    @abstractmethod
    def make_quantizer(self, axis: int | None) -> nn.Module:
        """A fake-quant int8 quantizer: per-tensor (``axis=None``) or per-channel along ``axis``."""

    @abstractmethod
    def make_calibrator(self, kind: str, axis: int | None, num_bins: int) -> Any:
        """A fresh calibrator: ``kind`` is "max" or "histogram" (histograms are per-tensor only)."""

    def is_quantizer(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this library's quantizers."""
        return type(module).__module__.startswith(self.module + ".")

    def quiet(self) -> contextlib.AbstractContextManager:
        """Silence the library's chatty logging while the project drives it."""
        return contextlib.nullcontext()


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    """Import a quantization library without it changing or flooding the program's output.

    pytorch-quantization's ``__init__`` calls absl's ``use_absl_handler()``, which swaps the root
    logger's handler for absl's and lowers the root to WARNING: every INFO line of the program
    (export's verification and "exported" lines) vanished once the library was imported. The
    root logger's handlers and level are put back. Both libraries decorate functions with
    ``torch.jit.script`` (a FutureWarning per import under torch 2.x) and ModelOpt imports torch's
    C++ extension helper, which warns on a machine without CUDA: nothing a user can act on.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    cpp = logging.getLogger("torch.utils.cpp_extension")
    cpp_level = cpp.level
    cpp.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            yield
    finally:
        cpp.setLevel(cpp_level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def register_backend(backend: QuantBackend, *, override: bool = False) -> QuantBackend:
    """Add a backend to the registry (``quant_backend: <backend.name>``); ``auto`` tries the
    backends in registration order, the built-in ones first."""
    return QUANT_BACKENDS.register(backend.name, backend, override=override)


def list_backends() -> list[str]:
    """Registered backend names, in ``auto`` preference order."""
    return QUANT_BACKENDS.names()


def get_backend(name: str | QuantBackend = "auto") -> QuantBackend:
    """The backend named by ``quant_backend``, checked to be usable.

    Args:
        name: a backend name, "auto" (the first installed in registration order: modelopt, then
            pytorch_quantization), or a backend.

    Returns:
        The backend, its library importable.

    Raises:
        ConfigError: unknown name; the named library missing or broken; for "auto", none installed.
    """
    if isinstance(name, QuantBackend):
        name.check_installed()
        return name
    if name != "auto":
        backend = QUANT_BACKENDS.get(QUANT_BACKENDS.canonical(name, extra=("auto",)))
        backend.check_installed()
        return backend
    errors = []
    for backend in (QUANT_BACKENDS.get(n) for n in QUANT_BACKENDS):
        try:
            backend.check_installed()
        except ConfigError as err:
            errors.append(str(err))
            if "placeholder" in str(err):
                # A broken install is worth fixing, not silently skipping.
                raise
            continue
        return backend
    raise ConfigError(
        f"ptq/qat need a quantization library and none is installed ({'; '.join(errors)}): {INSTALL_HINT}"
    )


def backend_of(net: nn.Module) -> QuantBackend:
    """The backend whose quantizers ``net`` holds.

    Raises:
        ValueError: the network holds no quantizer.
    """
    for module in net.modules():
        for backend in (QUANT_BACKENDS.get(n) for n in QUANT_BACKENDS):
            if backend.is_quantizer(module):
                return backend
    raise ValueError("the network is not quantized: call lightrainer.quant.quantize_model(net) first")


def iter_quantizers(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, quantizer) for every input and weight quantizer in ``net``, in module order.

    Quantizers are found by name: a quantized layer keeps them as ``input_quantizer`` and
    ``weight_quantizer`` (NVIDIA's own Quant* modules prefix an underscore; both are accepted).
    """
    for name, module in net.named_modules():
        if name.rsplit(".", 1)[-1].lstrip("_") in ("input_quantizer", "weight_quantizer"):
            yield name, module


def is_weight_quantizer(name: str) -> bool:
    """Whether the quantizer called ``name`` quantizes a weight (per-channel) rather than an input."""
    return name.rsplit(".", 1)[-1].lstrip("_") == "weight_quantizer"
