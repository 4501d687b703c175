"""examples/image_folder.py, shrunk: a JPEG folder, a timm backbone with augmentation through
`lightrainer fit`, the preview and confusion matrix, `lightrainer export --weights` alone."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import yaml


def test_image_folder_example(tmp_path, repo_path: str) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("kornia")
    pytest.importorskip("onnxruntime")
    from PIL import Image

    path = os.path.join(repo_path, "examples", "image_folder.py")
    spec = importlib.util.spec_from_file_location("example_image_folder", path)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example
    spec.loader.exec_module(example)

    run = example.main(save_dir=str(tmp_path), count=240, epochs=1, size=24, batch=32, net="timm/test_resnet",
                       workers=1, flags=("--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false"))
    folder = tmp_path / "digits_jpg_240_24"
    assert sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in folder.glob("*/*.jpg")) == 240
    assert Image.open(next(folder.glob("3/*.jpg"))).size == (24, 24)
    for picture in ("aug_preview.png", "confusion_matrix.png"):
        assert Image.open(run / picture).size[0] > 500, picture
    args = yaml.safe_load((run / "args.yaml").read_text())
    assert args["net"] == "timm/test_resnet" and args["degrees"] == 10.0 and args["cutmix"] == 0.1
    assert json.loads((run / "weights" / "best.onnx.verify.json").read_text())["passed"]
