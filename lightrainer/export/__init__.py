"""Export: verified ONNX (float and Q/DQ), TensorRT engines, latency tables.

``export_onnx`` writes one model (atomically, checked, verified against PyTorch on real batches
when given them); ``export_from_weights`` runs the whole export of a run (the callback and
``lightrainer export`` call it), one file per part of the task's export spec; ``run_ptq`` /
``export_int8`` calibrate a run's weights and write the verified Q/DQ model (``lightrainer ptq``,
the PTQ and QAT callbacks); ``build_engine`` turns an ONNX model into a TensorRT engine;
``benchmark_latency`` times PyTorch, ONNX Runtime and TensorRT.
"""

from lightrainer.export.errors import ExportError, MissingDependencyError
from lightrainer.export.graph import QdqLayer, count_qdq_nodes, input_spec, qdq_layers, read_metadata
from lightrainer.export.latency import LatencyRow, benchmark_latency, latency_markdown, write_latency
from lightrainer.export.onnx import DEFAULT_OPSET, export_onnx
from lightrainer.export.pipeline import (
    FORMATS,
    ExportFormat,
    ExportResult,
    benchmark_from_weights,
    check_format,
    export_from_weights,
    export_int8,
    export_part,
    export_parts,
    register_format,
    run_ptq,
)
from lightrainer.export.tensorrt import (
    EnginePlan,
    EngineRequest,
    TrtApi,
    build_engine,
    check_tensorrt,
    engine_plan,
    engine_request,
    trtexec_command,
)
from lightrainer.export.verify import Tolerance, VerifyReport, verify_onnx
from lightrainer.weights import apply_weights, load_weights  # re-exported: they lived here before lightrainer.weights

__all__ = [
    "DEFAULT_OPSET",
    "FORMATS",
    "EnginePlan",
    "EngineRequest",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "LatencyRow",
    "MissingDependencyError",
    "QdqLayer",
    "Tolerance",
    "TrtApi",
    "VerifyReport",
    "apply_weights",
    "benchmark_from_weights",
    "benchmark_latency",
    "build_engine",
    "check_format",
    "check_tensorrt",
    "count_qdq_nodes",
    "engine_plan",
    "engine_request",
    "export_from_weights",
    "export_int8",
    "export_onnx",
    "export_part",
    "export_parts",
    "input_spec",
    "latency_markdown",
    "load_weights",
    "qdq_layers",
    "read_metadata",
    "register_format",
    "run_ptq",
    "trtexec_command",
    "verify_onnx",
    "write_latency",
]
