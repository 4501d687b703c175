"""Class arguments a sweep tunes: ``model.init_args...`` / ``data.init_args...`` paths, the class
each names, its annotated type and its value in a config."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Mapping, Union

from lightrainer.config import Config, ConfigError, import_class
from lightrainer.errors import closest_hint
from lightrainer.record import class_path_of


def section_spec(cfg: Config, section: str) -> dict[str, Any] | None:
    """The ``model:``/``data:`` section ``cfg`` builds from (its task's default when absent)."""
    spec = cfg.sections.get(section)
    if isinstance(spec, str):
        return {"class_path": spec}
    if isinstance(spec, Mapping):
        return dict(spec)
    if section == "model" and cfg.task_class is not None:
        return {"class_path": class_path_of(cfg.task_class)}
    default = getattr(cfg.task_class, "default_datamodule", None)
    return {"class_path": class_path_of(default)} if section == "data" and isinstance(default, type) else None


def split_path(path: str) -> tuple[str, list[str]]:
    """``model.init_args.net.init_args.width`` -> ("model", ["net", "width"])."""
    parts = path.split(".")
    section, rest = parts[0], parts[1:]
    if section not in ("model", "data"):
        raise ConfigError(f"unknown key {path!r}: a dotted key is a class argument, model.init_args.NAME or "
                          "data.init_args.NAME" + closest_hint(section, ["model", "data"]))
    names = rest[1::2]
    if len(rest) < 2 or len(rest) % 2 or any(p != "init_args" for p in rest[0::2]) or not all(names):
        raise ConfigError(f"{path}: a class argument is written {section}.init_args.NAME "
                          f"(nested: {section}.init_args.NAME.init_args.NAME)")
    return section, names


def section_class(cfg: Config, section: str, names: list[str]) -> tuple[type, str]:
    """The class whose argument ``names[-1]`` is, and the path that names it."""
    spec: Any = section_spec(cfg, section)
    where = section
    for name in names[:-1]:
        init_args = (spec or {}).get("init_args") or {}
        spec = init_args.get(name) if isinstance(init_args, Mapping) else None
        where = f"{where}.init_args.{name}"
        if not isinstance(spec, Mapping) or "class_path" not in spec:
            raise ConfigError(f"{where} names no class in the config (no class_path); set it in the config to tune "
                              "its arguments")
    if not spec:
        raise ConfigError(f"{section}: the config has no {section}: section and its task no default")
    return import_class(str(spec["class_path"]), where), where


def _argument_annotation(cls: type, name: str, where: str) -> Any:
    """The annotation of the argument ``name`` of ``cls`` (``inspect.Parameter.empty`` if none).

    Raises:
        ConfigError: ``cls`` takes no such argument (with the closest one).
    """
    params = inspect.signature(cls).parameters
    if name not in params or name in ("self", "cfg"):
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return inspect.Parameter.empty
        known = [p for p in params if p not in ("self", "cfg")]
        raise ConfigError(f"{where}: {cls.__name__} takes no argument {name!r}" + closest_hint(name, known)
                          + f"; it takes {', '.join(known) or 'none'}")
    try:
        return typing.get_type_hints(cls.__init__).get(name, inspect.Parameter.empty)
    except Exception:  # noqa: BLE001 - unresolvable annotations: no type to check against
        return inspect.Parameter.empty


def section_number_type(path: str, cfg: Config) -> str:
    """"int"/"float" when the argument is annotated so, "other" for text/bool, "any" when unknown."""
    section, names = split_path(path)
    cls, where = section_class(cfg, section, names)
    hint = _argument_annotation(cls, names[-1], where)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    if args in ([int], [float]):
        return args[0].__name__
    if args in ([str], [bool]):
        return "other"
    return "any"


def section_check(number: str) -> Callable[[str, Any], Any]:
    """The check of a class argument's value: its annotated type (the class judges the rest)."""
    def check(key: str, value: Any) -> Any:
        if number in ("int", "float"):
            numeric = not isinstance(value, bool) and isinstance(value, (int, float))
            ok = numeric and (number == "float" or float(value).is_integer())
            if not ok:
                raise ConfigError(f"{key}: expected {'an integer' if number == 'int' else 'a number'}, got {value!r}")
            return int(value) if number == "int" else float(value)
        return value

    return check


def section_value(base: Config, path: str) -> Any:
    """The value a class argument has in ``base``: its section's, else the class's default."""
    section, names = split_path(path)
    spec: Any = section_spec(base, section)
    for name in names[:-1]:
        spec = spec["init_args"][name]  # load_space checked the path names a class
    given = spec.get("init_args") or {}
    if names[-1] in given:
        return given[names[-1]]
    param = inspect.signature(section_class(base, section, names)[0]).parameters.get(names[-1])
    return None if param is None or param.default is inspect.Parameter.empty else param.default
