"""Engine builds on a real GPU with TensorRT (skipped, with the reason, where either is missing)."""

from __future__ import annotations

import pytest
import torch

from lightrainer.export import MissingDependencyError, build_engine, check_tensorrt, export_onnx
from lightrainer.export.latency import trt_runner
from lightrainer.modules.nets import SmallCNN


def _tensorrt_or_skip() -> str:
    try:
        kind, _ = check_tensorrt()
    except MissingDependencyError as err:
        pytest.skip(str(err))
    return kind


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize("fp16, atol", [(False, 1e-3), (True, 5e-2)])
def test_engine_matches_pytorch(tmp_path, fp16, atol):
    kind = _tensorrt_or_skip()
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, width=8).eval()
    onnx_path = export_onnx(net, torch.randn(4, 1, 28, 28), tmp_path / "m.onnx", input_names=["images"])
    engine = build_engine(onnx_path, tmp_path / "m.engine", batch=8, fp16=fp16)
    assert engine.stat().st_size > 0
    if kind != "api":
        pytest.skip("engine built with trtexec; running it here needs the TensorRT Python API")
    x = torch.randn(8, 1, 28, 28)
    run, buffers, name = trt_runner(engine, x.shape)
    buffers[name].copy_(x)
    run()
    (out,) = [t for n, t in buffers.items() if n != name]
    with torch.no_grad():
        assert (out.float().cpu() - net(x)).abs().max() < atol
