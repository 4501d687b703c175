"""Every example runs, shrunk by its arguments (epochs, batches), not by a separate code path."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

FEW = {"epochs": 1, "limit_train_batches": 4, "limit_val_batches": 3, "enable_progress_bar": False}


def load_example(repo_path: str, name: str):
    path = os.path.join(repo_path, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_custom_task(tmp_path, repo_path: str) -> None:
    cfg = load_example(repo_path, "custom_task").main(save_dir=str(tmp_path), **FEW)
    assert (tmp_path / "ink" / "results.csv").is_file()
    assert "val/mae" in (tmp_path / "ink" / "results.csv").read_text().splitlines()[0]
    assert cfg.run_dir == str(tmp_path / "ink")


def test_point_clouds_pads_and_saves_only_the_encoder(tmp_path, repo_path: str) -> None:
    example = load_example(repo_path, "point_clouds")
    x = torch.zeros(2, 784 * 3)
    x[0, :6] = torch.tensor([0.1, 0.2, 0.9, 0.3, 0.4, 0.5])  # 2 points
    x[1, :3] = torch.tensor([0.5, 0.5, 1.0])  # 1 point
    (points, mask), y = example.pad_points([(x[0], torch.tensor(3)), (x[1], torch.tensor(7))])
    assert points.shape == (2, 2, 3) and mask.tolist() == [[True, True], [True, False]]
    assert y.tolist() == [3, 7]
    net = example.PointNet()
    padded = net((points, mask))
    alone = net((points[1:, :1], mask[1:, :1]))
    torch.testing.assert_close(padded[1:], alone)  # padding does not change the answer

    cfg = example.main(save_dir=str(tmp_path), **FEW)
    saved = torch.load(os.path.join(cfg.run_dir, "weights", "best.pt"), weights_only=True)["model"]
    assert set(saved) == set(net.encoder.state_dict())


def test_deploy_trains_quantizes_exports_and_times(tmp_path, repo_path: str) -> None:
    result = load_example(repo_path, "deploy").main(save_dir=str(tmp_path), qat_epochs=1, **FEW)
    run, qat_run = result["run"], result["qat_run"]
    for name in ("ptq_results.md", "quant_sensitivity.png", "latency.md", "weights/best.onnx",
                 "weights/best.onnx.verify.json", "weights/best_int8.onnx"):
        assert (run / name).is_file(), name
    assert (qat_run / "weights" / "best_int8.onnx").is_file()
    backends = {row.backend for row in result["latency"]}
    assert {"pytorch-eager", "onnxruntime-fp32", "onnxruntime-qdq"} <= backends
    if result["engine"] is None:  # no TensorRT here: the table says why
        assert "tensorrt" in (run / "latency.md").read_text()


def test_vqvae_walkthrough(tmp_path, repo_path: str) -> None:
    from PIL import Image

    path = load_example(repo_path, "vqvae_walkthrough").main(
        save_dir=str(tmp_path), epochs=1, limit_train_batches=4, limit_val_batches=2, enable_progress_bar=False
    )
    assert Image.open(path).size[0] > 1000
    assert list(path.parent.glob("recon_epoch*.png"))
