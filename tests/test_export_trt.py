"""TensorRT engine building without a GPU: the API call plan, the trtexec command, the errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightrainer.export import (
    EngineRequest,
    ExportError,
    MissingDependencyError,
    TrtApi,
    build_engine,
    engine_plan,
    engine_request,
    export_onnx,
    trtexec_command,
)
from lightrainer.export.tensorrt import parse_trtexec_major, profile_shapes

TRT8 = TrtApi("8.6.1")
TRT10 = TrtApi("10.3.0", strongly_typed_flag=True)
TRT11 = TrtApi("11.0.0", explicit_batch_flag=False, strongly_typed_flag=True, int8_flag=False, fp16_flag=False)
TRT7 = TrtApi("7.2.3", build_serialized_network=False, memory_pool_limit=False)
SHAPES = ((1, 1, 28, 28), (32, 1, 28, 28), (64, 1, 28, 28))


def _request(**kw) -> EngineRequest:
    base = dict(onnx_path=Path("m.onnx"), engine_path=Path("m.engine"), input_name="images", shapes=SHAPES)
    return EngineRequest(**{**base, **kw})


def test_profile_is_one_batch_twice_batch():
    assert profile_shapes(["batch", 1, 28, 28], 32) == SHAPES
    assert profile_shapes(["batch", 3, "h", "w"], 8, [64, 48]) == ((1, 3, 64, 48), (8, 3, 64, 48), (16, 3, 64, 48))
    assert profile_shapes([4, 1, 28, 28], 32) is None  # static model: no profile
    with pytest.raises(ExportError, match=r"input dim 2 .* is dynamic: give the size"):
        profile_shapes(["batch", 3, "h", "w"], 8)


@pytest.mark.parametrize(
    "api, options, network, builder",
    [
        (TRT8, {}, ("EXPLICIT_BATCH",), ()),
        (TRT8, {"fp16": True}, ("EXPLICIT_BATCH",), ("FP16",)),
        (TRT8, {"int8": True, "qdq": True}, ("EXPLICIT_BATCH",), ("INT8",)),
        (TRT8, {"int8": True, "fp16": True, "qdq": True}, ("EXPLICIT_BATCH",), ("INT8", "FP16")),
        (TRT10, {}, (), ()),  # explicit batch is implied from 10 on
        (TRT10, {"int8": True, "qdq": True}, (), ("INT8",)),
        (TRT11, {"int8": True, "qdq": True}, ("STRONGLY_TYPED",), ()),  # no INT8 flag: types from the graph
        (TRT11, {"fp16": True, "float16_model": True}, ("STRONGLY_TYPED",), ()),
    ],
)
def test_api_plan(api, options, network, builder):
    plan = engine_plan(api, _request(**options))
    assert plan.network_flags == network
    assert plan.builder_flags == builder
    assert plan.profile == {"images": SHAPES}
    assert plan.workspace == ("set_memory_pool_limit", 4096 << 20)
    assert plan.build_call == "build_serialized_network"


def test_api_plan_of_old_tensorrt():
    plan = engine_plan(TRT7, _request(shapes=None, workspace_mib=1024))
    assert plan.build_call == "build_engine" and plan.workspace == ("max_workspace_size", 1 << 30)
    assert plan.profile == {}


def test_precision_errors():
    with pytest.raises(ExportError, match="int8: m.onnx has no QuantizeLinear/DequantizeLinear nodes.*run PTQ first"):
        engine_plan(TRT10, _request(int8=True))
    with pytest.raises(ExportError, match="int8: m.onnx has no QuantizeLinear"):
        trtexec_command(_request(int8=True))
    with pytest.raises(ExportError, match=r"fp16: TensorRT 11.0.0 has no FP16 builder flag.*net\.half\(\)"):
        engine_plan(TRT11, _request(fp16=True))
    with pytest.raises(ExportError, match=r"fp16: trtexec of TensorRT 11 builds strongly typed"):
        trtexec_command(_request(fp16=True), trt_major=11)


@pytest.mark.parametrize(
    "major, options, flags",
    [
        (10, {}, []),
        (10, {"fp16": True}, ["--fp16"]),
        (8, {"int8": True, "qdq": True}, ["--int8"]),
        (10, {"int8": True, "fp16": True, "qdq": True}, ["--fp16", "--int8"]),
        (11, {"int8": True, "qdq": True}, ["--stronglyTyped"]),
    ],
)
def test_trtexec_command(major, options, flags):
    cmd = trtexec_command(_request(**options), trt_major=major)
    assert cmd == [
        "trtexec", "--onnx=m.onnx", "--saveEngine=m.engine",
        "--minShapes=images:1x1x28x28", "--optShapes=images:32x1x28x28", "--maxShapes=images:64x1x28x28",
        "--memPoolSize=workspace:4096M", *flags,
    ]


def test_trtexec_command_static_model_has_no_shapes():
    assert not [a for a in trtexec_command(_request(shapes=None)) if "Shapes" in a]


def test_trtexec_version_banner():
    assert parse_trtexec_major("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec --help") == 8
    assert parse_trtexec_major("[TensorRT v100300] # trtexec") == 10
    assert parse_trtexec_major("no banner") is None


def test_request_read_from_exported_model(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    path = export_onnx(net, torch.randn(2, 3, 40, 24), tmp_path / "fcn.onnx", input_names=["images"],
                       dynamic_spatial=True)
    request = engine_request(path, tmp_path / "fcn.engine", batch=16, fp16=True)
    # spatial dims are dynamic: the profile uses the size the model was exported with
    assert request.input_name == "images" and request.shapes == ((1, 3, 40, 24), (16, 3, 40, 24), (32, 3, 40, 24))
    assert not request.qdq and not request.float16_model
    request = engine_request(path, tmp_path / "fcn.engine", batch=4, input_shape=(3, 64, 64))
    assert request.shapes[2] == (8, 3, 64, 64)


def test_missing_tensorrt_is_one_clear_line(tmp_path, monkeypatch):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    path = export_onnx(net, torch.randn(2, 1, 2, 2), tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails
    monkeypatch.setenv("PATH", str(tmp_path))  # no trtexec
    with pytest.raises(MissingDependencyError, match=r'needs TensorRT.*pip install "lightrainer\[trt\]".*trtexec.*GPU') as info:
        build_engine(path, tmp_path / "m.engine", batch=8)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "m.engine").exists()


def test_int8_without_qdq_fails_before_looking_for_tensorrt(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    path = export_onnx(net, torch.randn(2, 1, 2, 2), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="run PTQ first"):
        build_engine(path, tmp_path / "m.engine", batch=8, int8=True)
    with pytest.raises(ExportError, match="ONNX model not found"):
        build_engine(tmp_path / "nope.onnx", tmp_path / "m.engine", batch=8)
