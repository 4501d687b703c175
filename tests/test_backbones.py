"""Backbones by name (timm, torchvision): checked names, sized to the data, pretrained weights from
the local cache only (a missing file is named, exit 2), and a timm backbone trained, quantized and
exported. Nothing here downloads: weight files are written by the tests."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import lightrainer as lt
from lightrainer.cli import main
from lightrainer.config import ConfigError
from lightrainer.datamodules import ArrayDataModule, ImageFolderDataModule
from lightrainer.modules import BACKBONE_SOURCES, ClassificationModule, SmallCNN
from lightrainer.modules.backbones import adapt_input_conv, build_backbone

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

#: A small model of each source, and the file its pretrained weights are cached as.
SMALL = {"timm": "test_resnet", "torchvision": "mobilenet_v3_small"}


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Torch's and Hugging Face's caches pointed at empty folders (nothing found, nothing fetched)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def cfg_with(**keys):
    return lt.load_config({"batch": 8, "num_workers": 0, **keys}, task_class=ClassificationModule)


def test_every_source_has_a_small_model_here():
    assert set(SMALL) == set(BACKBONE_SOURCES)


@pytest.mark.parametrize("source", list(BACKBONE_SOURCES))
def test_names_are_checked_with_the_closest(source):
    name = SMALL[source]
    assert cfg_with(net=f"{source}/{name}").extra("net") == f"{source}/{name}"
    with pytest.raises(ConfigError, match=rf"^net: {source} has no classifier '{name}x' \(did you mean '{name}'"):
        cfg_with(net=f"{source}/{name}x")


@pytest.mark.parametrize("value,match", [
    ("resnet18", "is not SOURCE/NAME"),
    ("tim/resnet18", r"'tim' is not one of .*did you mean 'timm'"),
    ("timm/", "is not SOURCE/NAME"),
])
def test_bad_net_values(value, match):
    with pytest.raises(ConfigError, match=rf"^net: .*{match}"):
        cfg_with(net=value)


def test_bad_net_exits_2_on_the_command_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"save_dir: {tmp_path / 'runs'}\nnet: timm/resnet18x\n")
    assert main(["fit", "--config", str(config)]) == 2
    assert "net: timm has no classifier 'resnet18x'" in capsys.readouterr().err


@pytest.mark.parametrize("source", list(BACKBONE_SOURCES))
@pytest.mark.parametrize("channels", [1, 3])
def test_default_net_is_sized_to_the_data(source, channels):
    cfg = cfg_with(net=f"{source}/{SMALL[source]}")
    data = ArrayDataModule(cfg, train=(torch.rand(20, channels, 32, 32), torch.arange(20) % 7))
    net = ClassificationModule.default_net(cfg, data)
    module = ClassificationModule(net, cfg)
    assert module.num_classes == 7 and net.lightrainer_backbone == f"{source}/{SMALL[source]}"
    assert net.eval()(torch.rand(2, channels, 32, 32)).shape == (2, 7)


def test_without_net_the_default_is_small_cnn():
    cfg = cfg_with()
    assert isinstance(ClassificationModule.default_net(cfg, None), SmallCNN)
    with pytest.raises(ConfigError, match="^pretrained: True needs a backbone"):
        ClassificationModule.default_net(cfg_with(pretrained=True), None)


def test_net_key_and_another_network_are_refused():
    with pytest.raises(ConfigError, match="^net: the config names the backbone timm/test_resnet"):
        ClassificationModule(SmallCNN(10), cfg_with(net="timm/test_resnet"))


# --- pretrained weights -----------------------------------------------------------------------
@pytest.mark.parametrize("source,file", [
    ("timm", "timm--test_resnet.r160_in1k.safetensors"),
    ("torchvision", "mobilenet_v3_small-047dcff4.pth"),
])
def test_missing_pretrained_file_is_named_with_where_to_put_it(empty_caches, source, file):
    cfg = cfg_with(net=f"{source}/{SMALL[source]}", pretrained=True)
    with pytest.raises(ConfigError, match=rf"save it as {empty_caches / file}.*or set pretrained: False"):
        ClassificationModule.default_net(cfg, None)


def test_missing_pretrained_file_exits_2_before_any_work(empty_caches, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"save_dir: {tmp_path / 'runs'}\nnet: timm/test_resnet\npretrained: True\n")
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "timm--test_resnet.r160_in1k.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_timm_pretrained_from_the_cache_file(empty_caches, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_resnet")  # 1000 ImageNet classes, like the published file
    empty_caches.mkdir(parents=True)
    save_file(source.state_dict(), str(empty_caches / "timm--test_resnet.r160_in1k.safetensors"))
    for channels in (3, 1):
        net = build_backbone("timm/test_resnet", num_classes=4, in_channels=channels, pretrained=True)
        state = net.state_dict()
        torch.testing.assert_close(state["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
        first = source.state_dict()["conv1.0.weight"]
        torch.testing.assert_close(state["conv1.0.weight"], first if channels == 3 else first.sum(1, keepdim=True))
        assert state["fc.weight"].shape == (4, source.fc.in_features)  # a new head for 4 classes


def test_torchvision_pretrained_from_the_cache_file(empty_caches):
    torch.manual_seed(2)
    source = torchvision.models.mobilenet_v3_small()
    empty_caches.mkdir(parents=True)
    torch.save(source.state_dict(), empty_caches / "mobilenet_v3_small-047dcff4.pth")
    net = build_backbone("torchvision/mobilenet_v3_small", num_classes=5, in_channels=1, pretrained=True)
    state, want = net.state_dict(), source.state_dict()
    torch.testing.assert_close(state["features.1.block.0.0.weight"], want["features.1.block.0.0.weight"])
    torch.testing.assert_close(state["features.0.0.weight"], want["features.0.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(state["classifier.0.weight"], want["classifier.0.weight"])
    assert state["classifier.3.weight"].shape == (5, 1024)


def test_adapt_input_conv_keeps_the_response_to_grey_input():
    w = torch.randn(8, 3, 3, 3)
    grey = torch.rand(1, 1, 6, 6)
    same = torch.nn.functional.conv2d(grey.expand(1, 3, 6, 6), w)
    torch.testing.assert_close(torch.nn.functional.conv2d(grey, adapt_input_conv(w, 1)), same)
    four = adapt_input_conv(w, 4)
    assert four.shape == (8, 4, 3, 3)
    torch.testing.assert_close(four[:, :3], w * 0.75)


def test_pretrained_weights_bring_their_normalization(empty_caches, tmp_path):
    from safetensors.torch import save_file

    empty_caches.mkdir(parents=True)
    save_file(timm.create_model("test_resnet").state_dict(), str(empty_caches / "timm--test_resnet.r160_in1k.safetensors"))
    from PIL import Image

    for c in range(2):
        (tmp_path / "img" / str(c)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 60 * c + i, np.uint8)).save(tmp_path / "img" / str(c) / f"{i}.png")
    cfg = cfg_with(net="timm/test_resnet", pretrained=True)
    data = ImageFolderDataModule(cfg, tmp_path / "img", image_size=8)
    ClassificationModule.default_net(cfg, data)
    assert data.mean == data.std == (0.5, 0.5, 0.5)  # test_resnet's own (most timm models: ImageNet's)
    given = ImageFolderDataModule(cfg, tmp_path / "img", image_size=8, mean=(0.1,) * 3, std=(0.2,) * 3)
    ClassificationModule.default_net(cfg, given)
    assert given.mean == (0.1,) * 3


# --- trained, quantized, exported ---------------------------------------------------------------
def test_timm_backbone_trains_quantizes_and_exports(tmp_path):
    """A timm ResNet by name through fit with PTQ (max calibration) and ONNX export after fit:
    the FP32 and Q/DQ ONNX models verified in ONNX Runtime, then rebuilt from the weights alone."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pytorch_quantization")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 3, 16, 16, generator=g)
    y = (x[:, 0].mean(dim=(1, 2)) > x[:, 1].mean(dim=(1, 2))).long() + 2 * (x[:, 2, :8].mean(dim=(1, 2)) > 0.5).long()
    cfg = lt.load_config({"save_dir": str(tmp_path), "epochs": 1, "batch": 16, "num_workers": 0, "device": "cpu",
                          "net": "timm/test_resnet", "fliplr": 0.5, "ptq": True, "method": "max", "num_batches": 2,
                          "export": "onnx", "quant_backend": "pytorch_quantization"})
    data = ArrayDataModule(cfg, train=(x, y))
    module = ClassificationModule(ClassificationModule.default_net(cfg, data), cfg)
    lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    weights = tmp_path / "train" / "weights"
    for name in ("best.onnx", "best_int8.onnx", "best_int8.pt"):
        assert (weights / name).is_file(), name
    for report in ("best.onnx.verify.json", "best_int8.onnx.verify.json"):
        assert json.loads((weights / report).read_text())["passed"], report
    assert (tmp_path / "train" / "ptq_results.md").is_file()
    assert os.path.getsize(weights / "best.pt") > 100_000


def test_timm_backbone_trains_quantization_aware(tmp_path):
    """QAT on a timm backbone: quantized at setup, calibrated, trained, its Q/DQ ONNX verified."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("pytorch_quantization")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(64, 3, 16, 16, generator=g), torch.arange(64) % 3
    cfg = lt.load_config({"save_dir": str(tmp_path), "epochs": 1, "batch": 16, "num_workers": 0, "device": "cpu",
                          "net": "timm/test_resnet", "qat": True, "method": "max", "num_batches": 2,
                          "quant_backend": "pytorch_quantization"})
    data = ArrayDataModule(cfg, train=(x, y))
    module = ClassificationModule(ClassificationModule.default_net(cfg, data), cfg)
    lt.build_trainer(cfg, enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    report = json.loads((tmp_path / "train" / "weights" / "best_int8.onnx.verify.json").read_text())
    assert report["passed"]
