"""ONNX export and verification: round trips in ONNX Runtime, metadata, atomic writes, failures."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from torch import nn

from lightrainer.export import (
    ExportError,
    Tolerance,
    count_qdq_nodes,
    export_onnx,
    input_spec,
    qdq_layers,
    read_metadata,
    verify_onnx,
)
from lightrainer.modules.nets import SmallCNN
from lightrainer.modules.vqvae_net import VQVAE


def _ort(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    net = SmallCNN(num_classes=10, width=4)
    net.train()
    for _ in range(3):  # non-trivial BatchNorm statistics
        net(torch.randn(8, 1, 28, 28))
    return net.eval()


def _vqvae() -> VQVAE:
    torch.manual_seed(0)
    net = VQVAE(in_channels=3, channels=16, num_res_blocks=1, downsample=4, codebook_size=32, code_dim=8)
    net.train()
    net(torch.rand(4, 3, 32, 32))  # initialises the codebook from encoder outputs
    return net.eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_classifier_round_trip_dynamic_batch(tmp_path, dynamo):
    net = _classifier()
    path = export_onnx(net, torch.randn(2, 1, 28, 28), tmp_path / "cls.onnx", dynamo=dynamo, output_names=["logits"])
    assert input_spec(path) == [("input", ["batch", 1, 28, 28])]
    x = torch.randn(5, 1, 28, 28)  # exported at batch 2, run at 5
    (got,) = _ort(path, x)
    with torch.no_grad():
        ref = net.double()(x.double()).numpy()  # float64 reference
    net.float()
    assert got.shape == (5, 10)
    assert np.abs(got - ref).max() < 1e-4
    assert not net.training


@pytest.mark.parametrize("dynamo", [False, True])
def test_autoencoder_exports_reconstruction_whole_and_split(tmp_path, dynamo):
    net = _vqvae()
    x = torch.rand(2, 3, 32, 32)
    whole = export_onnx(net, x, tmp_path / "ae.onnx", dynamo=dynamo, outputs=0, output_names=["reconstruction"],
                        dynamic_spatial=None)
    # fully convolutional: the probe makes height and width dynamic
    name, dims = input_spec(whole)[0]
    assert dims[:2] == ["batch", 3] and all(isinstance(d, str) for d in dims[2:])
    big = torch.rand(3, 3, 48, 64)
    (recon,) = _ort(whole, big)
    with torch.no_grad():
        ref_recon, _, _ = net(big)
        codes = net.encode_codes(big)
    assert np.abs(recon - ref_recon.numpy()).max() < 1e-4

    enc = export_onnx(net, x, tmp_path / "enc.onnx", dynamo=dynamo, method="encode_codes", dynamic_spatial=True)
    dec = export_onnx(net, net.encode_codes(x), tmp_path / "dec.onnx", dynamo=dynamo, method="decode_codes",
                      dynamic_spatial=True)
    (got_codes,) = _ort(enc, big)
    assert got_codes.dtype == np.int64
    assert (got_codes == codes.numpy()).mean() > 0.99  # a near-tie of two codes may flip
    (dec_out,) = _ort(dec, codes)
    with torch.no_grad():
        assert np.abs(dec_out - net.decode_codes(codes).numpy()).max() < 1e-4


def test_metadata_read_back(tmp_path):
    config = {"batch": 32, "lr0": 0.01, "optimizer": "Adam"}
    meta = {"task": "classification", "class_names": ["zero", "one"], "mean": [0.1307], "std": [0.3081],
            "num_classes": 2, "config": yaml.safe_dump(config)}
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    path = export_onnx(net, torch.randn(3, 1, 2, 2), tmp_path / "m.onnx", metadata=meta)
    props = read_metadata(path)
    assert props["task"] == "classification"
    assert json.loads(props["class_names"]) == ["zero", "one"]
    assert json.loads(props["mean"]) == [0.1307] and json.loads(props["std"]) == [0.3081]
    assert json.loads(props["num_classes"]) == 2
    assert yaml.safe_load(props["config"]) == config
    assert json.loads(props["input_shape"]) == ["batch", 1, 2, 2]
    assert props["lightrainer_version"] and props["exporter"] == "torchscript" and props["opset"] == "17"


class Spectral(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(x).abs().flatten(1)


class Inverse(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(4).expand(x.shape[0], 4, 4)
        return torch.linalg.inv(x[:, 0, :4, :4] + 4 * eye).flatten(1)


class Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.conv(x))


def test_unsupported_op_names_op_and_module_and_keeps_old_file(tmp_path):
    path = tmp_path / "best.onnx"
    path.write_bytes(b"previous good model")
    with pytest.raises(ExportError, match=r"aten::fft_rfft2 is not supported, called in module 'block\.1' \(Spectral\)"):
        export_onnx(Holder(Spectral()), torch.randn(2, 1, 8, 8), path)
    assert path.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx"]  # no temporary file left


def test_dynamo_unsupported_op_is_located(tmp_path):
    with pytest.raises(ExportError, match=r"dynamo exporter.*aten::linalg_inv_ex.*'block\.1' \(Inverse\)"):
        export_onnx(Holder(Inverse()), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", dynamo=True)
    assert not list(tmp_path.iterdir())


def test_verify_passes_and_reports(tmp_path):
    net = _classifier()
    batches = [torch.randn(7, 1, 28, 28), torch.randn(3, 1, 28, 28)]
    path = export_onnx(net, batches[0], tmp_path / "best.onnx", verify=batches, checks=["argmax"])
    report = json.loads((tmp_path / "best.onnx.verify.json").read_text())
    assert report["passed"] and report["samples"] == 10 and not report["qdq"]
    (out,) = report["outputs"]
    assert out["max_abs_diff"] < 1e-4 and out["agreement"] == 1.0 and out["check"] == "argmax"
    assert path.is_file()
    # the checks travel in the file: a later verification compares the same way
    assert json.loads(read_metadata(path)["export_checks"]) == ["argmax"]
    assert verify_onnx(path, net, batches).outputs[0].agreement == 1.0


def test_verify_catches_perturbed_weights(tmp_path):
    net = _classifier()
    path = export_onnx(net, torch.randn(2, 1, 28, 28), tmp_path / "best.onnx")
    with torch.no_grad():
        net.head.bias[3] += 0.01  # the ONNX file no longer matches the network
    with pytest.raises(ExportError, match=r"FAILED.*logits|output differs from PyTorch by 1\.0\d*e-02"):
        verify_onnx(path, net, [torch.randn(4, 1, 28, 28)])
    assert not json.loads((tmp_path / "best.onnx.verify.json").read_text())["passed"]
    assert path.is_file()
    with pytest.raises(ExportError):
        verify_onnx(path, net, [torch.randn(4, 1, 28, 28)], remove_on_fail=True)
    assert not path.exists()


class DataDependent(nn.Module):
    """Tracing records one branch: the exported model is wrong for inputs taking the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.mean() > 0 else x * 3


def test_failed_verification_does_not_promote(tmp_path):
    path = tmp_path / "best.onnx"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(DataDependent(), torch.ones(2, 4), path, verify=[-torch.ones(3, 4)])
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.onnx.verify.json"]


def test_bad_arguments(tmp_path):
    net = _vqvae()
    with pytest.raises(ExportError, match="output_names: 1 names for 3 outputs"):
        export_onnx(net, torch.rand(2, 3, 32, 32), tmp_path / "a.onnx", output_names=["recon"])
    with pytest.raises(ExportError, match="has no method 'encode_pixels'"):
        export_onnx(net, torch.rand(2, 3, 32, 32), tmp_path / "a.onnx", method="encode_pixels")
    with pytest.raises(ExportError, match="opset 18 or newer"):
        export_onnx(net, torch.rand(2, 3, 32, 32), tmp_path / "a.onnx", dynamo=True, opset=17)
    with pytest.raises(ExportError, match="no batches to verify"):
        export_onnx(_classifier(), torch.randn(2, 1, 28, 28), tmp_path / "a.onnx", verify=[])
    assert not list(tmp_path.glob("*.onnx"))


def test_tolerance_presets():
    fp32, qdq = Tolerance.fp32(), Tolerance.qdq()
    assert fp32.atol == 1e-4 and qdq.min_agreement == 0.995 and qdq.rtol > fp32.rtol


def _qdq_model(tmp_path):
    """A two-conv ONNX graph built by hand: conv1 quantized for TensorRT, conv2 float."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(4, -1).max(1) / 127).astype(np.float32)
    w_int8 = np.round(w / w_scale[:, None, None, None]).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(w_int8, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(np.random.default_rng(1).standard_normal((2, 4, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wdq"], axis=0),
        helper.make_node("Conv", ["xdq", "wdq"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["h", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "qdq.onnx"
    path.write_bytes(model.SerializeToString())
    return path, w_int8.astype(np.float32) * w_scale[:, None, None, None]


def test_qdq_inspection(tmp_path):
    path, w_dq = _qdq_model(tmp_path)
    assert count_qdq_nodes(path) == {"QuantizeLinear": 1, "DequantizeLinear": 2}
    conv1, conv2 = qdq_layers(path)
    assert (conv1.name, conv1.quantized, conv1.per_channel, conv1.symmetric_int8) == ("conv1", True, True, True)
    assert (conv2.name, conv2.quantized, conv2.input_qdq, conv2.weight_qdq) == ("conv2", False, False, False)
    x = np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(np.float32)
    (y,) = _ort(path, torch.from_numpy(x))  # the Q/DQ graph runs in ORT: compare with the same math in torch
    xq = torch.from_numpy(np.clip(np.round(x / 0.02), -128, 127) * 0.02)
    h = torch.nn.functional.conv2d(xq, torch.from_numpy(w_dq), padding=1)
    from onnx import numpy_helper, load

    w2 = numpy_helper.to_array([i for i in load(str(path)).graph.initializer if i.name == "w2"][0])
    ref = torch.nn.functional.conv2d(h, torch.from_numpy(w2.copy())).numpy()
    assert np.abs(y - ref).max() < 1e-4


@pytest.mark.parametrize("backend", ["pytorch_quantization", "modelopt"])
@pytest.mark.parametrize("dynamo", [False, True])
def test_fake_quant_network_exports_qdq_and_verifies(tmp_path, dynamo, backend):
    quant = pytest.importorskip("lightrainer.quant")
    net = _classifier()
    data = [torch.randn(8, 1, 28, 28) for _ in range(3)]
    qnet = quant.quantize_model(net, backend=backend)
    quant.calibrate(qnet, data, method="max")
    path = export_onnx(qnet, data[0], tmp_path / "q.onnx", dynamo=dynamo, verify=data, checks=["argmax"])
    layers = qdq_layers(path)
    assert layers and all(l.quantized and l.per_channel and l.symmetric_int8 for l in layers)
    report = json.loads((tmp_path / "q.onnx.verify.json").read_text())
    assert report["qdq"] and report["passed"] and report["tolerance"]["min_agreement"] == 0.995
    assert report["outputs"][0]["agreement"] >= 0.995
