"""The ``lightrainer`` command: one jsonargparse parser over the flat YAML, every subcommand.

``lightrainer fit|validate|test|predict|export|ptq|benchmark [--config FILE ...] [--key value ...]``.
jsonargparse (LightningCLI's parser) reads the command line and the config files once: the flat
keys of the original lightrainer (and the task's own keys) are root keys, ``model:``/``data:``
are class sections typed by the classes' signatures, ``trainer:`` is typed by
``lightning.Trainer``; several ``--config`` merge as in LightningCLI, and a later flag overrides.
lightrainer's own validation then runs on what the parser produced. Every user mistake ends in
exit code 2 and one line naming the key, before any folder exists.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, Namespace
from lightning.pytorch.cli import LightningArgumentParser

from lightrainer.assets import resolve_config
from lightrainer.build import build_from_config, rebuild, rebuild_config, trainer_kwargs
from lightrainer.callbacks.predictions import PredictionWriter
from lightrainer.callbacks.test_results import TestResults
from lightrainer.config import (
    _FIELDS,
    Config,
    ConfigError,
    _read_yaml,
    _task_class,
    _unknown_key,
    config_yaml,
    field_docs,
    load_config,
)
from lightrainer.errors import ExportError, MissingDependencyError, TrainingDiverged, WriteError, closest_hint
from lightrainer.export.pipeline import benchmark_from_weights, export_from_weights, run_ptq
from lightrainer.quant.workflow import check_quant_config
from lightrainer.registry import EXPORT_FORMATS
from lightrainer.runs import create_run_dir, load_checkpoint, newest_complete_checkpoint, run_folders
from lightrainer.sweep import add_tune_arguments, tune_command
from lightrainer.task import task_keys_of
from lightrainer.trainer import build_trainer, trainer_arg_problems
from lightrainer.tuner import autobatch, lr_find
from lightrainer.version import __version__
from lightrainer.weights import apply_weights, load_weights

log = logging.getLogger(__name__)

README = "README.md"
# Where the README explains an error: by the package that raised it, then by words in the message.
_SECTIONS_BY_PACKAGE = {"quant": "#quantization-ptq-and-qat", "export": "#export-onnx-tensorrt"}
_SECTIONS_BY_WORD = {
    "tune:": "#sweeps",
    "ckpt_path": "#crash-safety-and-resume",
    "resume": "#crash-safety-and-resume",
    "device": "#multi-gpu-and-multi-node",
    "num_nodes": "#multi-gpu-and-multi-node",
    "lpips": "#the-vq-vae-task-image-generation",
    "class_path": "#the-command-line",
    "trainer.": "#the-command-line",
    "method": "#quantization-ptq-and-qat",
    "ptq": "#quantization-ptq-and-qat",
    "qat": "#quantization-ptq-and-qat",
    "quant": "#quantization-ptq-and-qat",
}
# Modules whose errors the "Your own images" section explains.
_IMAGE_FILES = ("augment", "stream", "folder", "backbones", "checks")
USAGE = """usage: lightrainer COMMAND [--config FILE ...] [--key value ...]

Train a PyTorch model from one flat YAML file, on PyTorch Lightning.

commands:
  fit        train:                 lightrainer fit --config configs/mnist.yaml [--epochs 3 ...]
  validate   validate weights:      lightrainer validate --ckpt_path RUN/weights/best.ckpt
  test       test weights:          lightrainer test --ckpt_path RUN/weights/best.pt
  predict    predict:               lightrainer predict --ckpt_path RUN/weights/best.ckpt
  export     ONNX / TensorRT:       lightrainer export --weights RUN/weights/best.pt --format onnx
  ptq        int8 calibration:      lightrainer ptq --weights RUN/weights/best.pt --method max
  benchmark  latency table:         lightrainer benchmark --weights RUN/weights/best.pt
  tune-lr    lr range test:         lightrainer tune-lr --config FILE   (and batch: -1 sizes the batch to the GPU)
  tune       sweep keys (Optuna):   lightrainer tune --config FILE --space S.yaml --trials 20 [--workers 2]

Every YAML key is also a flag (--batch 64); several --config files merge, later ones win.
Resume a run: lightrainer fit --config FILE --resume. --version prints the version.
'lightrainer COMMAND --help' lists the options of a command; the README has a table of every key."""
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOL_SUBCOMMANDS = ("export", "ptq", "benchmark")
TUNER_SUBCOMMANDS = ("tune-lr", "tune")
SUBCOMMANDS = LIGHTNING_SUBCOMMANDS + TOOL_SUBCOMMANDS + TUNER_SUBCOMMANDS
#: ``batch: -1``: size the batch to the GPU (Ultralytics' AutoBatch); probed at this batch first.
AUTOBATCH, AUTOBATCH_PROBE = -1, 16
#: Flat keys a resumed run may change: where it runs, how it logs, how long it trains, what it
#: does after. Any other key differing from the checkpoint's is refused.
RESUMABLE_KEYS = frozenset({
    "device", "devices", "num_nodes", "num_workers", "epochs", "patience", "save_dir", "name", "exist_ok",
    "tensorboard", "wandb", "wandb_project", "wandb_offline", "mlflow", "mlflow_uri", "progress", "plots",
    "compile", "channels_last",
    "deterministic", "ptq", "num_batches", "method", "percentile", "quant_backend", "export", "trt_quant",
})


# ---------------------------------------------------------------------------------- the parser
def flat_keys(task: type | None = None) -> list[str]:
    """Every flat key of a run of ``task``: the built-in ones and those the task declares."""
    return list(_FIELDS) + sorted(task_keys_of(task))


def add_import_path(folder: str | Path) -> None:
    """Make a user's own modules beside a YAML (or in the working folder) importable by
    ``class_path``, as ``python script.py`` would; appended to sys.path, so an installed module
    of the same name wins. A run records the folders its classes came from, so ``--weights``
    alone re-imports them."""
    folder = str(Path(folder).resolve())
    if folder not in sys.path:
        sys.path.append(folder)


def make_parser(subcommand: str, task: type | None) -> LightningArgumentParser:
    """The parser of one subcommand: exactly the options that work there.

    Args:
        subcommand: one of :data:`SUBCOMMANDS`.
        task: the task class whose own keys are root keys too.
    """
    parser = LightningArgumentParser(
        prog=f"lightrainer {subcommand}", exit_on_error=False, default_env=False, allow_abbrev=False,
        description=f"lightrainer {subcommand}: flat keys (as in the YAML), model:/data: class sections"
        + (", trainer: Lightning Trainer arguments" if subcommand in LIGHTNING_SUBCOMMANDS else ""),
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config file (repeatable: merged in order)")
    docs = field_docs()
    name = task.__name__ if task is not None else "the task"
    docs.update({k: (spec.default, f"{spec.doc} ({name} key)") for k, spec in task_keys_of(task).items()})
    for key in flat_keys(task):
        default, doc = docs[key]
        parser.add_argument(f"--{key}", type=Any, default=default, help=doc)
    parser.add_subclass_arguments(L.LightningModule, "model", required=False, skip={"cfg"},
                                  help="the task: class_path and init_args (default: the task key's task)")
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=False, skip={"cfg"},
                                  help="the data: class_path and init_args (default: the task's default_datamodule)")
    if subcommand in LIGHTNING_SUBCOMMANDS + TUNER_SUBCOMMANDS:
        parser.add_lightning_class_args(L.Trainer, "trainer")
        parser.add_argument("--seed_everything", type=Optional[int], default=None,
                            help="LightningCLI's name for the seed key (the two must agree)")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                            help="a run's .ckpt (or, for validate/test/predict, its weights/*.pt)")
    if subcommand == "tune-lr":
        parser.add_argument("--min_lr", type=float, default=1e-6, help="lr0 at the start of the sweep")
        parser.add_argument("--max_lr", type=float, default=1.0, help="lr0 at the end of the sweep")
        parser.add_argument("--num_steps", type=int, default=100, help="optimizer steps of the sweep")
    if subcommand == "tune":
        add_tune_arguments(parser)
    if subcommand == "fit":
        parser.add_argument("--resume", action=ActionYesNo, default=False,
                            help="continue the newest run save_dir/name[N] from its last complete checkpoint")
    if subcommand == "predict":
        parser.add_argument("--source", type=Optional[str], default=None,
                            help="a folder of images to predict on (default: the test split)")
    if subcommand in TOOL_SUBCOMMANDS:
        parser.add_argument("--weights", type=str, required=True, help="a run's weights file: RUN/weights/best.pt")
    if subcommand == "export":
        parser.add_argument("--format", type=str, default="onnx", help=f"one of {', '.join(EXPORT_FORMATS)}")
        parser.add_argument("--int8", action=ActionYesNo, default=False, help="engine: int8 from a Q/DQ model")
        parser.add_argument("--fp16", action=ActionYesNo, default=False, help="engine: fp16 kernels")
    return parser


# ---------------------------------------------------------------------------------- pre-scan
@dataclass
class _Scan:
    """What the command line names before it is parsed: the files to import classes from, the task."""

    configs: list[Path] = field(default_factory=list)
    #: The root keys of each config file, in order.
    file_keys: list[set[str]] = field(default_factory=list)
    merged: dict[str, Any] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _config_args(args: list[str]) -> list[str]:
    """The arguments with each ``--config NAME`` naming a shipped config (``mnist.yaml``,
    ``configs/mnist.yaml``) that is not on disk replaced by the shipped file's path, so the pre-scan
    and jsonargparse read the same file."""
    def resolved(value: str) -> str:
        path = resolve_config(value)
        return str(path) if path != Path(value) else value

    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolved(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolved(arg.partition("=")[2])
    return out


def _scan(args: list[str]) -> _Scan:
    """Find the ``--config`` files and the flags that choose the task (``--model``, ``--task``,
    ``--ckpt_path``, ``--weights``, ``--save_dir``, ``--name``), so the task's class is imported
    and its keys known before the one parse. Files are read with the config's safe reader."""
    scan = _Scan()
    i = 0
    while i < len(args):
        arg = args[i]
        key, value, step = arg, None, 1
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, step = args[i + 1], 2
        if key in ("-c", "--config") and value is not None:
            path = Path(value)
            content = _read_yaml(path)
            scan.merged = _deep_merge(scan.merged, content)
            scan.configs.append(path)
            scan.file_keys.append(set(content))
            add_import_path(path.parent)
        elif key.startswith("--") and value is not None:
            scan.flags[key[2:]] = value
        i += step
    return scan


def _scan_task(scan: _Scan) -> type | None:
    """The task class the command line names (imported), as :func:`lightrainer.load_config` decides."""
    raw = {k: v for k, v in scan.merged.items()}
    flags = scan.flags
    model = flags.get("model.class_path") or flags.get("model")
    if model and not str(model).lstrip().startswith("{"):
        raw["model"] = {"class_path": model}
    elif model:
        raw["model"] = yaml.safe_load(model)
    if "task" in flags:
        raw["task"] = flags["task"]
    return _task_class(raw, None)


# ---------------------------------------------------------------------------------- errors
def _condense(err: BaseException, task: type | None, keys: list[str]) -> ConfigError:
    """jsonargparse's multi-line message -> one line naming the key (and the closest one)."""
    text = str(err)
    unknown = re.search(r"unrecognized arguments: --([\w.\-]+)", text) or re.search(r"Option '([\w.\-]+)' is not accepted", text)
    if unknown:
        key = unknown.group(1)
        if "." in key:
            root, _, rest = key.partition(".")
            return ConfigError(f"unknown {'flag --' if 'unrecognized' in text else 'key '}{key}: {root} has no {rest!r}"
                               + (" (see lightrainer fit --help)" if root == "trainer" else ""))
        message = str(_unknown_key(key, task, keys))
        if "unrecognized" in text:
            message = message.replace(f"unknown key {key!r}", f"unknown flag --{key}", 1)
        return ConfigError(message)
    missing = re.search(r"expected one argument", text)
    if missing:
        flag = re.search(r"argument (--[\w.]+)", text)
        return ConfigError(f"{flag.group(1) if flag else 'a flag'} needs a value: --key VALUE or --key=VALUE")
    where = re.search(r'Parser key "([\w.]+)"', text)
    required = re.search(r"the following arguments are required: ([\w., ]+)", text)
    given = re.search(r"Given value: (.+)", text)
    reasons = [r.strip() for r in re.findall(r"- (Expected [^\n]+|Problem with given class_path [^\n]+|Import path [^\n]+)", text)]
    key = where.group(1) if where else "config"
    if required:
        names = required.group(1).strip()
        hint = (" (give model: init_args: net: class_path: ..., or let the task's __init__ default net to None "
                "so its default_net builds it)") if names == "net" else ""
        return ConfigError(f"{key}: the class needs argument(s) {names}{hint}")
    if reasons or given:
        reason = "; ".join(dict.fromkeys(r for r in reasons if "NoneType" not in r)) or "invalid value"
        return ConfigError(f"{key}: {reason}" + (f", got {given.group(1).strip()}" if given else ""))
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return ConfigError(first)


# ---------------------------------------------------------------------------------- one command
@dataclass
class Command:
    """A parsed and validated command line."""

    subcommand: str
    cfg: Config
    namespace: Namespace
    parser: LightningArgumentParser
    trainer_args: dict[str, Any] = field(default_factory=dict)
    ckpt_path: Optional[str] = None
    resume: bool = False
    print_config: Optional[str] = None
    #: ``batch: -1`` was asked: AutoBatch sizes it before training.
    autobatch: bool = False
    #: A run's file the run is rebuilt from (no --config / model: section): its payload.
    rebuild_from: Optional[dict[str, Any]] = None
    rebuild_source: Optional[Path] = None


def _print_config_flag(args: list[str]) -> tuple[list[str], Optional[str]]:
    """Take ``--print_config[=flags]`` out of the arguments (lightrainer prints after validating)."""
    rest, flags = [], None
    for arg in args:
        if arg == "--print_config" or arg.startswith("--print_config="):
            flags = arg.partition("=")[2]
        else:
            rest.append(arg)
    return rest, flags


def _payload(path: Path) -> dict[str, Any]:
    """A checkpoint's ``lightrainer`` entry, or a weights file, as data; or a clear error."""
    if path.suffix == ".ckpt":
        checkpoint = read_checkpoint(path)
        return checkpoint["lightrainer"]
    return load_weights(path)


def parse_command(subcommand: str, args: list[str]) -> Command:
    """Parse and validate one subcommand's command line (nothing is created).

    Raises:
        ConfigError: any user mistake, as one line naming the key.
    """
    args, print_flags = _print_config_flag(_config_args(args))
    add_import_path(Path.cwd())
    scan = _scan(args)
    sections_given = bool({"model", "data"} & set(scan.merged)) or any(k.split(".")[0] in ("model", "data") for k in scan.flags)
    source = scan.flags.get("weights") if subcommand in TOOL_SUBCOMMANDS else scan.flags.get("ckpt_path")
    rebuild_from = None
    if source and not scan.configs and not sections_given and subcommand != "fit":
        rebuild_from = _payload(Path(source))
        recorded = rebuild_config(rebuild_from)  # the task class checked; the record's config validated
        task, defaults = recorded.task_class, recorded.to_dict()
    else:
        task, defaults = _scan_task(scan), {}
    parser = make_parser(subcommand, task)
    if defaults:
        parser.set_defaults(**defaults)
    keys = flat_keys(task)
    try:
        namespace = parser.parse_args(args)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - jsonargparse's ArgumentError and friends: a user mistake
        raise _condense(err, task, keys) from None
    values = namespace.as_dict()
    raw: dict[str, Any] = {key: values[key] for key in keys}
    for section in ("model", "data"):
        if values.get(section) is not None:
            raw[section] = values[section]
    trainer_args = _given_trainer_args(parser, values)
    if trainer_args:
        raw["trainer"] = trainer_args
    autobatch = raw.get("batch") in (AUTOBATCH, str(AUTOBATCH)) and subcommand == "fit"
    if autobatch:
        raw["batch"] = AUTOBATCH_PROBE
    seed_everything = values.get("seed_everything")
    if seed_everything not in (None, False):
        # LightningCLI's name for the seed: it sets `seed`, unless one source gives both, differently.
        both = any({"seed", "seed_everything"} <= keys for keys in [*scan.file_keys, set(scan.flags)])
        if both and int(raw["seed"]) != int(seed_everything):
            raise ConfigError(f"seed_everything: {seed_everything} and seed: {raw['seed']} disagree: give seed only")
        raw["seed"] = seed_everything
    cfg = load_config(raw, task_class=task)
    problems = trainer_arg_problems(cfg, trainer_args)
    if problems:
        raise ConfigError("; ".join(problems))
    _check_trainer_values(trainer_args)
    return Command(
        subcommand, cfg, namespace, parser, trainer_args,
        ckpt_path=values.get("ckpt_path"), resume=bool(values.get("resume")), print_config=print_flags,
        rebuild_from=rebuild_from, rebuild_source=Path(source) if rebuild_from is not None else None,
        autobatch=autobatch,
    )


def _check_trainer_values(trainer_args: dict[str, Any]) -> None:
    """Let Lightning judge the plain Trainer values (``limit_train_batches: -1``) now, by building
    a throwaway Trainer, so a bad one stops the command before any folder exists."""
    plain = {k: v for k, v in trainer_args.items() if not _names_class(v) and k not in ("strategy", "plugins")}
    if not plain:
        return
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        L.Trainer(**{**plain, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                     "enable_model_summary": False})
    except Exception as err:  # noqa: BLE001 - MisconfigurationException, ValueError, TypeError: the values
        raise ConfigError(f"trainer: {str(err).strip().splitlines()[0]}") from None
    finally:
        quiet.setLevel(level)


def _names_class(value: Any) -> bool:
    if isinstance(value, dict):
        return "class_path" in value
    return isinstance(value, (list, tuple)) and any(_names_class(v) for v in value)


def _given_trainer_args(parser: LightningArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """The Trainer arguments the user set (those that differ from the Trainer's defaults)."""
    given = values.get("trainer") or {}
    if not isinstance(given, dict):
        raise ConfigError(f"trainer: expected a section of Trainer arguments (trainer: {{max_time: ...}}), got {given!r}")
    defaults = (parser.get_defaults().as_dict().get("trainer") or {}) if given else {}
    return {k: v for k, v in given.items() if k in defaults and v != defaults[k]}


# ---------------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | Path, task_class: type | None = None) -> dict[str, Any]:
    """A lightrainer Lightning checkpoint, loaded as data (``weights_only=True``) and checked
    (:func:`lightrainer.runs.load_checkpoint`), or one clear error naming ``--ckpt_path``.

    Raises:
        ConfigError: missing, unreadable/damaged, not a lightrainer checkpoint, or another task's.
    """
    try:
        return load_checkpoint(path, task_class)
    except ConfigError as err:
        raise ConfigError(f"--ckpt_path: {err}") from None


def check_checkpoint(path: str | Path, task_class: type | None = None) -> Path:
    """``path`` when it is a complete lightrainer checkpoint (see :func:`read_checkpoint`)."""
    read_checkpoint(path, task_class)
    return Path(path)


def find_last_checkpoint(cfg: Config) -> Path:
    """The newest complete checkpoint among the runs ``save_dir/name`` and its numbered siblings
    (never another name that merely starts the same): each run's ``weights/last.ckpt``, or its
    ``best.ckpt`` when that is newer or ``last.ckpt`` is damaged.

    Raises:
        ConfigError: there is none, or none is complete.
    """
    runs = run_folders(cfg.save_dir, cfg.name)
    files = [p for run in runs for p in (run / "weights" / "last.ckpt", run / "weights" / "best.ckpt") if p.is_file()]
    if not files:
        raise ConfigError(f"--resume / --ckpt_path last: no {cfg.save_dir}/{cfg.name}[N]/weights/last.ckpt to resume from")
    for run in sorted(runs, key=lambda r: max((p.stat().st_mtime for p in r.glob("weights/*.ckpt")), default=0),
                      reverse=True):
        found = newest_complete_checkpoint(run, cfg.task_class)  # warns about each one it skips
        if found is not None:
            return found
    raise ConfigError(
        f"--resume: none of {len(files)} checkpoint(s) of {cfg.save_dir}/{cfg.name}[N] is complete; "
        "start a new run or pass --ckpt_path"
    )


def resume_differences(asked: Config, saved: Config) -> list[str]:
    """The keys that change training and differ between the command line and the checkpoint.

    A pure decision: ``RESUMABLE_KEYS`` may differ (they are recorded); any other flat key, and
    the ``model:``/``data:`` sections, may not.
    """
    mine, theirs = asked.to_dict(), saved.to_dict()
    changed = [f"{k}: {theirs.get(k)!r} in the checkpoint, {v!r} asked" for k, v in mine.items()
               if k not in RESUMABLE_KEYS and theirs.get(k) != v]
    for section in ("model", "data"):
        if section in asked.sections and asked.sections.get(section) != saved.sections.get(section, asked.sections[section]):
            changed.append(f"{section}: differs from the checkpoint's")
    return changed


def _resumed(command: Command) -> tuple[Config, Path, dict[str, Any]]:
    """The config, checkpoint and record of a resumed fit: the checkpoint's config, with the
    resumable keys of the command line.

    Raises:
        ConfigError: no checkpoint, another task's checkpoint, or training keys that differ.
    """
    cfg = command.cfg
    path = find_last_checkpoint(cfg) if command.resume or command.ckpt_path == "last" else Path(command.ckpt_path)
    payload = read_checkpoint(path)["lightrainer"]  # another task's checkpoint is refused below, by name
    saved = rebuild_config(payload)
    if saved.task_class is not cfg.task_class:
        raise ConfigError(
            f"--ckpt_path: {path} is a checkpoint of {saved.task_class.__name__}, not of {cfg.task_class.__name__}: "
            "resume a run with the config it was trained with"
        )
    differences = resume_differences(cfg, saved)
    if differences:
        raise ConfigError(
            f"--resume: the command line changes how the run in {path.parent.parent} trains ({'; '.join(differences)}); "
            f"a resumed run keeps its checkpoint's config (only {', '.join(sorted(RESUMABLE_KEYS))} may change): "
            "drop those keys, or start a new run"
        )
    allowed = {k: v for k, v in cfg.to_dict().items() if k in RESUMABLE_KEYS and k not in ("save_dir", "name", "exist_ok")}
    changes = {k: (saved.to_dict().get(k), v) for k, v in allowed.items() if saved.to_dict().get(k) != v}
    effective = rebuild_config(payload, **allowed)
    effective.sections.update({k: v for k, v in cfg.sections.items() if k == "trainer"})
    if changes:
        log.info("resuming %s with %s", path, ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    return effective, path, payload


def resumed_run_dir(ckpt: Path) -> Optional[Path]:
    """Where a resumed run lives: the run folder the checkpoint sits in (``RUN/weights/x.ckpt``
    with ``RUN/args.yaml``); a checkpoint copied anywhere else starts a new run folder
    ``save_dir/name[N]`` (None), so nothing is written into a folder that is not a run's."""
    run = ckpt.resolve().parent.parent
    if ckpt.resolve().parent.name != "weights" or not (run / "args.yaml").is_file():
        return None
    # Relative to the working folder where it is inside it, as a new run's save_dir/name is.
    return run.relative_to(Path.cwd().resolve()) if run.is_relative_to(Path.cwd().resolve()) else run


# ---------------------------------------------------------------------------------- running
def print_config(cfg: Config, flags: str | None) -> None:
    """``--print_config[=skip_null]``: the validated config as a YAML that ``fit --config`` reads
    back, with the derived values as comments."""
    print(config_yaml(cfg, skip_null=bool(flags and "skip_null" in flags)), end="")


def run_lightning(command: Command) -> int:
    """fit / validate / test / predict."""
    cfg, sub = command.cfg, command.subcommand
    ckpt: Optional[Path] = None
    run_dir: Optional[Path] = None
    if sub == "fit" and (command.resume or command.ckpt_path):
        cfg, ckpt, payload = _resumed(command)
        module, datamodule, _ = rebuild(payload, **{k: v for k, v in cfg.to_dict().items()})
        module.cfg.sections.update(cfg.sections)
        cfg = module.cfg
        run_dir = resumed_run_dir(ckpt)
    elif command.rebuild_from is not None:
        module, datamodule, cfg = rebuild(command.rebuild_from, **command.cfg.to_dict())
        cfg.sections.update({k: v for k, v in command.cfg.sections.items() if k == "trainer"})
    else:
        module, datamodule = build_from_config(cfg)
        if command.autobatch:
            cfg = cfg.replace(batch=autobatch(cfg, module, datamodule))
            module, datamodule = build_from_config(cfg)
    if command.print_config is not None:
        print_config(cfg, command.print_config)
        return 0
    if sub == "fit" and (cfg.ptq or cfg.qat or cfg.trt_quant):
        # The network is known now: refuse one with nothing to quantize before the run folder exists.
        check_quant_config(cfg.replace(ptq=cfg.ptq or not cfg.qat), getattr(module, "net", None))
    weights_file = None
    if sub != "fit" and command.ckpt_path:
        path = Path(command.ckpt_path)
        # A file the run was rebuilt from was read and checked already (parse_command).
        read = command.rebuild_from
        if path.suffix == ".ckpt":
            ckpt = path if read is not None else check_checkpoint(path)
        else:
            weights_file = path
            apply_weights(module.net, (read if read is not None else load_weights(path))["model"], path)
    source = command.namespace.get("source") if sub == "predict" else None
    if source:
        _predict_on(datamodule, source)  # a bad folder stops here, before any run folder exists
    if sub != "fit":
        cfg.name = f"{cfg.name}_{sub}"
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    kwargs = trainer_kwargs(cfg)
    given = kwargs.get("callbacks") or []
    kwargs["callbacks"] = [*(given if isinstance(given, list) else [given]), *_result_writers(sub, command.ckpt_path)]
    trainer = build_trainer(cfg, run_dir=run_dir, **kwargs)
    if weights_file is not None:
        log.info("%s: weights from %s", sub, weights_file)
    method = getattr(trainer, sub)
    # predict: PredictionWriter writes the rows; the Trainer need not hold them all.
    options = {"return_predictions": False} if sub == "predict" else {}
    # weights_only: our checkpoints hold tensors and plain values only.
    method(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True, **options)
    return 0


def _result_writers(sub: str, weights: Optional[str]) -> list[Any]:
    """The callbacks that write what test (test_results.csv/.md) and predict (predictions.csv) found."""
    if sub == "test":
        return [TestResults(weights)]
    return [PredictionWriter()] if sub == "predict" else []


def _predict_on(datamodule: Any, source: str) -> None:
    """``predict --source FOLDER``: the datamodule serves that folder's images to predict.

    Raises:
        ConfigError: a datamodule that cannot read images, no such folder, no images in it.
    """
    if not hasattr(datamodule, "predict_on"):
        raise ConfigError(f"--source: {type(datamodule).__name__} cannot read a folder of images (a lightrainer "
                          "datamodule can): leave --source out to predict on its own data")
    datamodule.predict_on(source)


def run_tool(command: Command) -> int:
    """export / ptq / benchmark, on a run rebuilt from its weights file or built from the config."""
    values = command.namespace.as_dict()
    weights = values["weights"]
    if command.rebuild_from is not None:
        module, datamodule, cfg = rebuild(command.rebuild_from, **command.cfg.to_dict())
    else:
        load_weights(weights)  # a clear error for a bad file before anything is built
        cfg = command.cfg
        module, datamodule = build_from_config(cfg)
    if command.print_config is not None:
        print_config(cfg, command.print_config)
        return 0
    cfg.run_dir = str(Path(weights).parent.parent)
    if command.subcommand == "export":
        export_from_weights(module, datamodule, cfg, weights, fmt=values["format"], int8=values["int8"],
                            fp16=values["fp16"])
    elif command.subcommand == "ptq":
        run_ptq(module, datamodule, cfg, weights)
    else:
        benchmark_from_weights(module, datamodule, cfg, weights)
    return 0


def run_tune_lr(command: Command) -> int:
    """``lightrainer tune-lr``: the lr range test; prints the suggested lr0 (the config is unchanged)."""
    cfg, values = command.cfg, command.namespace.as_dict()
    module, datamodule = build_from_config(cfg)
    out_dir = create_run_dir(cfg.save_dir, f"{cfg.name}_lr_find", cfg.exist_ok)  # claimed as a run folder is
    result = lr_find(cfg, module, datamodule, min_lr=values["min_lr"], max_lr=values["max_lr"],
                     num_steps=values["num_steps"], out_dir=out_dir, **trainer_kwargs(cfg))
    if result.suggestion is None:
        raise ConfigError(f"tune-lr: {len(result.lrs)} steps are too few to suggest an lr0: raise --num_steps")
    log.info("lr range test over %d steps: suggested lr0 %.3g (the loss fell fastest there); %s",
             len(result.lrs), result.suggestion, ", ".join(map(str, result.files)))
    log.info("train with it: lightrainer fit ... --lr0 %.3g", result.suggestion)
    return 0


def run_tune(command: Command) -> int:
    """``lightrainer tune``: a sweep over the keys of ``--space`` (:mod:`lightrainer.sweep`)."""
    if command.ckpt_path:
        raise ConfigError("tune: --ckpt_path is not for a sweep (every trial trains from the start); drop it")
    if command.print_config is not None:
        print_config(command.cfg, command.print_config)
        return 0
    tune_command(command.cfg, command.namespace.as_dict())
    return 0


# ---------------------------------------------------------------------------------- entry point
def readme_section(err: BaseException) -> str:
    """The README section that explains ``err``."""
    tb, origin = err.__traceback__, ""
    while tb is not None:
        origin = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if isinstance(err, WriteError):
        return README + "#crash-safety-and-resume"
    origin = origin.replace("\\", "/")
    for package, section in _SECTIONS_BY_PACKAGE.items():
        if f"lightrainer/{package}/" in origin or f"callbacks/{package}" in origin:
            return README + section
    if any(origin.endswith(f"/{name}.py") for name in _IMAGE_FILES):
        return README + "#your-own-images"
    text = str(err).lower()
    for word, section in _SECTIONS_BY_WORD.items():
        if word in text:
            return README + section
    return README + "#every-key"


def _is_user_error(err: Exception) -> bool:
    """Errors that describe a user mistake or a missing optional dependency (exit 2, no traceback)."""
    if isinstance(err, (ConfigError, ExportError, MissingDependencyError)):
        return True
    # The project's own error types (quantization, tasks) subclass ValueError.
    return isinstance(err, ValueError) and type(err).__module__.startswith("lightrainer.")


def _help(subcommand: str, args: list[str]) -> int:
    """``COMMAND --help``: the options of the command, with the keys of the config's task."""
    try:
        scan = _scan(_config_args([a for a in args if a not in ("-h", "--help")]))
        task = _scan_task(scan)
    except ConfigError:
        task = load_config().task_class
    make_parser(subcommand, task).print_help()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``lightrainer`` command; returns the exit code (2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if argv[:1] in (["--version"], ["-V"]):
        print(f"lightrainer {__version__}")
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        what = f"unknown command {argv[0]!r}" + closest_hint(argv[0], SUBCOMMANDS) if argv else "no command given"
        print(f"lightrainer: error: {what}; one of {', '.join(SUBCOMMANDS)} (lightrainer --help)", file=sys.stderr)
        return 2
    subcommand, args = argv[0], argv[1:]
    try:
        if any(a in ("-h", "--help") for a in args):
            return _help(subcommand, args)
        command = parse_command(subcommand, args)
        if subcommand in TOOL_SUBCOMMANDS:
            return run_tool(command)
        if subcommand == "tune":
            return run_tune(command)
        if subcommand in TUNER_SUBCOMMANDS:
            return run_tune_lr(command)
        return run_lightning(command)
    except TrainingDiverged as err:
        print(f"lightrainer: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - user errors become exit 2, anything else re-raises
        if not _is_user_error(err):
            raise
        message = " ".join(str(err).split())  # one line
        print(f"lightrainer: error: {message} (see {readme_section(err)})", file=sys.stderr)
        return 2


__all__ = ["Command", "find_last_checkpoint", "main", "make_parser", "parse_command", "read_checkpoint",
           "resume_differences"]


if __name__ == "__main__":
    sys.exit(main())
