"""Exponential moving average of a network's weights (Ultralytics' ``ModelEMA``).

After update ``n`` (one per optimizer step) every floating-point entry of the state dict (weights
and buffers such as BatchNorm running statistics) becomes::

    d = decay * (1 - exp(-n / tau))
    ema = d * ema + (1 - d) * model

The ramp ``1 - exp(-n / tau)`` makes early updates follow the model closely, so the average is
useful from the first epochs. Integer buffers (BatchNorm's ``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under a ``torch.compile`` wrapper (``OptimizedModule``) or DDP."""
    while True:
        inner = getattr(net, "_orig_mod", None) or getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


class ModelEMA:
    """A frozen, eval-mode copy of ``model`` that tracks the moving average of its weights.

    Args:
        model: the network being trained (not modified).
        decay: the asymptotic decay ``d`` (Ultralytics: 0.9999).
        tau: ramp time constant in updates (Ultralytics: 2000).
        updates: updates already made (resuming).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay: must be in (0, 1), got {decay!r}")
        if tau <= 0:
            raise ValueError(f"ema_tau: must be > 0, got {tau!r}")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        for m in self.module.modules():
            # nn.Module.compile() keeps its compiled __call__ on the instance; the copy's would
            # still run the original network.
            if getattr(m, "_compiled_call_impl", None) is not None:
                m._compiled_call_impl = None
        self.decay = float(decay)
        self.tau = float(tau)
        self.updates = int(updates)

    def decay_at(self, updates: int) -> float:
        """``decay * (1 - exp(-updates / tau))``."""
        return self.decay * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average (call after each optimizer step)."""
        self.updates += 1
        d = self.decay_at(self.updates)
        source = unwrap(model).state_dict()
        floats: list[Tensor] = []
        targets: list[Tensor] = []
        for name, value in self.module.state_dict().items():
            new = source[name].detach()
            if value.dtype.is_floating_point:
                targets.append(value)
                floats.append(new.to(value.dtype))
            else:
                value.copy_(new)
        if targets:
            # ema + (1 - d) * (model - ema) == d * ema + (1 - d) * model, in one fused kernel per dtype.
            torch._foreach_lerp_(targets, floats, 1.0 - d)

    def to(self, device: torch.device | str) -> "ModelEMA":
        """Move the averaged copy to ``device``."""
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the averaged weights and the update count."""
        return {"model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()}, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (resuming)."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])
