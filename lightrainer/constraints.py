"""Weight constraints a layer keeps by projecting its own parameters (the max-norm of EEGNet).

A constrained layer has a method ``apply_constraint_()`` that projects its parameters in place
(:class:`Constrained`). Its forward pass does so before computing, except while traced or
exported, and an optimizer step can move the parameters out again; so code that reads the
weights without a forward pass (ONNX export, quantizer calibration) calls
:func:`apply_constraints_` first. That code needs only this protocol, never the layers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Constrained(Protocol):
    """A module whose parameters must satisfy a constraint it enforces by projection."""

    def apply_constraint_(self) -> None:
        """Project the parameters in place onto the allowed set."""


def apply_constraints_(model: nn.Module) -> int:
    """Project every constrained submodule of ``model`` (``model`` included) now.

    Returns:
        The number of modules projected.
    """
    # getattr, not isinstance(m, Constrained): QAT calls this before every step, and a runtime
    # protocol check costs several times more per module.
    constrained = [m for m in model.modules() if callable(getattr(m, "apply_constraint_", None))]
    for module in constrained:
        module.apply_constraint_()
    return len(constrained)
