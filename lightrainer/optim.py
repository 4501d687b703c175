"""Registries of optimizers and lr schedules, and the four parameter groups.

Semantics follow Ultralytics' trainer (DESIGN.md "Semantics"): biases never decay, normalisation
weights and ``logit_scale`` never decay, embedding weights decay at a hundredth of the rate, all
other weights decay at the scaled rate. Adam-family betas are (momentum, 0.999), SGD is Nesterov,
RMSProp uses momentum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch import nn

from lightrainer.registry import OPTIMIZERS, SCHEDULES

if TYPE_CHECKING:
    from lightrainer.config import Config

#: Order of the parameter groups; warmup treats the first (biases) differently.
GROUP_NAMES = ("bias", "no_decay", "embedding", "decay")

_NORM_TYPES = tuple(
    getattr(nn, name)
    for name in dir(nn)
    if "Norm" in name and isinstance(getattr(nn, name), type) and issubclass(getattr(nn, name), nn.Module)
)


_FUSED_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class OptimizerInfo:
    """A registered optimizer: how to build it and which update kernels it takes.

    Args:
        build: ``build(param_groups, lr, momentum, **kernel) -> Optimizer``; each group carries
            its ``lr``, ``weight_decay``, ``name`` and ``initial_lr``. ``momentum`` is the
            ``momentum`` key (beta1 for the Adam family).
        fused: accepts ``fused=True`` (one kernel for all parameters, CPU and CUDA).
        foreach: accepts ``foreach=True`` (multi-tensor kernels).
    """

    build: Callable[..., torch.optim.Optimizer]
    fused: bool = False
    foreach: bool = False


def register_optimizer(name: str, build: Callable[..., torch.optim.Optimizer], *, fused: bool = False,
                       foreach: bool = False) -> OptimizerInfo:
    """Register an optimizer a YAML can name (``optimizer: NAME``); see :class:`OptimizerInfo`."""
    return OPTIMIZERS.register(name, OptimizerInfo(build, fused, foreach))


def _adam_family(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    def build(groups: list[dict], lr: float, momentum: float, **kernel: Any) -> torch.optim.Optimizer:
        return cls(groups, lr=lr, betas=(momentum, 0.999), weight_decay=0.0, **kernel)

    return build


def _sgd(groups: list[dict], lr: float, momentum: float, **kernel: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=0.0, **kernel)


def _rmsprop(groups: list[dict], lr: float, momentum: float, **kernel: Any) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=lr, momentum=momentum, weight_decay=0.0, **kernel)


# The seed's optimizers, as it spells them.
register_optimizer("SGD", _sgd, fused=True, foreach=True)
register_optimizer("Adam", _adam_family(torch.optim.Adam), fused=True, foreach=True)
register_optimizer("Adamax", _adam_family(torch.optim.Adamax), foreach=True)
register_optimizer("AdamW", _adam_family(torch.optim.AdamW), fused=True, foreach=True)
register_optimizer("NAdam", _adam_family(torch.optim.NAdam), foreach=True)
register_optimizer("RAdam", _adam_family(torch.optim.RAdam), foreach=True)
register_optimizer("RMSProp", _rmsprop, foreach=True)


def _cosine(cfg: Config) -> Callable[[float], float]:
    return lambda x: ((1 - math.cos(x * math.pi / cfg.epochs)) / 2) * (cfg.lrf - 1) + 1


def _linear(cfg: Config) -> Callable[[float], float]:
    return lambda x: max(1 - x / cfg.epochs, 0) * (1.0 - cfg.lrf) + cfg.lrf


def _exponential(cfg: Config) -> Callable[[float], float]:
    return lambda x: cfg.gamma**x * (1.0 - cfg.lrf) + cfg.lrf


def _polynomial(cfg: Config) -> Callable[[float], float]:
    return lambda x: max(1 - x / cfg.epochs, 0) ** cfg.power * (1.0 - cfg.lrf) + cfg.lrf


# name -> factory(cfg) -> lf(epoch); epoch x (0-based) trains at lr0 * lf(x).
SCHEDULES.register("Cosine", _cosine)
SCHEDULES.register("Linear", _linear)
SCHEDULES.register("Exponential", _exponential)
SCHEDULES.register("Polynomial", _polynomial)


def split_parameters(net: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Sort trainable parameters into the four groups of :data:`GROUP_NAMES`.

    Args:
        net: the network whose parameters are trained.

    Returns:
        group name -> parameters, each parameter in exactly one group.
    """
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    seen: set[int] = set()
    for module_name, module in net.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            if param_name == "bias":
                groups["bias"].append(param)
            elif isinstance(module, _NORM_TYPES) or "logit_scale" in full:
                groups["no_decay"].append(param)
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                groups["embedding"].append(param)
            else:
                groups["decay"].append(param)
    return groups


def build_optimizer(net: nn.Module, cfg: Config, lr0: float | None = None) -> torch.optim.Optimizer:
    """The configured optimizer over the four parameter groups.

    Args:
        net: the network to optimise.
        cfg: the config (optimizer, lr0, momentum, weight decay, batch, nbs).
        lr0: initial lr overriding ``cfg.lr0`` (QAT trains at a tenth).

    Returns:
        The optimizer; each group carries ``name`` and ``initial_lr``.

    Raises:
        ValueError: the network has no trainable parameters.
    """
    lr = cfg.lr0 if lr0 is None else lr0
    decay = cfg.weight_decay_scaled
    weight_decay = {"bias": 0.0, "no_decay": 0.0, "embedding": decay * 0.01, "decay": decay}
    params = split_parameters(net)
    if not any(params.values()):
        raise ValueError("the network has no trainable parameters: nothing to optimise")
    groups = [
        {"params": params[name], "name": name, "weight_decay": weight_decay[name], "initial_lr": lr}
        for name in GROUP_NAMES
    ]
    info = optimizer_info(cfg.optimizer)
    return info.build(groups, lr, cfg.momentum, **kernel_options(cfg.optimizer, net))


def optimizer_info(name: str) -> OptimizerInfo:
    """The registered optimizer ``name`` (a bare builder registered without flags takes no kernel options)."""
    entry = OPTIMIZERS.get(name, "optimizer")
    return entry if isinstance(entry, OptimizerInfo) else OptimizerInfo(entry)


def kernel_options(optimizer: str, net: nn.Module) -> dict[str, bool]:
    """The fastest update kernel the parameters' device supports (same rule, equal to rounding).

    ``fused=True`` (one kernel for all parameters; about 3x faster steps than the per-parameter
    loop on one CPU thread) for optimizers registered as fused (Adam, AdamW, SGD) with every
    parameter on the CPU or CUDA; ``foreach=True`` (multi-tensor) for those registered with it.
    On other devices, and for optimizers registered with neither: torch's default.
    """
    info = optimizer_info(optimizer)
    devices = {p.device.type for p in net.parameters()}
    if not devices or not devices <= set(_FUSED_DEVICES):
        return {}
    if info.fused and all(p.is_floating_point() for p in net.parameters()):
        return {"fused": True}
    return {"foreach": True} if info.foreach else {}


def schedule(cfg: Config) -> Callable[[float], float]:
    """The lr factor lf(epoch) of the configured schedule."""
    return SCHEDULES.get(cfg.scheduler, "scheduler")(cfg)


def list_optimizers() -> Iterable[str]:
    """Names of the registered optimizers."""
    return tuple(OPTIMIZERS)
