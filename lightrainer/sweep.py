"""Sweeps: tune any YAML key with Optuna, on one machine or a cluster; every trial is a run.

``lightrainer tune --config C.yaml --space S.yaml --trials N`` (or :func:`tune` in a notebook).
The space file names flat keys (and ``model.init_args...`` / ``data.init_args...`` paths), each
with a distribution::

    lr0: {low: 1.0e-4, high: 1.0e-1, log: true}   # a range: float or int as the key is
    warmup_epochs: {low: 0, high: 3}
    optimizer: [SGD, AdamW]                      # a list: the choices
    model.init_args.net.init_args.width: [16, 32, 64]
    sampler: tpe                                 # optional settings: sampler, pruner

Every key and value is validated with the config's own rules before anything is created.
Optuna runs underneath: the study lives in the sweep folder (``<save_dir>/tune/<name>[N]/
study.db``, SQLite) or in ``--storage URL``; a pruner judges each trial's fitness per epoch;
the direction is the task's fitness direction. Each trial is an ordinary run
(``<sweep>/trial_000/``); the sweep folder gets ``tune_results.csv/.md``, ``best.yaml`` and
Optuna's pictures.

Scale-out uses existing engines: ``--workers K`` starts K processes on this machine that share
the study (one GPU each where there are GPUs); ``--storage URL`` lets several machines join one
study (PostgreSQL/MySQL); ``--backend ray`` runs each trial as a Ray task on a Ray cluster,
with the study served to the tasks by Optuna's gRPC storage proxy.

Which trials count toward ``--trials``: complete, pruned, running, and failed by their own error.
A trial whose process was killed (``interrupted``) does not count: ``--resume`` runs its
parameters again as a new trial.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import traceback
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, Union

import lightning as L
import yaml

from lightrainer.assets import resolve_config
from lightrainer.build import build_from_config, instantiate
from lightrainer.callbacks.checkpoint import fitness_of
from lightrainer.config import (
    Config,
    ConfigError,
    _read_yaml,
    _unknown_key,
    config_yaml,
    field_docs,
    import_class,
    load_config,
    seed_all,
)
from lightrainer.errors import MissingDependencyError, TrainingDiverged, closest_hint
from lightrainer.io import atomic_write
from lightrainer.plots import _pyplot, save_figure
from lightrainer.record import class_path_of
from lightrainer.registry import Registry
from lightrainer.runs import create_run_dir, run_folders
from lightrainer.task import resolve_fitness
from lightrainer.trainer import build_trainer

log = logging.getLogger(__name__)

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
BACKENDS = ("optuna", "ray")
#: Files of the sweep folder.
CONFIG_FILE, SPACE_FILE, STUDY_FILE = "config.yaml", "space.yaml", "study.db"
RESULTS_CSV, RESULTS_MD, BEST_FILE, ERRORS_DIR = "tune_results.csv", "tune_results.md", "best.yaml", "errors"
#: Environment variable that hands a worker process its job (JSON).
JOB_ENV = "LIGHTRAINER_SWEEP_JOB"
#: Keys a resumed sweep may change in its base config (where and how trials run, not what they train).
RESUMABLE_KEYS = frozenset({"save_dir", "name", "exist_ok", "device", "devices", "num_workers", "plots",
                            "tensorboard", "wandb", "wandb_project", "wandb_offline"})
HOST = socket.gethostname()


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise MissingDependencyError('lightrainer tune needs Optuna: pip install "lightrainer[tune]"') from None
    return optuna


# ---------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class KeySpace:
    """One key of a sweep and its distribution.

    Attributes:
        key: a flat key (``lr0``) or a section path (``model.init_args.net.init_args.width``).
        kind: "float", "int" or "categorical".
        low, high, log, step: the range (float and int).
        choices: the values (categorical), each already validated and in its canonical spelling.
    """

    key: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value of this key for an Optuna trial."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a value this key may take (a baseline trial runs it)."""
        if self.kind == "categorical":
            return any(type(value) is type(c) and value == c for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not float(value).is_integer():
            return False
        on_step = self.step is None or math.isclose((value - self.low) / self.step, round((value - self.low) / self.step))
        return self.low <= value <= self.high and on_step

    def grid(self) -> list[Any]:
        """The values a grid search tries.

        Raises:
            ConfigError: a float range without a step (a grid needs a finite set).
        """
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "float" and self.step is None:
            raise ConfigError(
                f"sampler grid: {self.key} is a range without a step; give a list of values or a step "
                f"({self.key}: {{low: {self.low:g}, high: {self.high:g}, step: ...}})"
            )
        step = self.step or 1
        count = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        return [self.low + i * step if self.kind == "int" else round(self.low + i * step, 12) for i in range(count)]

    def to_data(self) -> Any:
        """The entry as a space file writes it."""
        if self.kind == "categorical":
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class Space:
    """A validated space: the keys to tune and the sweep's settings (None: the default)."""

    keys: tuple[KeySpace, ...]
    sampler: str | None = None
    pruner: str | None = None

    def names(self) -> list[str]:
        return [k.key for k in self.keys]

    def to_data(self) -> dict[str, Any]:
        """The space as plain data (``space.yaml``; compared on ``--resume``)."""
        return {k.key: k.to_data() for k in self.keys}

    def grid_size(self) -> int:
        return math.prod(len(k.grid()) for k in self.keys)


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
        return _parse_space(raw, cfg)
    except ConfigError as err:
        raise ConfigError(f"tune: {where}: {err}") from None


def _parse_space(raw: Mapping[str, Any], cfg: Config) -> Space:
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
        number = _section_number_type(key, cfg)
        check: Callable[[str, Any], Any] = _section_check(number)
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


# --- model.init_args... / data.init_args... paths
def _section_spec(cfg: Config, section: str) -> dict[str, Any] | None:
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


def _split_path(path: str) -> tuple[str, list[str]]:
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


def _section_class(cfg: Config, section: str, names: list[str]) -> tuple[type, str]:
    """The class whose argument ``names[-1]`` is, and the path that names it."""
    spec: Any = _section_spec(cfg, section)
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


def _section_number_type(path: str, cfg: Config) -> str:
    """"int"/"float" when the argument is annotated so, "other" for text/bool, "any" when unknown."""
    section, names = _split_path(path)
    cls, where = _section_class(cfg, section, names)
    hint = _argument_annotation(cls, names[-1], where)
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is Union else [hint]
    if args in ([int], [float]):
        return args[0].__name__
    if args in ([str], [bool]):
        return "other"
    return "any"


def _section_check(number: str) -> Callable[[str, Any], Any]:
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


# ---------------------------------------------------------------------------------- samplers, pruners
#: name -> builder(space, seed, trials) -> optuna sampler.
SAMPLERS: Registry[Callable[..., Any]] = Registry("sampler")
#: name -> builder(epochs, trials) -> optuna pruner.
PRUNERS: Registry[Callable[..., Any]] = Registry("pruner")


@SAMPLERS.register("tpe")
def _tpe(space: Space, seed: int, trials: int) -> Any:
    # Optuna starts TPE with 10 random trials; a sweep of 12 would be a random search: a third.
    return _optuna().samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, trials // 3)))


@SAMPLERS.register("random")
def _random(space: Space, seed: int, trials: int) -> Any:
    return _optuna().samplers.RandomSampler(seed=seed)


@SAMPLERS.register("grid")
def _grid(space: Space, seed: int, trials: int) -> Any:
    class SweepGrid(_optuna().samplers.GridSampler):
        """Optuna's grid; the sweep stops at the grid's size itself (GridSampler's own stop works
        only inside ``study.optimize``, and the sweep asks and tells)."""

        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            return None

    return SweepGrid({k.key: k.grid() for k in space.keys}, seed=seed)


@SAMPLERS.register("cmaes")
def _cmaes(space: Space, seed: int, trials: int) -> Any:
    try:
        import cmaes  # noqa: F401 - Optuna's CMA-ES sampler imports it lazily; fail now, by name
    except ImportError:
        raise MissingDependencyError("sampler cmaes needs the cmaes package: pip install cmaes") from None
    return _optuna().samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


@SAMPLERS.register("gp")
def _gp(space: Space, seed: int, trials: int) -> Any:
    return _optuna().samplers.GPSampler(seed=seed)


def startup_trials(trials: int) -> int:
    """Finished trials before the median pruner judges: a fifth of the sweep, 1 to 5."""
    return min(5, max(1, trials // 5))


def warmup_epochs_unjudged(epochs: int) -> int:
    """Epochs a trial trains before the median pruner judges it: a third of the run, at least one
    (an early epoch, often still in lr warmup, says little about where a run ends)."""
    return max(1, epochs // 3)


@PRUNERS.register("median")
def _median(epochs: int, trials: int) -> Any:
    return _optuna().pruners.MedianPruner(n_startup_trials=startup_trials(trials),
                                          n_warmup_steps=warmup_epochs_unjudged(epochs))


@PRUNERS.register("percentile")
def _percentile(epochs: int, trials: int) -> Any:
    return _optuna().pruners.PercentilePruner(25.0, n_startup_trials=startup_trials(trials),
                                              n_warmup_steps=warmup_epochs_unjudged(epochs))


@PRUNERS.register("hyperband")
def _hyperband(epochs: int, trials: int) -> Any:
    return _optuna().pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))


@PRUNERS.register("halving")
def _halving(epochs: int, trials: int) -> Any:
    return _optuna().pruners.SuccessiveHalvingPruner(min_resource=1)


@PRUNERS.register("none")
def _no_pruner(epochs: int, trials: int) -> Any:
    return _optuna().pruners.NopPruner()


# ---------------------------------------------------------------------------------- which trials count
def state_of(trial: Any) -> str:
    """A trial's state as the results table writes it: complete, pruned, failed, interrupted,
    skipped (a trial started past ``--trials`` by a concurrent machine), running, waiting."""
    name = trial.state.name
    attrs = trial.user_attrs
    if name == "FAIL":
        return "interrupted" if attrs.get("interrupted") else "skipped" if attrs.get("surplus") else "failed"
    return {"COMPLETE": "complete", "PRUNED": "pruned", "RUNNING": "running", "WAITING": "waiting"}.get(name, name.lower())


def counts_toward(trial: Any) -> bool:
    """Whether a trial counts toward ``--trials`` (a pure decision, see the module's docstring)."""
    return state_of(trial) in ("complete", "pruned", "failed", "running")


def dead_trials(trials: Sequence[Any], host: str, is_alive: Callable[[int], bool]) -> list[Any]:
    """The running trials whose process on ``host`` is gone (killed): a pure decision."""
    return [t for t in trials if t.state.name == "RUNNING" and t.user_attrs.get("host") == host
            and isinstance(t.user_attrs.get("pid"), int) and not is_alive(t.user_attrs["pid"])]


def reruns_needed(trials: Sequence[Any]) -> list[Any]:
    """The interrupted trials no later trial runs again yet."""
    rerun = {t.user_attrs.get("rerun_of") for t in trials}
    return [t for t in trials if state_of(t) == "interrupted" and t.number not in rerun]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------- the job
@dataclass
class Job:
    """What a worker needs to run trials of a sweep (plain data: it travels to worker processes
    and Ray tasks as JSON)."""

    folder: str
    study_name: str
    storage: str
    trials: int
    sampler: str
    pruner: str
    config: str
    space: dict
    deadline: float | None = None
    import_paths: list = field(default_factory=list)
    quiet: bool = True
    threads: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        return cls(**json.loads(text))


def open_storage(url: str) -> Any:
    """An Optuna storage for ``url``: an SQLAlchemy database URL (sqlite:///..., postgresql://,
    mysql://) or ``grpc://host:port`` (Optuna's gRPC storage proxy).

    Raises:
        ConfigError: the database cannot be opened (names the URL's scheme and the cause).
        MissingDependencyError: the database's driver is not installed.
    """
    optuna = _optuna()
    if url.startswith("grpc://"):
        host, _, port = url[len("grpc://"):].rpartition(":")
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
        proxy.wait_server_ready(timeout=60)
        return proxy
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    scheme = url.split(":", 1)[0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError as err:
        raise MissingDependencyError(
            f"--storage {scheme}: the database driver is missing ({err}); install it (pip install psycopg2-binary "
            "for postgresql, pymysql for mysql+pymysql)"
        ) from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's ArgumentError, OperationalError...: the URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"tune: --storage {scheme}://...: cannot open the study database ({first})") from None


def _seed(cfg_seed: int, *parts: int) -> int:
    """A sampler seed per worker and per start, so that workers, and a resumed sweep, never
    repeat each other's random samples."""
    import numpy as np

    return int(np.random.SeedSequence([cfg_seed, *parts]).generate_state(1)[0])


def open_study(job: Job, cfg: Config, space: Space, worker: int = 0, storage: Any = None) -> Any:
    """The study of ``job`` with this worker's sampler and the sweep's pruner."""
    optuna = _optuna()
    storage = storage or open_storage(job.storage)
    started = _trial_count(storage, job.study_name)
    sampler = SAMPLERS.get(job.sampler, "sampler")(space, _seed(cfg.seed, worker, started), job.trials)
    return optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler,
                             pruner=PRUNERS.get(job.pruner, "pruner")(cfg.epochs, job.trials))


def _trial_count(storage: Any, name: str) -> int:
    try:
        return len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    except KeyError:
        return 0


# ---------------------------------------------------------------------------------- one trial
class TrialReport(L.Callback):
    """Reports the fitness of each validated epoch to an Optuna trial and stops the Trainer
    cleanly (after the epoch's checkpoint) when the pruner says so, or when the fitness is not
    finite (a diverged run is pruned).

    Args:
        trial: the Optuna trial.
    """

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.monitor, self.mode = "val/loss", "min"
        self.values: list[float] = []
        #: Epochs validated (a non-finite fitness included).
        self.epochs = 0
        self.pruned_at: int | None = None
        self.diverged: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.monitor, self.mode = fitness_of(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.pruned_at is not None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value, epoch = float(value), trainer.current_epoch
        self.epochs += 1
        if not math.isfinite(value):
            self.diverged = f"epoch {epoch + 1}: {self.monitor} is {value}"
            self.pruned_at, trainer.should_stop = epoch, True
            return
        self.values.append(value)
        self.trial.report(value, epoch)
        # A trial that reached its last epoch is complete: pruning it would save nothing.
        if epoch + 1 < (trainer.max_epochs or 0) and self.trial.should_prune():
            self.pruned_at, trainer.should_stop = epoch, True

    @property
    def best(self) -> float | None:
        if not self.values:
            return None
        return max(self.values) if self.mode == "max" else min(self.values)


def apply_params(base: Config, params: Mapping[str, Any], **overrides: Any) -> Config:
    """``base`` with a trial's values: flat keys replaced, class arguments set in their sections.

    Raises:
        ConfigError: a combination the config refuses (both ptq and qat, ...).
    """
    sections: dict[str, Any] = {}
    for path, value in params.items():
        if "." not in path:
            continue
        section, names = _split_path(path)
        if section not in sections:
            sections[section] = copy.deepcopy(_section_spec(base, section))
        spec = sections[section]
        for name in names[:-1]:
            spec = spec.setdefault("init_args", {})[name]
        spec.setdefault("init_args", {})[names[-1]] = value
    flat = {k: v for k, v in params.items() if "." not in k}
    return base.replace(**flat, **sections, **overrides)


def _trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The ``trainer:`` section's arguments, built; a trial shows no progress bar or summary."""
    given = {key: instantiate(value, cfg, f"trainer.{key}") for key, value in (cfg.sections.get("trainer") or {}).items()}
    return {"enable_progress_bar": False, "enable_model_summary": False, **given}


@contextlib.contextmanager
def quiet_logs(quiet: bool = True) -> Iterator[None]:
    """Lightning's, lightrainer's and Optuna's info lines off while trials run (each trial
    prints one line of its own; its files hold the rest)."""
    if not quiet:
        yield
        return
    names = ("lightning.pytorch", "lightning.fabric", "lightrainer", "optuna")
    saved = {name: logging.getLogger(name).level for name in names}
    own = log.level
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        log.setLevel(own)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_trial(study: Any, trial: Any, base: Config, space: Space, folder: Path, quiet: bool = True) -> dict[str, Any]:
    """Run one trial: a fit of ``base`` with the trial's values in ``folder/trial_NNN``, its
    fitness reported each epoch; the trial is told its result (complete, pruned, failed).

    Returns:
        A summary for the log line: number, params, state, value, epochs, time, note.
    """
    params = {k.key: k.suggest(trial) for k in space.keys}
    start = time.time()
    report = TrialReport(trial)
    error: BaseException | None = None
    run = f"trial_{trial.number:03d}"
    try:
        cfg = apply_params(base, params, save_dir=str(folder), name=run, exist_ok=False)
        with quiet_logs(quiet):
            seed_all(cfg.seed)  # the network starts as `lightrainer fit --config trial/args.yaml` would
            module, datamodule = build_from_config(cfg)
            trainer = build_trainer(cfg, callbacks=[report], **_trainer_kwargs(cfg))
            run = Path(cfg.run_dir).name
            trial.set_user_attr("run", run)
            trainer.fit(module, datamodule=datamodule, weights_only=True)
    except TrainingDiverged as err:
        report.diverged = " ".join(str(err).split())
    except Exception as err:  # noqa: BLE001 - a crashing trial is recorded and the sweep goes on
        error = err
        _write_error(folder, run, err)
    except BaseException:
        # Killed from the keyboard (Lightning turns Ctrl-C into SystemExit): --resume runs it again.
        trial.set_user_attr("interrupted", True)
        study.tell(trial, state=_optuna().trial.TrialState.FAIL)
        raise
    seconds = time.time() - start
    trial.set_user_attr("time_s", round(seconds, 2))
    trial.set_user_attr("epochs", report.epochs)
    states = _optuna().trial.TrialState
    summary = {"number": trial.number, "params": params, "value": report.best, "epochs": report.epochs,
               "time_s": seconds, "run": run, "metric": report.monitor}
    if error is None and report.diverged is None and report.best is None:
        error = RuntimeError(f"the fitness {report.monitor} was never logged")
    if error is not None:
        note = _one_line(error)
        trial.set_user_attr("error", note)
        study.tell(trial, state=states.FAIL)
        return {**summary, "state": "failed", "note": note}
    if report.diverged is not None:
        trial.set_user_attr("diverged", report.diverged)
        study.tell(trial, state=states.PRUNED)
        return {**summary, "state": "pruned", "note": f"diverged: {report.diverged}"}
    if report.pruned_at is not None:
        trial.set_user_attr("pruned_at", report.pruned_at + 1)
        study.tell(trial, state=states.PRUNED)
        return {**summary, "state": "pruned", "note": f"pruned after epoch {report.pruned_at + 1}"}
    study.tell(trial, report.best)
    return {**summary, "state": "complete", "note": ""}


def _write_error(folder: Path, run: str, err: BaseException) -> None:
    """The full traceback of a failed trial, in ``errors/trial_NNN.txt`` (its one line is in the table)."""
    with contextlib.suppress(OSError):
        (folder / ERRORS_DIR).mkdir(exist_ok=True)
        atomic_write(folder / ERRORS_DIR / f"{run}.txt", "".join(traceback.format_exception(err)))


def _format_params(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def log_trial(summary: Mapping[str, Any], trials: int, prefix: str = "") -> None:
    """The one line a finished trial prints."""
    value, state = summary.get("value"), summary["state"]
    shown = f"{summary['metric']} {value:.4f}" if isinstance(value, float) else ""
    took = f"{summary['epochs']} epochs, {summary['time_s']:.1f} s"
    if state == "complete":
        tail = f"{shown} ({took})"
    elif state == "pruned":
        tail = f"pruned ({summary['note'].replace('pruned ', '')}), {shown or 'no fitness'} ({took})"
    else:
        tail = f"{state}: {summary['note']} ({took})"
    log.info("%strial %d: %s -> %s", prefix, summary["number"], _format_params(summary["params"]), tail)


# ---------------------------------------------------------------------------------- a worker's loop
@contextlib.contextmanager
def _ask_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock over "count the trials, then ask one" among this machine's workers, so
    they never start more than ``--trials`` (released by the OS when a process is killed)."""
    try:
        import fcntl
    except ImportError:  # Windows: the check after ask() covers it
        yield
        return
    with open(folder / ".ask.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ask_trial(study: Any, folder: Path, trials: int, worker: int = 0) -> Any | None:
    """The next trial to run, or None when ``trials`` trials count already."""
    with _ask_lock(folder):
        if sum(counts_toward(t) for t in study.get_trials(deepcopy=False)) >= trials:
            return None
        trial = study.ask()
        for key, value in (("host", HOST), ("pid", os.getpid()), ("worker", worker)):
            trial.set_user_attr(key, value)
    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_toward(t)]
    if len(ahead) >= trials:
        # Another machine took the last trial at the same moment.
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=_optuna().trial.TrialState.FAIL)
        return None
    return trial


def work(job: Job, base: Config, space: Space, worker: int = 0, study: Any = None, prefix: str = "") -> int:
    """Run trials of ``job`` until ``job.trials`` count (or the deadline passes).

    Args:
        prefix: what this worker's lines start with (``[worker 1] ``).

    Returns:
        The number of trials this worker ran.
    """
    study = study or open_study(job, base, space, worker)
    folder = Path(job.folder)
    ran = 0
    while job.deadline is None or time.time() < job.deadline:
        trial = ask_trial(study, folder, job.trials, worker)
        if trial is None:
            break
        summary = run_trial(study, trial, base, space, folder, job.quiet)
        ran += 1
        log_trial(summary, job.trials, prefix)
        write_tables(study, folder, space, base)
    return ran


def worker_main() -> int:
    """Entry of a ``--workers`` process: the job comes in ``$LIGHTRAINER_SWEEP_JOB``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    job = Job.from_json(os.environ[JOB_ENV])
    worker = int(os.environ.get("LIGHTRAINER_SWEEP_WORKER", "0"))
    base, space = _job_config(job)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    work(job, base, space, worker, prefix=f"[worker {worker}] ")
    return 0


def _job_config(job: Job) -> tuple[Config, Space]:
    """The base config and space of a job (rebuilt from its plain data, in a worker)."""
    for folder in job.import_paths:
        if folder not in sys.path:
            sys.path.append(folder)
    base = load_config(yaml.safe_load(job.config))
    space = _parse_space({**job.space, "sampler": job.sampler, "pruner": job.pruner}, base)
    return base, space


def _ray_trial(job_json: str) -> dict[str, Any]:
    """A Ray task: ask one trial of the sweep, run it, tell it; returns its summary."""
    job = Job.from_json(job_json)
    base, space = _job_config(job)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    Path(job.folder).mkdir(parents=True, exist_ok=True)  # on another node: the trial's folder is there
    study = open_study(job, base, space, worker=os.getpid())
    trial = study.ask()
    import ray

    for key, value in (("host", HOST), ("pid", os.getpid()), ("ray_task", ray.get_runtime_context().get_task_id())):
        trial.set_user_attr(key, value)
    with quiet_logs(job.quiet):
        return run_trial(study, trial, base, space, Path(job.folder), job.quiet)


# ---------------------------------------------------------------------------------- results
def result_rows(study: Any, space: Space, metric: str) -> list[dict[str, Any]]:
    """A row per trial: number, state, fitness, epochs, time, each key, the run folder, a note."""
    trials = study.get_trials(deepcopy=False)
    reruns = {t.user_attrs.get("rerun_of"): t.number for t in trials if t.user_attrs.get("rerun_of") is not None}
    hosts = {t.user_attrs.get("host") for t in trials if t.user_attrs.get("host")}
    rows = []
    for t in trials:
        state, attrs = state_of(t), t.user_attrs
        value = t.value if t.state.name == "COMPLETE" else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        note = attrs.get("error") or (f"diverged: {attrs['diverged']}" if attrs.get("diverged") else "")
        if attrs.get("pruned_at"):
            note = f"pruned after epoch {attrs['pruned_at']}"
        if state == "interrupted":
            note = "process killed" + (f"; run again as trial {reruns[t.number]}" if t.number in reruns else "")
        if attrs.get("rerun_of") is not None:
            note = f"runs trial {attrs['rerun_of']} again" + (f"; {note}" if note else "")
        if attrs.get("baseline"):
            note = "the config's own values" + (f"; {note}" if note else "")
        row: dict[str, Any] = {"trial": t.number, "state": state, metric: value,
                               "epochs": attrs.get("epochs", len(t.intermediate_values)),
                               "time_s": attrs.get("time_s", "")}
        row.update({k: t.params.get(k, "") for k in space.names()})
        row["run"] = attrs.get("run", "")
        if len(hosts) > 1:
            row["host"] = attrs.get("host", "")
        row["note"] = note
        rows.append(row)
    return rows


def best_trial(study: Any) -> Any | None:
    """The best complete trial, or None before one completes."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    return study.best_trial


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(study: Any, folder: Path, space: Space, base: Config) -> list[Path]:
    """``tune_results.csv`` and ``.md`` (a row per trial) and ``best.yaml``, written atomically."""
    import csv
    import io

    metric, mode = resolve_fitness(base.task_class, base.fitness)
    rows = result_rows(study, space, metric)
    if not rows:
        return []
    header = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    files = [atomic_write(folder / RESULTS_CSV, text.getvalue())]
    best = best_trial(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in dict.fromkeys(r["state"] for r in rows)}
    lines = [f"## Sweep {folder.name}", "",
             f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items())}); fitness {metric} ({mode}).",
             f"Best: trial {best.number}, {metric} {_cell(best.value)} ({_format_params(best.params)}); "
             f"train it: `lightrainer fit --config {folder / BEST_FILE}`" if best else "No trial has completed yet.",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [_cell(row.get(k)) for k in header]
        if best is not None and row["trial"] == best.number:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    files.append(atomic_write(folder / RESULTS_MD, "\n".join(lines) + "\n"))
    if best is not None:
        files.append(write_best(best, base, folder, metric))
    return files


def best_config(trial: Any, base: Config) -> Config:
    """The base config with the trial's values (a config ``lightrainer fit`` trains)."""
    return apply_params(base, trial.params)


def write_best(trial: Any, base: Config, folder: Path, metric: str) -> Path:
    """``best.yaml``: the best trial's config; ``lightrainer fit --config best.yaml`` trains it."""
    head = (f"# The best trial of the sweep {folder}: trial {trial.number} ({trial.user_attrs.get('run', '')}), "
            f"{metric} {trial.value:.6g}\n# with {_format_params(trial.params)}.\n"
            f"# Train it: lightrainer fit --config {folder / BEST_FILE}\n")
    return atomic_write(folder / BEST_FILE, head + config_yaml(best_config(trial, base)))


#: The pictures of a finished sweep: file -> Optuna's matplotlib plot.
PICTURES = {
    "tune_history.png": "plot_optimization_history",
    "tune_importances.png": "plot_param_importances",
    "tune_parallel.png": "plot_parallel_coordinate",
    "tune_slice.png": "plot_slice",
    "tune_intermediate.png": "plot_intermediate_values",
}


def write_pictures(study: Any, folder: Path, metric: str) -> list[Path]:
    """Optuna's pictures of the sweep (history, importances, parallel coordinates, a slice per
    key, the fitness per epoch of every trial); one that cannot be drawn yet is skipped."""
    import numpy as np

    plt = _pyplot()
    from optuna.visualization import matplotlib as plots

    written = []
    keys = len(study.user_attrs.get("space") or {}) or 1
    # Categorical numbers ([16, 32]) make matplotlib log a line per axis; nothing to act on.
    category = logging.getLogger("matplotlib.category")
    level = category.level
    category.setLevel(logging.WARNING)
    try:
        for name, function in PICTURES.items():
            kwargs = {} if function == "plot_intermediate_values" else {"target_name": metric}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    axes = np.atleast_1d(getattr(plots, function)(study, **kwargs))
                except (ValueError, RuntimeError, ZeroDivisionError) as err:
                    log.info("%s not drawn: %s", name, _one_line(err))
                    plt.close("all")
                    continue
                figure = axes.flat[0].figure
                if name == "tune_intermediate.png":
                    axes.flat[0].set_ylabel(metric)
                    axes.flat[0].set_xlabel("epoch (0: the first)")
                if name == "tune_slice.png":
                    figure.set_size_inches(max(4.0 * axes.size, 6.0), 4.0)
                if name == "tune_parallel.png":
                    figure.set_size_inches(max(1.6 * (keys + 1) + 2.0, 7.0), 5.0)
                figure.tight_layout()
            written.append(save_figure(figure, folder / name))
    finally:
        category.setLevel(level)
    return written


# ---------------------------------------------------------------------------------- a sweep
class TuneResult(NamedTuple):
    """What :func:`tune` returns: ``study, best, folder = lightrainer.tune(...)``."""

    study: Any
    best_config: Config | None
    folder: Path


@dataclass
class SweepOptions:
    """How a sweep runs (the flags of ``lightrainer tune`` beside ``--config``)."""

    space: Any
    trials: int = 20
    resume: bool = False
    workers: int = 1
    storage: str | None = None
    backend: str = "optuna"
    address: str | None = None
    sampler: str | None = None
    pruner: str | None = None
    timeout: float | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    quiet: bool = True


def check_options(options: SweepOptions, cfg: Config, space: Space) -> tuple[str, str]:
    """Refuse flags that do not go together, before anything is created; returns (sampler, pruner).

    Raises:
        ConfigError: one line naming the flag.
    """
    for name in ("trials", "workers"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"tune: --{name} must be an integer >= 1, got {value!r}")
    for name, low in (("timeout", 0), ("cpus_per_trial", 0), ("gpus_per_trial", -1)):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low):
            raise ConfigError(f"tune: --{name} must be a number {'>= 0' if low < 0 else '> 0'}, got {value!r}")
    if options.backend not in BACKENDS:
        raise ConfigError(f"tune: --backend {options.backend!r} is not one of {', '.join(BACKENDS)}"
                          + closest_hint(str(options.backend), BACKENDS))
    if options.address and options.backend != "ray":
        raise ConfigError("tune: --address names a Ray cluster: add --backend ray")
    if options.workers > 1 and (cfg.devices or 1) > 1:
        raise ConfigError(f"tune: --workers {options.workers} runs each trial on one device, but devices: {cfg.devices}: "
                          "drop devices (or run one worker)")
    sampler = SAMPLERS.canonical(options.sampler or space.sampler or "tpe", "tune: --sampler")
    pruner = PRUNERS.canonical(options.pruner or space.pruner or "median", "tune: --pruner")
    if sampler == "grid":
        try:
            space.grid_size()
        except ConfigError as err:
            raise ConfigError(f"tune: {err}") from None
    _optuna()
    if options.backend == "ray":
        _import_ray()
    return sampler, pruner


def sweep_folder(cfg: Config, resume: bool) -> Path:
    """``save_dir/tune/name``: a new folder (claimed, numbered), or with ``resume`` the newest
    existing one.

    Raises:
        ConfigError: ``resume`` and there is none.
    """
    root = Path(cfg.save_dir) / "tune"
    if resume:
        found = [p for p in run_folders(root, cfg.name) if (p / SPACE_FILE).is_file()]
        if not found:
            raise ConfigError(f"tune: --resume: no sweep {root / cfg.name}[N] to resume (none holds {SPACE_FILE})")
        return found[-1]
    return create_run_dir(root, cfg.name)


def _differences(asked: Config, saved: Config) -> list[str]:
    mine, theirs = {**asked.to_dict(), **asked.sections}, {**saved.to_dict(), **saved.sections}
    return [f"{k}: {theirs.get(k)!r} in the sweep, {v!r} asked" for k, v in mine.items()
            if k not in RESUMABLE_KEYS and k != "trainer" and theirs.get(k) != v]


def _resumed_base(folder: Path, cfg: Config, space: Space) -> Config:
    """The base config a resumed sweep keeps (its own), after checking the command line agrees.

    Raises:
        ConfigError: the space or a training key differs from the sweep's.
    """
    saved_space = yaml.safe_load((folder / SPACE_FILE).read_text()) or {}
    if saved_space != space.to_data():
        raise ConfigError(f"tune: --resume: the space differs from the sweep's ({folder / SPACE_FILE}); resume with "
                          "the same space file, or start a new sweep (without --resume)")
    saved = load_config(folder / CONFIG_FILE, task_class=cfg.task_class)
    differences = _differences(cfg, saved)
    if differences:
        raise ConfigError(f"tune: --resume: the command line changes what the trials of {folder} train "
                          f"({'; '.join(differences)}); only {', '.join(sorted(RESUMABLE_KEYS))} may change")
    return saved.replace(**{k: v for k, v in cfg.to_dict().items() if k in RESUMABLE_KEYS - {"save_dir", "name", "exist_ok"}})


def section_value(base: Config, path: str) -> Any:
    """The value a class argument has in ``base``: its section's, else the class's default."""
    section, names = _split_path(path)
    spec: Any = _section_spec(base, section)
    for name in names[:-1]:
        spec = spec["init_args"][name]  # load_space checked the path names a class
    given = spec.get("init_args") or {}
    if names[-1] in given:
        return given[names[-1]]
    param = inspect.signature(_section_class(base, section, names)[0]).parameters.get(names[-1])
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _baseline(base: Config, space: Space) -> dict[str, Any]:
    """The base config's own values of the space's keys, where the space holds them: the first
    trial of a new sweep trains the config as it is."""
    values = base.to_dict()
    out = {}
    for key in space.keys:
        value = section_value(base, key.key) if "." in key.key else values.get(key.key)
        if value is not None and key.contains(value):
            out[key.key] = value
    return out


def check_joined_study(storage: Any, name: str, base: Config, space: Space) -> None:
    """A study of that name in a shared storage must tune the same space on the same fitness.

    Raises:
        ConfigError: it tunes another space, fitness or direction.
    """
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return  # no such study yet: this machine creates it
    metric, mode = resolve_fitness(base.task_class, base.fitness)
    known = study.user_attrs.get("space")
    if (known is not None and known != space.to_data()) or study.user_attrs.get("fitness", metric) != metric:
        raise ConfigError(f"tune: the study {name!r} in --storage tunes another space or fitness; "
                          "give this sweep another --name, or the same space file")
    if study.direction.name.lower() != ("maximize" if mode == "max" else "minimize"):
        raise ConfigError(f"tune: the study {name!r} in --storage {study.direction.name.lower()}s, but {metric} is "
                          f"{'maximized' if mode == 'max' else 'minimized'}: give another --name")


def create_study(job: Job, base: Config, space: Space, storage: Any) -> Any:
    """Create the sweep's study (or join the one of that name in a shared storage) and record
    what it tunes; a new study's first trial runs the config's own values."""
    optuna = _optuna()
    check_joined_study(storage, job.study_name, base, space)
    metric, mode = resolve_fitness(base.task_class, base.fitness)
    direction = "maximize" if mode == "max" else "minimize"
    study = optuna.create_study(storage=storage, study_name=job.study_name, direction=direction, load_if_exists=True)
    if study.user_attrs.get("space") is None:
        study.set_user_attr("space", space.to_data())
        study.set_user_attr("fitness", metric)
        baseline = _baseline(base, space) if job.sampler != "grid" else {}
        if baseline and not study.get_trials(deepcopy=False):
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    return study


def set_trial_attr(storage: Any, study: Any, number: int, key: str, value: Any) -> None:
    """Set a user attribute of trial ``number``, which another (gone) process ran."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    storage.set_trial_user_attr(trial_id, key, value)


def recover(study: Any, storage: Any) -> list[int]:
    """Mark this machine's trials whose process is gone as interrupted and queue their values
    again (the interrupted trial is re-run); returns the numbers queued."""
    states = _optuna().trial.TrialState
    for trial in dead_trials(study.get_trials(deepcopy=False), HOST, _pid_alive):
        set_trial_attr(storage, study, trial.number, "interrupted", True)
        study.tell(trial.number, state=states.FAIL)
        log.info("trial %d was interrupted (its process is gone): it runs again", trial.number)
    queued = []
    for trial in reruns_needed(study.get_trials(deepcopy=False)):
        study.enqueue_trial(dict(trial.params), user_attrs={"rerun_of": trial.number})
        queued.append(trial.number)
    return queued


def _live_trials(study: Any) -> list[Any]:
    return [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
            and t.user_attrs.get("host") == HOST and _pid_alive(int(t.user_attrs.get("pid", -1)))]


def run_sweep(cfg: Config, options: SweepOptions) -> TuneResult:
    """A sweep: validate, claim the folder, create (or resume) the study, run the trials here,
    in worker processes or as Ray tasks, then write the tables, ``best.yaml`` and the pictures.

    Raises:
        ConfigError: a bad space file or flag (nothing is created), a resume that does not match.
    """
    space = load_space(options.space, cfg)
    sampler, pruner = check_options(options, cfg, space)
    trials = options.trials
    if sampler == "grid" and space.grid_size() < trials:
        log.info("the grid has %d points: the sweep runs %d trials", space.grid_size(), space.grid_size())
        trials = space.grid_size()
    shared = open_storage(options.storage) if options.storage else None
    if shared is not None:
        with _optuna_quiet(_optuna()):
            check_joined_study(shared, cfg.name, cfg, space)  # before this machine's folder exists
    folder = sweep_folder(cfg, options.resume)
    base = _resumed_base(folder, cfg, space) if options.resume else cfg
    if not options.resume:
        atomic_write(folder / CONFIG_FILE, config_yaml(cfg))
        atomic_write(folder / SPACE_FILE, yaml.safe_dump(space.to_data(), sort_keys=False))
    url = options.storage or f"sqlite:///{(folder / STUDY_FILE).resolve()}"
    job = Job(folder=str(folder), study_name=cfg.name, storage=url, trials=trials, sampler=sampler, pruner=pruner,
              config=config_yaml(base), space=space.to_data(), quiet=options.quiet,
              deadline=time.time() + options.timeout if options.timeout else None,
              import_paths=[p for p in sys.path if p and Path(p).is_dir()])
    optuna = _optuna()
    with _optuna_quiet(optuna):
        storage = shared or open_storage(url)
        study = create_study(job, base, space, storage)
        if options.resume and not options.storage and _live_trials(study):
            live = _live_trials(study)[0]
            raise ConfigError(f"tune: --resume: trial {live.number} of {folder} is still running (process "
                              f"{live.user_attrs.get('pid')}): stop that sweep first, or wait for it")
        queued = recover(study, storage)
        done = sum(counts_toward(t) for t in study.get_trials(deepcopy=False))
        metric, mode = resolve_fitness(base.task_class, base.fitness)
        log.info("sweep %s: %d trials over %s (%s sampler, %s pruner, %s %s)%s%s", folder, trials,
                 ", ".join(space.names()), sampler, pruner, "max" if mode == "max" else "min", metric,
                 f"; {done} done already" if done else "",
                 f"; trial(s) {', '.join(map(str, queued))} run again" if queued else "")
        if options.backend == "ray":
            run_ray(job, base, space, options)
        elif options.workers > 1:
            run_workers(job, options.workers, base)
        else:
            work(job, base, space, study=open_study(job, base, space, storage=storage))
        study = optuna.load_study(study_name=job.study_name, storage=storage)
        write_tables(study, folder, space, base)
        pictures = write_pictures(study, folder, metric)
    best = best_trial(study)
    _log_summary(study, folder, metric, pictures)
    return TuneResult(study, best_config(best, base) if best else None, folder)


@contextlib.contextmanager
def _optuna_quiet(optuna: Any) -> Iterator[None]:
    """Optuna's own info lines off (each trial logs one line of ours)."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _log_summary(study: Any, folder: Path, metric: str, pictures: list[Path]) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(state_of(t) == s for t in trials) for s in dict.fromkeys(state_of(t) for t in trials)}
    log.info("sweep done: %s; %s, %s", ", ".join(f"{n} {s}" for s, n in counts.items()),
             folder / RESULTS_CSV, ", ".join(p.name for p in pictures) or "no pictures")
    best = best_trial(study)
    if best is None:
        log.warning("no trial completed: see %s", folder / RESULTS_MD)
        return
    log.info("best: trial %d, %s %.4f (%s); train it: lightrainer fit --config %s", best.number, metric, best.value,
             _format_params(best.params), folder / BEST_FILE)


def _gpu_ids(cfg: Config) -> list[int]:
    """The GPUs worker processes are placed on (one each, round robin); none on a CPU run."""
    import torch

    if cfg.device in ("cpu", "mps") or not torch.cuda.is_available():
        return []
    return list(cfg.device) if isinstance(cfg.device, list) else list(range(torch.cuda.device_count()))


def run_workers(job: Job, workers: int, base: Config) -> None:
    """``--workers K``: K processes on this machine, each running trials of the shared study
    (one GPU each where there are GPUs, else an equal share of the CPU cores)."""
    gpus = _gpu_ids(base)
    threads = max((os.cpu_count() or 1) // workers, 1)
    procs = []
    for worker in range(workers):
        env = {**os.environ, "LIGHTRAINER_SWEEP_WORKER": str(worker)}
        spec = dataclasses.replace(job, threads=None if gpus else threads)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(gpus[worker % len(gpus)])
            spec.config = config_yaml(base.replace(device=None, devices=None))
        else:
            env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
        env[JOB_ENV] = spec.to_json()
        code = "import sys; from lightrainer.sweep import worker_main; sys.exit(worker_main())"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env))
    log.info("%d worker processes: %s", workers,
             ", ".join(f"GPU {gpus[w % len(gpus)]}" for w in range(workers)) if gpus else f"{threads} thread(s) each")
    try:
        codes = [p.wait() for p in procs]
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    failed = [w for w, code in enumerate(codes) if code]
    if failed:
        log.warning("worker(s) %s stopped with an error (their trials are in the study; --resume runs the "
                    "interrupted ones again)", ", ".join(map(str, failed)))


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependencyError('lightrainer tune --backend ray needs Ray: pip install "lightrainer[ray]"') from None
    return ray


def run_ray(job: Job, base: Config, space: Space, options: SweepOptions) -> None:
    """``--backend ray``: each trial a Ray task with ``--cpus_per_trial``/``--gpus_per_trial``, as
    many at once as the cluster fits (or ``--workers``). Without ``--storage`` the tasks reach the
    sweep's study through Optuna's gRPC storage proxy, served from this process."""
    ray = _import_ray()
    if not ray.is_initialized():
        ray.init(address=options.address, include_dashboard=False, log_to_driver=not job.quiet)
    resources = ray.cluster_resources()
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 and base.device != "cpu" else 0.0
    fit = int(resources.get("CPU", 1) // options.cpus_per_trial)
    if gpus:
        fit = min(fit, int(resources.get("GPU", 0) // gpus))
    parallel = options.workers if options.workers > 1 else max(fit, 1)
    spec = dataclasses.replace(job, threads=max(int(options.cpus_per_trial), 1),
                               folder=str(Path(job.folder).resolve()))
    server = None
    if not options.storage:
        server, spec.storage = _serve_storage(job.storage, ray.util.get_node_ip_address())
    remote = ray.remote(num_cpus=options.cpus_per_trial, num_gpus=gpus, max_retries=0)(_ray_trial)
    storage = open_storage(job.storage)
    optuna = _optuna()
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    log.info("Ray: %d trial(s) at once, %g CPU and %g GPU each", parallel, options.cpus_per_trial, gpus)
    in_flight: dict[Any, int] = {}
    try:
        while True:
            counted = sum(counts_toward(t) for t in study.get_trials(deepcopy=False))
            open_slots = job.trials - counted - sum(1 for _ in in_flight)
            while open_slots > 0 and len(in_flight) < parallel and (job.deadline is None or time.time() < job.deadline):
                in_flight[remote.remote(spec.to_json())] = 0
                open_slots -= 1
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            in_flight.pop(ref)
            try:
                log_trial(ray.get(ref), job.trials)
            except Exception as err:  # noqa: BLE001 - a task that died (worker crash, OOM kill)
                _fail_ray_trial(study, storage, ref, err)
            write_tables(study, Path(job.folder), space, base)
    finally:
        for ref in in_flight:
            ray.cancel(ref, force=True)
        if server is not None:
            server.stop(grace=1)


def _fail_ray_trial(study: Any, storage: Any, ref: Any, err: BaseException) -> None:
    """A Ray task that died: its running trial is recorded as failed with the error."""
    task = ref.task_id().hex()
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "RUNNING" and trial.user_attrs.get("ray_task") == task:
            set_trial_attr(storage, study, trial.number, "error", _one_line(err))
            study.tell(trial.number, state=_optuna().trial.TrialState.FAIL)
    log.warning("a Ray trial task failed: %s", _one_line(err))


def _serve_storage(url: str, host: str) -> tuple[Any, str]:
    """Serve the study database to Ray tasks with Optuna's gRPC storage proxy; (server, URL)."""
    try:
        from optuna.storages._grpc.server import make_server
    except ImportError:
        raise MissingDependencyError('--backend ray without --storage needs grpcio: pip install "lightrainer[ray]"') from None
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = make_server(open_storage(url), host, port)
    server.start()
    return server, f"grpc://{host}:{port}"


# ---------------------------------------------------------------------------------- the entry points
def tune(
    cfg: Union[Config, str, os.PathLike, Mapping[str, Any]],
    space: Union[str, os.PathLike, Mapping[str, Any]],
    trials: int = 20,
    *,
    resume: bool = False,
    workers: int = 1,
    storage: str | None = None,
    backend: str = "optuna",
    address: str | None = None,
    sampler: str | None = None,
    pruner: str | None = None,
    timeout: float | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float | None = None,
    quiet: bool = True,
    **overrides: Any,
) -> TuneResult:
    """Tune the keys of ``space`` over ``trials`` runs of ``cfg`` (``lightrainer tune`` in Python).

    Args:
        cfg: a :class:`Config`, a YAML file or a mapping of keys.
        space: a space file or a mapping: key -> ``{low, high, log, step}`` or a list of choices.
        trials: trials that count (complete, pruned or failed; killed ones are run again).
        resume: continue the newest sweep ``save_dir/tune/name[N]``.
        workers: trials at once on this machine (processes), or Ray tasks at once.
        storage: an Optuna database URL shared by several machines (PostgreSQL/MySQL).
        backend: "optuna" (this machine) or "ray" (tasks on a Ray cluster at ``address``).
        sampler: tpe (default), random, grid, cmaes, gp.
        pruner: median (default), percentile, hyperband, halving, none.
        timeout: no trial starts after this many seconds.
        cpus_per_trial, gpus_per_trial: Ray resources of a trial.
        quiet: keep Lightning's lines out (one line per trial).
        **overrides: keys that replace those of ``cfg`` (``epochs=3``).

    Returns:
        ``TuneResult(study, best_config, folder)``: the Optuna study, the best trial's config
        (None when none completed), the sweep folder.

    Raises:
        ConfigError: a bad space, key or option (before anything is created).
    """
    if isinstance(cfg, Config):
        cfg = cfg.replace(**overrides) if overrides else cfg
    else:
        cfg = load_config(cfg, **overrides)
    options = SweepOptions(space=space, trials=trials, resume=resume, workers=workers, storage=storage,
                           backend=backend, address=address, sampler=sampler, pruner=pruner, timeout=timeout,
                           cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, quiet=quiet)
    return run_sweep(cfg, options)


def add_tune_arguments(parser: Any) -> None:
    """The flags of ``lightrainer tune`` beside the config's keys."""
    from jsonargparse import ActionYesNo

    # Numbers are read as Any and checked by check_options: one line naming the flag, not the parser's.
    parser.add_argument("--space", type=typing.Optional[str], default=None,
                        help="the space file (required): key: {low, high, log} or [choices]")
    parser.add_argument("--trials", type=Any, default=20, help="trials that count (complete, pruned, failed)")
    parser.add_argument("--resume", action=ActionYesNo, default=False,
                        help="continue the newest sweep save_dir/tune/name[N] (an interrupted trial runs again)")
    parser.add_argument("--workers", type=Any, default=1, help="trials at once on this machine (one GPU each)")
    parser.add_argument("--storage", type=typing.Optional[str], default=None,
                        help="an Optuna database URL several machines share (postgresql://..., mysql://...)")
    parser.add_argument("--backend", type=str, default="optuna", help="optuna (this machine) or ray (a Ray cluster)")
    parser.add_argument("--address", type=typing.Optional[str], default=None, help="the Ray cluster (ray://host:10001, auto)")
    parser.add_argument("--sampler", type=typing.Optional[str], default=None,
                        help=f"one of {', '.join(SAMPLERS)} (default: the space file's, else tpe)")
    parser.add_argument("--pruner", type=typing.Optional[str], default=None,
                        help=f"one of {', '.join(PRUNERS)} (default: the space file's, else median)")
    parser.add_argument("--timeout", type=Any, default=None, help="no trial starts after this many seconds")
    parser.add_argument("--cpus_per_trial", type=Any, default=1.0, help="Ray: CPUs of a trial")
    parser.add_argument("--gpus_per_trial", type=Any, default=None,
                        help="Ray: GPUs of a trial (default: 1 where the cluster has GPUs)")


def tune_command(cfg: Config, values: Mapping[str, Any]) -> TuneResult:
    """``lightrainer tune``: the sweep the parsed flags describe."""
    if not values.get("space"):
        raise ConfigError("tune: --space is required: a space file of keys to tune, key: {low: ..., high: ...} or "
                          "key: [choice, ...] (see configs/spaces/digits.yaml)")
    names = [f.name for f in dataclasses.fields(SweepOptions) if f.name != "quiet"]
    return run_sweep(cfg, SweepOptions(**{k: values[k] for k in names if k in values}))


__all__ = ["KeySpace", "PRUNERS", "SAMPLERS", "Space", "SweepOptions", "TrialReport", "TuneResult", "add_tune_arguments",
           "load_space", "run_sweep", "tune", "tune_command"]
