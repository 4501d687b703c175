"""ONNX -> TensorRT engine: the Python API when ``tensorrt`` imports, else ``trtexec``.

What to build is decided by pure functions (:func:`engine_plan` for the API,
:func:`trtexec_command` for the command line) so it can be checked without a GPU; only
:func:`build_engine` touches TensorRT.

INT8 uses explicit quantization only: the ONNX model must carry QuantizeLinear/DequantizeLinear
nodes (a PTQ- or QAT-quantized network exported with :func:`~lightrainer.export.export_onnx`).
NVIDIA deprecated implicit calibration in TensorRT 10, so a float model is quantized *before*
export (``quantize=`` of :func:`~lightrainer.export.export_from_weights`), never here.

API differences handled (detected with ``hasattr``, not by version number):

* TensorRT 8.x: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` is required for ONNX models;
  ``BuilderFlag.INT8`` enables the int8 kernels of a Q/DQ network; ``build_serialized_network``
  (8.0+) or ``build_engine`` (older); ``set_memory_pool_limit`` (8.4+) or ``max_workspace_size``.
* TensorRT 10: explicit batch is implied (the flag is deprecated, not set);
  ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` exists.
* TensorRT 11: ``BuilderFlag.INT8``/``FP16`` are gone: networks are strongly typed, so a Q/DQ
  model gets its int8 from the graph and fp16 needs an ONNX model exported in float16.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from lightrainer.export.errors import ExportError, MissingDependencyError
from lightrainer.export.graph import PathLike, count_qdq_nodes, input_spec, load_graph, read_metadata
from lightrainer.io import atomic_path

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'pip install "lightrainer[trt]" for the TensorRT Python API, or NVIDIA\'s TensorRT tarball/apt '
    "package to put trtexec on PATH; a CUDA GPU is required"
)
Shape = tuple[int, ...]
_ONNX_FLOAT16 = 10  # onnx.TensorProto.FLOAT16


@dataclass(frozen=True)
class TrtApi:
    """What the installed ``tensorrt`` module offers (see the module docstring)."""

    version: str
    explicit_batch_flag: bool = True
    strongly_typed_flag: bool = False
    int8_flag: bool = True
    fp16_flag: bool = True
    build_serialized_network: bool = True
    memory_pool_limit: bool = True

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @classmethod
    def of(cls, trt: Any) -> TrtApi:
        """Inspect an imported ``tensorrt`` module."""
        creation = trt.NetworkDefinitionCreationFlag
        return cls(
            version=trt.__version__,
            explicit_batch_flag=hasattr(creation, "EXPLICIT_BATCH"),
            strongly_typed_flag=hasattr(creation, "STRONGLY_TYPED"),
            int8_flag=hasattr(trt.BuilderFlag, "INT8"),
            fp16_flag=hasattr(trt.BuilderFlag, "FP16"),
            build_serialized_network=hasattr(trt.Builder, "build_serialized_network"),
            memory_pool_limit=hasattr(trt.IBuilderConfig, "set_memory_pool_limit"),
        )


@dataclass(frozen=True)
class EngineRequest:
    """What engine to build from which ONNX model (all read from the model except the options)."""

    onnx_path: Path
    engine_path: Path
    input_name: str
    shapes: tuple[Shape, Shape, Shape] | None  # min/opt/max; None for a static input
    fp16: bool = False
    int8: bool = False
    qdq: bool = False
    float16_model: bool = False
    workspace_mib: int = 4096


@dataclass(frozen=True)
class EnginePlan:
    """The TensorRT API calls :func:`build_engine` makes: flag names and arguments."""

    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    workspace: tuple[str, int]  # ("set_memory_pool_limit" | "max_workspace_size", bytes)
    build_call: str  # "build_serialized_network" | "build_engine"
    profile: dict[str, tuple[Shape, Shape, Shape]] = field(default_factory=dict)


def profile_shapes(input_dims: Sequence[Union[int, str]], batch: int, spatial: Sequence[int] | None = None) -> tuple[Shape, Shape, Shape] | None:
    """min/opt/max shapes 1 / batch / 2 x batch (the seed's), or None when the input is static.

    Args:
        input_dims: the ONNX input dims (a dynamic dim is a string).
        batch: the optimal batch size.
        spatial: sizes of the dynamic dims after the batch axis (e.g. the training image size).

    Raises:
        ExportError: a dynamic non-batch dim without ``spatial``, or a batch below 1.
    """
    if batch < 1:
        raise ExportError(f"batch: must be >= 1 to build an engine, got {batch}")
    dynamic = [i for i, d in enumerate(input_dims) if _is_dynamic(d)]
    if not dynamic:
        return None
    rest: list[int] = []
    fill = list(spatial or [])
    for i, d in enumerate(input_dims[1:], start=1):
        if i in dynamic:
            if not fill:
                raise ExportError(
                    f"input dim {i} of the ONNX model is dynamic: give the size to build the engine for "
                    "(input_shape=(C, H, W)) or export with dynamic_spatial=False"
                )
            rest.append(int(fill.pop(0)))
        else:
            rest.append(int(d))
    if 0 not in dynamic:
        fixed = int(input_dims[0])
        return (fixed, *rest), (fixed, *rest), (fixed, *rest)
    return (1, *rest), (batch, *rest), (2 * batch, *rest)


def _check_precision(request: EngineRequest) -> None:
    if request.int8 and not request.qdq:
        raise ExportError(
            f"int8: {request.onnx_path.name} has no QuantizeLinear/DequantizeLinear nodes. TensorRT int8 needs a "
            "quantized model: run PTQ first (ptq: True, or quantize=... in export_from_weights) or train with qat: True"
        )


def engine_plan(api: TrtApi, request: EngineRequest) -> EnginePlan:
    """The TensorRT API calls for ``request`` on the TensorRT that ``api`` describes.

    Raises:
        ExportError: int8 without Q/DQ nodes, or fp16 on a TensorRT without the FP16 flag and a
            float32 model.
    """
    _check_precision(request)
    network: list[str] = []
    builder: list[str] = []
    if api.explicit_batch_flag and api.major < 10:
        network.append("EXPLICIT_BATCH")
    strongly_typed = False
    if request.int8:
        if api.int8_flag:
            builder.append("INT8")
        else:
            strongly_typed = True  # TensorRT 11: precision comes from the Q/DQ graph
    if request.fp16:
        if api.fp16_flag:
            builder.append("FP16")
        elif request.float16_model:
            strongly_typed = True
        else:
            raise ExportError(
                f"fp16: TensorRT {api.version} has no FP16 builder flag (strongly typed networks): export "
                "the model in float16 (export_onnx(net.half(), x.half(), ...)) and build that"
            )
    if strongly_typed:
        if not api.strongly_typed_flag:
            raise ExportError(f"TensorRT {api.version} has neither INT8/FP16 builder flags nor strongly typed networks")
        network.append("STRONGLY_TYPED")
    workspace = ("set_memory_pool_limit" if api.memory_pool_limit else "max_workspace_size", request.workspace_mib << 20)
    return EnginePlan(
        network_flags=tuple(network),
        builder_flags=tuple(builder),
        workspace=workspace,
        build_call="build_serialized_network" if api.build_serialized_network else "build_engine",
        profile={request.input_name: request.shapes} if request.shapes else {},
    )


def _dims(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(request: EngineRequest, trt_major: int | None = None, trtexec: str = "trtexec") -> list[str]:
    """The ``trtexec`` command line that builds the requested engine.

    Args:
        request: what to build.
        trt_major: TensorRT major version of the trtexec (None = unknown: 10 assumed).
        trtexec: the executable.

    Raises:
        ExportError: int8 without Q/DQ nodes, or fp16 of a float32 model where TensorRT 11+
            has no FP16 flag.
    """
    _check_precision(request)
    major = trt_major or 10
    cmd = [trtexec, f"--onnx={request.onnx_path}", f"--saveEngine={request.engine_path}"]
    if request.shapes:
        lo, opt, hi = request.shapes
        name = request.input_name
        cmd += [f"--minShapes={name}:{_dims(lo)}", f"--optShapes={name}:{_dims(opt)}", f"--maxShapes={name}:{_dims(hi)}"]
    cmd.append(f"--memPoolSize=workspace:{request.workspace_mib}M")
    if major >= 11:
        if request.fp16 and not request.float16_model:
            raise ExportError(
                f"fp16: trtexec of TensorRT {major} builds strongly typed networks only: export the model in "
                "float16 (export_onnx(net.half(), x.half(), ...)) and build that"
            )
        if request.int8 or request.fp16:
            cmd.append("--stronglyTyped")
    else:
        cmd += (["--fp16"] if request.fp16 else []) + (["--int8"] if request.int8 else [])
    return cmd


def engine_request(
    onnx_path: PathLike,
    engine_path: PathLike,
    *,
    batch: int,
    fp16: bool = False,
    int8: bool = False,
    input_shape: Sequence[int] | None = None,
    workspace_mib: int = 4096,
) -> EngineRequest:
    """Read the input name, dims and Q/DQ nodes of ``onnx_path`` into an :class:`EngineRequest`.

    Args:
        input_shape: (C, H, W) to build for where the ONNX spatial dims are dynamic (default: the
            "input_shape" metadata written at export).
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"ONNX model not found: {onnx_path}: export it first (--format onnx)")
    graph = load_graph(onnx_path, weights=False)
    (name, dims), *_ = input_spec(graph)
    if input_shape is not None:
        full = [int(d) for d in input_shape]
    else:
        full = json.loads(read_metadata(graph).get("example_shape", "null") or "null") or []
    rest = full[len(full) - (len(dims) - 1):] if len(full) >= len(dims) - 1 else []
    dynamic_rest = [rest[i - 1] for i in range(1, len(dims)) if _is_dynamic(dims[i])] if rest else None
    return EngineRequest(
        onnx_path=onnx_path,
        engine_path=Path(engine_path),
        input_name=name,
        shapes=profile_shapes(dims, batch, dynamic_rest),
        fp16=fp16,
        int8=int8,
        qdq=sum(count_qdq_nodes(graph).values()) > 0,
        float16_model=graph.graph.input[0].type.tensor_type.elem_type == _ONNX_FLOAT16,
        workspace_mib=workspace_mib,
    )


def _is_dynamic(dim: Union[int, str]) -> bool:
    return not isinstance(dim, int) or dim <= 0


def _find_backend() -> tuple[str, Any]:
    """("api", tensorrt module) or ("trtexec", path), or raise naming what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
    if trt is not None:
        return "api", trt
    exe = shutil.which("trtexec")
    if exe:
        return "trtexec", exe
    raise MissingDependencyError(f"building a TensorRT engine needs TensorRT, which is not installed: {INSTALL_HINT}")


def check_tensorrt() -> tuple[str, Any]:
    """The TensorRT backend an engine build will use: ("api", module) or ("trtexec", path).

    Raises:
        MissingDependencyError: neither the Python API nor trtexec is found, or no CUDA GPU.
    """
    kind, backend = _find_backend()
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"building a TensorRT engine needs a CUDA GPU and none is visible (TensorRT found: {kind})"
        )
    return kind, backend


def build_engine(
    onnx_path: PathLike,
    engine_path: PathLike,
    *,
    batch: int,
    fp16: bool = False,
    int8: bool = False,
    input_shape: Sequence[int] | None = None,
    workspace_mib: int = 4096,
) -> Path:
    """Build a TensorRT engine from an ONNX model (written atomically to ``engine_path``).

    Args:
        onnx_path: the ONNX model (with Q/DQ nodes for int8).
        engine_path: the engine file to write.
        batch: the optimisation profile is min 1 / opt ``batch`` / max 2 x ``batch``.
        fp16: allow fp16 kernels.
        int8: int8 from the model's Q/DQ nodes (explicit quantization).
        input_shape: (C, H, W) for models with dynamic spatial dims (default: the export's size).
        workspace_mib: builder workspace limit.

    Returns:
        ``engine_path``.

    Raises:
        MissingDependencyError: no TensorRT (Python API or trtexec) or no GPU.
        ExportError: int8 without Q/DQ nodes, a parse or build failure (with TensorRT's message).
    """
    request = engine_request(
        onnx_path, engine_path, batch=batch, fp16=fp16, int8=int8, input_shape=input_shape, workspace_mib=workspace_mib
    )
    _check_precision(request)
    kind, backend = check_tensorrt()
    request.engine_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(request.engine_path) as tmp:
        staged = EngineRequest(**{**request.__dict__, "engine_path": tmp})
        if kind == "api":
            _build_with_api(backend, engine_plan(TrtApi.of(backend), staged), staged)
        else:
            _build_with_trtexec(backend, staged)
    log.info("built TensorRT engine %s (%s)", request.engine_path, kind)
    return request.engine_path


def _build_with_api(trt: Any, plan: EnginePlan, request: EngineRequest) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(request.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {request.onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    method, size = plan.workspace
    if method == "set_memory_pool_limit":
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, size)
    else:
        config.max_workspace_size = size
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    if plan.profile:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.profile.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if plan.build_call == "build_serialized_network":
        data = builder.build_serialized_network(network, config)
    else:
        engine = builder.build_engine(network, config)
        data = engine.serialize() if engine is not None else None
    if data is None:
        raise ExportError(f"TensorRT failed to build an engine from {request.onnx_path.name}: see the TensorRT log above")
    request.engine_path.write_bytes(bytes(data))


_VERSION = re.compile(r"TensorRT[^\n]*?v(\d+)")


def trtexec_major(exe: str) -> int | None:
    """TensorRT major version of a trtexec, from the banner of ``trtexec --help``."""
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_trtexec_major(out.stdout + out.stderr)


def parse_trtexec_major(text: str) -> int | None:
    """``[TensorRT v8601]`` -> 8, ``[TensorRT v100300]`` -> 10 (None when absent)."""
    match = _VERSION.search(text)
    if not match:
        return None
    digits = match.group(1)
    return int(digits[:2]) if len(digits) >= 6 else int(digits[0])


def _build_with_trtexec(exe: str, request: EngineRequest) -> None:
    cmd = trtexec_command(request, trtexec_major(exe), exe)
    log.info("running %s", " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not request.engine_path.is_file():
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise ExportError(f"trtexec failed (exit {result.returncode}) building {request.onnx_path.name}: {tail}")
