"""Per-layer quantization sensitivity: which layers to keep in float.

For each quantized layer, with only that layer quantized:
- ``layer_sqnr_db``: SQNR of the layer's own output (float vs quantized, same float input);
- ``output_sqnr_db``: SQNR of the network's output.
Sorted worst (lowest output SQNR) first; written as CSV and a bar chart.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from lightrainer.io import atomic_write
from lightrainer.plots import _pyplot, save_figure
from lightrainer.quant.base import iter_quantizers

log = logging.getLogger(__name__)


@dataclass
class LayerSensitivity:
    """One row of the report."""

    layer: str
    layer_sqnr_db: float
    output_sqnr_db: float


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-30) / noise)


def _layers(net: nn.Module) -> dict[str, list[nn.Module]]:
    layers: dict[str, list[nn.Module]] = {}
    for name, quantizer in iter_quantizers(net):
        if not getattr(quantizer, "_disabled", False) and hasattr(quantizer, "_amax"):
            layers.setdefault(name.rpartition(".")[0], []).append(quantizer)
    return layers


def _main_output(output: Tensor | tuple | list) -> Tensor:
    """The first tensor of a network output (a VQ-VAE returns (reconstruction, loss, perplexity))."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _set(quantizers: list[nn.Module], on: bool) -> None:
    for quantizer in quantizers:
        quantizer.enable() if on else quantizer.disable()


@torch.no_grad()
def quant_sensitivity(net: nn.Module, inputs: Iterable[Tensor], num_batches: int | None = 4) -> list[LayerSensitivity]:
    """Rank the quantized layers of a calibrated ``net`` by the error each introduces alone.

    Args:
        net: a calibrated quantized network.
        inputs: network inputs (validation batches).
        num_batches: batches to use (None = all).

    Returns:
        One :class:`LayerSensitivity` per quantized layer, worst first.
    """
    layers = _layers(net)
    everything = [q for qs in layers.values() for q in qs]
    device = next(net.parameters()).device
    batches = [x.to(device) for x in itertools.islice(inputs, num_batches)]
    was_training = net.training
    net.eval()
    layer_power = {name: [0.0, 0.0] for name in layers}
    output_power = {name: [0.0, 0.0] for name in layers}
    inside: list[str] = []

    def hook(name: str):
        # Reruns the layer on its float input with only its own quantizers on.
        def run(module: nn.Module, args: tuple, output: Tensor) -> None:
            if inside:
                return
            inside.append(name)
            try:
                _set(layers[name], True)
                quantized = module(*args)
            finally:
                _set(layers[name], False)
                inside.pop()
            output, quantized = _main_output(output), _main_output(quantized)
            layer_power[name][0] += output.double().pow(2).sum().item()
            layer_power[name][1] += (output.double() - quantized.double()).pow(2).sum().item()

        return run

    handles = [net.get_submodule(name).register_forward_hook(hook(name)) for name in layers]
    try:
        _set(everything, False)
        references = [_main_output(net(x)).double() for x in batches]
        for handle in handles:
            handle.remove()
        handles = []
        for name, quantizers in layers.items():
            _set(quantizers, True)
            for x, reference in zip(batches, references):
                noise = (reference - _main_output(net(x)).double()).pow(2).sum().item()
                output_power[name][0] += reference.pow(2).sum().item()
                output_power[name][1] += noise
            _set(quantizers, False)
    finally:
        for handle in handles:
            handle.remove()
        _set(everything, True)
        net.train(was_training)
    rows = [
        LayerSensitivity(name, _sqnr_db(*layer_power[name]), _sqnr_db(*output_power[name])) for name in layers
    ]
    return sorted(rows, key=lambda row: (row.output_sqnr_db, row.layer_sqnr_db))


def write_sensitivity(rows: list[LayerSensitivity], run_dir: str | os.PathLike, plot: bool = True) -> Path:
    """Write ``quant_sensitivity.csv`` (and ``quant_sensitivity.png``) to ``run_dir``.

    Returns:
        The CSV path.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "quant_sensitivity.csv"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["rank", "layer", "output_sqnr_db", "layer_sqnr_db"])
    for rank, row in enumerate(rows, 1):
        writer.writerow([rank, row.layer, f"{row.output_sqnr_db:.2f}", f"{row.layer_sqnr_db:.2f}"])
    atomic_write(path, table.getvalue())
    if plot and rows:
        _plot(rows, run_dir / "quant_sensitivity.png")
    return path


def _plot(rows: list[LayerSensitivity], path: Path) -> None:
    plt = _pyplot()
    finite = [v for r in rows for v in (r.output_sqnr_db, r.layer_sqnr_db) if math.isfinite(v)]
    cap = (max(finite) if finite else 100.0) + 5
    names = [r.layer for r in rows]
    y = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.45 * len(rows)))
    height = 0.4
    out = [min(r.output_sqnr_db, cap) for r in rows]
    lay = [min(r.layer_sqnr_db, cap) for r in rows]
    ax.barh([i - height / 2 for i in y], out, height, label="network output, only this layer int8", color="#c0392b")
    ax.barh([i + height / 2 for i in y], lay, height, label="this layer's output", color="#7f8c8d")
    for i, value in zip(y, out):
        ax.text(value + 0.3, i - height / 2, f"{value:.1f}", va="center", fontsize=8)
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better")
    ax.set_title("Int8 sensitivity per layer (most sensitive at the top: keep_float candidates)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.4 * len(rows)) - 0.12), ncol=2, fontsize=8, frameon=False)
    ax.set_xlim(0, cap * 1.1)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
