"""The `lightrainer` command: flat YAML and flags, bad input (exit 2, one message, nothing written),
the notebook path and the CLI path agreeing, every shipped config training a few batches."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lightrainer as lt
from lightrainer.cli import main

FEW = ["--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2", "--epochs", "1"]


def results(run: Path) -> list[dict]:
    """results.csv's rows without the ``time`` column (wall-clock seconds differ between runs)."""
    with open(run / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


@pytest.fixture
def mnist(repo_path: str) -> str:
    return os.path.join(repo_path, "configs", "mnist.yaml")


def test_cli_fit_writes_the_run_folder(tmp_path, mnist: str) -> None:
    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path), *FEW]) == 0
    run = tmp_path / "mnist"
    for name in ("args.yaml", "results.csv", "results.png", "weights/best.pt", "weights/last.pt", "weights/last.ckpt"):
        assert (run / name).is_file(), name
    assert len(results(run)) == 1
    for picture in ("results.png", "confusion_matrix.png", "worst_val.png"):
        assert_real_picture(run / picture)


def test_cli_validate_scores_the_checkpoint_without_touching_the_run(tmp_path, mnist: str) -> None:
    """README: `lightrainer validate --config ... --ckpt_path .../best.ckpt` gives the fit's val metrics,
    in its own <name>_validate/ folder, with no warning about the checkpoint's callbacks or folder."""
    import warnings

    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path), *FEW]) == 0
    run = tmp_path / "mnist"
    fitted = results(run)[-1]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["validate", "--config", mnist, "--save_dir", str(tmp_path),
                     "--ckpt_path", str(run / "weights" / "best.ckpt"), "--trainer.limit_val_batches", "2"]) == 0
    noisy = [str(w.message) for w in caught if "dirpath" in str(w.message) or "callbacks used" in str(w.message)]
    assert not noisy
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    with open(tmp_path / "mnist_validate" / "logs" / "metrics.csv", newline="") as f:
        scored = list(csv.DictReader(f))[-1]
    for key in ("val/acc", "val/loss"):
        assert float(scored[key]) == pytest.approx(float(fitted[key]), abs=1e-5)


def assert_real_picture(path: Path, min_side: int = 300) -> None:
    """A PNG of a sensible size that is not blank."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert min(image.shape) >= min_side, (path, image.shape)
    assert image.std() > 5, f"{path} looks blank"


def test_notebook_and_cli_agree(tmp_path, mnist: str) -> None:
    from lightrainer.datamodules import MNIST5kDataModule
    from lightrainer.modules import ClassificationModule, SmallCNN

    cfg = lt.load_config(mnist, epochs=1, save_dir=str(tmp_path / "nb"))
    model = ClassificationModule(SmallCNN(num_classes=10), cfg)
    trainer = lt.build_trainer(cfg, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(model, datamodule=MNIST5kDataModule(cfg))
    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path / "cli"), *FEW]) == 0
    notebook, cli = results(Path(cfg.run_dir)), results(tmp_path / "cli" / "mnist")
    assert notebook == cli
    assert float(notebook[0]["val/acc"]) == pytest.approx(float(trainer.callback_metrics["val/acc"]), abs=1e-6)


def test_print_config_shows_derived_values(capsys, mnist: str) -> None:
    assert main(["fit", "--config", mnist, "--batch", "16", "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "batch: 16" in out and "accumulate: 4" in out and "weight_decay_scaled" in out


def test_flag_overrides_reach_the_trainer(tmp_path, mnist: str) -> None:
    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path), "--name", "flagged", "--batch=64", *FEW]) == 0
    args = (tmp_path / "flagged" / "args.yaml").read_text()
    assert "batch: 64" in args and "accumulate: 1" in args


@pytest.mark.parametrize(
    "content, flags, message",
    [
        ("lr00: 0.1\n", [], r"unknown key 'lr00' \(did you mean 'lr0'\?\)"),
        ("batch: 0\n", [], r"batch: must be >= 1"),
        ("optimizer: Adamm\n", [], r"optimizer: 'Adamm' is not one of SGD, Adam, Adamax, AdamW, NAdam, RAdam, RMSProp"),
        ("epochs: many\n", [], r"epochs: expected an integer"),
        ("momentum: 1.5\n", [], r"momentum: must be in \[0, 1\)"),
        ("batch: [1, 2\n", [], r"malformed YAML"),
        ("epochs: 1\n", ["--lr00", "0.1"], r"unknown flag --lr00 \(did you mean 'lr0'\?\)"),
        ("epochs: 1\n", ["--lrf", "-1"], r"lrf: must be >= 0"),
        ("epochs: 1\n", ["--ckpt_path", "nowhere/last.ckpt"], r"checkpoint not found: nowhere/last.ckpt"),
        ("epochs: 1\n", ["--resume"], r"no .*/weights/last.ckpt to resume from"),
        ("model:\n  class_path: lightrainer.modules.Nope\n", [], r"model.class_path: cannot import"),
    ],
)
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, content: str, flags: list, message: str) -> None:
    save_dir = tmp_path / "runs"
    (save_dir / "old").mkdir(parents=True)
    (save_dir / "old" / "results.csv").write_text("epoch\n1\n")
    config = tmp_path / "bad.yaml"
    config.write_text(content + f"save_dir: {save_dir}\n")
    code = main(["fit", "--config", str(config), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    import re

    assert re.search(message, err), err
    assert sorted(p.name for p in save_dir.iterdir()) == ["old"]  # no run folder created
    assert (save_dir / "old" / "results.csv").read_text() == "epoch\n1\n"  # earlier run untouched


def test_missing_config_file(capsys, tmp_path) -> None:
    assert main(["fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_foreign_checkpoint_is_refused(tmp_path, capsys, mnist: str) -> None:
    import torch

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path), "--ckpt_path", str(foreign)]) == 2
    assert "is not a lightrainer checkpoint" in capsys.readouterr().err
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04garbage")
    assert main(["fit", "--config", mnist, "--save_dir", str(tmp_path), "--ckpt_path", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "weights_only=False" not in err


def test_cli_resume_continues_the_run(tmp_path, mnist: str) -> None:
    base = ["fit", "--config", mnist, "--save_dir", str(tmp_path), "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--epochs", "3"]
    assert main([*base[:-2], "--epochs", "1"]) == 0
    assert main([*base, "--resume"]) == 0  # epochs may change on resume: train further
    rows = results(tmp_path / "mnist")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert not (tmp_path / "mnist2").exists()


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "lightrainer", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "lightrainer fit --config" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lightrainer", "fit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--lr0" in out.stdout and "--warmup_bias_lr" in out.stdout


@pytest.mark.parametrize("name", ["mnist.yaml", "digits.yaml", "trainer_cls_cfg.yml"])
def test_every_classification_config_trains_a_few_batches(tmp_path, repo_path: str, name: str) -> None:
    config = os.path.join(repo_path, "configs", name)
    assert main(["fit", "--config", config, "--save_dir", str(tmp_path), "--device", "cpu", "--num_workers", "0", *FEW]) == 0
    (run,) = list(tmp_path.iterdir())
    assert len(results(run)) == 1


def test_errors_point_at_readme_sections_that_exist(repo_path: str) -> None:
    import re

    from lightrainer.cli import _SECTIONS_BY_PACKAGE, _SECTIONS_BY_WORD, readme_section

    headings = re.findall(r"^## (.+)$", Path(repo_path, "README.md").read_text(), re.M)
    slugs = {"#" + re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    for anchor in {*_SECTIONS_BY_PACKAGE.values(), *_SECTIONS_BY_WORD.values(), "#every-key"}:
        assert anchor in slugs, anchor
    assert readme_section(ValueError("--ckpt_path: checkpoint not found")).endswith("#crash-safety-and-resume")
    assert readme_section(ValueError("unknown key 'lr00'")).endswith("#every-key")
