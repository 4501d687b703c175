"""The model table printed when a fit starts: the task's layers, without its bookkeeping.

Lightning's own table lists every child of the module, the containers of running means and
metrics included (``_stage_means``, ``metrics``: no parameters, nothing a user built), and a
FLOPs column that is 0 unless the module defines ``example_input_array``; its rich version draws
box characters into log files. This one is plain text, a line a row, and leaves those out.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning as L
import torchmetrics
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import nn

log = logging.getLogger(__name__)

_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.Sequential, torchmetrics.MetricCollection)


def bookkeeping_children(module: nn.Module) -> set[str]:
    """The direct children of ``module`` that only keep score: no parameters, and nothing inside
    but torchmetrics Metrics and empty containers (a task's running means and metrics)."""
    hidden = set()
    for name, child in module.named_children():
        if any(True for _ in child.parameters()):
            continue
        if all(isinstance(m, (torchmetrics.Metric, *_CONTAINERS)) for m in child.modules()):
            hidden.add(name)
    return hidden


def format_model_table(columns: Sequence[tuple[str, Sequence[str]]], hidden: set[str], total_params: int,
                       trainable_params: int, size_mb: float, total_flops: int) -> list[str]:
    """The lines of the model table: a header, a row per shown layer, and one line of totals.

    Args:
        columns: (header, values) of Lightning's summary data (``Name``, ``Type``, ``Params``, ...).
        hidden: names of the rows to leave out.
        total_params, trainable_params: parameter counts.
        size_mb: the parameters' size in MB.
        total_flops: FLOPs of one forward pass (0: not measured; neither column nor total shown).
    """
    table = {name: list(values) for name, values in columns}
    keep = [i for i, name in enumerate(table.get("Name", [])) if name not in hidden]
    shown = [(name, [values[i] for i in keep]) for name, values in columns
             if name.strip() and not (name == "FLOPs" and not total_flops)]
    widths = [max([len(name), *(len(v) for v in values)]) for name, values in shown]
    lines = ["  ".join(f"{name:<{w}}" for (name, _), w in zip(shown, widths)).rstrip()]
    for row in range(len(keep)):
        lines.append("  ".join(f"{values[row]:<{w}}" for (_, values), w in zip(shown, widths)).rstrip())
    frozen = total_params - trainable_params
    totals = f"{get_human_readable_count(total_params)} params ({size_mb:,.3f} MB)"
    if frozen:
        totals += f", {get_human_readable_count(frozen)} not trainable"
    if total_flops:
        totals += f", {get_human_readable_count(total_flops)} FLOPs a forward pass"
    return lines + [totals]


class LightrainerModelSummary(ModelSummary):
    """Lightning's ``ModelSummary`` (depth 1), written as :func:`format_model_table` lines."""

    def __init__(self) -> None:
        super().__init__(max_depth=1)
        self._hidden: set[str] = set()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hidden = bookkeeping_children(pl_module)
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        for line in format_model_table(summary_data, self._hidden, total_parameters, trainable_parameters,
                                       model_size, total_flops):
            log.info("%s", line)
