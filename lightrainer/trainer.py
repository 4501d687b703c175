"""Typed config -> ``lightning.Trainer``: devices, strategy, precision, run folder, callbacks, loggers."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightrainer.callbacks.checkpoint import RunCheckpoint
from lightrainer.callbacks.early_stopping import FitnessEarlyStopping
from lightrainer.callbacks.progress import LightrainerProgressBar
from lightrainer.callbacks.results import ResultsCSV
from lightrainer.config import Config, ConfigError, dump_config

log = logging.getLogger(__name__)

#: Set in the environment of the launching process so that worker processes (Lightning's DDP
#: launcher re-runs the script) use the run folder chosen once, by the launcher.
RUN_DIR_ENV = "LIGHTRAINER_RUN_DIR"


def increment_path(path: str | os.PathLike, exist_ok: bool = False) -> Path:
    """``path`` if it is free (or ``exist_ok``), else the first free ``path2``, ``path3``, ...

    Args:
        path: the wanted folder.
        exist_ok: reuse ``path`` even when it exists.

    Returns:
        The folder to use (not created).
    """
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    stem = re.sub(r"\d+$", "", path.name) or path.name
    n = 2
    while (candidate := path.with_name(f"{stem}{n}")).exists():
        n += 1
    return candidate


def _is_worker_process() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def resolve_run_dir(cfg: Config) -> Path:
    """The run folder, decided once: worker processes inherit the launcher's choice."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and _is_worker_process():
        return Path(inherited)
    return increment_path(Path(cfg.save_dir) / cfg.name, cfg.exist_ok)


def resolve_devices(cfg: Config) -> dict[str, Any]:
    """``device``/``devices`` -> Trainer accelerator, devices, strategy and num_nodes.

    Raises:
        ConfigError: a GPU id that does not exist, or more devices than there are.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = cfg.device
    if device is None:
        accelerator = "gpu" if gpus else "cpu"
        devices: Any = cfg.devices or 1
    elif device in ("cpu", "mps"):
        accelerator, devices = device, cfg.devices or 1
    else:
        if not gpus:
            warnings.warn(
                f"device={device} asks for CUDA GPUs but none is available: training on the CPU",
                stacklevel=2,
            )
            accelerator, devices = "cpu", cfg.devices or 1
        else:
            missing = [i for i in device if i >= gpus]
            if missing:
                raise ConfigError(
                    f"device: GPU {missing} does not exist; this machine has {gpus} GPU(s) with ids "
                    f"0..{gpus - 1}"
                )
            accelerator, devices = "gpu", list(device)
    if accelerator == "gpu" and isinstance(devices, int) and devices > gpus:
        raise ConfigError(f"devices: {devices} GPUs asked for, this machine has {gpus}")
    count = len(devices) if isinstance(devices, list) else int(devices)
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": cfg.num_nodes,
        "world_size": count * cfg.num_nodes,
    }


def resolve_precision(cfg: Config, accelerator: str) -> str:
    """``amp`` -> "16-mixed" on CUDA, else fp32 with a warning."""
    if not cfg.amp:
        return "32-true"
    if accelerator == "gpu":
        return "16-mixed"
    warnings.warn(f"amp=True needs a CUDA device; training on {accelerator} in fp32", stacklevel=2)
    return "32-true"


def _loggers(cfg: Config, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers: list = [CSVLogger(save_dir=run_dir, name="", version="logs")]
    if cfg.tensorboard:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError('tensorboard: True needs TensorBoard: pip install "lightrainer[tensorboard]"') from None
        loggers.append(TensorBoardLogger(save_dir=run_dir, name="", version="tensorboard"))
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            raise ConfigError('wandb: True needs wandb: pip install "lightrainer[wandb]"') from None
        loggers.append(
            WandbLogger(
                project=cfg.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=cfg.wandb_offline,
                config=cfg.to_dict(),
            )
        )
    return loggers


class RunSetup(Callback):
    """Writes ``args.yaml`` (config + derived values) once the data's batches per epoch are known."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        nb = trainer.num_training_batches
        extra = {"batches_per_epoch": nb, "warmup_iters": self.cfg.warmup_iters(nb)}
        fitness, mode = getattr(pl_module, "fitness_monitor", (None, None))
        extra.update({"fitness": fitness, "fitness_mode": mode, "run_dir": self.cfg.run_dir})
        extra.update(getattr(pl_module, "config_notes", lambda: {})())
        dump_config(self.cfg, Path(self.cfg.run_dir) / "args.yaml", extra)
        log.info("run folder: %s", self.cfg.run_dir)


def default_callbacks(cfg: Config, progress_bar: bool = True) -> list[Callback]:
    """The callbacks every run has, plus those the config asks for (quantization, export)."""
    run_dir = Path(cfg.run_dir)
    callbacks: list[Callback] = [LightrainerProgressBar()] if progress_bar else []
    callbacks += [
        RunSetup(cfg),
        ResultsCSV(run_dir, plots=cfg.plots),
        RunCheckpoint(run_dir / "weights"),
    ]
    if cfg.patience > 0:
        callbacks.append(FitnessEarlyStopping(cfg.patience))
    callbacks += _feature_callbacks(cfg)
    return callbacks


def _feature_callbacks(cfg: Config) -> list[Callback]:
    callbacks: list[Callback] = []
    if cfg.qat:
        from lightrainer.callbacks.qat import QATCallback

        callbacks.append(QATCallback(cfg))
    if cfg.ptq:
        from lightrainer.callbacks.ptq import PTQCallback

        callbacks.append(PTQCallback(cfg))
    if cfg.export or cfg.trt_quant:
        from lightrainer.callbacks.export import ExportCallback

        callbacks.append(ExportCallback(cfg))
    return callbacks


def build_trainer(cfg: Config, run_dir: str | os.PathLike | None = None, **trainer_overrides: Any) -> L.Trainer:
    """A ``lightning.Trainer`` that runs ``cfg`` as the YAML promises.

    Decides the run folder (``save_dir/name``, incremented unless ``exist_ok``) and records it on
    ``cfg.run_dir``; sets ``cfg.world_size``.

    Args:
        cfg: the validated config. The best checkpoint and early stopping follow the fitted
            module's ``fitness_monitor``.
        run_dir: use this run folder (resuming a run) instead of a new ``save_dir/name``.
        **trainer_overrides: any ``lightning.Trainer`` argument, taking precedence (e.g.
            ``limit_train_batches=5``); ``callbacks`` are added to the default ones.

    Returns:
        The Trainer.

    Raises:
        ConfigError: devices that do not exist, an optional logger that is not installed.
    """
    if cfg.ptq or cfg.qat:
        # A missing backend, the fake pytorch-quantization 2.2.x or a bad method fail here,
        # before the run folder exists.
        from lightrainer.quant.workflow import check_quant_config

        check_quant_config(cfg)
    hardware = resolve_devices(cfg)
    world_size = hardware.pop("world_size")
    run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(cfg)
    cfg.run_dir, cfg.world_size = str(run_dir), world_size
    if cfg.batch % world_size:
        warnings.warn(
            f"batch={cfg.batch} is not divisible by {world_size} devices: each device gets "
            f"{cfg.batch_per_device} (global batch {cfg.batch_per_device * world_size})",
            stacklevel=2,
        )
    strategy = "ddp" if world_size > 1 else "auto"
    extra_callbacks = list(trainer_overrides.pop("callbacks", []) or [])
    kwargs: dict[str, Any] = {
        **hardware,
        "strategy": strategy,
        "precision": resolve_precision(cfg, hardware["accelerator"]),
        "max_epochs": cfg.epochs,
        "default_root_dir": str(run_dir),
        "deterministic": cfg.deterministic or None,
        "sync_batchnorm": cfg.sync_bn if cfg.sync_bn is not None else world_size > 1,
        "log_every_n_steps": 10,
        "enable_model_summary": True,
    }
    kwargs.update(trainer_overrides)
    if kwargs.get("logger", True) is True:
        kwargs["logger"] = None  # placeholder, filled below once the folder exists
    callbacks = default_callbacks(cfg, kwargs.get("enable_progress_bar", True) is not False) + extra_callbacks
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "weights").mkdir(exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if kwargs["logger"] is None:
        kwargs["logger"] = _loggers(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return L.Trainer(callbacks=callbacks, **kwargs)
