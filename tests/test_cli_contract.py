"""The command line is LightningCLI's, without surprises: one parser, configs that round-trip,
Trainer arguments checked before any folder exists, resume that trusts its checkpoint."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightrainer.cli import main, resume_differences
from test_cli import results  # results.csv without its time column

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits.yaml")
FEW = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2", "--plots", "False"]


def printed(capsys, *args: str) -> str:
    capsys.readouterr()
    assert main(["fit", *args, "--print_config"]) == 0
    return capsys.readouterr().out


def loaded(text: str) -> dict:
    """The keys a printed config holds (the derived comments are not read back)."""
    return yaml.safe_load(text)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.y*ml")))
def test_print_config_round_trips_for_every_shipped_config(tmp_path, capsys, config) -> None:
    first = printed(capsys, "--config", str(REPO / "configs" / config))
    assert "derived" not in loaded(first) and "#   accumulate:" in first
    path = tmp_path / "printed.yaml"
    path.write_text(first)
    assert printed(capsys, "--config", str(path)) == first


def test_a_runs_args_yaml_trains_the_same_run_again(tmp_path, capsys) -> None:
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path), "--epochs", "1", "--seed", "7", *FEW]) == 0
    args = tmp_path / "digits" / "args.yaml"
    saved = loaded(args.read_text())
    assert saved["seed"] == 7 and saved["trainer"]["limit_train_batches"] == 2
    assert saved["model"]["class_path"].endswith("ClassificationModule") and "data" in saved
    again = loaded(printed(capsys, "--config", str(args)))
    assert again == saved
    assert main(["fit", "--config", str(args)]) == 0
    assert results(tmp_path / "digits") == results(tmp_path / "digits2")  # same keys, sections and seed: the same run


def test_several_configs_merge_as_in_lightningcli(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("epochs: 3\ntrainer:\n  limit_train_batches: 5\nmodel:\n  class_path: lightrainer.modules.ClassificationModule\n"
                 "  init_args:\n    net:\n      class_path: lightrainer.modules.SmallCNN\n      init_args: {width: 4}\n")
    b.write_text("batch: 16\ntrainer:\n  limit_val_batches: 2\nmodel:\n  init_args:\n    net:\n      init_args: {dropout: 0.3}\n")
    out = loaded(printed(capsys, "--config", str(a), "--config", str(b), "--model.init_args.net.init_args.num_classes", "7"))
    assert out["epochs"] == 3 and out["batch"] == 16
    assert out["trainer"] == {"limit_train_batches": 5, "limit_val_batches": 2}
    assert out["model"]["init_args"]["net"]["init_args"] == {"num_classes": 7, "in_channels": 1, "width": 4, "dropout": 0.3}


def test_seed_everything_ckpt_path_print_flags_version_and_help(tmp_path, capsys) -> None:
    assert loaded(printed(capsys, "--config", DIGITS, "--seed_everything", "123"))["seed"] == 123
    config = tmp_path / "c.yaml"
    config.write_text("seed_everything: 5\nseed: 6\n")
    assert main(["fit", "--config", str(config)]) == 2
    assert "seed_everything: 5 and seed: 6 disagree" in capsys.readouterr().err
    assert main(["fit", "--config", DIGITS, "--print_config=skip_null"]) == 0
    skipped = capsys.readouterr().out
    assert "fitness: null" not in skipped and "fitness" not in loaded(skipped) and loaded(skipped)["epochs"] == 20
    assert main(["--version"]) == 0 and re.match(r"lightrainer \d+\.\d+", capsys.readouterr().out)
    assert main(["fit", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--resume" in help_text and "--seed_everything" in help_text and "--trainer.max_epochs" in help_text
    assert main(["export", "--help"]) == 0
    export_help = capsys.readouterr().out
    assert "--weights" in export_help and "--method" in export_help and "--trainer." not in export_help
    # ckpt_path in a file works as the flag does.
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path), "--epochs", "1", *FEW]) == 0
    ckpt = tmp_path / "digits" / "weights" / "best.ckpt"
    config.write_text(f"ckpt_path: {ckpt}\n")
    assert main(["validate", "--config", DIGITS, "--config", str(config), "--save_dir", str(tmp_path),
                 "--trainer.limit_val_batches", "2"]) == 0
    assert (tmp_path / "digits_validate").is_dir()


CALLBACK = '''
from pathlib import Path
import lightning as L


class Marker(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(type(trainer.strategy).__name__)
'''


def test_trainer_callbacks_append(tmp_path, monkeypatch) -> None:
    (tmp_path / "marker_cb.py").write_text(CALLBACK)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "fit_ended"
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path), "--epochs", "1", *FEW,
                 "--trainer.callbacks+=marker_cb.Marker", f"--trainer.callbacks.path={marker}"]) == 0
    assert marker.read_text() == "SingleDeviceStrategy"
    sys.modules.pop("marker_cb", None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer.accumulate_grad_batches", "2"], r"trainer.accumulate_grad_batches is set by lightrainer .* use nbs"),
        (["--trainer.gradient_clip_val", "1"], r"trainer.gradient_clip_val .* use grad_clip"),
        (["--epochs", "100", "--trainer.max_epochs", "2"], r"trainer.max_epochs .* use epochs"),
        (["--trainer.strategy", "deepspeed"], r"trainer.strategy: deepspeed needs the deepspeed package: pip install deepspeed"),
        (["--trainer.strategy", "fsdp"], r"trainer.strategy: fsdp needs CUDA GPUs"),
        (["--trainer.logger", "lightning.pytorch.loggers.CometLogger"], r"needs the comet_ml package"),
        (["--trainer.precision", "16-mixed"], r"16-mixed needs a CUDA GPU; on the CPU use bf16-mixed"),
        (["--trainer.bogus", "1"], r"unknown flag --trainer.bogus: trainer has no 'bogus'"),
        (["--trainer.limit_train_batches", "-1"], r"trainer: You have passed invalid value -1 for limit_train_batches"),
        (["--trainer.max_epochs", "abc"], r"trainer.max_epochs: Expected a <class 'int'>, got abc"),
        (["--trainer.callbacks", "5"], r"trainer.callbacks: "),
        (["--model", "foo"], r"model.class_path: 'foo' is not a full import path"),
        (["--epochs"], r"--epochs needs a value"),
        (["--lr00", "1"], r"unknown flag --lr00 \(did you mean 'lr0'\?\)"),
    ],
)
def test_bad_trainer_arguments_exit_2_before_any_folder(tmp_path, capsys, flags, message) -> None:
    if "deepspeed" in flags and __import__("importlib").util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    if "fsdp" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if "16-mixed" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_tools_take_every_key_as_a_flag(tmp_path, capsys) -> None:
    pytest.importorskip("pytorch_quantization")
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path), "--epochs", "1", *FEW]) == 0
    best = tmp_path / "digits" / "weights" / "best.pt"
    assert main(["ptq", "--config", DIGITS, "--weights", str(best), "--method", "max", "--num_batches", "2"]) == 0
    assert (best.parent / "best_int8.pt").is_file()
    assert main(["ptq", "--weights", str(best), "--method", "maxx"]) == 2
    assert "method: 'maxx' is not one of" in capsys.readouterr().err


def test_resume_trusts_the_checkpoint(tmp_path, capsys) -> None:
    base = ["fit", "--config", DIGITS, "--save_dir", str(tmp_path), *FEW]
    assert main([*base, "--epochs", "1"]) == 0
    run = tmp_path / "digits"
    args_before = (run / "args.yaml").read_text()
    assert main([*base, "--resume", "--optimizer", "SGD", "--lr0", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "optimizer: 'AdamW' in the checkpoint, 'SGD' asked" in err and "lr0: 0.002 in the checkpoint, 0.1 asked" in err
    assert (run / "args.yaml").read_text() == args_before  # never overwritten with another run's values
    assert main([*base, "--resume", "--epochs", "2", "--num_workers", "0"]) == 0
    resumed = loaded((run / "args.yaml").read_text())
    assert resumed["epochs"] == 2 and resumed["optimizer"] == "AdamW"
    assert not (tmp_path / "digits2").exists()


def test_resume_differences_is_a_pure_decision() -> None:
    import lightrainer as lt

    saved = lt.load_config({"lr0": 0.01, "epochs": 10})
    assert resume_differences(lt.load_config({"lr0": 0.01, "epochs": 20, "num_workers": 0}), saved) == []
    assert resume_differences(lt.load_config({"lr0": 0.02, "epochs": 10}), saved) == [
        "lr0: 0.01 in the checkpoint, 0.02 asked"]


@pytest.mark.parametrize("weights", ["best.pt", "last.pt", "best.ckpt"])
def test_validate_and_test_take_weights_files(tmp_path, weights) -> None:
    assert main(["fit", "--config", DIGITS, "--save_dir", str(tmp_path), "--epochs", "1", *FEW]) == 0
    run = tmp_path / "digits"
    assert main(["validate", "--ckpt_path", str(run / "weights" / weights), "--trainer.limit_val_batches", "2"]) == 0
    scored = (tmp_path / "digits_validate" / "logs" / "metrics.csv").read_text().splitlines()
    header, values = scored[0].split(","), scored[1].split(",")
    rows = (run / "results.csv").read_text().splitlines()
    fit = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert float(values[header.index("val/acc")]) == pytest.approx(float(fit["val/acc"]), abs=1e-6)
