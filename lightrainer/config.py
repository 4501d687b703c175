"""The config boundary: flat YAML -> validated, typed :class:`Config`.

This is the only module that reads raw keys. Everything below it works with attributes of
:class:`Config`. The flat keys of the original lightrainer are the public contract: a file written
for it loads unchanged, with the same defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import yaml

OPTIMIZERS = ("SGD", "Adam", "Adamax", "AdamW", "NAdam", "RAdam", "RMSProp")
SCHEDULERS = ("Cosine", "Linear", "Exponential", "Polynomial")
CALIB_METHODS = ("entropy", "max", "percentile", "mse")
QUANT_BACKENDS = ("auto", "pytorch_quantization", "modelopt")
LPIPS_BACKBONES = ("pretrained", "random")

# Sections that name classes for LightningCLI (`model:` / `data:` / `trainer:`); load_config keeps
# them aside untouched so the same file serves the notebook path and the CLI.
CLI_SECTIONS = ("model", "data", "trainer", "ckpt_path", "seed_everything")


class ConfigError(ValueError):
    """A user mistake in the configuration: names the key, the allowed values and the fix."""


def choice(choices: tuple[str, ...]) -> Callable[[str, Any], Any]:
    lower = {c.lower(): c for c in choices}

    def check(key: str, value: Any) -> Any:
        canonical = lower.get(str(value).lower())
        if canonical is None:
            raise ConfigError(
                f"{key}: {value!r} is not one of {', '.join(choices)}"
                + _closest_hint(str(value), choices)
            )
        return canonical

    return check


def at_least(low: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value!r}")
        return value

    return check


def _positive(key: str, value: Any) -> Any:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value!r}")
    return value


def _unit_interval_open(key: str, value: Any) -> Any:
    if not 0 <= value < 1:
        raise ConfigError(f"{key}: must be in [0, 1), got {value!r}")
    return value


def _percentile(key: str, value: Any) -> Any:
    if not 0 < value <= 100:
        raise ConfigError(f"{key}: must be in (0, 100], got {value!r}")
    return value


def _fraction(key: str, value: Any) -> Any:
    if not 0 < value < 1:
        raise ConfigError(f"{key}: must be in (0, 1), got {value!r}")
    return value


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
    save_dir: str = _key("runs", doc="folder that holds the run folders")
    device: Union[int, str, list, None] = _key(
        None, doc='GPU ids (0, "0,1", [0, 1]), "cpu", or None/"" for auto'
    )
    batch: int = _key(32, at_least(1), "global batch size (split across devices)")
    nbs: int = _key(64, at_least(1), "nominal batch size: accumulation and weight-decay scaling")
    num_workers: int = _key(4, at_least(0), "DataLoader worker processes")
    patience: int = _key(100, at_least(0), "epochs without fitness improvement before stopping (0 = off)")
    epochs: int = _key(200, at_least(1), "training epochs")
    exist_ok: bool = _key(False, doc="reuse save_dir/name instead of incrementing it")
    amp: bool = _key(False, doc="automatic mixed precision where the device supports it")
    ptq: bool = _key(False, doc="post-training quantization after fit")
    num_batches: Union[int, None] = _key(None, at_least(1), "PTQ calibration batches (None = all)")
    method: str = _key("entropy", choice(CALIB_METHODS), "PTQ amax method")
    qat: bool = _key(False, doc="quantization-aware training")
    trt_quant: bool = _key(False, doc="build an int8 TensorRT engine after fit")
    optimizer: str = _key("Adam", choice(OPTIMIZERS), "optimizer")
    scheduler: str = _key("Cosine", choice(SCHEDULERS), "lr schedule")
    lr0: float = _key(0.01, _positive, "initial learning rate")
    lrf: float = _key(0.01, at_least(0), "final lr = lr0 * lrf")
    gamma: float = _key(0.9, _positive, "Exponential schedule factor")
    power: float = _key(2.0, _positive, "Polynomial schedule power")
    momentum: float = _key(0.937, _unit_interval_open, "SGD momentum / Adam beta1")
    weight_decay: float = _key(0.0005, at_least(0), "weight decay (scaled by batch*accumulate/nbs)")
    warmup_epochs: float = _key(3.0, at_least(0), "warmup epochs (fractions allowed)")
    warmup_momentum: float = _key(0.8, _unit_interval_open, "momentum at the start of warmup")
    warmup_bias_lr: float = _key(0.1, at_least(0), "bias lr at the start of warmup")

    # --- keys beyond the seed (defaults keep seed behaviour) ---------------------------------
    name: str = _key("train", doc="run folder name under save_dir")
    seed: int = _key(0, at_least(0), "random seed (data split, shuffling, init)")
    deterministic: bool = _key(False, doc="torch deterministic algorithms")
    grad_clip: float = _key(10.0, at_least(0), "gradient norm clip (0 = off)")
    val_split: float = _key(0.2, _fraction, "fraction held out for validation (stratified)")
    devices: Union[int, None] = _key(None, at_least(1), "number of devices (overrides device count)")
    num_nodes: int = _key(1, at_least(1), "number of machines")
    sync_bn: Union[bool, None] = _key(None, doc="SyncBatchNorm (None = on when several devices)")
    tensorboard: bool = _key(False, doc="also log to TensorBoard")
    wandb: bool = _key(False, doc="also log to Weights & Biases")
    wandb_project: str = _key("lightrainer", doc="wandb project")
    wandb_offline: bool = _key(False, doc="wandb offline mode (no network)")
    plots: bool = _key(True, doc="write results.png and task plots")
    shift: int = _key(0, at_least(0), "random +-shift pixels for training images (in-memory image data)")
    label_smoothing: float = _key(0.0, _unit_interval_open, "cross-entropy label smoothing")
    percentile: float = _key(99.99, _percentile, "PTQ percentile method's percentile")
    quant_backend: str = _key("auto", choice(QUANT_BACKENDS), "quantization library")
    export: Union[str, None] = _key(None, doc="export after fit: onnx | engine | None")
    fitness: Union[str, None] = _key(None, doc="metric that selects the best epoch (None = task's)")
    compile: bool = _key(False, doc="torch.compile the network (first steps slower while it compiles)")
    channels_last: bool = _key(False, doc="channels-last memory format for the network and 4-D inputs")
    ema: bool = _key(False, doc="keep an EMA of the weights; validate, save (weights/*.pt) and export it")
    ema_decay: float = _key(0.9999, _fraction, "EMA decay d: ema = d' * ema + (1 - d') * w, d' = d * (1 - exp(-n / ema_tau))")
    ema_tau: float = _key(2000.0, _positive, "EMA warm-up time constant, in optimizer steps")

    # Task-specific keys (e.g. the VQ-VAE's loss weights), validated against the task registry.
    extras: dict = field(default_factory=dict, metadata={"check": None, "doc": ""})
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
        spec = _extra_specs().get(key)
        if spec is None:
            raise ConfigError(f"{key}: no task declares this key" + _closest_hint(key, _extra_specs()))
        return self.extras.get(key, spec.default)

    def derived(self) -> dict[str, Any]:
        """The derived values, as written to args.yaml."""
        return {
            "accumulate": self.accumulate,
            "weight_decay_scaled": self.weight_decay_scaled,
            "batch_per_device": self.batch_per_device,
            "world_size": self.world_size,
        }

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of every key (seed, new and task keys), as a YAML file would hold it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _INTERNAL}
        out.update({k: self.extra(k) for k in sorted(_extra_specs())})
        return out

    def replace(self, **overrides: Any) -> Config:
        """A validated copy with some keys changed."""
        data = self.to_dict()
        data.update(self.sections)
        data.update(overrides)
        new = _validate(data)
        new.run_dir, new.world_size = self.run_dir, self.world_size
        return new


_INTERNAL = {"extras", "sections", "run_dir", "world_size"}
_FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name not in _INTERNAL}


@dataclass(frozen=True)
class ExtraKey:
    """A key a task adds to the config: its type, default and optional validator."""

    type: type
    default: Any
    check: Callable[[str, Any], Any] | None = None
    doc: str = ""


_TASK_KEYS: dict[str, dict[str, ExtraKey]] = {}


def register_task_keys(task: str, keys: Mapping[str, ExtraKey]) -> None:
    """Declare the extra YAML keys a task reads (call at import time of the task module).

    Args:
        task: the task's name (for messages).
        keys: key name -> :class:`ExtraKey`.

    Raises:
        ValueError: a key clashes with a built-in key or another task's key of another type.
    """
    for name, spec in keys.items():
        if name in _FIELDS:
            raise ValueError(f"task {task!r} cannot redeclare the built-in key {name!r}")
        for other, other_keys in _TASK_KEYS.items():
            if other != task and name in other_keys and other_keys[name].type is not spec.type:
                raise ValueError(f"task {task!r} declares {name!r} which task {other!r} declares differently")
    _TASK_KEYS[task] = dict(keys)


def _extra_specs() -> dict[str, ExtraKey]:
    _import_tasks()
    merged: dict[str, ExtraKey] = {}
    for keys in _TASK_KEYS.values():
        merged.update(keys)
    return merged


def _import_tasks() -> None:
    # Tasks register their keys when imported; importing the package registers the built-in ones.
    import lightrainer.modules  # noqa: F401


def _closest_hint(key: str, known: Any) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = difflib.get_close_matches(key.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("None", "none", "null", "~", ""))


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
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
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


def _validate_extra(key: str, value: Any, spec: ExtraKey) -> Any:
    if _is_none(value):
        return spec.default
    value = _coerce(key, value, spec.type.__name__)
    return spec.check(key, value) if spec.check else value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(source: Union[str, os.PathLike, Mapping[str, Any], None] = None, **overrides: Any) -> Config:
    """Read and validate a flat lightrainer config.

    Args:
        source: a YAML file path, a mapping of keys, or None for all defaults.
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
        raw = _read_yaml(Path(source))
    raw.update(overrides)
    cfg = _validate(raw)
    seed_all(cfg.seed)
    return cfg


def _validate(raw: Mapping[str, Any]) -> Config:
    """Flat keys -> Config (no side effects)."""

    extra_specs = _extra_specs()
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
            raise ConfigError(f"unknown key {key!r}" + _closest_hint(key, known))
    if "device" in values:
        values["device"] = _normalise_device(values["device"])
    if values.get("ptq") and values.get("qat"):
        raise ConfigError("ptq and qat are both True: choose one (qat trains quantized; ptq calibrates after fit)")
    if values.get("export") is not None and values["export"] not in ("onnx", "engine"):
        raise ConfigError(f"export: {values['export']!r} is not one of onnx, engine, None")
    return Config(**values, extras=extras, sections=sections)


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
    """Write the config, its derived values and ``extra`` entries to a YAML file (args.yaml)."""
    data = cfg.to_dict()
    data["derived"] = cfg.derived()
    if extra:
        data["derived"].update(extra)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
