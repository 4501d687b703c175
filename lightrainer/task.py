"""What a task declares about itself, in one place on its class, and how generic code reads it.

A task is a :class:`~lightrainer.LightrainerModule` subclass. On its class it declares:

- ``task_name``: its name in the task registry and the value of the ``task`` key (default: the
  class name, lower-cased, without a trailing "Module": ``ClassificationModule`` -> classification);
- ``task_keys``: the YAML keys it adds, ``{"huber_delta": TaskKey(float, 1.0, check, "doc")}``;
- ``metric_modes``: the direction ("min"/"max") of every metric it logs (names without the
  ``val/`` prefix), which ``fitness`` may name;
- ``fitness_key`` / ``fitness_mode``: the metric that selects the best epoch by default;
- ``default_net(cfg, datamodule)`` and ``default_datamodule``: what a YAML without
  ``model: init_args: net:`` / ``data:`` trains;
- ``export_spec``: the exported graphs, their input and output names and how each output verifies;
- ``rebuild_overrides``: keys a run rebuilt from its weights file takes instead of the recorded
  ones, because the file holds the weights (``pretrained: False``: no cache file needed to export);
- ``test_report(run_dir)`` (a method): its own table and pictures in ``lightrainer test``'s
  results (a :class:`TestReport`), and ``prediction_columns`` / ``prediction_images``: what
  ``lightrainer predict`` writes per sample.

Generic code (config, build, export, verify) reads these through the functions below and never
names a task. This module is the bottom layer: it imports nothing of lightrainer but the registry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from lightrainer.errors import ConfigError, closest_hint
from lightrainer.registry import TASKS

MODES = ("min", "max")


@dataclass(frozen=True)
class TaskKey:
    """A YAML key a task adds: its type, default, optional validator and one-line meaning."""

    type: type
    default: Any
    check: Callable[[str, Any], Any] | None = None
    doc: str = ""


#: The name the original rebuild used for :class:`TaskKey`.
ExtraKey = TaskKey


@dataclass(frozen=True)
class ExportOutput:
    """One output of an exported graph.

    Args:
        name: the ONNX output name.
        check: how ONNX Runtime's output is compared with PyTorch's: "tolerance" (max abs
            difference), "argmax" (tolerance and argmax agreement over the last axis: class
            scores), or "equal" (integer outputs such as code indices: index agreement).
    """

    name: str
    check: str = "tolerance"

    def __post_init__(self) -> None:
        if self.check not in ("tolerance", "argmax", "equal"):
            raise ValueError(f"ExportOutput.check: {self.check!r} is not one of tolerance, argmax, equal")


@dataclass(frozen=True)
class ExportPart:
    """One exported graph: a method of the network, its input, the outputs kept.

    Args:
        suffix: added to the file stem ("" for the whole network, ".encoder", ...).
        method: the network's method to export ("forward", "encode_codes", ...).
        input_name: the ONNX input name.
        outputs: the outputs kept, in order; with ``select`` the indices of a tuple output.
        select: indices of the method's tuple output to keep (None: the whole output).
        input_from: the suffix of an earlier part whose first output is this part's input (a
            decoder exported from the encoder's codes); None: the datamodule's inputs.
    """

    suffix: str = ""
    method: str = "forward"
    input_name: str = "input"
    outputs: tuple[ExportOutput, ...] = (ExportOutput("output"),)
    select: tuple[int, ...] | None = None
    input_from: str | None = None


@dataclass(frozen=True)
class ExportSpec:
    """How a task's network exports: one or more graphs (see :class:`ExportPart`)."""

    parts: tuple[ExportPart, ...] = (ExportPart(),)
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class TestReport:
    """What a task adds to ``test_results.csv``/``.md`` after ``lightrainer test``.

    Args:
        rows: the task's table, a dict per row with the same keys (classification: a row per class
            and the averages); empty: the table is the logged test metrics.
        pictures: the files it wrote into the run folder (linked from the markdown).
    """

    __test__ = False  # not a pytest test class, despite the name

    rows: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)


def default_task_name(cls: type) -> str:
    """``ClassificationModule`` -> "classification", ``InkHuber`` -> "inkhuber"."""
    name = cls.__name__
    if name.endswith("Module") and name != "Module":
        name = name[: -len("Module")]
    return name.lower()


def task_name_of(cls: type) -> str:
    """The registry name of a task class (its own ``task_name``, else the default)."""
    own = vars(cls).get("task_name")
    return own if isinstance(own, str) and own else default_task_name(cls)


#: Keys declared with :func:`register_task_keys` under a task name, and the module that did.
_REGISTERED_KEYS: dict[str, dict[str, TaskKey]] = {}
_REGISTERING_MODULE: dict[str, str] = {}


def register_task_keys(task: str | type, keys: Mapping[str, TaskKey]) -> None:
    """Declare YAML keys of a task from outside its class (prefer ``task_keys`` on the class).

    Keys registered under a name belong to the task of that ``task_name``; when no registered task
    has that name, to the tasks defined in the module that registered them (the original's
    ``register_task_keys("ink", ...)`` beside ``class InkHuber``).

    Args:
        task: the task class, or its ``task_name``.
        keys: key name -> :class:`TaskKey`.

    Raises:
        ValueError: a key that is not a TaskKey.
    """
    for name, spec in keys.items():
        if not isinstance(spec, TaskKey):
            raise ValueError(f"register_task_keys: {name!r} must be a TaskKey(type, default, check, doc)")
    name = task_name_of(task) if isinstance(task, type) else str(task)
    _REGISTERED_KEYS.setdefault(name, {}).update(keys)
    caller = inspect.currentframe().f_back  # the module that registers (for classes without the name)
    _REGISTERING_MODULE[name] = task.__module__ if isinstance(task, type) else caller.f_globals.get("__name__", "")


def task_keys_of(cls: type | None) -> dict[str, TaskKey]:
    """Every key a task class declares: ``task_keys`` along its class hierarchy (subclass wins)
    and those registered under its name with :func:`register_task_keys`."""
    if cls is None:
        return {}
    merged: dict[str, TaskKey] = {}
    for klass in reversed(cls.__mro__):
        own = vars(klass).get("task_keys")
        if isinstance(own, Mapping):
            merged.update(own)
        if vars(klass).get("task_name") is not None or klass is cls:
            merged.update(_REGISTERED_KEYS.get(task_name_of(klass), {}))
    for name, module in _REGISTERING_MODULE.items():
        if module == cls.__module__ and name not in TASKS:
            merged.update(_REGISTERED_KEYS[name])
    return merged


def metric_modes_of(cls: type | None) -> dict[str, str]:
    """Every metric a task class declares, with its direction (plus its default fitness)."""
    modes: dict[str, str] = {"loss": "min"}
    if cls is None:
        return modes
    for klass in reversed(cls.__mro__):
        own = vars(klass).get("metric_modes")
        if isinstance(own, Mapping):
            modes.update(own)
    key = getattr(cls, "fitness_key", None)
    if isinstance(key, str):
        modes.setdefault(key.split("/", 1)[-1], getattr(cls, "fitness_mode", "max"))
    for name, mode in modes.items():
        if mode not in MODES:
            raise ValueError(f"{cls.__name__}.metric_modes[{name!r}]: {mode!r} is not one of min, max")
    return modes


def resolve_fitness(cls: type | None, fitness: str | None) -> tuple[str, str]:
    """(metric, mode) that selects the best epoch: the ``fitness`` key, or the task's default.

    Args:
        cls: the task class (None: a plain task that logs val/loss).
        fitness: "acc", "val/acc" or None.

    Raises:
        ConfigError: a metric the task does not declare (lists those it does).
    """
    modes = metric_modes_of(cls)
    if not fitness:
        key = getattr(cls, "fitness_key", "val/loss") if cls is not None else "val/loss"
        return key, modes.get(key.split("/", 1)[-1], getattr(cls, "fitness_mode", "min"))
    stage, _, name = fitness.rpartition("/")
    if stage not in ("", "val"):
        raise ConfigError(f"fitness: {fitness!r} must be a validation metric (val/NAME or NAME)")
    if name not in modes:
        owner = cls.__name__ if cls is not None else "the task"
        raise ConfigError(
            f"fitness: {fitness!r} is not a metric {owner} logs; it logs "
            f"{', '.join(sorted(modes))}" + closest_hint(name, modes)
        )
    return f"val/{name}", modes[name]


def export_spec_of(task: Any) -> ExportSpec:
    """The task's :class:`ExportSpec` (a plain LightningModule: one graph, input and output)."""
    spec = getattr(task, "export_spec", None)
    return spec if isinstance(spec, ExportSpec) else ExportSpec()


def find_task(name: str) -> type:
    """The task class registered as ``name``.

    Raises:
        ConfigError: no such task (names the registered ones and the closest).
    """
    return TASKS.get(name)


def _base_most(classes: list[type]) -> list[type]:
    """Drop the classes that subclass another one of the list (a subclass inherits its keys)."""
    return [c for c in classes if not any(o is not c and issubclass(c, o) for o in classes)]


def tasks_declaring(keys: set[str]) -> list[type]:
    """The registered tasks that declare every key of ``keys`` (used to pick a task for a YAML
    without a ``task`` key or a ``model:`` section, such as the original's files); of a task and
    its subclasses, the task."""
    return _base_most([TASKS.get(n) for n in TASKS if keys <= set(task_keys_of(TASKS.get(n)))])


def key_owners(key: str) -> list[str]:
    """The names of the registered tasks (or register_task_keys names) that declare ``key``."""
    owners = [task_name_of(c) for c in _base_most([TASKS.get(n) for n in TASKS if key in task_keys_of(TASKS.get(n))])]
    owners += [n for n, keys in _REGISTERED_KEYS.items() if key in keys and n not in owners]
    return owners
