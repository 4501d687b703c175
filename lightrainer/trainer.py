"""Typed config -> ``lightning.Trainer``: devices, strategy, precision, run folder, callbacks, loggers."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import Callback

from lightrainer.callbacks.export import ExportCallback, check_export_dependencies
from lightrainer.callbacks.interrupt import InterruptCheckpoint
from lightrainer.callbacks.ptq import PTQCallback
from lightrainer.callbacks.qat import QATCallback
from lightrainer.callbacks.checkpoint import RandomState, RunCheckpoint, with_atomic_checkpoint_io
from lightrainer.callbacks.early_stopping import FitnessEarlyStopping
from lightrainer.callbacks.model_summary import LightrainerModelSummary
from lightrainer.callbacks.progress import EpochLines, LightrainerProgressBar, resolve_progress
from lightrainer.callbacks.results import ResultsCSV
from lightrainer.callbacks.summary import RunSummary
from lightrainer.config import Config, ConfigError, dump_config
from lightrainer.io import atomic_write
from lightrainer.logs import install_fallback_handler
from lightrainer.quant.workflow import check_quant_config
from lightrainer.runs import (
    SLURM_JOB_FILE,
    create_run_dir,
    numbered_name,
    remove_unused_run_dir,
    remove_stale_temp_files,
    requeued_run_dir,
    slurm_job_id,
)

log = logging.getLogger(__name__)


#: Lightning's info lines that say nothing to a lightrainer user: its cloud-logger tip, devices
#: lightrainer never uses, and the end of fit (the closing summary says why the fit stopped).
LIGHTNING_NOISE = ("\N{ELECTRIC LIGHT BULB} Tip:", "TPU available:", "HPU available:", "`Trainer.fit` stopped:")


class _DropLightningTips(logging.Filter):
    """Drops :data:`LIGHTNING_NOISE` from Lightning's rank-zero log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_NOISE)


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())
# Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates, once per fit: not ours
# to fix, and nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# amp: bf16 keeps fp32 weights; the model table's size in MB is right as it is.
warnings.filterwarnings("ignore", message=r"Precision bf16-mixed is not supported by the model summary")

#: Set in the environment of the launching process so that worker processes (Lightning's DDP
#: launcher re-runs the script) use the run folder chosen once, by the launcher.
RUN_DIR_ENV = "LIGHTRAINER_RUN_DIR"


def increment_path(path: str | os.PathLike, exist_ok: bool = False) -> Path:
    """``path`` if it is free (or ``exist_ok``), else its first free numbered sibling: ``path2``,
    ``path3``, ... (``name-2`` for a name that ends in a digit: :func:`lightrainer.runs.numbered_name`).

    Only looks: a folder that several processes may claim at once (a run folder) is created with
    :func:`lightrainer.runs.create_run_dir` instead.

    Args:
        path: the wanted folder.
        exist_ok: reuse ``path`` even when it exists.

    Returns:
        The folder to use (not created).
    """
    path = Path(path)
    if exist_ok or not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(numbered_name(path.name, n))).exists():
        n += 1
    return candidate


def launcher_layout() -> tuple[str, int, int] | None:
    """(launcher, processes per node, nodes) of an external launcher that started this process.

    torchrun/torchelastic and SLURM's ``srun`` start every process themselves; Lightning then must
    be given the same device and node counts, so they come from the environment, not the YAML.

    Returns:
        ``("torchrun", LOCAL_WORLD_SIZE, WORLD_SIZE // LOCAL_WORLD_SIZE)``,
        ``("SLURM", tasks per node, SLURM_NNODES)``, or None (Lightning launches the processes).
    """
    env = os.environ
    if TorchElasticEnvironment.detect():
        local = int(env["LOCAL_WORLD_SIZE"])
        return "torchrun", local, max(int(env.get("WORLD_SIZE", local)) // local, 1)
    if SLURMEnvironment.detect():
        nodes = int(env.get("SLURM_NNODES", "1"))
        per_node = env.get("SLURM_NTASKS_PER_NODE") or str(int(env.get("SLURM_NTASKS", "1")) // nodes)
        return "SLURM", int(re.match(r"\d+", per_node).group()), nodes  # "2(x3)" -> 2
    return None


def is_rank_zero_process() -> bool:
    """Whether this process will be global rank 0, known before the process group exists.

    torchrun sets ``RANK``, SLURM ``SLURM_PROCID``; processes started by Lightning's launcher (and
    machines of a manual multi-node launch) carry ``LOCAL_RANK`` and ``NODE_RANK``.
    """
    layout = launcher_layout()
    env = os.environ
    if layout is not None:
        return int(env.get("RANK" if layout[0] == "torchrun" else "SLURM_PROCID", "0")) == 0
    node_rank = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    return int(env.get("LOCAL_RANK", "0")) == 0 and node_rank == 0


def resolve_run_dir(cfg: Config) -> tuple[Path, bool]:
    """The run folder, decided once, by the process that becomes global rank 0, which creates it.

    Rank 0 claims ``save_dir/name`` or its first free numbered sibling with an exclusive
    ``mkdir`` (:func:`lightrainer.runs.create_run_dir`), so runs that start together never share
    a folder. A SLURM job that was requeued (``requeue: True``) takes the folder it trained in
    before. Other ranks never create folders: a process that Lightning's launcher started
    inherits the launcher's choice through ``LIGHTRAINER_RUN_DIR``; under torchrun/SLURM the other
    ranks hold a provisional path until :class:`RunDirSync` broadcasts rank 0's folder when the
    fit starts.

    Returns:
        ``(folder, created)``: whether this call created the folder.

    Raises:
        ConfigError: the folder cannot be created.
    """
    if is_rank_zero_process():
        previous = _requeued_run_dir(cfg)
        if previous is not None:
            log.info("SLURM job requeued: continuing in %s", previous)
            return previous, False
        wanted = Path(cfg.save_dir) / cfg.name
        existed = cfg.exist_ok and wanted.is_dir()
        path = create_run_dir(cfg.save_dir, cfg.name, cfg.exist_ok)
        return path, not existed
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and launcher_layout() is None:
        return Path(inherited), False
    return Path(cfg.save_dir) / cfg.name, False


def _requeued_run_dir(cfg: Config) -> Path | None:
    """The folder a requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) trained in before."""
    job = slurm_job_id()
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    if not (cfg.requeue and job and SLURMEnvironment.detect() and restarts.isdigit() and int(restarts) > 0):
        return None
    return requeued_run_dir(cfg.save_dir, cfg.name, job)


def _requested_devices(cfg: Config, gpus: int) -> tuple[str, Any]:
    """(accelerator, devices) from ``device``/``devices``, before any launcher is considered."""
    device = cfg.device
    if device is None:
        return ("gpu" if gpus else "cpu"), cfg.devices or 1
    if device in ("cpu", "mps"):
        return device, cfg.devices or 1
    if not gpus:
        warnings.warn(
            f"device={device} asks for CUDA GPUs but none is available: training on the CPU with "
            f"{cfg.devices or 1} process(es) (set device: cpu and devices: N to choose)",
            stacklevel=3,
        )
        return "cpu", cfg.devices or 1
    missing = [i for i in device if i >= gpus]
    if missing:
        raise ConfigError(
            f"device: GPU {missing} does not exist; this machine has {gpus} GPU(s) with ids "
            f"0..{gpus - 1}"
        )
    if cfg.devices is not None and cfg.devices != len(device):
        raise ConfigError(
            f"device: {device} names {len(device)} GPU(s) but devices: {cfg.devices}; "
            "give one of them (device lists the ids, devices only counts)"
        )
    return "gpu", list(device)


def _check_count(accelerator: str, devices: Any, gpus: int) -> None:
    count = len(devices) if isinstance(devices, list) else int(devices)
    if accelerator == "gpu" and isinstance(devices, int) and devices > gpus:
        raise ConfigError(f"devices: {devices} GPUs asked for, this machine has {gpus}: set devices: {gpus} or fewer")
    if accelerator == "mps" and count > 1:
        raise ConfigError(f"devices: {count} asked for with device: mps; Apple's MPS is one device: set devices: 1")
    cores = os.cpu_count() or 1
    if accelerator == "cpu" and count > cores:
        warnings.warn(
            f"devices: {count} CPU processes on {cores} cores: they will compete for the cores "
            f"(each runs torch with {max(cores // count, 1)} thread(s) at best)",
            stacklevel=3,
        )


def _apply_launcher(cfg: Config, accelerator: str, devices: Any, layout: tuple[str, int, int]) -> tuple[Any, int]:
    """Devices and nodes as the external launcher started them; a YAML that disagrees warns."""
    name, per_node, nodes = layout
    asked = len(devices) if isinstance(devices, list) else int(devices)
    explicit = cfg.devices is not None or isinstance(devices, list)
    if explicit and asked != per_node:
        warnings.warn(
            f"devices: {asked} in the config, but {name} started {per_node} process(es) per machine: "
            f"using {per_node}",
            stacklevel=3,
        )
    if cfg.num_nodes != 1 and cfg.num_nodes != nodes:
        warnings.warn(f"num_nodes: {cfg.num_nodes} in the config, but {name} started {nodes} machine(s): using {nodes}",
                      stacklevel=3)
    if isinstance(devices, list) and len(devices) == per_node:
        return devices, nodes
    return per_node, nodes


def _check_nodes(cfg: Config) -> None:
    env = os.environ
    if cfg.num_nodes > 1 and not ("NODE_RANK" in env and "MASTER_ADDR" in env):
        raise ConfigError(
            f"num_nodes: {cfg.num_nodes} needs a launcher that starts the run on every machine: "
            f"torchrun --nnodes={cfg.num_nodes} --nproc_per_node=GPUS_PER_MACHINE --node_rank=R "
            "--master_addr=HOST0 --master_port=29500 -m lightrainer fit --config FILE (on each machine), "
            "srun under SLURM, or set MASTER_ADDR, MASTER_PORT and NODE_RANK on each machine"
        )


def resolve_devices(cfg: Config) -> dict[str, Any]:
    """``device``/``devices``/``num_nodes`` (or the launcher's layout) -> Trainer arguments.

    Returns:
        accelerator, devices, num_nodes, and world_size (processes in all).

    Raises:
        ConfigError: a GPU id that does not exist, more devices than there are, ``device`` and
            ``devices`` that disagree, ``num_nodes > 1`` without a launcher.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    accelerator, devices = _requested_devices(cfg, gpus)
    layout = launcher_layout()
    if layout is not None:
        devices, num_nodes = _apply_launcher(cfg, accelerator, devices, layout)
    else:
        _check_nodes(cfg)
        num_nodes = cfg.num_nodes
    _check_count(accelerator, devices, gpus)
    count = len(devices) if isinstance(devices, list) else int(devices)
    return {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "world_size": count * num_nodes,
    }


def resolve_strategy(world_size: int) -> str:
    """"auto" for one process; "ddp" for several, "ddp_notebook" (fork) from a notebook.

    Lightning's "ddp" re-runs the script in new processes, which a notebook cannot do; forking
    works there on the CPU and on GPUs, provided CUDA was not used in the notebook before the fit.
    """
    if world_size == 1:
        return "auto"
    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)  # a notebook or a REPL
    if interactive and launcher_layout() is None:
        return "ddp_notebook"
    return "ddp"


def resolve_sync_bn(cfg: Config, accelerator: str, world_size: int) -> bool:
    """``sync_bn``: default on with several GPUs; torch's SyncBatchNorm does not run on the CPU.

    Raises:
        ConfigError: ``sync_bn: True`` for several CPU processes.
    """
    if cfg.sync_bn is None:
        return world_size > 1 and accelerator == "gpu"
    if cfg.sync_bn and world_size > 1 and accelerator != "gpu":
        raise ConfigError(
            f"sync_bn: True needs CUDA GPUs (torch's SyncBatchNorm refuses {accelerator} processes): "
            "set sync_bn: False (or leave it empty) to train on several CPU processes"
        )
    return bool(cfg.sync_bn) and world_size > 1


def resolve_precision(cfg: Config, accelerator: str, bf16_gpu: bool | None = None) -> str:
    """``amp`` -> Lightning's precision: True (fp16) is "16-mixed" on CUDA, else fp32 with a
    warning; "bf16" is "bf16-mixed" on the CPU and on a CUDA GPU that supports bf16.

    Args:
        cfg: the config.
        accelerator: "gpu", "cpu" or "mps".
        bf16_gpu: whether the GPUs support bf16 (None: ask torch).

    Raises:
        ConfigError: ``amp: bf16`` on a GPU without bf16 support, or on MPS.
    """
    if not cfg.amp:
        return "32-true"
    if cfg.amp == "bf16":
        if accelerator == "cpu":
            return "bf16-mixed"
        if accelerator == "gpu" and (torch.cuda.is_bf16_supported() if bf16_gpu is None else bf16_gpu):
            return "bf16-mixed"
        raise ConfigError(f"amp: bf16 is not supported on this {accelerator} device (CUDA bf16 needs an Ampere or "
                          "newer GPU): use amp: True (fp16 mixed precision) or amp: False")
    if accelerator == "gpu":
        return "16-mixed"
    warnings.warn(f"amp=True needs a CUDA device for fp16; training on {accelerator} in fp32 "
                  "(amp: bf16 runs bf16 mixed precision on the CPU)", stacklevel=2)
    return "32-true"


def _logger_classes(cfg: Config) -> dict[str, type]:
    """The optional loggers the config asks for, imported (checked before the run folder exists).

    Raises:
        ConfigError: a logger whose package is not installed (names the pip install).
    """
    classes: dict[str, type] = {}
    if cfg.tensorboard:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError('tensorboard: True needs TensorBoard: pip install "lightrainer[tensorboard]"') from None
        classes["tensorboard"] = TensorBoardLogger
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:
            raise ConfigError('wandb: True needs wandb: pip install "lightrainer[wandb]"') from None
        if not cfg.wandb_offline and not wandb_can_log_in(os.environ):
            raise ConfigError(
                "wandb: True needs a Weights & Biases login (run `wandb login`, or set WANDB_API_KEY), "
                "or wandb_offline: True to log to the run folder and sync later"
            )
        classes["wandb"] = WandbLogger
    if cfg.mlflow:
        try:
            import mlflow  # noqa: F401
            from lightning.pytorch.loggers import MLFlowLogger
        except ImportError:
            raise ConfigError('mlflow: True needs MLflow: pip install "lightrainer[mlflow]"') from None
        classes["mlflow"] = MLFlowLogger
    return classes


def mlflow_location(cfg: Config, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location) of ``mlflow: True``: ``mlflow_uri`` (the server keeps the
    artifacts), else a SQLite store in the run folder, ``RUN/mlflow.db``, with artifacts in
    ``RUN/mlartifacts`` (MLflow 3 refuses its old file store, and would put artifacts in the
    working folder). A pure decision."""
    if cfg.mlflow_uri:
        return cfg.mlflow_uri, None
    run_dir = Path(run_dir).resolve()
    return f"sqlite:///{run_dir / 'mlflow.db'}", (run_dir / "mlartifacts").as_uri()


def wandb_can_log_in(env: Mapping[str, str]) -> bool:
    """Whether wandb will run without asking for a login: an API key, offline or disabled mode, or
    a stored login (~/.netrc entry for api.wandb.ai). A pure decision on the environment."""
    if env.get("WANDB_API_KEY") or env.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    netrc = Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _loggers(cfg: Config, run_dir: Path, classes: dict[str, type]) -> list:
    from lightning.pytorch.loggers import CSVLogger

    # A resumed run writes logs2/, logs3/...: Lightning's CSVLogger deletes an existing metrics.csv.
    loggers: list = [CSVLogger(save_dir=run_dir, name="", version=increment_path(run_dir / "logs").name)]
    if "tensorboard" in classes:
        loggers.append(classes["tensorboard"](save_dir=run_dir, name="", version="tensorboard"))
    if "wandb" in classes:
        loggers.append(
            classes["wandb"](
                project=cfg.wandb_project,
                name=run_dir.name,
                save_dir=str(run_dir),
                offline=cfg.wandb_offline,
                config=cfg.to_dict(),
            )
        )
    if "mlflow" in classes and is_rank_zero_process():
        # Rank 0 alone: the client opens (or creates) the store as it is made, and ranks that start
        # together under torchrun would race to create one SQLite file. Its logging is rank 0's anyway.
        uri, artifacts = mlflow_location(cfg, run_dir)
        # MLflow announces its new database tables and Lightning the new experiment, at INFO and
        # WARNING: routine for a store per run.
        with _quieter(("mlflow.store.db.utils", "alembic", "lightning.pytorch.loggers.mlflow"), logging.ERROR):
            logger = classes["mlflow"](experiment_name=cfg.name, run_name=run_dir.name, tracking_uri=uri,
                                       artifact_location=artifacts)
            logger.log_hyperparams({k: v for k, v in cfg.to_dict().items() if v is not None})
        loggers.append(logger)
    return loggers


@contextlib.contextmanager
def _quieter(names: tuple[str, ...], level: int) -> Any:
    """Raise the level of some libraries' loggers for a moment."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def check_batch_split(batch: int, world_size: int) -> None:
    """The global batch must split evenly, so every device gets the same share.

    Raises:
        ConfigError: ``batch`` not divisible by the number of processes (names the nearest fits).
    """
    if batch % world_size == 0:
        return
    low, high = batch // world_size * world_size, (batch // world_size + 1) * world_size
    options = f"{low} ({low // world_size} a device) or {high}" if low else f"{high}"
    raise ConfigError(
        f"batch: {batch} does not split over {world_size} devices (each would take "
        f"{batch / world_size:g} samples): set batch to {options} ({high // world_size} a device)"
    )


class RunDirSync(Callback):
    """Makes every rank use rank 0's run folder (torchrun/SLURM ranks decide nothing themselves)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        run_dir = trainer.strategy.broadcast(self.cfg.run_dir, src=0)
        if run_dir != self.cfg.run_dir:
            log.debug("rank %d: run folder %s (from rank 0)", trainer.global_rank, run_dir)
            self.cfg.run_dir = run_dir
            for callback in trainer.callbacks:
                if isinstance(callback, ResultsCSV):
                    callback.path = Path(run_dir) / callback.path.name


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
        job = slurm_job_id()
        if self.cfg.requeue and job and SLURMEnvironment.detect():
            # A requeued job finds its folder by this file (resolve_run_dir).
            atomic_write(Path(self.cfg.run_dir) / SLURM_JOB_FILE, job)
        log.info("run folder: %s", self.cfg.run_dir)


class EmptyRunCleanup(Callback):
    """Removes the run folder that :func:`build_trainer` created when the fit fails before any
    file was written in it (bad data found while setting up, a missing package): a run that
    failed to start leaves no empty folder behind. A folder holding any file is kept.

    Args:
        run_dir: the folder this build created.
        save_dir: the folder holding it, when this build created that too (removed when left empty).
    """

    def __init__(self, run_dir: str | os.PathLike, save_dir: str | os.PathLike | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.save_dir = save_dir

    def remove(self) -> None:
        """Remove the run folder if it holds no file (and ``save_dir`` if that leaves it empty)."""
        if remove_unused_run_dir(self.run_dir, self.save_dir):
            log.info("removed the run folder %s: the run failed before writing anything", self.run_dir)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.remove()


def default_callbacks(cfg: Config, progress: str = "bar", accelerator: str = "cpu",
                      model_summary: bool = False) -> list[Callback]:
    """The callbacks every run has, plus those the config asks for (quantization, export).

    Args:
        cfg: the config.
        progress: "bar", "lines" or "off" (:func:`lightrainer.callbacks.progress.resolve_progress`).
        accelerator: "gpu", "cpu" or "mps".
        model_summary: print the model table when the fit starts.
    """
    run_dir = Path(cfg.run_dir)
    callbacks: list[Callback] = []
    if progress == "bar":
        # Each bar refresh reads the running loss from the device: on a GPU that stalls the queue,
        # so refresh every 10 steps there; on a CPU it costs nothing and every step shows.
        callbacks.append(LightrainerProgressBar(refresh_rate=10 if accelerator == "gpu" else 1))
    elif progress == "lines":
        callbacks.append(EpochLines())
    if model_summary:
        callbacks.append(LightrainerModelSummary())
    results = ResultsCSV(run_dir, plots=cfg.plots)
    stopper = FitnessEarlyStopping(cfg.patience) if cfg.patience > 0 else None
    callbacks += [
        RunSetup(cfg),
        results,
        RunCheckpoint(run_dir / "weights"),
        RandomState(),
        InterruptCheckpoint(run_dir / "weights"),
    ]
    if stopper is not None:
        callbacks.append(stopper)
    callbacks += _feature_callbacks(cfg)
    # Last: after the files the feature callbacks write at the end of the fit.
    callbacks.append(RunSummary(results, stopper))
    return callbacks


def _feature_callbacks(cfg: Config) -> list[Callback]:
    callbacks: list[Callback] = []
    if cfg.qat:
        callbacks.append(QATCallback(cfg))
    if cfg.ptq:
        callbacks.append(PTQCallback(cfg))
    if cfg.export or cfg.trt_quant:
        callbacks.append(ExportCallback(cfg))
    return callbacks


def build_trainer(cfg: Config, run_dir: str | os.PathLike | None = None, **trainer_overrides: Any) -> L.Trainer:
    """A ``lightning.Trainer`` that runs ``cfg`` as the YAML promises.

    Decides the run folder (``save_dir/name``, incremented unless ``exist_ok``) on the process that
    becomes global rank 0, before Lightning starts any worker, and records it on ``cfg.run_dir``;
    sets ``cfg.world_size``. Several devices or machines run Lightning's DDP; under torchrun or
    SLURM the launcher's process layout is used (see :func:`launcher_layout`).

    Everything that can be checked without the folder is checked before it is created, and a
    folder this call created is removed again when building the Trainer, or the fit before its
    first file, fails (:class:`EmptyRunCleanup`). At the start of a run and of a resume, the
    temporary files a killed run left in the folder are removed.

    Args:
        cfg: the validated config. The best checkpoint and early stopping follow the fitted
            module's ``fitness_monitor``.
        run_dir: use this run folder (resuming a run) instead of a new ``save_dir/name``.
        **trainer_overrides: any ``lightning.Trainer`` argument, taking precedence (e.g.
            ``limit_train_batches=5``); ``callbacks`` are added to the default ones.

    Returns:
        The Trainer.

    Raises:
        ConfigError: devices that do not exist, a batch that does not split over the devices,
            ``num_nodes > 1`` without a launcher, an optional logger that is not installed, a
            run folder that cannot be created.
        MissingDependencyError: what the export after fit needs is missing (TensorRT for
            ``export: engine``, onnx, onnxruntime).
    """
    install_fallback_handler()  # a notebook that set up no logging still sees the lines and the summary
    if cfg.ptq or cfg.qat or cfg.trt_quant:
        # A missing backend, the fake pytorch-quantization 2.2.x or a bad method fail here,
        # before the run folder exists (trt_quant runs PTQ first when ptq is off).
        check_quant_config(cfg.replace(ptq=cfg.ptq or not cfg.qat))
    check_export_dependencies(cfg)
    logger_classes = _logger_classes(cfg)
    hardware = resolve_devices(cfg)
    world_size = hardware.pop("world_size")
    check_batch_split(cfg.batch, world_size)
    extra_callbacks = list(trainer_overrides.pop("callbacks", []) or [])
    kwargs: dict[str, Any] = {
        **hardware,
        "strategy": resolve_strategy(world_size),
        "precision": resolve_precision(cfg, hardware["accelerator"]),
        "max_epochs": cfg.epochs,
        "deterministic": cfg.deterministic or None,
        "sync_batchnorm": resolve_sync_bn(cfg, hardware["accelerator"], world_size),
        # The module logs epoch means itself; per-step logging only feeds the bar. 1 also keeps
        # Lightning from warning about epochs shorter than the interval (a whole-graph batch).
        "log_every_n_steps": 1,
        "enable_model_summary": True,
    }
    kwargs.update(trainer_overrides)
    kwargs["plugins"] = with_slurm_requeue(with_atomic_checkpoint_io(kwargs.get("plugins")), cfg.requeue)

    rank_zero = is_rank_zero_process()
    save_dir_made = run_dir is None and rank_zero and not Path(cfg.save_dir).exists()
    if run_dir is not None:
        run_dir = Path(run_dir)
        created = rank_zero and not run_dir.exists()
    else:
        run_dir, created = resolve_run_dir(cfg)
    cleanup = EmptyRunCleanup(run_dir, cfg.save_dir if save_dir_made else None) if created else None
    cfg.run_dir, cfg.world_size = str(run_dir), world_size
    kwargs.setdefault("default_root_dir", str(run_dir))
    try:
        return _trainer_in(cfg, run_dir, kwargs, logger_classes, extra_callbacks, cleanup)
    except BaseException:
        if cleanup is not None:
            cleanup.remove()
        raise


def with_slurm_requeue(plugins: list[Any], requeue: bool) -> list[Any]:
    """A Trainer's plugins plus, under SLURM, Lightning's ``SLURMEnvironment`` with
    ``auto_requeue=requeue`` (Lightning's own default would requeue every SLURM job on its
    signal); unchanged when a cluster environment is given or SLURM is not detected."""
    if not SLURMEnvironment.detect() or any(isinstance(p, ClusterEnvironment) for p in plugins):
        return plugins
    return [*plugins, SLURMEnvironment(auto_requeue=requeue)]


def _trainer_in(
    cfg: Config, run_dir: Path, kwargs: dict[str, Any], logger_classes: dict[str, type],
    extra_callbacks: list[Callback], cleanup: EmptyRunCleanup | None,
) -> L.Trainer:
    """The rest of :func:`build_trainer`, once the run folder is decided."""
    progress = resolve_progress(cfg.progress) if kwargs.get("enable_progress_bar", True) is not False else "off"
    if progress == "off":
        kwargs["enable_progress_bar"] = False
    summary = kwargs.get("enable_model_summary") is not False
    kwargs["enable_model_summary"] = False  # ours prints it (Lightning would add its own and say so)
    callbacks = [RunDirSync(cfg), *default_callbacks(cfg, progress, kwargs["accelerator"], summary), *extra_callbacks]
    if cleanup is not None:
        callbacks.append(cleanup)  # last: after the interruption callback may have saved a file
    if is_rank_zero_process():  # only rank 0 creates folders; Lightning's launcher hands the run's to workers
        (run_dir / "weights").mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run_dir)
        os.environ[RUN_DIR_ENV] = str(run_dir)
    if kwargs.get("logger", True) in (True, None):  # Lightning's default logger: ours, in the run folder
        kwargs["logger"] = _loggers(cfg, run_dir, logger_classes)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return L.Trainer(callbacks=callbacks, **kwargs)


#: Trainer arguments the engine sets from flat keys: the key to use instead.
ENGINE_OWNED_TRAINER_ARGS = {
    "accumulate_grad_batches": "nbs (accumulate = max(round(nbs / batch), 1), ramped during warmup)",
    "gradient_clip_val": "grad_clip",
    "gradient_clip_algorithm": "grad_clip (the gradient norm is clipped)",
    "max_epochs": "epochs",
    "default_root_dir": "save_dir and name",
    "accelerator": "device (cpu, a GPU id list, or empty for auto)",
    "devices": "device or devices",
    "num_nodes": "num_nodes",
    "sync_batchnorm": "sync_bn",
    "deterministic": "deterministic",
}
#: Packages a Trainer option needs: (what the option names, the module, the pip install).
_NEEDS_PACKAGE = (
    ("deepspeed", "deepspeed", "pip install deepspeed"),
    ("MLFlowLogger", "mlflow", "pip install mlflow"),
    ("WandbLogger", "wandb", 'pip install "lightrainer[wandb]"'),
    ("CometLogger", "comet_ml", "pip install comet-ml"),
    ("NeptuneLogger", "neptune", "pip install neptune"),
    ("TensorBoardLogger", "tensorboard", 'pip install "lightrainer[tensorboard]"'),
    ("xla", "torch_xla", "pip install torch_xla"),
    ("transformer-engine", "transformer_engine", "pip install transformer-engine"),
)


def _names_in(value: Any) -> list[str]:
    """The strings and class paths a Trainer option's value names."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [str(value.get("class_path", ""))]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names_in(item)]
    return []


def trainer_arg_problems(cfg: Config, trainer_args: dict[str, Any]) -> list[str]:
    """What is wrong with the ``trainer:`` arguments of a config, before anything is built.

    A pure decision: the engine's own arguments (with the key to use instead; ``max_epochs``
    only when it differs from ``epochs``), and strategies, loggers, profilers and precisions
    whose package or device is missing (naming what to install or the device needed).

    Returns:
        One message per problem (empty: nothing wrong).
    """
    problems = []
    for key, use in ENGINE_OWNED_TRAINER_ARGS.items():
        if key not in trainer_args or (key == "max_epochs" and trainer_args[key] == cfg.epochs):
            continue
        problems.append(f"trainer.{key} is set by lightrainer from its own key: use {use} instead")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for key in ("strategy", "logger", "profiler", "precision", "plugins"):
        for name in _names_in(trainer_args.get(key)):
            for marker, module, install in _NEEDS_PACKAGE:
                if marker.lower() in name.lower() and importlib.util.find_spec(module) is None:
                    problems.append(f"trainer.{key}: {name} needs the {module} package: {install}")
            if key == "strategy" and "fsdp" in name.lower() and not gpus:
                problems.append(f"trainer.strategy: {name} needs CUDA GPUs (this machine has none): drop it")
            if key == "precision" and name.startswith("16") and not gpus:
                problems.append(f"trainer.precision: {name} needs a CUDA GPU; on the CPU use bf16-mixed (amp: bf16) or 32-true")
    return problems
