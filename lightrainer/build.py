"""Config -> task module and datamodule; a run's record -> the same task module and datamodule.

A section names a class and its arguments, as LightningCLI does::

    model:
      class_path: lightrainer.modules.ClassificationModule
      init_args:
        net:
          class_path: lightrainer.modules.SmallCNN
          init_args: {num_classes: 10}
    data:
      class_path: lightrainer.datamodules.MNIST5kDataModule

Every class whose ``__init__`` takes ``cfg`` receives the validated config. Without a ``model:``
section the task is the config's (``cfg.task_class``); without ``net`` the task's
``default_net(cfg, datamodule)`` builds it; without ``data:`` the task's ``default_datamodule``.

Only classes are constructed, and only of the kind the place expects: ``model:`` a
LightningModule, ``data:`` a LightningDataModule, a network an ``nn.Module``. Each class is
imported and checked before anything is called. A YAML is code (it names modules to import, as
in LightningCLI); a weights file or checkpoint is data: :func:`rebuild` takes plain values from it
and constructs only subclasses of those bases.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Mapping

import lightning as L
from torch import nn

from lightrainer.config import Config, ConfigError, import_class, load_config
from lightrainer.record import BUILD_SPECS_ATTR, class_path_of, is_plain

log = logging.getLogger(__name__)

#: The base a class must subclass in each place of a config or record.
EXPECTED = {"model": L.LightningModule, "data": L.LightningDataModule, "net": nn.Module}


def checked_class(path: str, base: type, where: str, sources: Mapping[str, Any] | None = None) -> type:
    """Import the class ``path`` names and check it subclasses ``base``, before anything is called.

    Args:
        path: ``package.module.Class``.
        base: the expected base class (``object``: any class).
        where: the config entry, for messages ("model", "data.init_args.transform").
        sources: class path -> file it was defined in (from a record), for the message when the
            class no longer imports.

    Raises:
        ConfigError: the class cannot be imported, is not a class, or is not a ``base``.
    """
    try:
        cls = import_class(path, where)
    except ConfigError as err:
        source = (sources or {}).get(path)
        if source:
            folder = Path(source).parent
            raise ConfigError(
                f"{err}. The run's class was defined in {source}: run the command from {folder} or add it "
                f"to PYTHONPATH (PYTHONPATH={folder} lightrainer ...), or pass --config with the run's YAML"
            ) from None
        raise
    if not issubclass(cls, base):
        raise ConfigError(
            f"{where}.class_path: {path} is not a {base.__module__}.{base.__qualname__} subclass: refused "
            f"(only {base.__name__} classes may be built here)"
        )
    return cls


def _parameter_base(cls: type, name: str) -> type:
    """The class a parameter's annotation names (its expected kind), or ``object``."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no constraint beyond "a class"
        return object
    hint = hints.get(name)
    return hint if isinstance(hint, type) else object


def instantiate(
    spec: Any, cfg: Config, section: str, base: type = object, *, trusted: bool = True, **inject: Any
) -> Any:
    """Build the object a section describes, recursively; pass ``cfg`` (and ``inject``) where taken.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}``, a list of such, or a plain value.
        cfg: the config given to every class that takes ``cfg``.
        section: the section's name, for messages.
        base: the class the built object must be an instance of (checked before the call).
        trusted: False for a spec read from a weights file or checkpoint: nested classes must then
            be ``nn.Module`` subclasses and values plain data.
        **inject: further arguments given when the class takes them and the spec does not set them.

    Raises:
        ConfigError: a class that cannot be imported, of the wrong kind, or arguments it refuses.
    """
    if isinstance(spec, list):
        return [instantiate(item, cfg, section, base, trusted=trusted) for item in spec]
    if not (isinstance(spec, Mapping) and "class_path" in spec):
        if not trusted and not is_plain(spec):
            raise ConfigError(f"{section}: {type(spec).__name__} is not plain data: refused")
        return spec
    unknown = set(spec) - {"class_path", "init_args", "dict_kwargs"}
    if unknown:
        raise ConfigError(f"{section}: unknown entries {sorted(unknown)}; a section has class_path and init_args")
    cls = checked_class(str(spec["class_path"]), base, section)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ConfigError(f"{section}.init_args: expected a mapping of argument names to values, got {init_args!r}")
    args = {}
    for key, value in init_args.items():
        nested_base = _parameter_base(cls, key) if trusted else nn.Module
        args[key] = instantiate(value, cfg, f"{section}.init_args.{key}", nested_base, trusted=trusted)
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


def _spec_with_class(spec: Any, section: str) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"class_path": spec}
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ConfigError(f"{section}: expected a section with class_path (and init_args), got {spec!r}")
    return dict(spec)


def build_from_config(cfg: Config) -> tuple[L.LightningModule, L.LightningDataModule | None]:
    """The task module and datamodule the config describes.

    Args:
        cfg: the validated config (its ``sections`` hold ``model:``/``data:`` when given).

    Returns:
        (module, datamodule). The module carries the specs it was built from, which its weights
        files and checkpoints record.

    Raises:
        ConfigError: no task, a class of the wrong kind, or arguments a class refuses.
    """
    task = cfg.task_class
    if "model" in cfg.sections:
        model_spec = _spec_with_class(cfg.sections["model"], "model")
    elif task is not None:
        model_spec = {"class_path": class_path_of(task)}
    else:
        raise ConfigError("no task: give a model: section (class_path: package.module.Task) or task: NAME")
    module_cls = checked_class(str(model_spec["class_path"]), L.LightningModule, "model")
    if "data" in cfg.sections:
        data_spec = None if cfg.sections["data"] is None else _spec_with_class(cfg.sections["data"], "data")
    else:
        default = getattr(module_cls, "default_datamodule", None)
        data_spec = {"class_path": class_path_of(default)} if isinstance(default, type) else None
    datamodule = instantiate(data_spec, cfg, "data", L.LightningDataModule) if data_spec else None
    init_args = dict(model_spec.get("init_args") or {})
    if init_args.get("net") is None:
        init_args.pop("net", None)  # the parser fills the default None: the task's default_net
    inject: dict[str, Any] = {}
    if "net" in init_args:
        net_spec: Any = init_args["net"]
    elif hasattr(module_cls, "default_net"):
        inject["net"] = module_cls.default_net(cfg, datamodule)
        net_spec = {"default": True}
    else:
        net_spec = None
    module = instantiate({**model_spec, "init_args": init_args}, cfg, "model", L.LightningModule, **inject)
    model_record = {"class_path": class_path_of(type(module)),
                    "init_args": {k: v for k, v in init_args.items() if k != "net"}}
    setattr(module, BUILD_SPECS_ATTR, {"model": model_record, "net": net_spec, "data": data_spec})
    return module, datamodule


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The Trainer arguments of the ``trainer:`` section, their classes built (callbacks, loggers).

    Raises:
        ConfigError: a class the section names cannot be built.
    """
    return {key: instantiate(value, cfg, f"trainer.{key}") for key, value in (cfg.sections.get("trainer") or {}).items()}


# ---------------------------------------------------------------------------------- rebuild
def _old_record(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A record for files written before records existed: the task's class and its defaults."""
    config = dict(payload.get("config") or {})
    sections = {k: config.pop(k) for k in ("model", "data", "trainer", "ckpt_path", "seed_everything") if k in config}
    model = sections.get("model") or ({"class_path": payload["task"]} if isinstance(payload.get("task"), str) else None)
    net = (model or {}).get("init_args", {}).get("net") if isinstance(model, Mapping) else None
    return {"config": config, "model": model, "net": net or {"default": True}, "data": sections.get("data", "default"),
            "sources": {}, "import_paths": []}


def record_of(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The run record a weights file or a checkpoint's ``lightrainer`` entry holds.

    Raises:
        ConfigError: the file holds no record of the run.
    """
    record = payload.get("run")
    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(payload.get("config"), Mapping) and (payload.get("task") or payload["config"].get("model")):
        return _old_record(payload)
    raise ConfigError("the file holds no record of its run (no 'run' entry): pass --config with the run's YAML")


def _check_unrecorded(spec: Mapping[str, Any], where: str) -> None:
    missing = spec.get("unrecorded") or []
    if missing:
        raise ConfigError(
            f"{where}: {spec.get('class_path')} was built in Python with argument(s) {', '.join(map(str, missing))} "
            "that a weights file cannot hold (data, functions): pass --config with a YAML whose "
            f"{where}: section builds it"
        )


def _add_import_paths(paths: Any) -> None:
    """Folders the command line put on sys.path to import the run's own classes (its YAML's
    folder): appended, so they never shadow an installed module."""
    for folder in paths if isinstance(paths, list) else []:
        if isinstance(folder, str) and Path(folder).is_dir() and folder not in sys.path:
            log.info("importing the run's classes from %s too (recorded in the file)", folder)
            sys.path.append(folder)


def rebuild_config(payload: Mapping[str, Any], **overrides: Any) -> Config:
    """The validated config of the run that wrote ``payload``, for the task class it records
    (imported and checked to be a LightningModule); nothing is built.

    Args:
        payload: the loaded file (``torch.load(..., weights_only=True)``).
        **overrides: flat keys that replace the recorded ones (e.g. ``num_workers=0``).

    Raises:
        ConfigError: no record, a task class that no longer imports (named, with how to pass it)
            or is not a LightningModule, or values the config refuses.
    """
    record = record_of(payload)
    model = record.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("class_path"), str):
        raise ConfigError("the file's record names no task class: pass --config with the run's YAML")
    _add_import_paths(record.get("import_paths"))
    task = checked_class(model["class_path"], L.LightningModule, "model", _sources(record))
    config = record.get("config")
    if not isinstance(config, Mapping):
        raise ConfigError("the file's record holds no config: pass --config with the run's YAML")
    # The file holds the weights: what the task says a rebuild does not need (pretrained: False).
    declared = getattr(task, "rebuild_overrides", None)
    overrides = {**(dict(declared) if isinstance(declared, Mapping) else {}), **overrides}
    return load_config({k: v for k, v in config.items() if v is not None}, task_class=task, **overrides)


def _sources(record: Mapping[str, Any]) -> Mapping[str, Any]:
    sources = record.get("sources")
    return sources if isinstance(sources, Mapping) else {}


def rebuild(payload: Mapping[str, Any], **overrides: Any) -> tuple[L.LightningModule, L.LightningDataModule | None, Config]:
    """The task module, datamodule and config of the run that wrote ``payload`` (a weights file's
    content or a checkpoint's ``lightrainer`` entry).

    Every class is imported and checked to subclass the base its place expects (LightningModule,
    LightningDataModule, nn.Module) before anything is called; arguments are plain values.

    Args:
        payload: the loaded file (``torch.load(..., weights_only=True)``).
        **overrides: flat keys that replace the recorded ones (e.g. ``num_workers=0``).

    Raises:
        ConfigError: no record, a class that no longer imports (named, with how to pass it), a
            class of the wrong kind, or values the config refuses.
    """
    cfg = rebuild_config(payload, **overrides)
    record = record_of(payload)
    model, task, sources = record["model"], cfg.task_class, _sources(record)
    data = record.get("data")
    if data == "default":
        default = getattr(task, "default_datamodule", None)
        data = {"class_path": class_path_of(default)} if isinstance(default, type) else None
    datamodule = None
    if isinstance(data, Mapping):
        _check_unrecorded(data, "data")
        checked_class(str(data.get("class_path")), L.LightningDataModule, "data", sources)
        datamodule = instantiate({"class_path": data["class_path"], "init_args": data.get("init_args") or {}},
                                 cfg, "data", L.LightningDataModule, trusted=False)
    _check_unrecorded(model, "model")
    net = _rebuild_net(record.get("net"), task, cfg, datamodule, sources)
    inject = {"net": net} if net is not None else {}
    module = instantiate({"class_path": model["class_path"], "init_args": model.get("init_args") or {}},
                         cfg, "model", L.LightningModule, trusted=False, **inject)
    setattr(module, BUILD_SPECS_ATTR, {"model": dict(model), "net": record.get("net"), "data": data})
    return module, datamodule, cfg


def _rebuild_net(spec: Any, task: type, cfg: Config, datamodule: Any, sources: Mapping[str, Any]) -> nn.Module | None:
    if spec is None:
        return None
    if isinstance(spec, Mapping) and spec.get("default"):
        if not hasattr(task, "default_net"):
            raise ConfigError(f"{task.__name__} has no default_net to rebuild its network with: pass --config")
        return task.default_net(cfg, datamodule)
    if not isinstance(spec, Mapping) or "class_path" not in spec:
        raise ConfigError(f"net: the record's network entry is not a class spec: {spec!r}")
    _check_unrecorded(spec, "net")
    checked_class(str(spec["class_path"]), nn.Module, "net", sources)
    return instantiate({"class_path": spec["class_path"], "init_args": spec.get("init_args") or {}},
                       cfg, "net", nn.Module, trusted=False)


__all__ = ["build_from_config", "checked_class", "instantiate", "rebuild", "rebuild_config", "record_of",
           "trainer_kwargs"]
