"""Checkpoints of a run: Lightning ``.ckpt`` for resuming and the seed's ``.pt`` weights files.

Every file is written to a temporary name and moved into place with ``os.replace``, so a kill at
any moment leaves either the previous complete file or the new one under the final name.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightrainer


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete file ``tmp`` over ``path``: flushed to disk first, so that neither a
    killed process nor a machine that loses power leaves a partial file under ``path``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if os.name == "posix":  # persist the rename itself
        fd = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_payload(trainer: L.Trainer, pl_module: L.LightningModule, best_fitness: float | None) -> dict[str, Any]:
    """The seed's weights file: epoch, best_fitness, model weights, optimizer state, date (+ config)."""
    optimizers = trainer.optimizers
    return {
        "epoch": trainer.current_epoch,
        "best_fitness": best_fitness,
        "model": {k: v.detach().cpu() for k, v in pl_module.weights_state_dict().items()},
        "optimizer": optimizers[0].state_dict() if optimizers else None,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        # With the model:/data: sections, so `lightrainer export --weights` rebuilds the same task.
        "config": {**pl_module.cfg.to_dict(), **pl_module.cfg.sections},
        "task": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "version": lightrainer.__version__,
    }


def fitness_of(pl_module: L.LightningModule) -> tuple[str, str]:
    """The module's (fitness metric, mode); plain LightningModules select on val/loss."""
    return getattr(pl_module, "fitness_monitor", ("val/loss", "min"))


class RunCheckpoint(ModelCheckpoint):
    """``weights/best.ckpt``/``last.ckpt`` plus ``best.pt``/``last.pt``, all written atomically.

    The best epoch is selected on the module's fitness, read when the fit starts, so the same
    Trainer serves any task.

    Args:
        dirpath: the run's ``weights`` folder.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor="val/loss",
            mode="min",
            save_last=True,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )

    _last_epoch_saved = -1

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        # Once per epoch, even when the epoch made no optimizer step (long accumulation).
        from lightning.pytorch.trainer.states import TrainerFn

        return (
            bool(trainer.fast_dev_run)
            or trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or self._last_epoch_saved == trainer.current_epoch
        )

    def _save_epoch(self, trainer: L.Trainer) -> None:
        # Lightning 2.6 writes last.ckpt only in epochs that improved the best: we want every epoch.
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_epoch_saved = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_epoch(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_epoch(trainer)

    _fitting = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitting = stage == "fit"
        self.monitor, mode = fitness_of(pl_module)
        self.mode = mode
        self.kth_value = torch.tensor(-torch.inf if mode == "max" else torch.inf)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # validate/test/predict with a ckpt_path: no checkpoint is written, so the fit's best/last
        # bookkeeping is not needed (and Lightning would warn that the folder changed, as a new
        # <name>_validate/ run folder always does). Setup runs before the restore.
        if self._fitting:
            super().load_state_dict(state_dict)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # Every rank takes part (the module averages pending gradients); rank 0 writes.
        path = Path(filepath)
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            replace_durably(tmp, path)
            best = self.best_model_score
            payload = weights_payload(trainer, trainer.lightning_module, None if best is None else float(best))
            atomic_torch_save(payload, path.with_suffix(".pt"))
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


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
