"""Module replacement: float Conv/Linear layers -> quantized layers, through a registry users extend.

A quantized layer is the original layer with two child quantizers, ``input_quantizer``
(per-tensor, histogram-calibrated) and ``weight_quantizer`` (per-channel along axis 0,
max-calibrated). Built-in layers are converted in place by a class swap, so parameters, buffers,
hooks and ``state_dict`` keys stay as they were (``<layer>.<quantizer>._amax`` is added).

The swap inserts the quantized base *between* a subclass and its torch base class, so a subclass
whose ``forward`` does extra work and then calls ``super().forward`` keeps doing it: the project's
``Conv2dWithConstraint`` / ``LinearWithConstraint`` keep their max-norm renorm during QAT.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightrainer.config import ConfigError
from lightrainer.quant.base import QuantBackend, backend_of, get_backend, iter_quantizers
from lightrainer.quant.calibrate import set_amax

#: factory(layer, backend) -> the quantized layer (it may modify ``layer`` in place and return it)
QuantLayerFactory = Callable[[nn.Module, QuantBackend], nn.Module]

_LAYERS: dict[type, QuantLayerFactory] = {}


class _QuantConvMixin:
    """Quantizes the input and the weight where every torch ``_ConvNd`` computes its output."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(self.input_quantizer(input), self.weight_quantizer(weight), bias)


class _QuantConv1d(_QuantConvMixin, nn.Conv1d):
    pass


class _QuantConv2d(_QuantConvMixin, nn.Conv2d):
    pass


class _QuantConv3d(_QuantConvMixin, nn.Conv3d):
    pass


class _QuantLinear(nn.Linear):
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(input), self.weight_quantizer(self.weight), self.bias)


_QUANT_CLASSES: dict[type, type] = {}


def _quant_class(cls: type, quant_base: type) -> type:
    """``cls`` with ``quant_base`` placed right after it in the MRO (cached, picklable by name)."""
    if cls not in _QUANT_CLASSES:
        name = f"Quant{cls.__name__}"
        qcls = type(name, (cls, quant_base), {"__module__": __name__, "__qualname__": name})
        globals().setdefault(name, qcls)
        _QUANT_CLASSES[cls] = qcls
    return _QUANT_CLASSES[cls]


def class_swap_factory(torch_base: type, quant_base: type) -> QuantLayerFactory:
    """A factory that swaps a layer's class for ``quant_base`` (or, for a subclass, a mix of both).

    ``quant_base`` subclasses ``torch_base`` and reads ``self.input_quantizer`` and
    ``self.weight_quantizer`` in its forward; see ``_QuantLinear`` for the pattern.
    """

    def factory(layer: nn.Module, backend: QuantBackend) -> nn.Module:
        if type(layer) is torch_base:
            layer.__class__ = quant_base
        else:
            layer.__class__ = _quant_class(type(layer), quant_base)
        add_quantizers(layer, backend)
        return layer

    return factory


def add_quantizers(layer: nn.Module, backend: QuantBackend, weight_axis: int = 0) -> None:
    """Give ``layer`` an ``input_quantizer`` and a per-channel ``weight_quantizer`` of ``backend``.

    Also lets a freshly quantized layer load a state_dict holding calibrated amax (the quantizers
    have no ``_amax`` buffer until calibrated; pytorch-quantization would create it with ``.cuda()``).
    """
    layer.input_quantizer = backend.make_quantizer(None)
    layer.weight_quantizer = backend.make_quantizer(weight_axis)
    layer.register_load_state_dict_pre_hook(_make_amax_buffers)
    layer.register_load_state_dict_post_hook(_end_quiet)


def _make_amax_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # pytorch-quantization logs a warning per quantizer loaded: quiet until the post hook.
    module._quant_load_quiet = backend_of(module).quiet()
    module._quant_load_quiet.__enter__()
    for name in ("input_quantizer", "weight_quantizer"):
        quantizer = getattr(module, name, None)
        key = f"{prefix}{name}._amax"
        if quantizer is not None and key in state_dict and "_amax" not in quantizer._buffers:
            device = next((p.device for p in module.parameters(recurse=False)), torch.device("cpu"))
            quantizer.register_buffer("_amax", torch.empty_like(state_dict[key], device=device))


def _end_quiet(module: nn.Module, incompatible_keys: object) -> None:
    quiet = module.__dict__.pop("_quant_load_quiet", None)
    if quiet is not None:
        quiet.__exit__(None, None, None)


def register_quant_layer(cls: type, factory: QuantLayerFactory) -> None:
    """Teach :func:`quantize_model` to quantize layers of type ``cls`` (and its subclasses).

    Args:
        cls: the float layer type.
        factory: ``factory(layer, backend) -> quantized layer``. The quantized layer must hold its
            quantizers as ``input_quantizer`` / ``weight_quantizer`` (make them with
            :func:`add_quantizers`) and apply them in its forward.

    Example:
        >>> class QuantMyConv(MyConv):              # MyConv: a layer with .weight
        ...     def forward(self, x):
        ...         return my_op(self.input_quantizer(x), self.weight_quantizer(self.weight))
        >>> def make(layer, backend):
        ...     layer.__class__ = QuantMyConv
        ...     add_quantizers(layer, backend)
        ...     return layer
        >>> register_quant_layer(MyConv, make)
    """
    _LAYERS[cls] = factory


def quant_layer_types() -> list[type]:
    """The layer types :func:`quantize_model` converts."""
    return list(_LAYERS)


def _factory_for(module: nn.Module) -> QuantLayerFactory | None:
    for cls in type(module).__mro__:
        if cls in _LAYERS:
            return _LAYERS[cls]
    return None


def quantizable_layers(net: nn.Module, keep_float: Sequence[str] = ()) -> list[str]:
    """Names of the layers :func:`quantize_model` would convert (patterns in ``keep_float`` excluded)."""
    names = []
    for name, module in net.named_modules():
        if _is_quantized(module) or _factory_for(module) is None:
            continue
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in keep_float):
            names.append(name)
    return names


def _is_quantized(module: nn.Module) -> bool:
    return any(True for _ in iter_quantizers(module))


def quantize_model(
    net: nn.Module, backend: str | QuantBackend = "auto", keep_float: Sequence[str] = ()
) -> nn.Module:
    """Convert every registered layer type of ``net`` to its quantized form, in place.

    Weights stay the same tensors. The quantizers start uncalibrated: run
    :func:`lightrainer.quant.calibrate` (or load a state_dict with amax) next.

    Args:
        net: the float network.
        backend: "auto", "pytorch_quantization", "modelopt" or a :class:`QuantBackend`.
        keep_float: module names (fnmatch patterns, e.g. ``"head.*"``) to leave in float.

    Returns:
        ``net`` (or its replacement where ``net`` itself is a single layer).

    Raises:
        ConfigError: the backend is unusable; a ``keep_float`` pattern matches no layer; there is
            nothing to quantize.
    """
    backend = get_backend(backend)
    all_names = [name for name, _ in net.named_modules()]
    for pattern in keep_float:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise ConfigError(f"keep_float: {pattern!r} matches no layer of the network")
    names = quantizable_layers(net, keep_float)
    if not names:
        kinds = ", ".join(cls.__name__ for cls in _LAYERS)
        raise ConfigError(
            f"ptq/qat: the network has no layer to quantize (quantizable types: {kinds}; kept float: "
            f"{list(keep_float)}): register your layer type with lightrainer.quant.register_quant_layer"
        )
    with backend.quiet():
        for name in names:
            layer = net.get_submodule(name)
            quantized = _factory_for(layer)(layer, backend)
            if quantized is not layer:
                if not name:
                    return quantized
                parent_name, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent_name), child, quantized)
    return net


for _torch_base, _quant_base in (
    (nn.Conv1d, _QuantConv1d),
    (nn.Conv2d, _QuantConv2d),
    (nn.Conv3d, _QuantConv3d),
    (nn.Linear, _QuantLinear),
):
    register_quant_layer(_torch_base, class_swap_factory(_torch_base, _quant_base))


def is_quantized_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state_dict comes from a quantized network (it holds quantizer amax)."""
    return any(key.endswith("_quantizer._amax") for key in state_dict)


def quantize_like(net: nn.Module, state_dict: Mapping[str, Any], backend: str | QuantBackend = "auto") -> nn.Module:
    """Quantize ``net`` the way ``state_dict``'s network was, ready for ``net.load_state_dict(state_dict)``.

    The layers quantized are those whose quantizer amax the state_dict holds; the others stay
    float. Each of their quantizers gets an ``_amax`` buffer of the saved shape, so ``net``'s
    keys and shapes match the file before anything is loaded (a mismatch then means another model).
    Layers of ``net`` that are quantized already are left as they are.

    Returns:
        ``net`` (or its replacement where ``net`` itself is a single layer), not yet loaded.
    """
    amax_keys = [key for key in state_dict if key.endswith("_quantizer._amax")]
    quantized = {key.rsplit(".", 2)[0] for key in amax_keys}
    todo = [name for name in quantizable_layers(net) if name in quantized]
    if todo:
        keep_float = [name for name in quantizable_layers(net) if name not in quantized]
        net = quantize_model(net, backend, keep_float=keep_float)
    modules = dict(net.named_modules())
    for key in amax_keys:
        quantizer, layer = modules.get(key[: -len("._amax")]), modules.get(key.rsplit(".", 2)[0])
        if quantizer is not None and layer is not None and "_amax" not in quantizer._buffers:
            device = next((p.device for p in layer.parameters(recurse=False)), torch.device("cpu"))
            set_amax(quantizer, torch.zeros_like(state_dict[key], device=device))
    return net


def load_quantized_state_dict(
    net: nn.Module, state_dict: Mapping[str, Any], backend: str | QuantBackend = "auto"
) -> nn.Module:
    """Quantize a float ``net`` the way ``state_dict``'s network was (:func:`quantize_like`), then load it.

    Works on the weights of ``best_int8.pt`` and on a QAT run's ``best.pt`` / ``last.pt``.

    Returns:
        The quantized network with the weights and amax loaded.
    """
    net = quantize_like(net, state_dict, backend)
    net.load_state_dict(state_dict)
    return net
