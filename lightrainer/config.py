"""The config boundary: flat YAML -> validated, typed :class:`Config`.

This is the only module that reads raw keys. Everything below it works with attributes of
:class:`Config`. The flat keys of the original lightrainer are the public contract: a file written
for it loads unchanged, with the same defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import yaml

from lightrainer.assets import resolve_config, shipped_configs
from lightrainer.errors import ConfigError, closest_hint
from lightrainer.io import atomic_write
from lightrainer.registry import CALIBRATION_METHODS, EXPORT_FORMATS, OPTIMIZERS, QUANT_BACKENDS, SCHEDULES, TASKS
from lightrainer.task import (
    ExtraKey,
    TaskKey,
    key_owners,
    register_task_keys,
    resolve_fitness,
    task_keys_of,
    task_name_of,
    tasks_declaring,
)

__all__ = [
    "CLI_SECTIONS", "Config", "ConfigError", "ExtraKey", "TaskKey", "at_least", "choice", "dump_config",
    "config_yaml", "derived_values", "field_docs", "fraction", "import_class", "in_range", "load_config", "positive", "register_task_keys", "seed_all",
    "unit_interval",
]

# Sections that name classes for LightningCLI (`model:` / `data:` / `trainer:`); load_config keeps
# them aside untouched so the same file serves the notebook path and the CLI.
CLI_SECTIONS = ("model", "data", "trainer", "ckpt_path", "seed_everything")
#: The task a YAML trains when it names none and uses no task's own keys (the main job).
DEFAULT_TASK = "classification"


def choice(choices: tuple[str, ...]) -> Callable[[str, Any], Any]:
    """A check that accepts one of ``choices`` (any case) and returns its canonical spelling."""
    lower = {c.lower(): c for c in choices}

    def check(key: str, value: Any) -> Any:
        canonical = lower.get(str(value).lower())
        if canonical is None:
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(choices)}"
                + closest_hint(str(value), choices)
            )
        return canonical

    return check


def at_least(low: float) -> Callable[[str, Any], Any]:
    """A check that refuses values below ``low``."""
    def check(key: str, value: Any) -> Any:
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
        return value

    return check


def in_range(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str, Any], Any]:
    """A check: the value must lie between ``low`` and ``high`` (each end closed unless open)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def check(key: str, value: Any) -> Any:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ConfigError(f"{key}: must be in {left}{low:g}, {high:g}{right}, got {value!r}")
        return value

    return check


def positive(key: str, value: Any) -> Any:
    """A check: the value must be > 0."""
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return value


#: A check: the value must be in [0, 1).
unit_interval = in_range(0.0, 1.0, high_open=True)
#: A check: the value must be in (0, 1).
fraction = in_range(0.0, 1.0, low_open=True, high_open=True)
_percentile = in_range(0.0, 100.0, low_open=True)


#: The largest count a size key takes (batch, epochs, workers, ...): a C int, far past any sane run.
INT_MAX = 2**31 - 1
#: NumPy and torch seed with 32-bit unsigned integers.
SEED_MAX = 2**32 - 1
#: A config file larger than this is refused before it is parsed (configs are a few KB).
MAX_CONFIG_BYTES = 1 << 20
#: Nodes a YAML document may expand to, aliases expanded (a 1 KB "billion laughs" holds ~10**9).
MAX_YAML_NODES = 100_000


def between(low: int, high: int) -> Callable[[str, Any], Any]:
    """A check that refuses values outside ``[low, high]``."""
    def check(key: str, value: Any) -> Any:
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
        if value > high:
            shown = f"{value:.4g}" if abs(value) >= 10**15 else repr(value)
            raise ConfigError(f"{key}: must be at most {high}, got {shown}")
        return value

    return check


def _save_dir(key: str, value: Any) -> str:
    """``save_dir`` with ``~`` and environment variables expanded, once, here: every file of a
    run goes under the same folder, and ``--resume`` finds it."""
    text = str(value)
    expanded = os.path.expandvars(os.path.expanduser(text))
    unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ConfigError(
            f"{key}: {text!r} uses the environment variable ${unset.group(1)}, which is not set: "
            "set it, or write the folder out"
        )
    if expanded.startswith("~"):
        raise ConfigError(f"{key}: {text!r}: cannot expand {expanded.split(os.sep)[0]!r} (no such user); write the folder out")
    if not expanded.strip() or "\0" in expanded:
        raise ConfigError(f"{key}: {text!r} is not a folder path; give one, such as runs")
    if os.path.exists(expanded) and not os.path.isdir(expanded):
        raise ConfigError(f"{key}: {expanded} exists and is not a folder; choose another save_dir")
    return expanded


def _run_name(key: str, value: Any) -> str:
    """``name`` is one folder inside ``save_dir``: a run never writes outside it."""
    name = str(value)
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    if (not name.strip() or name in (".", "..") or "\0" in name or os.path.isabs(name)
            or any(sep in name for sep in separators)):
        raise ConfigError(
            f"{key}: {name!r} is not a folder name: a run's name is one folder inside save_dir (no '/', "
            "'\\', '..', not '.' or empty); put parent folders in save_dir (save_dir: runs/sweep, name: exp)"
        )
    return name


#: ``amp`` as written: False/True, or a precision name (normalised by :func:`_amp`).
AmpSetting = Union[bool, str]
#: The ``progress`` key's choices.
PROGRESS_MODES = ("auto", "bar", "lines", "off")
_AMP_NAMES = {"false": False, "fp32": False, "true": True, "fp16": True, "16": True, "bf16": "bf16"}


def _amp(key: str, value: Any) -> Union[bool, str]:
    """``amp``: False (fp32), True or fp16 (fp16 mixed precision), bf16 (bf16 mixed precision);
    normalised to False, True or "bf16", so a seed file's ``amp: True`` reads as before."""
    canonical = _AMP_NAMES.get(str(value).strip().lower())
    if canonical is None:
        raise ConfigError(f"{key}: {value!r} is not one of False, True, fp16, bf16 (True means fp16)"
                          + closest_hint(str(value), ("fp16", "bf16")))
    return canonical


def _key(default: Any, check: Callable[[str, Any], Any] | None = None, doc: str = "") -> Any:
    """A config field: its default, an optional validator and a one-line meaning (for the docs)."""
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass
class Config:
    """The validated training configuration.

    Build it with :func:`load_config`. Seed keys keep the original lightrainer's names and
    defaults; keys beyond the seed default to the seed's behaviour. Derived values
    (:attr:`accumulate`, :attr:`weight_decay_scaled`, :attr:`batch_per_device`) are properties,
    and :attr:`run_dir` is set once by :func:`lightrainer.build_trainer`.
    """

    # --- the seed's keys -------------------------------------------------------------------
    save_dir: str = _key("runs", _save_dir, "folder that holds the run folders (~ and $VARS expanded)")
    device: Union[int, str, list, None] = _key(
        None, doc='GPU ids (0, "0,1", [0, 1]), "cpu", or None/"" for auto'
    )
    batch: int = _key(32, between(1, INT_MAX), "global batch size (split across devices)")
    nbs: int = _key(64, between(1, INT_MAX), "nominal batch size: accumulation and weight-decay scaling")
    num_workers: int = _key(4, between(0, INT_MAX), "DataLoader worker processes")
    patience: int = _key(100, between(0, INT_MAX), "epochs without fitness improvement before stopping (0 = off)")
    epochs: int = _key(200, between(1, INT_MAX), "training epochs")
    exist_ok: bool = _key(False, doc="reuse save_dir/name instead of incrementing it")
    amp: AmpSetting = _key(False, _amp, "mixed precision: False, True or fp16 (CUDA), bf16 (CUDA with bf16 "
                           "support, or the CPU)")
    ptq: bool = _key(False, doc="post-training quantization after fit")
    num_batches: Union[int, None] = _key(None, between(1, INT_MAX), "PTQ calibration batches (None = all)")
    method: str = _key("entropy", CALIBRATION_METHODS.validator(), "PTQ amax method (a registered calibration method)")
    qat: bool = _key(False, doc="quantization-aware training")
    trt_quant: bool = _key(False, doc="build an int8 TensorRT engine after fit")
    optimizer: str = _key("Adam", OPTIMIZERS.validator(), "optimizer (a registered optimizer)")
    scheduler: str = _key("Cosine", SCHEDULES.validator(), "lr schedule (a registered schedule)")
    lr0: float = _key(0.01, in_range(0.0, 10.0, low_open=True), "initial learning rate, in (0, 10]")
    lrf: float = _key(0.01, at_least(0), "final lr = lr0 * lrf")
    gamma: float = _key(0.9, in_range(0.0, 1.0, low_open=True), "Exponential schedule factor, in (0, 1]")
    power: float = _key(2.0, in_range(0.0, 100.0, low_open=True), "Polynomial schedule power, in (0, 100]")
    momentum: float = _key(0.937, unit_interval, "SGD momentum / Adam beta1")
    weight_decay: float = _key(0.0005, at_least(0), "weight decay (scaled by batch*accumulate/nbs)")
    warmup_epochs: float = _key(3.0, at_least(0), "warmup epochs (fractions allowed)")
    warmup_momentum: float = _key(0.8, unit_interval, "momentum at the start of warmup")
    warmup_bias_lr: float = _key(0.1, at_least(0), "bias lr at the start of warmup")

    # --- keys beyond the seed (defaults keep seed behaviour) ---------------------------------
    task: str = _key(DEFAULT_TASK, TASKS.validator(),
                     "task trained when the YAML has no model: section (a registered task name)")
    name: str = _key("train", _run_name, "run folder name under save_dir (one folder: no '/' or '..')")
    seed: int = _key(0, between(0, SEED_MAX), "random seed (data split, shuffling, init)")
    deterministic: bool = _key(False, doc="torch deterministic algorithms")
    grad_clip: float = _key(10.0, at_least(0), "gradient norm clip (0 = off)")
    val_split: float = _key(0.2, fraction, "fraction held out for validation (stratified)")
    test_split: float = _key(0.0, unit_interval, "fraction held out for `lightrainer test` (stratified; 0 = none)")
    devices: Union[int, None] = _key(None, between(1, INT_MAX), "number of devices (overrides device count)")
    num_nodes: int = _key(1, between(1, INT_MAX), "number of machines")
    sync_bn: Union[bool, None] = _key(None, doc="SyncBatchNorm (None = on when several devices)")
    tensorboard: bool = _key(False, doc="also log to TensorBoard")
    wandb: bool = _key(False, doc="also log to Weights & Biases")
    wandb_project: str = _key("lightrainer", doc="wandb project")
    wandb_offline: bool = _key(False, doc="wandb offline mode (no network)")
    mlflow: bool = _key(False, doc="also log to MLflow (a local store, RUN/mlflow.db, unless mlflow_uri)")
    mlflow_uri: Union[str, None] = _key(None, doc="MLflow tracking server or store URI (None = RUN/mlflow.db)")
    progress: Union[str, None] = _key("auto", choice(PROGRESS_MODES), "training output: bar (a live bar), lines "
                                      "(a line per epoch, for log files), off (None too), or auto (bar on a "
                                      "terminal or in a notebook, lines otherwise)")
    plots: bool = _key(True, doc="write results.png and task plots")
    shift: int = _key(0, at_least(0), "random +-shift pixels for training images (in-memory image data)")
    percentile: float = _key(99.99, _percentile, "PTQ percentile method's percentile")
    quant_backend: str = _key("auto", QUANT_BACKENDS.validator(extra=("auto",)), "quantization library (auto or a registered backend)")
    export: Union[str, None] = _key(None, EXPORT_FORMATS.validator(), "export after fit: a registered format (onnx, engine) or None")
    fitness: Union[str, None] = _key(None, doc="metric that selects the best epoch (None = the task's; a metric the task declares)")
    compile: bool = _key(False, doc="torch.compile the network (first steps slower while it compiles)")
    channels_last: bool = _key(False, doc="channels-last memory format for the network and 4-D inputs")
    ema: bool = _key(False, doc="keep an EMA of the weights; validate, save (weights/*.pt) and export it")
    ema_decay: float = _key(0.9999, fraction, "EMA decay d: ema = d' * ema + (1 - d') * w, d' = d * (1 - exp(-n / ema_tau))")
    ema_tau: float = _key(2000.0, positive, "EMA warm-up time constant, in optimizer steps")
    nan_patience: int = _key(10, between(0, INT_MAX), "optimizer steps in a row with a NaN/inf loss or gradient "
                             "(each skipped) before the run stops with exit 1 (0 = stop at the first)")
    requeue: bool = _key(False, doc="under SLURM: requeue the job on its time-limit signal and resume in "
                         "the same run folder (Lightning's SLURM auto-requeue)")

    # The task's own keys (e.g. the VQ-VAE's loss weights), validated against its declaration.
    extras: dict = field(default_factory=dict, metadata={"check": None, "doc": ""})
    # The task class the config was validated for, and the keys it declares.
    task_class: Union[type, None] = field(default=None, metadata={"check": None, "doc": ""})
    task_specs: dict = field(default_factory=dict, metadata={"check": None, "doc": ""})
    # Sections for LightningCLI (model:/data:/trainer:), kept verbatim.
    sections: dict = field(default_factory=dict, metadata={"check": None, "doc": ""})
    # Set by build_trainer; never read from YAML.
    run_dir: Union[str, None] = field(default=None, metadata={"check": None, "doc": ""})
    world_size: int = field(default=1, metadata={"check": None, "doc": ""})

    # --- derived values ----------------------------------------------------------------------
    @property
    def accumulate(self) -> int:
        """Micro-batches per optimizer step after warmup: max(round(nbs / batch), 1)."""
        return max(round(self.nbs / self.batch), 1)

    @property
    def weight_decay_scaled(self) -> float:
        """Decay applied to the decayed group: weight_decay * batch * accumulate / nbs."""
        return self.weight_decay * self.batch * self.accumulate / self.nbs

    @property
    def batch_per_device(self) -> int:
        """Each device's share of the global batch."""
        return max(self.batch // max(self.world_size, 1), 1)

    def warmup_iters(self, batches_per_epoch: int) -> int:
        """Warmup iterations nw = max(round(warmup_epochs * nb), 100), or -1 when off."""
        if self.warmup_epochs <= 0:
            return -1
        return max(round(self.warmup_epochs * batches_per_epoch), 100)

    def extra(self, key: str) -> Any:
        """A task key's value, with the default its task declared."""
        spec = self.task_specs.get(key)
        if spec is None:
            owner = self.task_class.__name__ if self.task_class is not None else f"task {self.task!r}"
            raise ConfigError(f"{key}: {owner} declares no such key" + closest_hint(key, self.task_specs))
        return self.extras.get(key, spec.default)

    def __getattr__(self, name: str) -> Any:
        # Task keys read like built-in ones: cfg.recon_weight.
        specs = self.__dict__.get("task_specs")
        if not name.startswith("_") and specs and name in specs:
            return self.extra(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def bind_task(self, cls: type) -> None:
        """Make this config the config of task ``cls`` (a module built from a config validated for
        another task, as in a notebook). Its task keys must be keys ``cls`` declares.

        Raises:
            ConfigError: a task key ``cls`` does not declare, or a ``fitness`` it does not log.
        """
        if self.task_class is cls:
            return
        specs = task_keys_of(cls)
        foreign = sorted(k for k in self.extras if k not in specs)
        if foreign:
            raise ConfigError(
                f"{cls.__name__} does not declare the key(s) {', '.join(foreign)} that this config sets "
                f"(they belong to {self.task_class.__name__ if self.task_class else self.task}): "
                f"load the config for {cls.__name__} (load_config(..., task_class={cls.__name__}))"
            )
        resolve_fitness(cls, self.fitness)
        self.task_class, self.task_specs, self.task = cls, specs, task_name_of(cls)

    def derived(self) -> dict[str, Any]:
        """The derived values, as written to args.yaml."""
        return {
            "accumulate": self.accumulate,
            "weight_decay_scaled": self.weight_decay_scaled,
            "batch_per_device": self.batch_per_device,
            "world_size": self.world_size,
        }

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every built-in key and the task's own keys, as a YAML file would hold it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _INTERNAL}
        out.update({k: self.extra(k) for k in sorted(self.task_specs)})
        return out

    def replace(self, **overrides: Any) -> Config:
        """A validated copy with some keys changed."""
        data = self.to_dict()
        data.update(self.sections)
        data.update(overrides)
        new = _validate(data, self.task_class)
        new.run_dir, new.world_size = self.run_dir, self.world_size
        return new


_INTERNAL = {"extras", "sections", "run_dir", "world_size", "task_class", "task_specs"}
_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in _INTERNAL}


def import_class(path: str, section: str) -> type:
    """The class ``pkg.mod.Name`` names (a task's class name alone finds a registered task).

    Importing a module runs its top-level code, as LightningCLI does for a ``class_path``: a
    config is code. Nothing is called here; the caller checks the class's kind before using it.

    Raises:
        ConfigError: the module or the name cannot be imported, or it is not a class.
    """
    path = str(path)
    if "." not in path:
        found = [TASKS.get(n) for n in TASKS if TASKS.get(n).__name__ == path]
        if found:
            return found[0]
        raise ConfigError(
            f"{section}.class_path: {path!r} is not a full import path: give package.module.Class "
            "(a module beside the YAML, on PYTHONPATH, or installed)"
        )
    module_name, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
    except ImportError as err:
        raise ConfigError(
            f"{section}.class_path: cannot import {path!r} ({err}); a module of your own must be importable: "
            "run from its folder or add that folder to PYTHONPATH"
        ) from None
    except AttributeError:
        raise ConfigError(f"{section}.class_path: cannot import {path!r} (module {module_name!r} has no {name!r})") from None
    if not isinstance(obj, type):
        raise ConfigError(f"{section}.class_path: {path!r} is a {type(obj).__name__}, not a class")
    return obj


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("None", "none", "null", "~", ""))


_INT64_MAX = 2**63 - 1


def _as_integer(value: Any) -> int | None:
    """An int from an int, an integral float or the text of either; None when it is none."""
    if isinstance(value, int):
        return value
    if not isinstance(value, (float, str)):
        return None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(number) or not number.is_integer():
        return None
    return int(number)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML value to the field's type, or raise naming the key and the expected type."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    optional = "None" in text
    if _is_none(value):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required, got None")
    if "bool" in text:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected True or False, got {value!r}")
    if text.startswith("int") or text == "Union[int, None]":
        number = None if isinstance(value, bool) else _as_integer(value)
        if number is None:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if abs(number) > _INT64_MAX:
            # No integer setting takes such a value; refused before a check sees a 30-digit number.
            raise ConfigError(f"{key}: {value!r} is out of range for an integer setting")
        return number
    if text.startswith("float"):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if text.startswith("str") or text == "Union[str, None]":
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _validate_extra(key: str, value: Any, spec: TaskKey) -> Any:
    if _is_none(value):
        return spec.default
    value = _coerce(key, value, spec.type.__name__)
    return spec.check(key, value) if spec.check else value


class _YamlRefused(yaml.YAMLError):
    """A YAML document that parses but is refused (a key given twice, aliases expanding too far)."""


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, limit: int = MAX_YAML_NODES) -> None:
    """Refuse a document that would expand to more than ``limit`` nodes with its aliases expanded,
    or whose aliases refer to a node that contains them. Counted on the node graph (a shared node
    once per use, never expanded), so an alias bomb is refused in microseconds."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, counted_children = stack.pop()
        key = id(node)
        if counted_children:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _yaml_children(node))
            if sizes[key] > limit:
                raise _YamlRefused(
                    f"its aliases (*name) expand it to more than {limit} values (a YAML alias bomb?); "
                    "a config holds a few hundred"
                )
        elif key not in sizes:
            if key in on_path:
                raise _YamlRefused("an alias (*name) refers to a node that contains it (a recursive structure)")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _yaml_children(node) if id(child) not in sizes)


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would keep the last
    silently) and a document whose aliases expand too far."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges, then keys of its own override: not a repeat
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            try:
                first = first_seen.setdefault(key, mark)
            except TypeError:
                continue  # an unhashable key: the constructor reports it
            if first is not mark:
                where = (f"lines {first.line + 1} and {mark.line + 1}" if first.line != mark.line
                         else f"line {mark.line + 1}, columns {first.column + 1} and {mark.column + 1}")
                raise _YamlRefused(f"key {key!r} is given twice ({where}): keep one")
        return super().construct_mapping(node, deep=deep)


def _read_config_text(path: Path) -> str:
    """The text of a config file, or one clear error: a folder, missing, unreadable, too large,
    binary or not UTF-8."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file: give the YAML file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        shipped = ", ".join(shipped_configs())
        hint = f" (shipped configs, by name: {shipped})" if shipped else ""
        raise ConfigError(f"config file not found: {path}{hint}") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read the config file (permission denied); check its permissions") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or type(err).__name__})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KB, not a config file (a config is a few KB; "
            "data belongs in a datamodule)"
        )
    if b"\0" in data:
        raise ConfigError(f"{path}: a binary file, not a YAML config (it holds NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save the file as UTF-8"
        ) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_config_text(Path(path))
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _YamlRefused as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: malformed YAML: nested too deeply for a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(
    source: Union[str, os.PathLike, Mapping[str, Any], None] = None, *, task_class: type | None = None, **overrides: Any
) -> Config:
    """Read and validate a flat lightrainer config.

    The task it is validated for, whose keys it accepts: ``task_class``; else the ``model:`` section's
    class (imported here); else the ``task`` key; else the one registered task that declares the
    task keys the YAML uses (the original's VQ-VAE file); else the classification task.

    Args:
        source: a YAML file path, a mapping of keys, or None for all defaults.
        task_class: the task class (a LightrainerModule subclass) whose keys the config may hold.
        **overrides: keys that replace those of ``source``.

    Returns:
        The validated :class:`Config`. Python, NumPy and torch are seeded with ``cfg.seed``, so a
        network built right after (as in a notebook) starts from the same weights as on the CLI.

    Raises:
        ConfigError: a missing or malformed file, an unknown key (with the closest known key), a
            wrong type, a value out of range or not among the allowed choices.
    """
    if source is None:
        raw: dict[str, Any] = {}
    elif isinstance(source, Mapping):
        raw = dict(source)
    else:
        raw = _read_yaml(resolve_config(source))
    raw.update(overrides)
    cfg = _validate(raw, task_class)
    seed_all(cfg.seed)
    return cfg


def _task_class(raw: Mapping[str, Any], task: type | None) -> type | None:
    """The task class a flat config is validated for (see :func:`load_config`)."""
    if task is not None:
        return task
    model = raw.get("model")
    if isinstance(model, Mapping) and model.get("class_path"):
        return import_class(str(model["class_path"]), "model")
    if model is not None and not isinstance(model, Mapping):
        raise ConfigError(f"model: expected a section with class_path and init_args, got {model!r}")
    if not _is_none(raw.get("task")):
        return TASKS.get(str(raw["task"]).strip(), "task")
    own = {str(k) for k in raw if str(k) not in _FIELDS and str(k) not in CLI_SECTIONS}
    declaring = tasks_declaring(own) if own else []
    if len(declaring) == 1:
        return declaring[0]
    return TASKS.get(DEFAULT_TASK) if DEFAULT_TASK in TASKS else None


def _unknown_key(key: str, cls: type | None, known: list[str]) -> ConfigError:
    owners = [o for o in key_owners(key) if cls is None or o != task_name_of(cls)]
    if owners:
        here = cls.__name__ if cls is not None else "this run's task"
        return ConfigError(
            f"unknown key {key!r}: it is a key of task {', '.join(owners)}, not of {here}; "
            "name that task (task: NAME or model: class_path: ...) or drop the key"
        )
    return ConfigError(f"unknown key {key!r}" + closest_hint(key, known))


def _validate(raw: Mapping[str, Any], task: type | None = None) -> Config:
    """Flat keys -> Config (no side effects beyond importing the task's class)."""

    cls = _task_class(raw, task)
    extra_specs = task_keys_of(cls)
    known = list(_FIELDS) + list(extra_specs) + list(CLI_SECTIONS)
    values: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        if key in CLI_SECTIONS:
            sections[key] = value
        elif key in _FIELDS:
            f = _FIELDS[key]
            value = _coerce(key, value, f.type)
            check = f.metadata["check"]
            if check is not None and value is not None:
                value = check(key, value)
            values[key] = value
        elif key in extra_specs:
            extras[key] = _validate_extra(key, value, extra_specs[key])
        else:
            raise _unknown_key(key, cls, known)
    if "device" in values:
        values["device"] = _normalise_device(values["device"])
    split = (values.get("val_split") or _FIELDS["val_split"].default) + (values.get("test_split") or 0.0)
    if split >= 1:
        raise ConfigError(f"test_split: val_split + test_split = {split:g} leaves no training data; "
                          "keep their sum below 1 (e.g. val_split: 0.2, test_split: 0.1)")
    if values.get("ptq") and values.get("qat"):
        raise ConfigError("ptq and qat are both True: choose one (qat trains quantized; ptq calibrates after fit)")
    if cls is not None:
        resolve_fitness(cls, values.get("fitness"))
        values["task"] = task_name_of(cls)
    return Config(**values, extras=extras, sections=sections, task_class=cls, task_specs=dict(extra_specs))


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _normalise_device(device: Any) -> Union[str, list[int], None]:
    """Device spec -> None (auto), "cpu" or a list of GPU ids."""
    if _is_none(device):
        return None
    if isinstance(device, bool):
        raise ConfigError(f"device: expected GPU ids, 'cpu' or None, got {device!r}")
    if isinstance(device, int):
        ids = [device]
    elif isinstance(device, (list, tuple)):
        ids = list(device)
    else:
        text = str(device).strip().lower()
        if text in ("cpu", "mps", "auto"):
            return None if text == "auto" else text
        if text.startswith("cuda:"):
            text = text[5:]
        ids = [part for part in text.replace(" ", "").split(",") if part]
    try:
        parsed = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise ConfigError(f"device: expected GPU ids like 0 or '0,1', 'cpu' or None, got {device!r}") from None
    if any(i < 0 for i in parsed) or len(set(parsed)) != len(parsed):
        raise ConfigError(f"device: GPU ids must be distinct and >= 0, got {device!r}")
    return parsed


def field_docs() -> dict[str, tuple[Any, str]]:
    """Every built-in key -> (default, meaning), for documentation and --help."""
    return {name: (f.default, f.metadata["doc"]) for name, f in _FIELDS.items()}


def dump_config(cfg: Config, path: Union[str, os.PathLike], extra: Mapping[str, Any] | None = None) -> None:
    """Write the config to a YAML file (args.yaml) that ``lightrainer fit --config`` reads back:
    every flat key, the ``model:``/``data:``/``trainer:`` sections, then the derived values and
    ``extra`` entries as comments (not read back). Written atomically."""
    atomic_write(path, config_yaml(cfg, extra))


def config_yaml(cfg: Config, extra: Mapping[str, Any] | None = None, skip_null: bool = False) -> str:
    """The YAML text of :func:`dump_config` (and of ``--print_config``)."""
    data = {**cfg.to_dict(), **cfg.sections}
    if skip_null:
        data = {k: v for k, v in data.items() if v is not None}
    derived = {**cfg.derived(), **(extra or {})}
    plain = {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in derived.items()}
    comments = "".join(f"#   {line}\n" for line in yaml.safe_dump(plain, sort_keys=False, width=1000).splitlines())
    return yaml.safe_dump(data, sort_keys=False) + DERIVED_MARK + "\n" + comments


#: The line that opens the derived values' comments in args.yaml and --print_config.
DERIVED_MARK = "# derived values (comments: not read back):"


def derived_values(text: str) -> dict[str, Any]:
    """The derived values written as comments by :func:`config_yaml` (for tools and tests)."""
    _, _, tail = text.partition(DERIVED_MARK)
    lines = [line[1:] for line in tail.splitlines() if line.startswith("#   ")]
    return dict(yaml.safe_load("\n".join(lines)) or {})
