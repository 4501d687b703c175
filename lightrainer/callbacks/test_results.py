"""``test_results.csv`` and ``test_results.md`` after ``lightrainer test``: the task's own table
(classification: precision, recall, F1 and support per class) or its logged test metrics."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from lightrainer.io import atomic_write
from lightrainer.tables import csv_text, markdown_table
from lightrainer.task import TestReport

log = logging.getLogger(__name__)


def format_cell(value: Any, digits: str = ".6g") -> str:
    """A value of test_results.csv or predictions.csv: floats to ``digits``, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, digits)
    return str(value)


def _md_cell(value: Any) -> str:
    return format_cell(value, ".4f")


def results_markdown(metrics: dict[str, float], report: TestReport, about: dict[str, Any]) -> str:
    """``test_results.md``: what was scored, the logged metrics, the task's table, its pictures."""
    text = "# Test results\n\n"
    text += "".join(f"- {key}: {value}\n" for key, value in about.items() if value is not None)
    text += "\n## Metrics\n\n" + markdown_table([{"metric": k, "value": v} for k, v in metrics.items()], _md_cell)
    if report.rows:
        text += "\n## Per class\n\n" + markdown_table(report.rows, _md_cell)
    if report.pictures:
        text += "\n" + "".join(f"![{Path(p).stem}]({Path(p).name})\n" for p in report.pictures)
    return text


class TestResults(Callback):
    """After a test epoch: ``test_results.csv`` (the task's :class:`~lightrainer.task.TestReport`
    table, else one row of the logged test metrics) and ``test_results.md`` (what was scored, the
    metrics, the table, links to the task's pictures) in the run folder, by rank 0.

    The task's ``test_report`` runs on every rank (its metrics sync over all of them).

    Args:
        source: the checkpoint or weights file that was tested, named in the markdown.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, source: Optional[str | os.PathLike] = None) -> None:
        self.source = None if source is None else str(source)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_test_end, not ..._epoch_end: only here are the epoch's metrics in callback_metrics.
        run_dir = Path(getattr(getattr(pl_module, "cfg", None), "run_dir", None) or trainer.default_root_dir)
        hook = getattr(pl_module, "test_report", None)
        report = hook(run_dir) if callable(hook) else TestReport()
        if not trainer.is_global_zero:
            return
        metrics = {k.split("/", 1)[1]: float(v) for k, v in sorted(trainer.callback_metrics.items())
                   if k.startswith("test/")}
        datamodule = trainer.datamodule
        split = datamodule.scored_split() if hasattr(datamodule, "scored_split") else None
        about = {"weights": self.source, "split": split if split != "val" else "val (no test split: test_split is 0)",
                 "samples": _samples(datamodule, split), "devices": trainer.world_size}
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "test_results.csv", csv_text(report.rows or [metrics], format_cell))
        atomic_write(run_dir / "test_results.md", results_markdown(metrics, report, about))
        log.info("test results: %s, %s", run_dir / "test_results.md", run_dir / "test_results.csv")


def _samples(datamodule: Any, split: Optional[str]) -> Optional[int]:
    data = datamodule.split_data(split) if split is not None and hasattr(datamodule, "split_data") else None
    if data is None:
        return None
    return len(data[0] if isinstance(data, tuple) else data)
