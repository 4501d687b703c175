"""Checkpoints of a run: Lightning ``.ckpt`` for resuming and the seed's ``.pt`` weights files.

Every file goes through :mod:`lightrainer.io` (the ``.ckpt`` files through the
:class:`AtomicCheckpointIO` plugin the Trainer is built with), so a kill at any moment leaves
either the previous complete file or the new one under the final name. Only Lightning's public
API is used: the :class:`~lightning.pytorch.callbacks.Checkpoint` base, ``trainer.save_checkpoint``
and the ``CheckpointIO`` plugin.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightrainer.errors import TrainingDiverged
from lightrainer.record import class_path_of, run_record
from lightrainer.io import atomic_torch_save
from lightrainer.version import __version__

log = logging.getLogger(__name__)


def nan_entries(obj: Any, prefix: str = "") -> list[str]:
    """Where a nested checkpoint (dicts, lists, tuples of tensors and values) holds NaN: the
    dotted names of its floating tensors with a NaN. NaN has no legitimate use in a saved state."""
    if isinstance(obj, Tensor):
        floating = obj.is_floating_point() or obj.is_complex()
        return [prefix or "tensor"] if floating and bool(torch.isnan(obj.detach()).any()) else []
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return []
    return [name for key, value in items for name in nan_entries(value, f"{prefix}.{key}" if prefix else str(key))]


def non_finite_tensors(pl_module: nn.Module) -> list[str]:
    """The module's parameters that are not finite and its buffers that hold NaN (a buffer may
    hold inf on purpose, as an attention mask does), the EMA weights' included."""
    modules = [("", pl_module)]
    ema = getattr(pl_module, "ema", None)
    if isinstance(getattr(ema, "module", None), nn.Module):
        modules.append(("ema.", ema.module))
    bad = []
    for prefix, module in modules:
        for name, value in module.state_dict(keep_vars=True).items():
            if not isinstance(value, Tensor) or not (value.is_floating_point() or value.is_complex()):
                continue
            data = value.detach()
            broken = ~torch.isfinite(data).all() if isinstance(value, nn.Parameter) else torch.isnan(data).any()
            if bool(broken):
                bad.append(prefix + name)
    return bad


def trained_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The entries of a Lightning checkpoint that hold the trained state: the weights, the
    optimizer's state, lightrainer's pending gradients and EMA (not the metrics that the loops and
    callbacks record, which may be NaN legitimately)."""
    own = checkpoint.get("lightrainer") if isinstance(checkpoint.get("lightrainer"), dict) else {}
    state = {k: checkpoint[k] for k in ("state_dict", "optimizer_states") if k in checkpoint}
    state.update({f"lightrainer.{k}": own[k] for k in ("pending_grads", "ema") if own.get(k) is not None})
    return state


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def weights_payload(trainer: L.Trainer, pl_module: L.LightningModule, best_fitness: float | None) -> dict[str, Any]:
    """The seed's weights file: epoch, best_fitness, model weights, date (+ config), with
    ``"optimizer": None`` (Ultralytics' stripped file): the seed's key is kept, but the state is not
    written, since resuming reads ``last.ckpt`` and never a ``.pt`` file. The file holds what a user
    ships, about a third of the size for Adam, and every epoch writes that much less."""
    return {
        "epoch": trainer.current_epoch,
        "best_fitness": best_fitness,
        "model": {k: v.detach().cpu() for k, v in pl_module.weights_state_dict().items()},
        "optimizer": None,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        # The task, network and datamodule classes with their arguments, and the config: every
        # command re-opens the run from this file alone (lightrainer.build.rebuild).
        "run": run_record(pl_module, getattr(trainer, "datamodule", None), pl_module.cfg.to_dict()),
        "config": pl_module.cfg.to_dict(),
        "task": class_path_of(type(pl_module)),
        "version": __version__,
    }


def fitness_of(pl_module: L.LightningModule) -> tuple[str, str]:
    """The module's (fitness metric, mode); plain LightningModules select on val/loss."""
    return getattr(pl_module, "fitness_monitor", ("val/loss", "min"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint writer, writing local files through
    :func:`lightrainer.io.atomic_torch_save` (temporary file, fsync, rename): a kill or a power
    loss while a ``.ckpt`` is written leaves the previous complete file. Remote (fsspec URL)
    paths and ``storage_options`` go to Lightning's own writer.

    A checkpoint that holds NaN anywhere (weights, optimizer state, pending gradients) is not
    written: the error is logged and the previous file is kept.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None
    ) -> None:
        nan = nan_entries(trained_state(checkpoint))
        if nan:
            log.error("%s is not written: the state holds NaN (%s); the previous file is kept", path, _listed(nan))
            return
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """A Trainer's ``plugins`` argument (None, one plugin or a list) plus :class:`AtomicCheckpointIO`,
    unless it already holds a ``CheckpointIO`` (a user's own writer is kept: Lightning takes one)."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def improves(current: float, best: float | None, mode: str) -> bool:
    """Whether the fitness ``current`` beats ``best`` in direction ``mode`` ("min" | "max").

    The first value (``best`` None) always wins, so a run that validated has a best file; NaN
    never beats a number, and any number beats a NaN best.
    """
    if best is None or (math.isnan(best) and not math.isnan(current)):
        return True
    return current < best if mode == "min" else current > best


class RunCheckpoint(Checkpoint):
    """``weights/last.ckpt``/``last.pt`` every epoch, ``best.ckpt``/``best.pt`` when the fitness
    improved, all written atomically.

    The best epoch is selected on the module's fitness (:func:`fitness_of`, read when the fit
    starts), so the same Trainer serves any task. Saves once per training epoch, after the
    module's own epoch-end hook, even when the epoch made no optimizer step; never outside a fit
    or under ``fast_dev_run``. Every rank assembles the checkpoint (the module's
    ``on_save_checkpoint`` runs collectives under DDP); rank 0 writes. The best score is part of
    the checkpoint, so a resumed run keeps it.

    A model whose parameters are not finite (or whose buffers hold NaN) is never saved: the run
    stops with :class:`~lightrainer.errors.TrainingDiverged` and the files of the last finite
    epoch stay.

    Args:
        dirpath: the run's ``weights`` folder.

    Attributes:
        best_model_score: the best fitness so far (None before the first validated epoch).
        best_model_path: ``best.ckpt`` once written (what ``ckpt_path="best"`` loads), else "".
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.monitor, self.mode = "val/loss", "min"
        self.best_model_score: float | None = None

    @property
    def best_model_path(self) -> str:
        return str(self.dirpath / "best.ckpt") if self.best_model_score is not None else ""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Under torchrun/SLURM another rank may hold a provisional folder: rank 0's is the run's.
        self.dirpath = Path(trainer.strategy.broadcast(str(self.dirpath), src=0))
        self.monitor, self.mode = fitness_of(pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            rank_zero_warn(
                f"{self.dirpath / 'best.ckpt'} is not updated: the fitness metric {self.monitor!r} was not logged "
                f"(logged: {sorted(trainer.callback_metrics)}); log it in validation or choose another fitness"
            )
        current = None if value is None else float(value)
        better = current is not None and improves(current, self.best_model_score, self.mode)
        broken = non_finite_tensors(pl_module) if trainer.is_global_zero else []
        # Rank 0 decides, so that every rank calls save_checkpoint (a collective) the same times.
        better, current, broken = trainer.strategy.broadcast((better, current, broken), src=0)
        if broken:
            # Training cannot make these finite again, and no later state could be saved.
            raise TrainingDiverged(
                f"epoch {trainer.current_epoch + 1}: the model's state is not finite ({_listed(broken)}); it is not "
                f"saved, and {self.dirpath} keeps the last finite checkpoints. Lower lr0 (or raise warmup_epochs) "
                "or look for NaN/inf in the data"
            )
        if better:
            self.best_model_score = current
            self._save(trainer, pl_module, "best")
        self._save(trainer, pl_module, "last")
        trainer.strategy.barrier()

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        # weights_only=False: the full training state (Lightning logs a line per save otherwise).
        trainer.save_checkpoint(self.dirpath / f"{name}.ckpt", weights_only=False)
        if trainer.is_global_zero:
            atomic_torch_save(weights_payload(trainer, pl_module, self.best_model_score), self.dirpath / f"{name}.pt")

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, "best_model_score": self.best_model_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A run resumed under another fitness (or direction) starts its best afresh.
        if (state_dict.get("monitor"), state_dict.get("mode")) == (self.monitor, self.mode):
            self.best_model_score = state_dict.get("best_model_score")


class RandomState(L.Callback):
    """Saves every rank's random generators (Python, NumPy, torch CPU and CUDA) in the checkpoint
    and restores them on resume, so dropout and other random layers continue as if never stopped.

    Stored as tensors and plain values only: the checkpoint stays ``weights_only``-loadable.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        local = {
            "python": [list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        # Every rank calls this while the checkpoint is assembled; rank 0 writes all ranks' states.
        gathered = [local]
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
        checkpoint["rng_states"] = gathered

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        import random

        import numpy as np

        states = checkpoint.get("rng_states")
        if not states:
            return
        state = states[trainer.global_rank] if trainer.global_rank < len(states) else states[0]
        internal, gauss_next = state["python"]
        random.setstate((3, tuple(internal), gauss_next))
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
