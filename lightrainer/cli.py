"""The ``lightrainer`` command: LightningCLI over the flat YAML, plus export/ptq/benchmark.

``lightrainer fit|validate|test|predict --config FILE [--key value ...]`` reads the flat YAML of
the original lightrainer (every seed key is also a flag), optionally with ``model:``/``data:``
sections naming classes, and runs the Lightning Trainer. Every user mistake is caught before any
work starts and reported in one paragraph with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightrainer.build import build_from_config, instantiate, rebuild
from lightrainer.config import (
    _FIELDS,
    Config,
    ConfigError,
    _closest_hint,
    _read_yaml,
    _task_class,
    _unknown_key,
    field_docs,
    load_config,
)
from lightrainer.export.errors import ExportError, MissingDependencyError
from lightrainer.export.pipeline import benchmark_from_weights, export_from_weights, run_ptq
from lightrainer.quant.workflow import check_quant_config
from lightrainer.task import task_keys_of
from lightrainer.trainer import build_trainer
from lightrainer.weights import load_weights

log = logging.getLogger(__name__)

README = "README.md"
# Where the README explains an error: by the package that raised it, then by words in the message.
_SECTIONS_BY_PACKAGE = {"quant": "#quantization-ptq-and-qat", "export": "#export-onnx-tensorrt"}
_SECTIONS_BY_WORD = {
    "ckpt_path": "#crash-safety-and-resume",
    "resume": "#crash-safety-and-resume",
    "device": "#multi-gpu-and-multi-node",
    "num_nodes": "#multi-gpu-and-multi-node",
    "lpips": "#the-vq-vae-task-image-generation",
    "class_path": "#the-command-line",
    "method": "#quantization-ptq-and-qat",
    "ptq": "#quantization-ptq-and-qat",
    "qat": "#quantization-ptq-and-qat",
    "quant": "#quantization-ptq-and-qat",
}
USAGE = """usage: lightrainer COMMAND [options]

Train a PyTorch model from one flat YAML file, on PyTorch Lightning.

commands:
  fit        train:                 lightrainer fit --config configs/mnist.yaml [--epochs 3 ...]
  validate   validate weights:      lightrainer validate --config FILE --ckpt_path RUN/weights/best.ckpt
  test       test weights:          lightrainer test --config FILE --ckpt_path RUN/weights/best.ckpt
  predict    predict:               lightrainer predict --config FILE --ckpt_path RUN/weights/best.ckpt
  export     ONNX / TensorRT:       lightrainer export --weights RUN/weights/best.pt --format onnx
  ptq        int8 calibration:      lightrainer ptq --config FILE --weights RUN/weights/best.pt
  benchmark  latency table:         lightrainer benchmark --weights RUN/weights/best.pt

Every YAML key is also a flag (--batch 64). Resume a run: lightrainer fit --config FILE --resume.
'lightrainer COMMAND --help' lists the options of a command; the README has a table of every key."""
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
TOOL_SUBCOMMANDS = ("export", "ptq", "benchmark")
# Arguments of Trainer.fit/validate/test/predict that LightningCLI adds to each subcommand.
_METHOD_FLAGS = {"ckpt_path", "verbose", "return_predictions", "weights_only"}


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


# ---------------------------------------------------------------------------------- preflight
def _split_flag(arg: str, argv: list[str], i: int) -> tuple[str, Optional[str], int]:
    """``--key=value`` or ``--key value`` -> (key, value, next index)."""
    body = arg[2:]
    if "=" in body:
        key, value = body.split("=", 1)
        return key, value, i + 1
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return body, argv[i + 1], i + 2
    return body, None, i + 1


def _set_section_flag(merged: dict[str, Any], key: str, value: Optional[str]) -> None:
    """``--trainer '{...}'`` replaces a section; ``--trainer.limit_train_batches 5`` sets one entry."""
    parsed = yaml.safe_load(value) if value is not None else True
    root, _, path = key.partition(".")
    if not path:
        if not isinstance(parsed, dict):
            raise ConfigError(f"--{root}: expected a mapping like '{{key: value}}', got {value!r}")
        merged[root] = parsed
        return
    node = merged.setdefault(root, {})
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = parsed


@dataclass
class Command:
    """A Lightning subcommand's validated config, and what else its command line asked for."""

    cfg: Config
    ckpt_path: Optional[str]
    passthrough: list[str]
    print_config: bool
    #: The checkpoint's ``lightrainer`` entry when the run is rebuilt from it (no --config).
    rebuild_from: Optional[dict[str, Any]] = None


def read_command_config(argv: list[str], subcommand: str = "fit") -> Command:
    """Validate the config files and flags of a Lightning subcommand before anything runs.

    The ``model:`` section's class is imported first (from the YAML's folder or the working
    folder too), so the keys its task declares are known: validated, settable as flags, and a
    misspelling gets the closest key. Without ``--config``, ``validate``/``test``/``predict`` take
    the run's config from the checkpoint's record.

    Args:
        argv: the arguments after the subcommand.
        subcommand: fit, validate, test or predict.

    Returns:
        The config, ckpt_path, the arguments for LightningCLI, --print_config, and the
        checkpoint's record when the run is rebuilt from it.

    Raises:
        ConfigError: a missing/malformed file, an unknown key or flag, a bad value.
    """
    merged: dict[str, Any] = {}
    flags: list[tuple[str, Any, list[str]]] = []
    ckpt_path: Optional[str] = None
    print_config = False
    passthrough: list[str] = []
    configs = 0
    add_import_path(Path.cwd())
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config") or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if path is None:
                raise ConfigError("--config needs a file path")
            merged.update(_read_yaml(Path(path)))
            add_import_path(Path(path).parent)
            configs += 1
            i += 1 if "=" in arg else 2
            continue
        if arg.startswith("--print_config"):
            print_config = True
            i += 1
            continue
        if arg == "--resume":
            ckpt_path = "last"
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --epochs 3")
        key, value, nxt = _split_flag(arg, argv, i)
        root = key.split(".", 1)[0]
        if key == "ckpt_path":
            ckpt_path = value
        elif root in ("model", "data", "trainer"):
            _set_section_flag(merged, key, value)
        elif key in _METHOD_FLAGS or key in ("help", "h"):
            passthrough += argv[i:nxt]
        else:
            flags.append((key, yaml.safe_load(value) if value is not None else True, argv[i:nxt]))
        i = nxt
    overrides = {key: value for key, value, _ in flags}
    if not configs and subcommand != "fit" and ckpt_path not in (None, "last") and not {"model", "data"} & set(merged):
        payload = _payload_of_checkpoint(ckpt_path)
        _, _, cfg = rebuild(payload, **overrides)  # validates the record and the flags
        cfg.sections.update(merged)
        return Command(cfg, ckpt_path, passthrough + [r for _, _, raw in flags for r in raw], print_config, payload)
    task = _task_class({**merged, **overrides}, None)
    keys = set(flat_keys(task))
    for key, _, raw in flags:
        if key not in keys:
            raise _unknown_flag(key, task, keys)
        passthrough += raw
    cfg = load_config(merged, task_class=task, **overrides)
    return Command(cfg, ckpt_path, passthrough, print_config)


def _unknown_flag(key: str, task: type | None, keys: set[str]) -> ConfigError:
    message = str(_unknown_key(key, task, sorted(keys | _METHOD_FLAGS)))
    return ConfigError(message.replace(f"unknown key {key!r}", f"unknown flag --{key}", 1))


def _payload_of_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The ``lightrainer`` entry of a checkpoint (its record), for validate/test/predict without --config."""
    path = check_checkpoint(ckpt_path)
    return torch.load(path, map_location="cpu", weights_only=True)["lightrainer"]


def find_last_checkpoint(cfg: Config) -> Path:
    """The newest complete ``weights/last.ckpt`` among the runs ``save_dir/name*``.

    A checkpoint that does not read back (a run killed by a crash the atomic writes could not
    cover, a disk that filled up) is skipped with a warning, and the next newest one is used.

    Raises:
        ConfigError: there is none, or none is complete.
    """
    candidates = sorted(
        Path(cfg.save_dir).glob(f"{cfg.name}*/weights/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    if not candidates:
        raise ConfigError(
            f"--resume / --ckpt_path last: no {cfg.save_dir}/{cfg.name}*/weights/last.ckpt to resume from"
        )
    for path in candidates:
        try:
            return check_checkpoint(path)
        except ConfigError as err:
            warnings.warn(f"--resume: skipping {path}: {err}", stacklevel=2)
    raise ConfigError(
        f"--resume: none of {len(candidates)} checkpoint(s) {cfg.save_dir}/{cfg.name}*/weights/last.ckpt "
        "is complete; start a new run or pass --ckpt_path"
    )


def check_checkpoint(path: str | Path) -> Path:
    """A lightrainer Lightning checkpoint that exists and loads, or a clear error.

    Raises:
        ConfigError: missing, unreadable/truncated, or not written by lightrainer.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ckpt_path: checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the file is unusable
        raise ConfigError(f"--ckpt_path: {path} is not a readable checkpoint (corrupt or truncated?): {err}") from None
    if not isinstance(checkpoint, dict) or "lightrainer" not in checkpoint or "state_dict" not in checkpoint:
        raise ConfigError(
            f"--ckpt_path: {path} was not written by lightrainer: resume from <run>/weights/last.ckpt"
        )
    return path


def resolve_ckpt(cfg: Config, ckpt_path: Optional[str]) -> Optional[Path]:
    """``last`` -> the newest run checkpoint; a path -> checked."""
    if ckpt_path in (None, "", "None", "null"):
        return None
    if ckpt_path == "last":
        return find_last_checkpoint(cfg)
    return check_checkpoint(ckpt_path)


# ---------------------------------------------------------------------------------- LightningCLI
def _lightning_cli_class() -> type:
    class LightrainerCLI(LightningCLI):
        """LightningCLI whose root keys are the flat lightrainer keys."""

        def __init__(self, cfg: Config, ckpt: Optional[Path], args: list[str],
                     rebuild_from: Optional[dict[str, Any]] = None) -> None:
            self._cfg = cfg
            self._ckpt = ckpt
            self._rebuild_from = rebuild_from
            with warnings.catch_warnings():
                # We always pass args (already validated); LightningCLI warns when sys.argv is set too.
                warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
                self._run_lightning_cli(args)

        def _run_lightning_cli(self, args: list[str]) -> None:
            super().__init__(
                model_class=None,
                datamodule_class=None,
                save_config_callback=None,
                seed_everything_default=False,
                auto_configure_optimizers=False,
                parser_kwargs={"prog": "lightrainer", "description": "Train from a flat lightrainer YAML."},
                args=args,
            )

        def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_argument("--model", type=Optional[dict], default=None, help="model: class_path/init_args")
            parser.add_argument("--data", type=Optional[dict], default=None, help="data: class_path/init_args")
            parser.add_argument("--trainer", type=Optional[dict], default=None, help="extra lightning.Trainer args")

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            docs = field_docs()
            task = self._cfg.task_class
            name = task.__name__ if task is not None else "the task"
            docs.update({k: (spec.default, f"{spec.doc} ({name} key)") for k, spec in task_keys_of(task).items()})
            for key in flat_keys(task):
                default, doc = docs[key]
                parser.add_argument(f"--{key}", type=Any, default=default, help=doc)

        def instantiate_classes(self) -> None:
            self.config_init = self.config
            cfg = self._cfg
            if self.subcommand != "fit":
                cfg.name = f"{cfg.name}_{self.subcommand}"
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            if self._rebuild_from is not None:
                # No --config: the run re-opens from its checkpoint's record (classes checked).
                self.model, self.datamodule, rebuilt = rebuild(self._rebuild_from, **cfg.to_dict())
                rebuilt.sections.update(cfg.sections)
                cfg = rebuilt
            else:
                self.model, self.datamodule = build_from_config(cfg)
            if self.subcommand == "fit" and (cfg.ptq or cfg.qat or cfg.trt_quant):
                # The network is known now: refuse one with nothing to quantize before the run
                # folder exists.
                check_quant_config(cfg.replace(ptq=cfg.ptq or not cfg.qat), getattr(self.model, "net", None))
            run_dir = self._ckpt.parent.parent if (self._ckpt and self.subcommand == "fit") else None
            trainer_args = {
                key: instantiate(value, cfg, f"trainer.{key}")
                for key, value in (cfg.sections.get("trainer") or {}).items()
            }
            self.trainer = build_trainer(cfg, run_dir=run_dir, **trainer_args)
            sub = self.config[self.subcommand]
            sub["ckpt_path"] = str(self._ckpt) if self._ckpt else None
            if "weights_only" in sub and sub["weights_only"] is None:
                sub["weights_only"] = True  # our checkpoints hold tensors and plain values only

    return LightrainerCLI


# ---------------------------------------------------------------------------------- tools
def _tool_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightrainer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="tool", required=True)
    export = sub.add_parser("export", help="export weights to ONNX (verified) or a TensorRT engine")
    export.add_argument("--weights", required=True, help="<run>/weights/best.pt")
    export.add_argument("--format", default="onnx", help="onnx | engine")
    export.add_argument("--config", default=None, help="YAML (default: the config saved in the weights)")
    export.add_argument("--int8", action="store_true", help="engine: int8 from a Q/DQ model")
    export.add_argument("--fp16", action="store_true", help="engine: fp16")
    ptq = sub.add_parser("ptq", help="post-training quantization of trained weights")
    ptq.add_argument("--weights", required=True)
    ptq.add_argument("--config", default=None, help="YAML (default: the config saved in the weights)")
    bench = sub.add_parser("benchmark", help="latency table: PyTorch, ONNX Runtime (FP32, Q/DQ), TensorRT")
    bench.add_argument("--weights", required=True)
    bench.add_argument("--config", default=None)
    return parser


def _run_for_weights(weights: str, config: Optional[str]) -> tuple[Any, Any, Config]:
    """The task module, datamodule and config of a weights file: rebuilt from the file's own
    record (classes checked before anything is called), or built from ``--config``."""
    payload = load_weights(weights)
    if config:
        add_import_path(Path(config).parent)
        cfg = load_config(config)
        module, datamodule = build_from_config(cfg)
    else:
        module, datamodule, cfg = rebuild(payload)
    cfg.run_dir = str(Path(weights).parent.parent)
    return module, datamodule, cfg


def run_tool(argv: list[str]) -> int:
    """``lightrainer export|ptq|benchmark``."""
    args = _tool_parser().parse_args(argv)
    add_import_path(Path.cwd())
    module, datamodule, cfg = _run_for_weights(args.weights, args.config)
    if args.tool == "export":
        export_from_weights(module, datamodule, cfg, args.weights, fmt=args.format, int8=args.int8, fp16=args.fp16)
    elif args.tool == "ptq":
        run_ptq(module, datamodule, cfg, args.weights)
    else:
        benchmark_from_weights(module, datamodule, cfg, args.weights)
    return 0


def _help_config(argv: list[str]) -> Config:
    """The config whose task's keys ``--help`` lists: that of the ``--config`` files when they
    read, else the defaults (the main job's task)."""
    without_help = [a for a in argv if a not in ("-h", "--help")]
    try:
        return read_command_config(without_help).cfg
    except ConfigError:
        return load_config()


# ---------------------------------------------------------------------------------- entry point
def readme_section(err: BaseException) -> str:
    """The README section that explains ``err``."""
    tb, origin = err.__traceback__, ""
    while tb is not None:
        origin = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    for package, section in _SECTIONS_BY_PACKAGE.items():
        if f"lightrainer/{package}/" in origin.replace("\\", "/") or f"callbacks/{package}" in origin:
            return README + section
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

def main(argv: Optional[list[str]] = None) -> int:
    """Run the ``lightrainer`` command; returns the exit code (2 for a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv and argv[0] in TOOL_SUBCOMMANDS:
            return run_tool(argv)
        if not argv or argv[0] not in LIGHTNING_SUBCOMMANDS:
            print(USAGE, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
            return 0 if argv and argv[0] in ("-h", "--help") else 2
        if any(a in ("-h", "--help") for a in argv):
            _lightning_cli_class()(_help_config(argv[1:]), None, argv)
            return 0
        command = read_command_config(argv[1:], argv[0])
        cfg = command.cfg
        if command.print_config:
            data = cfg.to_dict()
            data["derived"] = cfg.derived()
            print(yaml.safe_dump({**data, **cfg.sections}, sort_keys=False), end="")
            return 0
        ckpt = resolve_ckpt(cfg, command.ckpt_path)
        _lightning_cli_class()(cfg, ckpt, [argv[0], *command.passthrough], command.rebuild_from)
    except Exception as err:  # noqa: BLE001 - user errors become exit 2, anything else re-raises
        if not _is_user_error(err):
            raise
        print(f"lightrainer: error: {err}\n(see {readme_section(err)})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
