"""The space file: read it and validate every key and value with the config's own rules."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from lightrainer.assets import resolve_config
from lightrainer.config import Config, ConfigError, _read_yaml, _unknown_key, field_docs
from lightrainer.errors import closest_hint
from lightrainer.sweep.samplers import PRUNERS, SAMPLERS
from lightrainer.sweep.sections import section_check, section_number_type
from lightrainer.sweep.space import KeySpace, Space

#: Top-level entries of a space file that are settings of the sweep, not keys to tune.
SPACE_SETTINGS = ("sampler", "pruner")

#: Entries of a range: ``{low: ..., high: ..., log: true, step: ...}``.
RANGE_ENTRIES = ("low", "high", "log", "step")

#: Keys a sweep sets itself, or whose change would make trials incomparable: why each is refused.
UNTUNABLE = {
    "save_dir": "the sweep puts its trials in its own folder",
    "name": "the sweep names its trials trial_000, trial_001, ...",
    "exist_ok": "every trial gets a folder of its own",
    "task": "the task fixes which keys exist",
    "fitness": "trials are compared on one fitness",
    "device": "--workers places trials on devices",
    "devices": "--workers places trials on devices",
    "num_nodes": "a trial runs on one machine",
    "requeue": "a sweep is resumed with --resume",
}


def read_space(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The raw entries of a space file (or mapping) and its name for messages.

    Raises:
        ConfigError: a missing or malformed file (as for a config file).
    """
    if isinstance(source, Mapping):
        return dict(source), "space"
    try:
        return _read_yaml(resolve_config(source)), f"space file {source}"
    except ConfigError as err:
        raise ConfigError(f"tune: space file: {err}") from None


def load_space(source: str | os.PathLike | Mapping[str, Any], cfg: Config) -> Space:
    """Read a space file and validate every key and value with ``cfg``'s own rules.

    Args:
        source: a YAML file or a mapping (key -> ``{low, high, log, step}`` or a list of choices;
            ``sampler``/``pruner`` entries are settings).
        cfg: the sweep's base config: its keys, its task, its ``model:``/``data:`` classes.

    Returns:
        The validated :class:`Space`.

    Raises:
        ConfigError: one line: an unknown key (with the closest known one), a key a sweep sets
            itself, a range without ``low``/``high``, an end or a choice the key refuses, ...
    """
    raw, where = read_space(source)
    try:
        return parse_space(raw, cfg)
    except ConfigError as err:
        raise ConfigError(f"tune: {where}: {err}") from None


def parse_space(raw: Mapping[str, Any], cfg: Config) -> Space:
    settings = {k: raw[k] for k in SPACE_SETTINGS if k in raw}
    for name, value in settings.items():
        registry = SAMPLERS if name == "sampler" else PRUNERS
        settings[name] = registry.canonical(value, name)
    entries = {str(k): v for k, v in raw.items() if k not in SPACE_SETTINGS}
    if not entries:
        raise ConfigError("names no key to tune; give key: {low: ..., high: ...} or key: [choice, ...]")
    keys = tuple(_parse_entry(key, value, cfg) for key, value in entries.items())
    return Space(keys, settings.get("sampler"), settings.get("pruner"))


def flat_key_types(cfg: Config) -> dict[str, str]:
    """Every flat key of ``cfg``'s task -> "int", "float" or "other" (what a range may give it)."""
    types = {f.name: str(f.type) for f in dataclasses.fields(Config) if f.name in field_docs()}
    types.update({k: spec.type.__name__ for k, spec in cfg.task_specs.items()})
    return {k: "int" if t in ("int", "Union[int, None]") else "float" if t in ("float", "Union[float, None]") else "other"
            for k, t in types.items()}


def _parse_entry(key: str, value: Any, cfg: Config) -> KeySpace:
    if "." in key:
        number = section_number_type(key, cfg)
        check: Callable[[str, Any], Any] = section_check(number)
    else:
        types = flat_key_types(cfg)
        if key not in types:
            raise _unknown_key(key, cfg.task_class, [*types, "model.init_args.", "data.init_args."])
        if key in UNTUNABLE:
            raise ConfigError(f"{key} cannot be tuned: {UNTUNABLE[key]}")
        number = types[key]
        check = _flat_check(cfg, key)
    if isinstance(value, list):
        return _parse_choices(key, value, check)
    if isinstance(value, Mapping):
        return _parse_range(key, value, number, check)
    raise ConfigError(
        f"{key}: {value!r} is one value; give a range {{low: ..., high: ...}} or a list of choices "
        f"[a, b] (a fixed value belongs in the config or a flag: --{key} {value})"
    )


def _flat_check(cfg: Config, key: str) -> Callable[[str, Any], Any]:
    """The config's own validation of one value of a flat key (with every other key as it is)."""
    def check(name: str, value: Any) -> Any:
        return cfg.replace(**{key: value}).to_dict()[key]

    return check


def _parse_choices(key: str, values: list, check: Callable[[str, Any], Any]) -> KeySpace:
    if not values:
        raise ConfigError(f"{key}: an empty list of choices; give at least one value")
    choices = []
    for value in values:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: a choice must be a plain value (number, text, true/false, null), got {value!r}")
        choices.append(check(key, value))
    if len({repr(c) for c in choices}) != len(choices):
        raise ConfigError(f"{key}: a choice is given twice in {values!r}; list each once")
    return KeySpace(key, "categorical", choices=tuple(choices))


def _parse_range(key: str, value: Mapping[str, Any], number: str, check: Callable[[str, Any], Any]) -> KeySpace:
    unknown = [str(k) for k in value if k not in RANGE_ENTRIES]
    if unknown:
        raise ConfigError(f"{key}: unknown entry {unknown[0]!r} in the range" + closest_hint(unknown[0], RANGE_ENTRIES)
                          + f"; a range has {', '.join(RANGE_ENTRIES)}")
    missing = [k for k in ("low", "high") if value.get(k) is None]
    if missing:
        raise ConfigError(f"{key}: a range needs low and high (missing {' and '.join(missing)}): "
                          f"{key}: {{low: ..., high: ...}}, or a list of choices")
    if number == "other":
        raise ConfigError(f"{key} is not a number: give a list of choices ({key}: [a, b]) instead of a range")
    for end in ("low", "high"):
        if isinstance(value[end], bool) or not isinstance(value[end], (int, float)):
            raise ConfigError(f"{key}: {end} must be a number, got {value[end]!r}")
    if number == "any":  # a class argument without a numeric annotation: ints stay ints
        number = "int" if all(isinstance(value[e], int) for e in ("low", "high")) else "float"
    ends = []
    for end in ("low", "high"):
        try:
            ends.append(check(key, value[end]))
        except ConfigError as err:
            raise ConfigError(f"{err} (the {end} end of the range)") from None
    low, high = ends
    if number == "float":
        low, high = float(low), float(high)
    if not low < high:
        raise ConfigError(f"{key}: low must be below high, got low {low!r} and high {high!r}")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{key}: log must be true or false, got {log!r}")
    step = value.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise ConfigError(f"{key}: step must be a number > 0, got {step!r}")
        if number == "int" and not float(step).is_integer():
            raise ConfigError(f"{key}: an integer key takes an integer step, got {step!r}")
        if log:
            raise ConfigError(f"{key}: log and step do not go together (Optuna samples one or the other): drop one")
        step = int(step) if number == "int" else float(step)
    if log and low <= 0:
        raise ConfigError(f"{key}: log: true needs low > 0, got {low!r}")
    return KeySpace(key, number, low=low, high=high, log=log, step=step)
