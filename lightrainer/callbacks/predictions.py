"""``predictions.csv`` (and the task's images) from ``lightrainer predict``, over every rank."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightrainer.callbacks.test_results import format_cell
from lightrainer.io import atomic_path, atomic_write
from lightrainer.tables import csv_text

log = logging.getLogger(__name__)

#: The folder of the task's predicted images, inside the run folder.
IMAGES_DIR = "predictions"


def sample_positions(trainer: L.Trainer, batch_idx: int, n: int, served: int) -> list[int]:
    """Positions in the predicted split of the ``n`` samples of this rank's batch ``batch_idx``.

    A lightrainer loader says which samples each batch holds (under DDP too); a torch DataLoader
    through Lightning's batch indices; else (one process) the samples served so far.
    """
    loader = trainer.predict_dataloaders
    if hasattr(loader, "sample_indices"):
        return loader.sample_indices(batch_idx).tolist()
    indices = list(getattr(trainer.predict_loop, "current_batch_indices", []) or [])
    return indices if len(indices) == n else list(range(served, served + n))


def _values(column: Any, n: int) -> list[Any]:
    if isinstance(column, Tensor):
        column = column.detach().cpu()
        return column.tolist() if column.dim() == 1 else [" ".join(map(str, row)) for row in column.tolist()]
    values = list(column)
    if len(values) != n:
        raise ValueError(f"prediction_columns: a column has {len(values)} values for {n} samples")
    return values


def save_image(image: Tensor, path: Path) -> Path:
    """A (C, H, W) image in [0, 1] as a PNG, written atomically."""
    import matplotlib.image

    array = image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy()
    gray = array.shape[2] == 1
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, array[..., 0] if gray else array, cmap="gray" if gray else None,
                                vmin=0, vmax=1, format="png")
    return path


class PredictionWriter(Callback):
    """Writes ``predictions.csv`` into the run folder at the end of predict: a row per sample, in
    the order of the predicted split, with the sample's id (its index in the data set, or its
    file) and the task's ``prediction_columns``; the task's ``prediction_images`` are saved as
    ``predictions/<id>.png`` (each rank saves its own) and named in an ``image`` column.

    Every rank predicts its share; rank 0 gathers the rows and writes the file.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._served = 0
        self._ids: Optional[Sequence[Any]] = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self._served, self._ids = [], 0, _sample_ids(trainer.datamodule)

    def on_predict_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        n = int(pl_module.example_input(batch).shape[0]) if hasattr(pl_module, "example_input") else len(batch[0])
        positions = sample_positions(trainer, batch_idx, n, self._served)
        self._served += n
        ids = self._ids
        columns = pl_module.prediction_columns(outputs, batch) if hasattr(pl_module, "prediction_columns") else {}
        values = {name: _values(column, n) for name, column in columns.items()}
        images = pl_module.prediction_images(outputs, batch) if hasattr(pl_module, "prediction_images") else None
        run_dir = _run_dir(trainer, pl_module)
        for i, position in enumerate(positions):
            sample = ids[position] if ids is not None else position
            key = "file" if isinstance(sample, (str, os.PathLike)) else "index"
            row: dict[str, Any] = {"position": position, key: sample}
            row.update({name: column[i] for name, column in values.items()})
            if images is not None:
                name = _image_name(position, sample)
                save_image(images[i], run_dir / IMAGES_DIR / name)
                row["image"] = f"{IMAGES_DIR}/{name}"
            self.rows.append(row)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.rows
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[Optional[list[dict[str, Any]]]] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, rows)
            rows = [row for part in everyone for row in (part or [])]
        if not trainer.is_global_zero:
            return
        rows = sorted(rows, key=lambda r: r["position"])
        for row in rows:
            del row["position"]
        path = _run_dir(trainer, pl_module) / "predictions.csv"
        atomic_write(path, csv_text(rows, format_cell))
        log.info("predictions of %d samples: %s", len(rows), path)


def _run_dir(trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
    return Path(getattr(getattr(pl_module, "cfg", None), "run_dir", None) or trainer.default_root_dir)


def _sample_ids(datamodule: Any) -> Optional[Sequence[Any]]:
    """The ids of the samples of the split being predicted, or None (their positions name them)."""
    ids = getattr(datamodule, "sample_ids", None)
    if not isinstance(ids, dict):
        return None
    split = "predict" if getattr(datamodule, "predict_data", None) is not None else datamodule.scored_split()
    found = ids.get(split)
    return None if found is None else [int(i) if isinstance(i, (np.integer, int)) else i for i in found]


def _image_name(position: int, sample: Any) -> str:
    if isinstance(sample, (str, os.PathLike)):
        return f"{position:06d}_{Path(sample).stem}.png"  # two files of one name in different folders
    return f"{int(sample):06d}.png"
