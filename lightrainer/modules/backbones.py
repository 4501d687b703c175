"""Classifier backbones by name: ``net: timm/resnet18`` or ``net: torchvision/resnet18`` in the YAML.

A source (``timm``, ``torchvision``) is an entry of :data:`BACKBONE_SOURCES`: how to check a
model name, build it with the data's class count and input channels, find its pretrained weights
in the local cache, and read the normalisation they were trained with. The classification task's
``default_net`` calls :func:`build_backbone`.

Pretrained weights are never downloaded at run time. They are read from the local cache:
the Hugging Face cache (where timm puts them; ``HF_HUB_CACHE`` / ``HF_HOME``) or
``$TORCH_HOME/hub/checkpoints/`` (where torchvision puts them). A file that is not there is named
in the error, with where to put it; ``pretrained: False`` trains from scratch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lightrainer.config import ConfigError
from lightrainer.errors import MissingDependencyError, closest_hint
from lightrainer.registry import Registry

log = logging.getLogger(__name__)

#: ImageNet's normalisation (what most pretrained classifiers expect).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSource:
    """Where backbones of one library come from.

    Args:
        module: the package to import (its absence: one line naming the pip extra).
        extra: the lightrainer extra that installs it.
        names: all model names (for the closest-name hint).
        is_name: whether a name (with an optional ``.tag`` of pretrained weights) exists.
        build: ``build(name, num_classes, in_channels, image_size, weights_file) -> nn.Module``;
            ``weights_file`` None: random initialisation.
        weights: ``weights(name) -> (found file or None, where to put it, download URL)``.
        normalization: ``normalization(name) -> (mean, std)`` of its pretrained weights.
    """

    module: str
    extra: str
    names: Callable[[], list[str]]
    is_name: Callable[[str], bool]
    build: Callable[[str, int, int, Optional[tuple[int, int]], Optional[Path]], nn.Module]
    weights: Callable[[str], tuple[Optional[Path], Path, str]]
    normalization: Callable[[str], tuple[tuple[float, ...], tuple[float, ...]]]

    def require(self, spec: str) -> Any:
        """The imported package, or MissingDependencyError naming the feature and the extra."""
        try:
            return __import__(self.module)
        except ImportError:
            raise MissingDependencyError(f"net: {spec} needs {self.module}: pip install 'lightrainer[{self.extra}]'") from None


#: source name -> BackboneSource.
BACKBONE_SOURCES: Registry[BackboneSource] = Registry("backbone source", key="net")


def parse_net(key: str, value: Any) -> tuple[str, str]:
    """``"timm/resnet18"`` -> ("timm", "resnet18"), the source's registered spelling.

    Raises:
        ConfigError: not SOURCE/NAME, or an unknown source (with the closest one).
    """
    source, sep, name = str(value).strip().partition("/")
    if not sep or not source or not name:
        raise ConfigError(
            f"{key}: {value!r} is not SOURCE/NAME: write e.g. {key}: timm/resnet18 or {key}: torchvision/resnet18 "
            f"(sources: {', '.join(BACKBONE_SOURCES)}), or leave it empty for the default SmallCNN"
        )
    return BACKBONE_SOURCES.canonical(source, key), name


def check_net(key: str, value: Any) -> str:
    """The ``net`` key's check: a registered source and a model that source has (with the closest
    name); its package must be installed. Returns the canonical ``source/name``."""
    source, name = parse_net(key, value)
    entry = BACKBONE_SOURCES.get(source)
    entry.require(f"{source}/{name}")
    if not entry.is_name(name):
        raise ConfigError(f"{key}: {source} has no classifier {name!r}" + closest_hint(name, entry.names()))
    return f"{source}/{name}"


def build_backbone(
    spec: str, num_classes: int, in_channels: int = 3, image_size: Optional[tuple[int, int]] = None,
    pretrained: bool = False,
) -> nn.Module:
    """The classifier ``spec`` names (``source/name``) with ``num_classes`` outputs and
    ``in_channels`` input channels, with its pretrained weights from the local cache when asked.

    The network carries ``lightrainer_backbone = spec`` (the task checks the YAML's ``net`` against it).

    Raises:
        ConfigError: a bad name, or pretrained weights that are not in the local cache (names the
            file and where to put it).
        MissingDependencyError: the source's package is not installed.
    """
    source, name = parse_net("net", spec)
    entry = BACKBONE_SOURCES.get(source)
    entry.require(spec)
    weights = pretrained_file(spec) if pretrained else None
    net = entry.build(name, num_classes, in_channels, image_size, weights)
    net.lightrainer_backbone = f"{source}/{name}"
    log.info("net: %s/%s, %d classes, %d input channels, %s", source, name, num_classes, in_channels,
             f"pretrained weights from {weights}" if weights else "random initialisation")
    return net


def pretrained_file(spec: str) -> Path:
    """The local file of ``spec``'s pretrained weights.

    Raises:
        ConfigError: not in the cache: names the file, where to put it and the alternative.
    """
    source, name = parse_net("net", spec)
    found, place, url = BACKBONE_SOURCES.get(source).weights(name)
    if found is None:
        raise ConfigError(
            f"net: {spec} with pretrained: True needs its weights file, and nothing is downloaded at run time: "
            f"download {url} and save it as {place} (or let {source} fill its cache once on a machine with network), "
            "or set pretrained: False"
        )
    return found


def backbone_normalization(spec: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the pretrained weights of ``spec`` expect (ImageNet's for most)."""
    source, name = parse_net("net", spec)
    return BACKBONE_SOURCES.get(source).normalization(name)


def torch_hub_checkpoints() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's cache of downloaded weights)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A first-conv weight (out, 3, k, k) for ``in_channels`` inputs: summed over RGB for one
    channel, tiled and rescaled for others (as timm adapts its own)."""
    if weight.shape[1] == in_channels:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


# ---------------------------------------------------------------------------------- timm
def _timm() -> Any:
    import timm

    return timm


def _timm_names() -> list[str]:
    return _timm().list_models()


def _timm_is_name(name: str) -> bool:
    return bool(_timm().is_model(name))


def _timm_pretrained_cfg(name: str) -> Any:
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"net: timm/{name} has no pretrained weights in timm: set pretrained: False or pick a tag")
    return cfg


def _timm_build(name: str, num_classes: int, in_channels: int, image_size: Optional[tuple[int, int]],
                weights: Optional[Path]) -> nn.Module:
    timm = _timm()
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    cfg = timm.models.get_pretrained_cfg(name)
    if image_size is not None and cfg is not None and cfg.fixed_input_size:
        kwargs["img_size"] = tuple(image_size)  # ViT-like: position embeddings sized to the data
    if weights is not None:
        # timm reads the file itself: it adapts the first conv to in_chans and drops a head of
        # another class count; "source" cleared so it never turns to the hub.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights), "source": ""})
    return timm.create_model(name, **kwargs)


def _timm_weights(name: str) -> tuple[Optional[Path], Path, str]:
    cfg = _timm_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id
    candidates: list[Path] = []
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename, cache_dir=hf_hub_cache()) if try_to_load_from_cache else None
            if isinstance(found, str):
                candidates.append(Path(found))
        place = torch_hub_checkpoints() / f"{hub_id.replace('/', '--')}.safetensors"
        url = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors"
    elif cfg.url:
        place = torch_hub_checkpoints() / os.path.basename(cfg.url)
        url = cfg.url
    else:
        raise ConfigError(f"net: timm/{name} has no pretrained weights to load: set pretrained: False")
    candidates.append(place)
    if cfg.url:
        candidates.append(torch_hub_checkpoints() / os.path.basename(cfg.url))
    found = next((p for p in candidates if p.is_file()), None)
    return found, place, url


def _timm_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = _timm().models.get_pretrained_cfg(name)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)


BACKBONE_SOURCES.register("timm", BackboneSource(
    module="timm", extra="timm", names=_timm_names, is_name=_timm_is_name, build=_timm_build, weights=_timm_weights,
    normalization=_timm_normalization,
))


# ---------------------------------------------------------------------------------- torchvision
def _tv_models() -> Any:
    import torchvision.models

    return torchvision.models


def _tv_names() -> list[str]:
    models = _tv_models()
    return models.list_models(module=models)


def _tv_split(name: str) -> tuple[str, Optional[str]]:
    arch, _, tag = name.partition(".")
    return arch, tag or None


def _tv_is_name(name: str) -> bool:
    arch, tag = _tv_split(name)
    if arch not in _tv_names():
        return False
    return tag is None or tag in _tv_models().get_model_weights(arch).__members__


def _tv_weights_enum(name: str) -> Any:
    arch, tag = _tv_split(name)
    weights = _tv_models().get_model_weights(arch)
    return weights[tag] if tag else weights.DEFAULT


def _first_rgb_conv(net: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)


def _tv_build(name: str, num_classes: int, in_channels: int, image_size: Optional[tuple[int, int]],
              weights: Optional[Path]) -> nn.Module:
    arch, _ = _tv_split(name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if arch.startswith("vit_") and image_size is not None:
        kwargs["image_size"] = image_size[0]
    net = _tv_models().get_model(arch, weights=None, **kwargs)
    first = _first_rgb_conv(net) if in_channels != 3 else None
    if in_channels != 3:
        if first is None:
            raise ConfigError(f"net: torchvision/{name} has no 3-channel first convolution to adapt to {in_channels} channels")
        path, conv = first
        parent = net.get_submodule(path.rpartition(".")[0]) if "." in path else net
        setattr(parent, path.rpartition(".")[2], nn.Conv2d(
            in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
            conv.bias is not None, conv.padding_mode))
    if weights is not None:
        _load_matching(net, torch.load(weights, map_location="cpu", weights_only=True), first[0] if first else None,
                       in_channels, f"torchvision/{name}")
    return net


def _load_matching(net: nn.Module, state: dict[str, torch.Tensor], first_conv: Optional[str], in_channels: int,
                   spec: str) -> None:
    """Load pretrained tensors whose shapes fit; the first conv adapted to ``in_channels``; the
    classifier head of another class count stays freshly initialised (logged)."""
    own = net.state_dict()
    if first_conv is not None and f"{first_conv}.weight" in state:
        state = {**state, f"{first_conv}.weight": adapt_input_conv(state[f"{first_conv}.weight"], in_channels)}
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    fresh = sorted(k for k in own if k not in fitting)
    net.load_state_dict(fitting, strict=False)
    if fresh:
        log.info("%s: pretrained except %s (new for this data)", spec, ", ".join(fresh))


def _tv_weights(name: str) -> tuple[Optional[Path], Path, str]:
    url = _tv_weights_enum(name).url
    place = torch_hub_checkpoints() / os.path.basename(url)
    return (place if place.is_file() else None), place, url


def _tv_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    transform = _tv_weights_enum(name).transforms()
    return tuple(transform.mean), tuple(transform.std)


BACKBONE_SOURCES.register("torchvision", BackboneSource(
    module="torchvision", extra="images", names=_tv_names, is_name=_tv_is_name, build=_tv_build, weights=_tv_weights,
    normalization=_tv_normalization,
))


__all__ = [
    "BACKBONE_SOURCES", "BackboneSource", "IMAGENET_MEAN", "IMAGENET_STD", "adapt_input_conv", "backbone_normalization",
    "build_backbone", "check_net", "parse_net", "pretrained_file",
]
