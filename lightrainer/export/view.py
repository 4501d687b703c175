"""The part of a network that an ONNX file holds: one method, some of its outputs."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from lightrainer.export.errors import ExportError


class ExportView(nn.Module):
    """Wraps ``net`` so that ``forward`` calls ``net.<method>`` and returns only the chosen outputs.

    Args:
        net: the network.
        method: name of the method to export ("forward", or e.g. "encode_codes").
        outputs: indices of the outputs to keep when the method returns a tuple (None = all).

    Raises:
        ExportError: ``net`` has no such method.
    """

    def __init__(self, net: nn.Module, method: str = "forward", outputs: Sequence[int] | None = None) -> None:
        super().__init__()
        if not callable(getattr(net, method, None)):
            raise ExportError(f"method: {type(net).__name__} has no method {method!r} to export")
        self.net = net
        self.method = method
        self.outputs = None if outputs is None else tuple(int(i) for i in outputs)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = self.net(x) if self.method == "forward" else getattr(self.net, self.method)(x)
        if self.outputs is None:
            return out
        if isinstance(out, Tensor):
            out = (out,)
        picked = tuple(out[i] for i in self.outputs)
        return picked[0] if len(picked) == 1 else picked


def as_tensors(out: object, what: str = "the network") -> list[Tensor]:
    """The outputs of a forward pass as a flat list of tensors.

    Raises:
        ExportError: an output that is not a tensor (ONNX carries tensors only).
    """
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    bad = [f"#{i}: {type(o).__name__}" for i, o in enumerate(items) if not isinstance(o, Tensor)]
    if bad:
        raise ExportError(
            f"{what} returns non-tensor outputs ({', '.join(bad)}): ONNX holds tensors only; "
            "pick tensor outputs with outputs=[...]"
        )
    return items


def normalise_outputs(outputs: int | Sequence[int] | None) -> tuple[int, ...] | None:
    """``outputs`` as a tuple of indices (an int selects one output)."""
    if outputs is None:
        return None
    return (int(outputs),) if isinstance(outputs, int) else tuple(int(i) for i in outputs)


@contextlib.contextmanager
def cpu_eval(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode on the CPU (a copy when it lives elsewhere); the training flag is restored.

    Exporting and the PyTorch reference of a verification run on the CPU, so a GPU's TF32 kernels
    do not show up as an ONNX mismatch.
    """
    params = list(net.parameters()) + list(net.buffers())
    on_cpu = all(p.device.type == "cpu" for p in params)
    target = net if on_cpu else copy.deepcopy(net).cpu()
    was_training = net.training
    target.eval()
    try:
        with torch.no_grad():
            yield target
    finally:
        net.train(was_training)
