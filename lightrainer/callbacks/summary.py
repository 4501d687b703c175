"""The closing summary of a fit (Ultralytics' end of training): how long, why it stopped, the best
epoch, ``weights/best.pt`` validated again, where the files are and what to run next.

The decisions and the text are small pure functions (:func:`stop_reason`, :func:`best_epoch`,
:func:`summary_lines`), tested without a Trainer; :class:`RunSummary` gathers their inputs.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping

from lightrainer.callbacks.checkpoint import fitness_of, improves
from lightrainer.callbacks.progress import format_duration, format_metrics
from lightrainer.callbacks.results import ResultsCSV
from lightrainer.quant.workflow import evaluate
from lightrainer.weights import apply_weights, load_weights

log = logging.getLogger(__name__)


def stop_reason(epochs_run: int, max_epochs: int, early_stopped: bool = False, patience: int = 0,
                monitor: str = "", interrupted: str | None = None) -> str:
    """Why a fit ended, in words. A pure decision.

    Args:
        epochs_run: epochs completed.
        max_epochs: the run's ``epochs``.
        early_stopped: early stopping asked the fit to stop.
        patience: early stopping's patience.
        monitor: the fitness metric.
        interrupted: the signal or exception that interrupted the fit (None: it was not).
    """
    if interrupted:
        return f"interrupted ({interrupted})"
    if early_stopped:
        return f"early stopping: {monitor} did not improve for {patience} epochs (patience: {patience})"
    if epochs_run >= max_epochs:
        return f"reached epochs: {max_epochs}"
    return "stopped by a callback or a Trainer limit (e.g. max_time, max_steps)"


def best_epoch(rows: Sequence[Mapping[str, Any]], monitor: str, mode: str) -> tuple[int, float] | None:
    """(epoch, fitness) of the best row of results.csv: the first epoch that reached the best
    value in direction ``mode``, as the best checkpoint is chosen (None: no row has it)."""
    best: tuple[int, float] | None = None
    for row in rows:
        value = row.get(monitor)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if improves(float(value), None if best is None else best[1], mode):
            best = (int(row["epoch"]), float(value))
    return best


def next_commands(run_dir: str | os.PathLike) -> list[str]:
    """What a user runs next on a finished run: test its best weights, export them."""
    best = shlex.quote(str(Path(run_dir) / "weights" / "best.pt"))
    return [f"lightrainer test --ckpt_path {best}", f"lightrainer export --weights {best}"]


def summary_lines(
    *, run_dir: str | os.PathLike, epochs_run: int, max_epochs: int, seconds: float, reason: str, monitor: str,
    mode: str, best: tuple[int, float] | None, revalidated: Mapping[str, float] | None = None,
    revalidation_seconds: float = 0.0, files: Sequence[tuple[str, int]] = (), finished: bool = True,
) -> list[str]:
    """The closing summary, line by line. A pure function of what the run did.

    Args:
        run_dir: the run folder.
        epochs_run: epochs completed (a resumed run counts its earlier epochs).
        max_epochs: the run's ``epochs``.
        seconds: training time over the whole run.
        reason: :func:`stop_reason`.
        monitor: the fitness metric; ``mode`` its direction ("max" | "min").
        best: :func:`best_epoch`.
        revalidated: the metrics of ``weights/best.pt`` validated again (None: not done).
        revalidation_seconds: how long that took.
        files: (path relative to the run folder, bytes) of the weights files.
        finished: the fit ended normally (the next commands are shown).
    """
    lines = [f"{epochs_run}/{max_epochs} epochs in {format_duration(seconds)}; stopped: {reason}"]
    direction = "higher" if mode == "max" else "lower"
    if best is None:
        lines.append(f"best epoch: none ({monitor} was never logged)")
    else:
        lines.append(f"best epoch: {best[0]}, {monitor} {best[1]:.4g} (fitness, {direction} is better)")
    if revalidated is not None:
        lines.append(f"weights/best.pt validated again in {format_duration(revalidation_seconds)}: "
                     f"{format_metrics(revalidated)}")
    lines.append(f"results: {run_dir}")
    if files:
        lines.append("  " + ", ".join(f"{name} ({size / 1e6:.2g} MB)" for name, size in files))
    if finished and any(name == "weights/best.pt" for name, _ in files):
        lines.append("next:")
        lines += [f"  {command}" for command in next_commands(run_dir)]
    return lines


def weights_files(run_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """(``weights/NAME``, bytes) of a run's files for users: its .pt files and exports (not .ckpt)."""
    folder = Path(run_dir) / "weights"
    if not folder.is_dir():
        return []
    return [(f"weights/{p.name}", p.stat().st_size) for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix != ".ckpt"]


def _limit(limit: int | float, loader: Any) -> int | None:
    """Batches of ``loader`` that ``limit_val_batches`` allows (None: all)."""
    if isinstance(limit, int):
        return limit
    if limit >= 1.0:
        return None
    try:
        return max(int(math.ceil(limit * len(loader))), 1)
    except TypeError:  # an iterable without a length
        return None


class RunSummary(Callback):
    """Logs the closing summary of a fit on global rank 0 (see :func:`summary_lines`).

    At the end of the fit, ``weights/best.pt`` is loaded into a copy of the network and validated
    again on rank 0, on the training device and precision, over the validation data
    (``limit_val_batches`` respected; under DDP the whole set on rank 0, the other ranks wait for
    nothing): the file a user ships is proven to load and to score as recorded. An interrupted
    fit gets the summary of what it did, without the validation.

    Args:
        results: the run's results.csv writer (rows and training time).
        early_stopping: the run's early stopping, if any.
    """

    def __init__(self, results: ResultsCSV, early_stopping: EarlyStopping | None = None) -> None:
        self.results = results
        self.early_stopping = early_stopping
        self.revalidated: dict[str, float] | None = None
        self._revalidation_seconds = 0.0
        self._fitted = False

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.fast_dev_run:
            best = Path(self.results.path).parent / "weights" / "best.pt"
            self._revalidation_seconds, self.revalidated = self._revalidate(trainer, pl_module, best)
            self._fitted = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end (and the files they write): the summary closes the output.
        if stage == "fit" and self._fitted:
            self._fitted = False
            self._log(trainer, pl_module, interrupted=None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero or not isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return  # any other error is reported by itself
        name = "SIGTERM" if isinstance(exception, SystemExit) else "KeyboardInterrupt"
        self._log(trainer, pl_module, interrupted=name)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, interrupted: str | None) -> None:
        monitor, mode = fitness_of(pl_module)
        run_dir = Path(self.results.path).parent
        rows = self.results.rows
        epochs_run = int(rows[-1]["epoch"]) if rows else 0
        stopper = self.early_stopping
        reason = stop_reason(epochs_run, trainer.max_epochs, bool(stopper and stopper.stopped_epoch),
                             stopper.patience if stopper else 0, monitor, interrupted)
        lines = summary_lines(
            run_dir=run_dir, epochs_run=epochs_run, max_epochs=trainer.max_epochs, seconds=self.results.elapsed,
            reason=reason, monitor=monitor, mode=mode, best=best_epoch(rows, monitor, mode),
            revalidated=self.revalidated if interrupted is None else None,
            revalidation_seconds=self._revalidation_seconds, files=weights_files(run_dir),
            finished=interrupted is None,
        )
        for line in lines:
            log.info("%s", line)

    @staticmethod
    def _revalidate(trainer: L.Trainer, pl_module: L.LightningModule, path: Path) -> tuple[float, dict | None]:
        """(seconds, metrics) of ``path`` validated again on rank 0 (None: no file or no val data)."""
        if not path.is_file() or not hasattr(pl_module, "step") or trainer.datamodule is None:
            return 0.0, None
        start = time.monotonic()
        state = load_weights(path)["model"]
        if set(state) != set(pl_module.net.state_dict()):
            return 0.0, None  # a task that saves part of its network (weights_state_dict): no network to load it into
        # The fit's teardown moved the module to the CPU: validate on the training device.
        device = trainer.strategy.root_device
        net = copy.deepcopy(pl_module.net)
        apply_weights(net, state, path)
        net.to(device)
        loader = trainer.datamodule.val_dataloader()
        limit = _limit(trainer.limit_val_batches, loader)
        batches = loader if limit is None else itertools.islice(loader, limit)
        original = pl_module.device
        pl_module.to(device)
        try:
            with trainer.precision_plugin.forward_context():
                metrics = evaluate(pl_module, net, batches)
        finally:
            pl_module.to(original)
        return time.monotonic() - start, metrics
