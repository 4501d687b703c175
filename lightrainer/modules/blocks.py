"""Network building blocks of the original lightrainer.

``Conv`` is the Ultralytics-style Conv2d + BatchNorm + SiLU with "same" padding; the
``*WithConstraint`` layers keep each output unit's weight vector inside an L2 ball of radius
``max_norm`` (the EEGNet max-norm constraint): before every forward pass the weights are projected
in place, so the optimizer steps on the unconstrained parameter and the layer always computes with
the projected one. ``Conv2dWithConstraint`` and ``LinearWithConstraint`` stay subclasses of
``nn.Conv2d`` / ``nn.Linear`` so quantization can swap them like any conv or linear layer.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightrainer.constraints import apply_constraints_

IntOrPair = Union[int, tuple[int, int]]

__all__ = [
    "Conv",
    "Conv2dWithConstraint",
    "ConvWithConstraint",
    "DWConvWithConstraint",
    "LinearWithConstraint",
    "SeparableConv",
    "apply_constraints_",
    "autopad",
    "max_norm_",
]


def autopad(k: IntOrPair, p: Optional[IntOrPair] = None, d: int = 1) -> IntOrPair:
    """Padding that keeps the spatial size at stride 1 ("same"), unless ``p`` is given.

    Args:
        k: kernel size (int or pair).
        p: explicit padding; returned unchanged when not None.
        d: dilation.

    Returns:
        The padding, an int or a list per dimension like ``k``.
    """
    if p is not None:
        return p
    if isinstance(k, int):
        return (d * (k - 1) + 1) // 2
    return [(d * (size - 1) + 1) // 2 for size in k]


def _activation(act: Union[bool, nn.Module]) -> nn.Module:
    # True: SiLU (the seed's default); a module: used as given; False/None: identity.
    if act is True:
        return nn.SiLU()
    if isinstance(act, nn.Module):
        return act
    return nn.Identity()


def _exporting() -> bool:
    # The projection mutates parameters: keep it out of traced/exported graphs.
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()


def max_norm_(weight: Tensor, max_norm: float) -> None:
    """Scale in place each output unit's weights (dim 0) whose L2 norm exceeds ``max_norm``."""
    with torch.no_grad():
        weight.copy_(torch.renorm(weight, p=2, dim=0, maxnorm=max_norm))


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation with "same" padding (Ultralytics' ``Conv``).

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size.
        s: stride.
        p: padding (None: :func:`autopad`).
        g: groups.
        d: dilation.
        act: True for SiLU, a module to use it, False for none.
        has_bias: give the convolution a bias.
    """

    def __init__(self, c1: int, c2: int, k: IntOrPair = 1, s: int = 1, p: Optional[IntOrPair] = None,
                 g: int = 1, d: int = 1, act: Union[bool, nn.Module] = True, has_bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=has_bias)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        """Forward after BatchNorm was folded into the convolution."""
        return self.act(self.conv(x))


class _MaxNormConstraint:
    """Projects ``self.weight`` onto the max-norm ball before each forward (not while exporting).

    Mixed in before a torch layer, so quantized layers inserted after it in the MRO keep the rule.
    A :class:`lightrainer.constraints.Constrained` module: export and calibration project it
    through :func:`lightrainer.constraints.apply_constraints_`.
    """

    weight: Tensor

    def __init__(self, *args, max_norm: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_norm = max_norm

    def apply_constraint_(self) -> None:
        """Project the weight onto the max-norm ball now."""
        max_norm_(self.weight, self.max_norm)

    def forward(self, x: Tensor) -> Tensor:
        if not _exporting():
            self.apply_constraint_()
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_norm={self.max_norm}"


class Conv2dWithConstraint(_MaxNormConstraint, nn.Conv2d):
    """``nn.Conv2d`` whose filters (per output channel) have L2 norm at most ``max_norm``.

    Args:
        *args: ``nn.Conv2d`` arguments.
        max_norm: the largest filter norm.
        **kwargs: ``nn.Conv2d`` keyword arguments.
    """


class LinearWithConstraint(_MaxNormConstraint, nn.Linear):
    """``nn.Linear`` whose rows (per output unit) have L2 norm at most ``max_norm``.

    Args:
        *args: ``nn.Linear`` arguments.
        max_norm: the largest row norm.
        **kwargs: ``nn.Linear`` keyword arguments.
    """


class ConvWithConstraint(nn.Module):
    """:class:`Conv2dWithConstraint` + BatchNorm2d + activation, "same" padding by default.

    Args:
        c1: input channels.
        c2: output channels.
        k: kernel size.
        max_norm: the largest filter norm.
        s: stride.
        p: padding (None: :func:`autopad`).
        g: groups.
        d: dilation.
        act: True for SiLU, a module to use it, False for none.
        has_bias: give the convolution a bias.
    """

    def __init__(self, c1: int, c2: int, k: IntOrPair = 1, max_norm: float = 1.0, s: int = 1,
                 p: Optional[IntOrPair] = None, g: int = 1, d: int = 1, act: Union[bool, nn.Module] = True,
                 has_bias: bool = True) -> None:
        super().__init__()
        self.conv = Conv2dWithConstraint(c1, c2, k, max_norm=max_norm, stride=s, padding=autopad(k, p, d),
                                         groups=g, dilation=d, bias=has_bias)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: Tensor) -> Tensor:
        """Forward after BatchNorm was folded into the convolution."""
        return self.act(self.conv(x))


class DWConvWithConstraint(ConvWithConstraint):
    """Depthwise (``groups = gcd(c1, c2)``) max-norm convolution, no padding by default.

    EEGNet's spatial filter: a ``(channels, 1)`` kernel that collapses the electrode axis, hence
    ``p=0`` as in the original.

    Args:
        c1: input channels.
        c2: output channels (a multiple of ``c1`` for a true depthwise layer).
        max_norm: the largest filter norm.
        k: kernel size.
        act: True for SiLU, a module to use it, False for none.
        s: stride.
        p: padding.
        d: dilation.
        has_bias: give the convolution a bias.
    """

    def __init__(self, c1: int, c2: int, max_norm: float = 1.0, k: IntOrPair = 1, act: Union[bool, nn.Module] = True,
                 s: int = 1, p: Optional[IntOrPair] = 0, d: int = 1, has_bias: bool = True) -> None:
        super().__init__(c1, c2, k, max_norm=max_norm, s=s, p=p, g=math.gcd(c1, c2), d=d, act=act, has_bias=has_bias)


class SeparableConv(nn.Module):
    """Depthwise k x k conv (stride ``s``) then pointwise 1 x 1 conv, BatchNorm, activation.

    Args:
        c1: input channels.
        c2: output channels.
        k: depthwise kernel size.
        s: stride (of the depthwise conv only).
        p: padding (None: :func:`autopad`).
        d: dilation.
        act: True for SiLU, a module to use it, False for none.
        has_bias: give the convolutions biases.
    """

    def __init__(self, c1: int, c2: int, k: IntOrPair = 1, s: int = 1, p: Optional[IntOrPair] = None, d: int = 1,
                 act: Union[bool, nn.Module] = True, has_bias: bool = True) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c1, c1, k, stride=s, padding=autopad(k, p, d), dilation=d, groups=c1, bias=has_bias)
        self.pw = nn.Conv2d(c1, c2, 1, bias=has_bias)
        self.bn = nn.BatchNorm2d(c2)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.pw(self.dw(x))))
