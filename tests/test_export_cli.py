"""`lightrainer export` in-process: a QAT run's weights export as Q/DQ; every bad input exits 2 with one
message and leaves nothing under a final name."""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightrainer.cli import main
from lightrainer.export import qdq_layers, read_metadata

FEW = ["--epochs", "1", "--plots", "False", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
       "--trainer.enable_progress_bar", "False"]


class SpectralNet(nn.Module):
    """A classifier calling an op ONNX has no translation for (torch.fft.rfft2)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(2 * 8 * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.fft.rfft2(self.conv(x)).abs().flatten(1))


@pytest.fixture(scope="module")
def digits_yaml() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits.yaml")


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, digits_yaml: str) -> Path:
    """A real QAT run of configs/digits.yaml, shrunk to 3 batches (its best.pt holds quantizer amax)."""
    save_dir = tmp_path_factory.mktemp("qat")
    code = main(["fit", "--config", digits_yaml, "--save_dir", str(save_dir), "--qat", "True", "--num_batches", "2",
                 "--method", "max", *FEW])
    assert code == 0
    return save_dir / "digits"


def _val_images(config: str) -> torch.Tensor:
    import lightrainer as lt
    from lightrainer.datamodules import DigitsDataModule

    return torch.cat([batch[0] for batch in DigitsDataModule(lt.load_config(config)).val_dataloader()])


def test_export_of_qat_weights_is_qdq(qat_run: Path, digits_yaml: str) -> None:
    from lightrainer.modules.nets import SmallCNN
    from lightrainer.quant import load_quantized_state_dict

    weights = qat_run / "weights"
    (weights / "best.onnx").unlink(missing_ok=True)
    assert main(["export", "--weights", str(weights / "best.pt"), "--config", digits_yaml]) == 0
    onnx_path = weights / "best.onnx"
    layers = qdq_layers(onnx_path)
    float_net = SmallCNN(num_classes=10, in_channels=1)
    expected = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in float_net.modules())
    assert len(layers) == expected
    assert all(l.quantized and l.per_channel and l.symmetric_int8 for l in layers)
    assert read_metadata(onnx_path)["quantized"] == "int8"
    report = json.loads((weights / "best.onnx.verify.json").read_text())
    assert report["qdq"] and report["passed"]

    # The weight scales are the saved per-channel amax / 127 (TensorRT's symmetric int8).
    import onnx
    from onnx import numpy_helper

    state = torch.load(weights / "best.pt", weights_only=True)["model"]
    model = onnx.load(str(onnx_path))
    scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            scales[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    first_amax = next(v for k, v in state.items() if k.endswith("weight_quantizer._amax")).flatten().numpy()
    weight_scales = [scales[n.input[1]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and scales.get(n.input[1], np.zeros(1)).size == first_amax.size]
    assert any(np.allclose(s, first_amax / 127, rtol=1e-6) for s in weight_scales)

    # ONNX Runtime against the fake-quant network rebuilt independently from best.pt.
    net = load_quantized_state_dict(SmallCNN(num_classes=10, in_channels=1), state).eval()
    x = _val_images(digits_yaml)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = net(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def _run_export(capsys, args: list[str]) -> str:
    code = main(["export", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    return err


def test_bad_weights_files_exit_2(tmp_path, capsys, digits_yaml: str) -> None:
    err = _run_export(capsys, ["--weights", str(tmp_path / "nope" / "best.pt")])
    assert "file not found" in err and "nope" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(1024))
    assert "junk.pt is not a lightrainer weights file" in _run_export(capsys, ["--weights", str(junk)])
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    assert re.search("tensor.pt is not a lightrainer (weights file|checkpoint)", _run_export(capsys, ["--weights", str(tensor)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "tensor.pt"]


def _weights_of(net: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "model": net.state_dict(), "config": {}}, path)
    return path


def test_weights_of_a_different_model_exit_2(tmp_path, capsys, digits_yaml: str) -> None:
    from lightrainer.modules.nets import SmallCNN

    weights = _weights_of(SmallCNN(num_classes=4, in_channels=1), tmp_path / "run" / "weights" / "best.pt")
    err = _run_export(capsys, ["--weights", str(weights), "--config", digits_yaml])
    assert "saved by a different model than SmallCNN" in err and "head" in err
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.pt"]


def test_unknown_format_exit_2(qat_run: Path, capsys, digits_yaml: str) -> None:
    before = sorted(p.name for p in (qat_run / "weights").iterdir())
    err = _run_export(capsys, ["--weights", str(qat_run / "weights" / "best.pt"), "--config", digits_yaml,
                               "--format", "tflite"])
    assert "format: 'tflite' is not one of onnx, engine" in err
    assert sorted(p.name for p in (qat_run / "weights").iterdir()) == before


def test_non_exportable_op_exit_2_naming_op_and_module(tmp_path, capsys) -> None:
    config = tmp_path / "spectral.yaml"
    config.write_text(
        f"save_dir: {tmp_path}\nbatch: 32\nnum_workers: 0\nplots: False\n"
        "model:\n  class_path: lightrainer.modules.ClassificationModule\n  init_args:\n    num_classes: 10\n"
        f"    net:\n      class_path: {__name__}.SpectralNet\n"
        "data:\n  class_path: lightrainer.datamodules.DigitsDataModule\n"
    )
    weights = _weights_of(SpectralNet(), tmp_path / "run" / "weights" / "best.pt")
    err = _run_export(capsys, ["--weights", str(weights), "--config", str(config)])
    assert "aten::fft_rfft2 is not supported" in err and "SpectralNet" in err
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.pt"]
