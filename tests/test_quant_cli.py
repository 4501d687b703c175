"""Quantization bad input through `lightrainer fit` / `lightrainer ptq` in-process: exit 2, one message,
no traceback, no run folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightrainer.cli import main
from lightrainer.quant import QuantBackend, get_backend
from lightrainer.quant import base as quant_base
from lightrainer.registry import Registry

FEW = ["--epochs", "1", "--plots", "False", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
       "--trainer.enable_progress_bar", "False"]


class NoLayers(nn.Module):
    """A classifier with nothing int8 can quantize (pooling and a BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((2, 5))
        self.norm = nn.BatchNorm1d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.pool(x).flatten(1))


class AbsentBackend(QuantBackend):
    """A registry entry whose library is genuinely not installed here."""

    name = "absent"
    module = "lightrainer_absent_int8_library"

    def make_quantizer(self, axis: int | None) -> nn.Module:
        raise NotImplementedError

    def make_calibrator(self, kind: str, axis: int | None, num_bins: int) -> Any:
        raise NotImplementedError


@pytest.fixture
def digits_yaml(repo_path: str) -> str:
    return os.path.join(repo_path, "configs", "digits.yaml")


def _fails(capsys, save_dir: Path, argv: list[str], message: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert re.search(message, err), err
    assert not save_dir.exists() or not list(save_dir.iterdir()), list(save_dir.rglob("*"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ptq", "True", "--method", "kl"], r"method: 'kl' is not one of entropy, max, percentile, mse"),
        (["--ptq", "True", "--qat", "True"], r"ptq and qat are both True: choose one"),
        (["--ptq", "True", "--num_batches", "0"], r"num_batches: must be >= 1"),
        (["--qat", "True", "--num_batches", "-3"], r"num_batches: must be >= 1"),
    ],
)
def test_bad_quant_settings_exit_2(tmp_path, capsys, digits_yaml: str, flags: list, message: str) -> None:
    save_dir = tmp_path / "runs"
    _fails(capsys, save_dir, ["fit", "--config", digits_yaml, "--save_dir", str(save_dir), *flags, *FEW], message)


def test_no_backend_installed_exit_2(tmp_path, capsys, monkeypatch, digits_yaml: str) -> None:
    # The registry holds one backend, and its library is not installed: "auto" finds none.
    only_absent = Registry("quantization backend", key="quant_backend")
    only_absent.register(AbsentBackend.name, AbsentBackend())
    monkeypatch.setattr(quant_base, "QUANT_BACKENDS", only_absent)
    with pytest.raises(ValueError, match=r"absent is not installed \(No module named 'lightrainer_absent_int8_library'\)"):
        get_backend("absent")
    save_dir = tmp_path / "runs"
    for flag in ("--ptq", "--qat", "--trt_quant"):
        _fails(capsys, save_dir, ["fit", "--config", digits_yaml, "--save_dir", str(save_dir), flag, "True", *FEW],
               r'none is installed .*pip install "lightrainer\[quant\]"')


def test_placeholder_pytorch_quantization_exit_2(tmp_path, capsys, monkeypatch, digits_yaml: str) -> None:
    # A real distribution on sys.path, as `pip install pytorch-quantization` (2.2.x) leaves it.
    info = tmp_path / "site" / "pytorch_quantization-2.2.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytorch-quantization\nVersion: 2.2.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    save_dir = tmp_path / "runs"
    _fails(capsys, save_dir, ["fit", "--config", digits_yaml, "--save_dir", str(save_dir), "--qat", "True",
                              "--quant_backend", "pytorch_quantization", *FEW],
           r"pytorch-quantization 2\.2\.1 is a placeholder.*pip install pytorch-quantization==2\.1\.3")


def test_nothing_to_quantize_exit_2(tmp_path, capsys) -> None:
    save_dir = tmp_path / "runs"
    config = tmp_path / "nolayers.yaml"
    config.write_text(
        f"save_dir: {save_dir}\nnum_workers: 0\n"
        "model:\n  class_path: lightrainer.modules.ClassificationModule\n  init_args:\n    num_classes: 10\n"
        f"    net:\n      class_path: {__name__}.NoLayers\n"
        "data:\n  class_path: lightrainer.datamodules.DigitsDataModule\n"
    )
    for flag in ("--ptq", "--qat"):
        _fails(capsys, save_dir, ["fit", "--config", str(config), flag, "True", *FEW],
               r"NoLayers has no Conv/Linear layer to quantize: register your layer type")


def test_ptq_command_bad_weights_exit_2(tmp_path, capsys, digits_yaml: str) -> None:
    save_dir = tmp_path / "runs"
    _fails(capsys, save_dir, ["ptq", "--config", digits_yaml, "--weights", str(tmp_path / "none" / "best.pt")],
           r"file not found")
    from lightrainer.modules.nets import SmallCNN
    from lightrainer.quant import calibrate, quantize_model

    net = quantize_model(SmallCNN(num_classes=10, in_channels=1), "pytorch_quantization")
    calibrate(net, [torch.rand(4, 1, 8, 8)], "max")
    weights = tmp_path / "qat" / "weights" / "best.pt"
    weights.parent.mkdir(parents=True)
    torch.save({"model": net.state_dict(), "config": {}}, weights)
    _fails(capsys, save_dir, ["ptq", "--config", digits_yaml, "--weights", str(weights)],
           r"ptq: these weights are quantized already .*lightrainer export")
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.pt"]
