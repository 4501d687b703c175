"""The run record: what a weights file or checkpoint holds so that the run re-opens from it alone.

A record names the task class, the network class and the datamodule class with their arguments,
and the flat config, as data (strings, numbers, lists, dicts)::

    {"config": {...flat keys...},
     "model": {"class_path": "mytask.InkHuber", "init_args": {...}},
     "net": {"class_path": "lightrainer.modules.nets.SmallCNN", "init_args": {"num_classes": 10}}
            or {"default": True} (the task's default_net rebuilds it from the config and data),
     "data": {"class_path": "...", "init_args": {...}} or None,
     "sources": {class_path: file the class was defined in},
     "import_paths": [the user's folders the classes were imported from],
     "version": "0.1.0"}

Arguments come from the YAML's sections when the run was built from them (exact), else from the
objects: each ``__init__`` parameter whose value the object keeps as a plain attribute of the same
name (or in Lightning's ``hparams``). A parameter whose value could not be recorded and differs
from its default is listed under ``unrecorded``, so a rebuild refuses it by name instead of
building something else. Rebuilding (:func:`lightrainer.build.rebuild`) imports and checks every
class before calling anything.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from lightrainer.version import __version__

#: Attribute a built module carries: the specs it was built from (set by lightrainer.build).
BUILD_SPECS_ATTR = "_lightrainer_build_specs"
_INJECTED = {"self", "cfg", "net"}


def is_plain(value: Any) -> bool:
    """Whether ``value`` is data a record can hold (None, bool, number, str, and lists/dicts of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def spec_of(obj: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"class_path", "init_args"[, "unrecorded"]}`` of an object, read from its attributes.

    Args:
        obj: the task module, network or datamodule.
        skip: parameters supplied otherwise (the network of a task).
    """
    cls = type(obj)
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    hparams = getattr(obj, "hparams", None) if isinstance(getattr(obj, "hparams", None), Mapping) else {}
    init_args: dict[str, Any] = {}
    unrecorded: list[str] = []
    for name, param in params.items():
        if name in _INJECTED or name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in hparams:
            value = hparams[name]
        else:
            value = getattr(obj, name, param.default)
            if isinstance(value, nn.Module) and not isinstance(param.default, nn.Module):
                # A submodule that shares the parameter's name (SmallCNN's ``dropout`` layer for
                # its ``dropout`` rate): not the argument; the weights check catches a difference.
                value = param.default
        if value is param.empty:
            unrecorded.append(name)
        elif is_plain(value):
            if param.default is param.empty or value != param.default:
                init_args[name] = _plain(value)
        elif value is not param.default:
            unrecorded.append(name)
    spec: dict[str, Any] = {"class_path": class_path_of(cls), "init_args": init_args}
    if unrecorded:
        spec["unrecorded"] = unrecorded
    return spec


def source_file(cls: type) -> str | None:
    """The file a class was defined in (for messages when it no longer imports)."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    return str(Path(path).resolve()) if path else None


def module_name_of(cls: type) -> str:
    """The importable module of a class: a script run as ``python examples/x.py`` defines its
    classes in ``__main__``, importable later as ``x`` from the script's folder."""
    if cls.__module__ == "__main__":
        path = getattr(sys.modules.get("__main__"), "__file__", None)
        if path:
            return Path(path).stem
    return cls.__module__


def class_path_of(cls: type) -> str:
    """``pkg.mod.Name`` of a class (a script's classes by the script's module name)."""
    return f"{module_name_of(cls)}.{cls.__qualname__}"


def _import_root(cls: type) -> str | None:
    """The folder a class's module was imported from, when it is a user's folder (not an
    installed package, not the standard library): recorded so ``--weights`` alone re-imports it."""
    source = source_file(cls)
    if source is None:
        return None
    parts = module_name_of(cls).split(".")
    root = Path(source).parent
    for _ in parts[1:] if Path(source).name != "__init__.py" else parts:
        root = root.parent
    installed = ("site-packages", "dist-packages")
    if any(part in installed for part in root.parts) or root == Path(inspect.getfile(inspect)).parent:
        return None
    if (root / "lightrainer" / "record.py").resolve() == Path(__file__).resolve():
        return None  # lightrainer itself (an editable install)
    return str(root)


def run_record(module: Any, datamodule: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """The record of a run (see the module docstring).

    Args:
        module: the task module (its ``net`` is recorded as the network).
        datamodule: the datamodule, or None.
        config: the flat config (``cfg.to_dict()``).
    """
    built = getattr(module, BUILD_SPECS_ATTR, None) or {}
    model = built.get("model") or spec_of(module, skip=("net",))
    net = getattr(module, "net", None)
    if "net" in built:
        net_spec = built["net"]
    elif isinstance(net, nn.Module):
        net_spec = spec_of(net)
    else:
        net_spec = None
    data = built.get("data") if "data" in built else (spec_of(datamodule) if datamodule is not None else None)
    classes = [type(module)] + ([type(net)] if isinstance(net, nn.Module) else [])
    classes += [type(datamodule)] if datamodule is not None else []
    return {
        "config": dict(config),
        "model": model,
        "net": net_spec,
        "data": data,
        "sources": {class_path_of(c): source_file(c) for c in classes},
        "import_paths": sorted({root for root in map(_import_root, classes) if root}),
        "version": __version__,
    }
