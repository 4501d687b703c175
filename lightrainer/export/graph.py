"""Reading exported ONNX files: metadata, inputs, Q/DQ structure. Pure ONNX, no PyTorch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from lightrainer.export.errors import MissingDependencyError

if TYPE_CHECKING:
    import onnx

PathLike = Union[str, os.PathLike]

#: ONNX ops whose weight input a Q/DQ model quantizes.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def require_onnx() -> Any:
    """The ``onnx`` module, or a one-line error naming the extra to install."""
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError('ONNX export needs onnx and onnxruntime: pip install "lightrainer[onnx]"') from None
    return onnx


def load_graph(path: PathLike, weights: bool = True) -> onnx.ModelProto:
    """The ONNX model at ``path`` (``weights=False``: the graph without external weight data)."""
    return require_onnx().load(str(path), load_external_data=weights)


def read_metadata(path: PathLike | onnx.ModelProto) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict of strings."""
    model = path if not isinstance(path, (str, os.PathLike)) else load_graph(path, weights=False)
    return {p.key: p.value for p in model.metadata_props}


def input_spec(path: PathLike | onnx.ModelProto) -> list[tuple[str, list[Union[int, str]]]]:
    """(name, dims) of each graph input; a dynamic dim is its symbol name (or "?")."""
    model = path if not isinstance(path, (str, os.PathLike)) else load_graph(path, weights=False)
    initializers = {i.name for i in model.graph.initializer}
    spec = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value.type.tensor_type.shape.dim]
        spec.append((value.name, dims))
    return spec


def count_qdq_nodes(path: PathLike | onnx.ModelProto) -> dict[str, int]:
    """Number of QuantizeLinear and DequantizeLinear nodes in the model."""
    model = path if not isinstance(path, (str, os.PathLike)) else load_graph(path, weights=False)
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for node in model.graph.node:
        if node.op_type in counts:
            counts[node.op_type] += 1
    return counts


@dataclass(frozen=True)
class QdqLayer:
    """How one weighted node (Conv, Gemm, ...) of an ONNX model is quantized."""

    name: str
    op_type: str
    input_qdq: bool  # its activation input comes from a QuantizeLinear -> DequantizeLinear pair
    weight_qdq: bool  # its weight input comes from a (QuantizeLinear ->) DequantizeLinear
    per_channel: bool  # the weight scale is a vector (one per output channel)
    symmetric_int8: bool  # every zero point on its inputs is 0 and of type int8

    @property
    def quantized(self) -> bool:
        """Both inputs pass through Q/DQ, as TensorRT's explicit quantization needs."""
        return self.input_qdq and self.weight_qdq


def qdq_layers(path: PathLike | onnx.ModelProto) -> list[QdqLayer]:
    """Every Conv/ConvTranspose/Gemm/MatMul node and how its inputs are quantized.

    A layer quantized for TensorRT has ``quantized`` True, ``per_channel`` True and
    ``symmetric_int8`` True.
    """
    model = path if not isinstance(path, (str, os.PathLike)) else load_graph(path)
    numpy_helper = require_onnx().numpy_helper
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def traced(name: str) -> onnx.NodeProto | None:
        # Look through layout-only ops that exporters put between a DQ and its consumer.
        node = producer.get(name)
        while node is not None and node.op_type in ("Identity", "Transpose", "Reshape", "Cast") and node.input:
            node = producer.get(node.input[0])
        return node

    def zero_point_ok(dq: onnx.NodeProto) -> bool:
        if len(dq.input) < 3 or not dq.input[2]:
            return False  # no zero point means uint8, which TensorRT's explicit quantization rejects
        zp = constants.get(dq.input[2])
        return zp is not None and zp.dtype.name == "int8" and not zp.any()

    layers = []
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        act, weight = traced(node.input[0]), traced(node.input[1])
        input_qdq = act is not None and act.op_type == "DequantizeLinear" and (
            getattr(traced(act.input[0]), "op_type", "") == "QuantizeLinear"
        )
        weight_qdq = weight is not None and weight.op_type == "DequantizeLinear"
        scale = constants.get(weight.input[1]) if weight_qdq else None
        per_channel = scale is not None and scale.ndim == 1 and scale.size > 1
        dqs = [n for n in (act if input_qdq else None, weight if weight_qdq else None) if n is not None]
        layers.append(
            QdqLayer(
                name=node.name or node.output[0],
                op_type=node.op_type,
                input_qdq=input_qdq,
                weight_qdq=weight_qdq,
                per_channel=per_channel,
                symmetric_int8=bool(dqs) and all(zero_point_ok(dq) for dq in dqs),
            )
        )
    return layers


def companion_path(path: PathLike, suffix: str) -> Path:
    """A file next to ``path`` named ``<name><suffix>`` (``best.onnx`` -> ``best.onnx.verify.json``)."""
    path = Path(path)
    return path.with_name(path.name + suffix)
