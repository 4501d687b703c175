"""Config -> task module and datamodule, from the YAML's ``model:``/``data:`` sections or defaults.

A section names a class and its arguments, as LightningCLI does::

    model:
      class_path: lightrainer.modules.ClassificationModule
      init_args:
        net:
          class_path: lightrainer.modules.SmallCNN
          init_args: {num_classes: 10}
    data:
      class_path: lightrainer.datamodules.MNIST5kDataModule

Every class whose ``__init__`` takes ``cfg`` receives the validated config. Without sections, the
task follows the keys: VQ-VAE keys select the VQ-VAE on photo patches, anything else the small
CNN on MNIST-5k (the main job).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import lightning as L

from lightrainer.config import Config, ConfigError

# Short names a section may use instead of a full import path.
_SHORT_NAME_PACKAGES = ("lightrainer.modules", "lightrainer.datamodules", "torch.nn")


def import_class(path: str, section: str) -> Any:
    """Import ``pkg.mod.Name`` (or a short name exported by lightrainer.modules/datamodules).

    Raises:
        ConfigError: the class cannot be imported.
    """
    if "." not in path:
        for package in _SHORT_NAME_PACKAGES:
            found = getattr(importlib.import_module(package), path, None)
            if found is not None:
                return found
        raise ConfigError(
            f"{section}.class_path: {path!r} is not exported by {', '.join(_SHORT_NAME_PACKAGES)}; "
            "give the full import path (package.module.Class)"
        )
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{section}.class_path: cannot import {path!r} ({err})") from None


def instantiate(spec: Any, cfg: Config, section: str, **inject: Any) -> Any:
    """Build the object a section describes, recursively; pass ``cfg`` (and ``inject``) where taken.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``, a list of such, or a plain value.
        cfg: the config given to every class that takes ``cfg``.
        section: the section's name, for messages.
        **inject: further arguments given when the class takes them and the YAML does not set them.

    Raises:
        ConfigError: a class that cannot be imported or arguments it does not accept.
    """
    if isinstance(spec, list):
        return [instantiate(item, cfg, section) for item in spec]
    if not (isinstance(spec, dict) and "class_path" in spec):
        return spec
    unknown = set(spec) - {"class_path", "init_args", "dict_kwargs"}
    if unknown:
        raise ConfigError(f"{section}: unknown entries {sorted(unknown)}; a section has class_path and init_args")
    cls = import_class(str(spec["class_path"]), section)
    init_args = spec.get("init_args") or {}
    args = {k: instantiate(v, cfg, f"{section}.init_args.{k}") for k, v in init_args.items()}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in {"cfg": cfg, **inject}.items():
        if name in params and name not in args:
            args[name] = value
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"{section}: {cls.__name__}({', '.join(args)}) failed: {err}") from None


def _default_sections(cfg: Config) -> tuple[dict, dict]:
    from lightrainer.config import _TASK_KEYS

    vqvae_keys = set(_TASK_KEYS.get("vqvae", {}))
    if vqvae_keys & set(cfg.extras):
        return (
            {"class_path": "lightrainer.modules.VQVAEModule"},
            {"class_path": "lightrainer.datamodules.PhotoPatchesDataModule"},
        )
    return (
        {"class_path": "lightrainer.modules.ClassificationModule"},
        {"class_path": "lightrainer.datamodules.MNIST5kDataModule"},
    )


def build_from_config(cfg: Config) -> tuple[L.LightningModule, L.LightningDataModule | None]:
    """The task module and datamodule the config describes.

    A task module section without a ``net`` gets the task's default network
    (``Task.default_net(cfg, datamodule)``).

    Args:
        cfg: the validated config (its ``sections`` hold ``model:``/``data:`` when given).

    Returns:
        (module, datamodule).
    """
    default_model, default_data = _default_sections(cfg)
    data_spec = cfg.sections.get("data", default_data)
    model_spec = dict(cfg.sections.get("model") or default_model)
    datamodule = instantiate(data_spec, cfg, "data") if data_spec else None
    init_args = dict(model_spec.get("init_args") or {})
    module_cls = import_class(str(model_spec.get("class_path")), "model")
    if "net" not in init_args and hasattr(module_cls, "default_net"):
        model_spec["init_args"] = init_args
        module = instantiate(model_spec, cfg, "model", net=module_cls.default_net(cfg, datamodule))
    else:
        module = instantiate(model_spec, cfg, "model")
    if not isinstance(module, L.LightningModule):
        raise ConfigError(f"model: {type(module).__name__} is not a LightningModule")
    return module, datamodule
