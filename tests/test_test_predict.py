"""The held-out test split, `lightrainer test` (test_results.csv/.md, confusion matrix, per-class
scores checked against sklearn) and `lightrainer predict` (predictions.csv, images, --source); the
validation order that makes `limit_val_batches` a fair sample; metrics over every rank under DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lightrainer as lt
from lightrainer.cli import main
from lightrainer.config import ConfigError
from lightrainer.datamodules import ArrayDataModule, DigitsDataModule, ImageFolderDataModule, InMemoryBatchLoader
from lightrainer.datamodules.base import split_indices, stratified_split

QUICK = ["--epochs", "1", "--trainer.limit_train_batches", "8", "--trainer.enable_progress_bar", "false"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16, digits.target


def net_from(weights: Path) -> torch.nn.Module:
    from lightrainer.modules import SmallCNN

    net = SmallCNN(num_classes=10, in_channels=1)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["model"])
    return net.eval()


# --- the split ---------------------------------------------------------------------------------
def test_split_is_seeded_stratified_and_disjoint() -> None:
    labels = np.repeat(np.arange(5), 40)
    train, val, test = split_indices(200, labels, 0.2, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (140, 40, 20)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert sorted([*train, *val, *test]) == list(range(200))
    assert Counter(labels[test]) == {c: 4 for c in range(5)} and Counter(labels[val]) == {c: 8 for c in range(5)}
    again = split_indices(200, labels, 0.2, 0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(test, split_indices(200, labels, 0.2, 0.1, seed=4)[2])


def test_no_test_split_keeps_the_train_val_split() -> None:
    labels = np.repeat(np.arange(10), 30)
    train, val, test = split_indices(300, labels, 0.2, 0.0, seed=0)
    old_train, old_val = stratified_split(300, labels, 0.2, seed=0)
    assert np.array_equal(train, old_train) and np.array_equal(val, old_val) and len(test) == 0


def test_digits_test_split_is_held_out_of_training_and_validation() -> None:
    x, y = digits_arrays()
    dm = DigitsDataModule(lt.load_config({"batch": 32, "test_split": 0.1}))
    dm.setup()
    ids = dm.sample_ids
    assert len(ids["test"]) == 180 and len(ids["train"]) + len(ids["val"]) + 180 == 1797
    assert not set(ids["test"]) & (set(ids["train"]) | set(ids["val"]))
    assert Counter(dm.test_data[1].tolist()) == Counter(y[ids["test"]].tolist())
    assert torch.equal(dm.test_data[0][:, 0], torch.from_numpy(x[ids["test"]]))
    assert dm.scored_split() == "test"


@pytest.mark.parametrize("values, match", [
    ({"test_split": 1.0}, r"test_split: must be in \[0, 1\)"),
    ({"test_split": -0.1}, r"test_split: must be in \[0, 1\)"),
    ({"val_split": 0.5, "test_split": 0.5}, "val_split \\+ test_split = 1 leaves no training data"),
])
def test_bad_test_split_is_refused_at_load(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        lt.load_config(values)


def test_array_and_folder_test_sets(tmp_path: Path) -> None:
    from PIL import Image

    x, y = torch.rand(60, 1, 4, 4), torch.arange(60) % 3
    explicit = ArrayDataModule(lt.load_config({"batch": 8}), train=(x, y), test=(x[:6], y[:6]))
    explicit.setup()
    assert torch.equal(explicit.test_data[0], x[:6])
    carved = ArrayDataModule(lt.load_config({"batch": 8, "test_split": 0.2}), train=(x, y), val=(x[:3], y[:3]))
    carved.setup()
    assert len(carved.test_data[0]) == 12 and len(carved.train_data[0]) == 48
    with pytest.raises(ConfigError, match="test_split: 0.2 and an explicit test set"):
        ArrayDataModule(lt.load_config({"batch": 8, "test_split": 0.2}), train=(x, y), test=(x, y)).setup()

    for root, count in ((tmp_path / "train", 5), (tmp_path / "test", 2)):
        for cls, value in (("cat", 0), ("dog", 255)):
            (root / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((4, 4), value, np.uint8)).save(root / cls / f"{i}.png")
    folder = ImageFolderDataModule(lt.load_config({"batch": 4}), tmp_path / "train", image_size=4, channels=1,
                                   test_root=tmp_path / "test")
    folder.setup()
    assert folder.test_data[1].tolist() == [0, 0, 1, 1] and len(folder.train_data[0]) + len(folder.val_data[0]) == 10
    assert folder.sample_ids["test"][0].endswith(os.path.join("test", "cat", "0.png"))
    (tmp_path / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "test" / "bird" / "0.png")
    with pytest.raises(ConfigError, match="test_root: class folder 'bird' is not one of the training classes"):
        ImageFolderDataModule(lt.load_config({"batch": 4}), tmp_path / "train", image_size=4, channels=1,
                              test_root=tmp_path / "test").setup()


# --- the validation order ------------------------------------------------------------------------
def test_first_val_batches_are_a_fair_sample_the_same_every_epoch() -> None:
    dm = DigitsDataModule(lt.load_config({"batch": 32}))
    dm.setup()
    loader = dm.val_dataloader()
    first_two = [b[1] for _, b in zip(range(2), loader)]  # what --trainer.limit_val_batches 2 scores
    assert len(set(torch.cat(first_two).tolist())) > 2  # the sorted order gave digits 0 and 1 only
    epochs = [torch.cat([b[1] for b in loader]) for _ in range(2)]
    assert torch.equal(epochs[0], epochs[1]) and sorted(epochs[0].tolist()) == sorted(dm.val_data[1].tolist())
    # Under DDP each rank serves a share: every sample exactly once, no padding.
    shards = [InMemoryBatchLoader(dm.val_data, 16, shuffle=True, reshuffle=False, rank=r, world_size=2,
                                  equal_batches=False) for r in range(2)]
    served = torch.cat([b[1] for shard in shards for b in shard])
    assert sorted(served.tolist()) == sorted(dm.val_data[1].tolist())


# --- lightrainer test / predict --------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, repo_path_module: str) -> Path:
    save_dir = tmp_path_factory.mktemp("runs")
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    assert main(["fit", "--config", config, "--save_dir", str(save_dir), *QUICK]) == 0
    return save_dir


@pytest.fixture(scope="module")
def repo_path_module() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_writes_per_class_scores_that_sklearn_agrees_with(digits_run: Path, repo_path_module: str) -> None:
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    weights = digits_run / "digits" / "weights" / "best.pt"
    assert main(["test", "--config", config, "--save_dir", str(digits_run), "--ckpt_path", str(weights),
                 "--trainer.enable_progress_bar", "false"]) == 0
    out = digits_run / "digits_test"
    table = rows(out / "test_results.csv")
    # Independently: the weights on the held-out images, scored by sklearn.
    x, y = digits_arrays()
    dm = DigitsDataModule(lt.load_config(config))
    dm.setup()
    test = dm.sample_ids["test"]
    with torch.no_grad():
        pred = net_from(weights)(torch.from_numpy(x[test]).unsqueeze(1)).argmax(1).numpy()
    precision, recall, f1, support = precision_recall_fscore_support(y[test], pred, labels=range(10), zero_division=0)
    for i in range(10):
        row = table[i]
        assert row["class"] == str(i) and int(row["support"]) == support[i]
        for key, expected in (("precision", precision[i]), ("recall", recall[i]), ("f1", f1[i])):
            assert float(row[key]) == pytest.approx(expected, abs=1e-5), (i, key)
    averages = {r["class"]: r for r in table[10:]}
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y[test], pred, average=average, zero_division=0)
        got = averages[f"{average} avg"]
        assert [float(got[k]) for k in ("precision", "recall", "f1")] == pytest.approx(expected[:3], abs=1e-5)
    assert float(averages["accuracy"]["f1"]) == pytest.approx(accuracy_score(y[test], pred), abs=1e-5)
    text = (out / "test_results.md").read_text()
    assert "- split: test" in text and "- samples: 180" in text and "| macro avg |" in text
    assert "![confusion_matrix_test](confusion_matrix_test.png)" in text
    assert (out / "confusion_matrix_test.png").stat().st_size > 10_000

    # A second test never overwrites the first: it gets a numbered folder.
    assert main(["test", "--config", config, "--save_dir", str(digits_run), "--ckpt_path", str(weights),
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert rows(digits_run / "digits_test2" / "test_results.csv") == table


def test_without_a_test_split_test_scores_validation_and_says_so(digits_run: Path, repo_path_module: str,
                                                                caplog) -> None:
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    weights = digits_run / "digits" / "weights" / "best.pt"
    assert main(["test", "--config", config, "--save_dir", str(digits_run), "--name", "noheldout",
                 "--test_split", "0", "--ckpt_path", str(weights), "--trainer.enable_progress_bar", "false"]) == 0
    assert "no test split (test_split: 0): scoring the VALIDATION split" in caplog.text
    text = (digits_run / "noheldout_test" / "test_results.md").read_text()
    assert "- split: val (no test split: test_split is 0)" in text and "- samples: 360" in text


def test_predict_writes_a_row_per_test_sample(digits_run: Path, repo_path_module: str) -> None:
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    weights = digits_run / "digits" / "weights" / "best.pt"
    assert main(["predict", "--config", config, "--save_dir", str(digits_run), "--ckpt_path", str(weights),
                 "--trainer.enable_progress_bar", "false"]) == 0
    table = rows(digits_run / "digits_predict" / "predictions.csv")
    x, y = digits_arrays()
    index = np.array([int(r["index"]) for r in table])
    dm = DigitsDataModule(lt.load_config(config))
    dm.setup()
    assert np.array_equal(index, np.sort(dm.sample_ids["test"]))
    with torch.no_grad():
        probs = net_from(weights)(torch.from_numpy(x[index]).unsqueeze(1)).softmax(1)
    assert [int(r["pred"]) for r in table] == probs.argmax(1).tolist()
    assert [float(r["confidence"]) for r in table] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    assert [int(r["target"]) for r in table] == y[index].tolist()
    assert all(r["correct"] == str(int(r["pred"] == r["target"])) for r in table)
    assert all(len(r["top5"].split()) == 5 and r["top5"].split()[0] == r["pred"] for r in table)


def test_predict_on_a_folder_of_images(digits_run: Path, repo_path_module: str, tmp_path: Path) -> None:
    from PIL import Image

    x, _ = digits_arrays()
    source = tmp_path / "scans"
    (source / "more").mkdir(parents=True)
    pixels = [(x[i] * 255).round().astype(np.uint8) for i in range(5)]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(source / ("more" if i % 2 else "") / f"digit{i}.png")
    (source / "notes.txt").write_text("not an image")
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    weights = digits_run / "digits" / "weights" / "best.pt"
    assert main(["predict", "--config", config, "--save_dir", str(tmp_path), "--ckpt_path", str(weights),
                 "--source", str(source), "--trainer.enable_progress_bar", "false"]) == 0
    table = rows(tmp_path / "digits_predict" / "predictions.csv")
    names = [Path(r["file"]).name for r in table]
    assert names == ["digit0.png", "digit2.png", "digit4.png", "digit1.png", "digit3.png"]  # sorted paths
    # Independently: the PNGs as the network's inputs, pixel / 255 (the digits' 0..1 scale).
    images = torch.from_numpy(np.stack([pixels[int(n[5])] for n in names]).astype(np.float32) / 255).unsqueeze(1)
    with torch.no_grad():
        probs = net_from(weights)(images).softmax(1)
    assert [int(r["pred"]) for r in table] == probs.argmax(1).tolist()
    assert [float(r["confidence"]) for r in table] == pytest.approx(probs.max(1).values.tolist(), abs=1e-4)
    assert "target" not in table[0]


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "missing", "--source: image folder not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "--source: no images"),
])
def test_predict_source_bad_folder_is_one_line_exit_2(digits_run: Path, repo_path_module: str, tmp_path: Path,
                                                      capsys, make, match) -> None:
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    weights = digits_run / "digits" / "weights" / "best.pt"
    save_dir = tmp_path / "runs"
    assert main(["predict", "--config", config, "--save_dir", str(save_dir), "--ckpt_path", str(weights),
                 "--source", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err
    assert not save_dir.exists()


def test_vqvae_test_report_and_predicted_images(tmp_path: Path) -> None:
    from PIL import Image

    from lightrainer.callbacks.predictions import PredictionWriter
    from lightrainer.callbacks.test_results import TestResults
    from lightrainer.datamodules import PhotoPatchesDataModule
    from lightrainer.modules import VQVAEModule

    values = {"save_dir": str(tmp_path), "batch": 8, "lpips_weight": 0.0, "test_split": 0.25, "patch_size": 16,
              "channels": 8, "res_blocks": 1, "downsample": 2, "codebook_size": 16, "code_dim": 4}
    cfg = lt.load_config(values, task_class=VQVAEModule)
    dm = PhotoPatchesDataModule(cfg, train_photos=("coffee",), val_photos=("flower",), max_side=128)
    module = VQVAEModule.from_config(cfg)
    trainer = lt.build_trainer(cfg, callbacks=[TestResults(), PredictionWriter()], enable_progress_bar=False)
    trainer.test(module, datamodule=dm)
    run = Path(cfg.run_dir)
    assert dm.sample_ids["test"].size and not set(dm.sample_ids["test"]) & set(dm.sample_ids["val"])
    metrics = rows(run / "test_results.csv")[0]
    assert {"psnr", "ssim", "loss"} <= set(metrics)
    assert (run / "reconstruction_test.png").stat().st_size > 5_000
    assert "![reconstruction_test](reconstruction_test.png)" in (run / "test_results.md").read_text()

    trainer.predict(module, datamodule=dm, return_predictions=False)
    table = rows(run / "predictions.csv")
    assert len(table) == len(dm.test_data[0])
    first = table[0]
    position = int(np.flatnonzero(dm.sample_ids["test"] == int(first["index"]))[0])
    x = dm.test_data[0][position:position + 1]
    with torch.no_grad():
        recon = module.net.eval()(x)[0].clamp(0, 1)
    mse = float(((recon - x) ** 2).mean())
    assert float(first["mse"]) == pytest.approx(mse, rel=1e-4)
    assert float(first["psnr"]) == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
    saved = np.asarray(Image.open(run / first["image"]).convert("RGB"), dtype=np.float32) / 255
    assert np.abs(saved - recon[0].permute(1, 2, 0).numpy()).max() <= 1 / 255 + 1e-6


# --- every rank -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_score_the_whole_split(tmp_path: Path, repo_path_module: str) -> None:
    """Under DDP the confusion matrix of fit, the test report and the predictions cover the whole
    split (each rank scores its share), and agree with one process."""
    config = os.path.join(repo_path_module, "configs", "digits.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LIGHTRAINER_RUN_DIR"):
        env.pop(var, None)

    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "lightrainer", *args, "--config", config, "--save_dir",
                               str(tmp_path), "--device", "cpu", "--devices", "2", "--trainer.enable_progress_bar",
                               "false"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr + proc.stdout

    log = run("fit", "--epochs", "1", "--trainer.limit_train_batches", "4")
    assert "classification plots over 360 validation samples" in log
    weights = str(tmp_path / "digits" / "weights" / "best.pt")
    run("test", "--ckpt_path", weights)
    two = rows(tmp_path / "digits_test" / "test_results.csv")
    assert int(two[-1]["support"]) == 180 and sum(int(r["support"]) for r in two[:10]) == 180
    run("predict", "--ckpt_path", weights)
    predicted = rows(tmp_path / "digits_predict" / "predictions.csv")
    assert len(predicted) == 180 and len({r["index"] for r in predicted}) == 180
    # One process gives the same table.
    assert main(["test", "--config", config, "--save_dir", str(tmp_path), "--name", "one", "--ckpt_path", weights,
                 "--trainer.enable_progress_bar", "false"]) == 0
    assert rows(tmp_path / "one_test" / "test_results.csv") == two
