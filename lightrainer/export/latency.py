"""Latency table: PyTorch eager, ONNX Runtime FP32 and Q/DQ, TensorRT, at batch 1 and ``batch``."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from lightrainer.export.errors import ExportError
from lightrainer.export.graph import PathLike, read_metadata
from lightrainer.export.verify import ort_session
from lightrainer.io import atomic_write
from lightrainer.export.view import ExportView, cpu_eval

log = logging.getLogger(__name__)


@dataclass
class LatencyRow:
    """One backend at one batch size; ``median_ms`` is None when the backend was skipped."""

    backend: str
    batch: int
    median_ms: float | None
    ms_per_sample: float | None
    samples_per_s: float | None
    note: str = ""


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _row(backend: str, batch: int, seconds: float | None, note: str = "") -> LatencyRow:
    if seconds is None:
        return LatencyRow(backend, batch, None, None, None, note)
    ms = seconds * 1e3
    return LatencyRow(backend, batch, round(ms, 4), round(ms / batch, 4), round(batch / seconds, 1), note)


def _ort_runner(path: PathLike, x: np.ndarray) -> Callable[[], Any]:
    session = ort_session(path)
    feed = {session.get_inputs()[0].name: x}
    return lambda: session.run(None, feed)


def trt_runner(engine_path: PathLike, shape: Sequence[int]) -> tuple[Callable[[], None], dict[str, torch.Tensor], str]:
    """``(run, buffers, input_name)``: ``run()`` executes the engine once on the GPU on the CUDA
    tensors in ``buffers`` (by tensor name; fill ``buffers[input_name]``, read the outputs).
    Needs the TensorRT 8.5+ tensor API."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None or not hasattr(engine, "num_io_tensors"):
        raise ExportError(f"cannot time {engine_path}: needs a loadable engine and TensorRT 8.5 or newer")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    context.set_input_shape(inputs[0], tuple(shape))
    buffers = {}
    for name in names:
        dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        buffers[name] = torch.zeros(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()

    def run() -> None:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()

    return run, buffers, inputs[0]


def _trt_skip_reason(engine_path: PathLike | None) -> str | None:
    if engine_path is None:
        return "no engine given (build one with --format engine)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return 'TensorRT Python API not installed (pip install "lightrainer[trt]")'
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def benchmark_latency(
    net: nn.Module,
    onnx_path: PathLike,
    *,
    batch: int,
    input_shape: Sequence[int] | None = None,
    qdq_path: PathLike | None = None,
    engine_path: PathLike | None = None,
    repeats: int = 50,
    warmup: int = 10,
    threads: int = 1,
    out_dir: PathLike | None = None,
) -> list[LatencyRow]:
    """Median latency of each backend at batch 1 and ``batch`` (CPU backends use ``threads`` threads).

    Args:
        net: the PyTorch network (timed in eval mode on the CPU, the exported method/outputs only).
        onnx_path: the FP32 ONNX model (from :func:`~lightrainer.export.export_onnx`).
        batch: the larger batch size.
        input_shape: (C, H, W) of one input (default: the shape the model was exported with).
        qdq_path: a Q/DQ ONNX model (ONNX Runtime runs it in float: a correctness check, not int8 speed).
        engine_path: a TensorRT engine (timed when TensorRT and a GPU are present).
        repeats: timed calls per measurement.
        warmup: untimed calls before them.
        threads: torch and ONNX Runtime intra-op threads.
        out_dir: write ``latency.csv`` and ``latency.md`` there.

    Returns:
        The rows, one per backend and batch size (skipped backends have a note and no numbers).
    """
    meta = read_metadata(onnx_path)
    if input_shape is None:
        input_shape = json.loads(meta.get("example_shape", "null") or "null")[1:]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[LatencyRow] = []
    try:
        with cpu_eval(net) as cpu_net:
            outputs = json.loads(meta.get("export_outputs", "null") or "null")
            view = ExportView(cpu_net, meta.get("export_method", "forward"), outputs)
            for b in sorted({1, batch}):
                x = torch.randn(b, *input_shape)
                rows.append(_row("pytorch-eager", b, median_seconds(lambda: view(x), repeats, warmup)))
                rows.append(_row("onnxruntime-fp32", b, median_seconds(_ort_runner(onnx_path, x.numpy()), repeats, warmup)))
                if qdq_path is None:
                    rows.append(_row("onnxruntime-qdq", b, None, "no Q/DQ model given (ptq: True writes one)"))
                else:
                    rows.append(_row("onnxruntime-qdq", b, median_seconds(_ort_runner(qdq_path, x.numpy()), repeats, warmup),
                                     "ORT runs Q/DQ in float: not int8 speed"))
                reason = _trt_skip_reason(engine_path)
                if reason:
                    rows.append(_row("tensorrt", b, None, reason))
                else:
                    rows.append(_row("tensorrt", b, median_seconds(trt_runner(engine_path, x.shape)[0], repeats, warmup), "GPU"))
    finally:
        torch.set_num_threads(previous)
    if out_dir is not None:
        write_latency(rows, out_dir)
    return rows


def latency_markdown(rows: Sequence[LatencyRow]) -> str:
    """The rows as a markdown table."""
    lines = ["| backend | batch | median ms | ms/sample | samples/s | note |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = ["-" if v is None else f"{v:g}" for v in (r.median_ms, r.ms_per_sample, r.samples_per_s)]
        lines.append(f"| {r.backend} | {r.batch} | {' | '.join(cells)} | {r.note} |")
    return "\n".join(lines) + "\n"


def write_latency(rows: Sequence[LatencyRow], out_dir: PathLike) -> tuple[Path, Path]:
    """Write ``latency.csv`` and ``latency.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / "latency.csv", out / "latency.md"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(asdict(rows[0])) if rows else list(LatencyRow.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    atomic_write(csv_path, table.getvalue())
    atomic_write(md_path, latency_markdown(rows))
    log.info("latency table: %s\n%s", md_path, latency_markdown(rows))
    return csv_path, md_path
