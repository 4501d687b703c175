"""What a run writes for its reader: a line per epoch in a log file, the closing summary, stripped
weights files, QAT's lines, the model table, amp: bf16 and the MLflow logger."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lightrainer as lt
from lightrainer.callbacks.model_summary import bookkeeping_children, format_model_table
from lightrainer.callbacks.progress import epoch_columns, format_columns, format_duration, resolve_progress
from lightrainer.callbacks.summary import best_epoch, next_commands, stop_reason, summary_lines
from lightrainer.config import ConfigError
from lightrainer.datamodules import DigitsDataModule
from lightrainer.modules import ClassificationModule, SmallCNN
from lightrainer.trainer import mlflow_location, resolve_precision

REPO = Path(__file__).resolve().parent.parent
DIGITS = str(REPO / "configs" / "digits.yaml")
LIGHTRAINER = str(Path(sys.executable).with_name("lightrainer"))
#: Bytes a redirected run may write: a fixed part (devices, data, model table, summary) and a line
#: per epoch. MNIST's 10 epochs wrote 163,768 bytes of bar frames before; this bound is 7 KB there.
FIXED_BYTES, BYTES_PER_EPOCH = 4000, 300


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _cfg(tmp_path: Path, **keys) -> lt.Config:
    values = {"batch": 32, "nbs": 32, "num_workers": 0, "plots": False, "save_dir": str(tmp_path), "warmup_epochs": 0,
              "lr0": 0.002, "optimizer": "AdamW", "patience": 0}
    values.update(keys)
    return lt.load_config(values)


# ---------------------------------------------------------------------------------- pure decisions
def test_progress_auto_is_the_bar_on_a_terminal_and_lines_in_a_file() -> None:
    assert resolve_progress("auto", _Terminal(), notebook=False) == "bar"
    assert resolve_progress("auto", io.StringIO(), notebook=False) == "lines"
    assert resolve_progress("auto", io.StringIO(), notebook=True) == "bar"
    for mode in ("bar", "lines", "off"):
        assert resolve_progress(mode, io.StringIO(), notebook=False) == mode
    assert resolve_progress(lt.load_config(progress="None").progress) == "off"
    with pytest.raises(ConfigError, match=r"progress: 'line' is not one of auto, bar, lines, off"):
        lt.load_config(progress="line")


def test_epoch_line_columns_line_up_under_the_header() -> None:
    row = {"train/loss": 0.5123456, "val/acc": 0.98, "val/loss": 0.6}
    columns = epoch_columns(3, 10, 75.0, row, 0.00123, None, best=True)
    header, line = format_columns(columns, header=True), format_columns(columns, header=False)
    assert header.split() == ["Epoch", "Time", "loss", "val/acc", "val/loss", "lr", "best"]
    assert line.split() == ["3/10", "1m15s", "0.5123", "0.98", "0.6", "0.00123", "*"]
    # Right-aligned: each value ends where its header ends.
    for name, value in zip(header.split(), line.split()):
        assert header.index(name) + len(name) == line.index(value) + len(value) or value == "*"
    gpu = epoch_columns(1, 1, 1.0, row, None, 2.5, best=False)
    assert ("GPU_mem", "2.5G") in gpu and ("best", "") == gpu[-1] and not any(n == "lr" for n, _ in gpu)
    assert [format_duration(s) for s in (9.96, 61, 3725)] == ["10.0s", "1m01s", "1h02m"]


def test_stop_reason() -> None:
    assert stop_reason(10, 10) == "reached epochs: 10"
    assert stop_reason(7, 10, early_stopped=True, patience=3, monitor="val/acc") == (
        "early stopping: val/acc did not improve for 3 epochs (patience: 3)")
    assert stop_reason(4, 10, interrupted="SIGTERM") == "interrupted (SIGTERM)"
    assert "max_time" in stop_reason(4, 10)


def test_best_epoch_is_the_first_that_reached_the_best_value() -> None:
    rows = [{"epoch": 1, "val/acc": 0.5}, {"epoch": 2, "val/acc": float("nan")}, {"epoch": 3, "val/acc": 0.9},
            {"epoch": 4, "val/acc": 0.9}, {"epoch": 5}]
    assert best_epoch(rows, "val/acc", "max") == (3, 0.9)
    assert best_epoch(rows, "val/acc", "min") == (1, 0.5)
    assert best_epoch(rows, "val/loss", "min") is None


def test_summary_lines_say_what_a_user_needs() -> None:
    lines = summary_lines(
        run_dir="runs/my run", epochs_run=7, max_epochs=10, seconds=135.0,
        reason=stop_reason(7, 10, early_stopped=True, patience=3, monitor="val/acc"), monitor="val/acc", mode="max",
        best=(4, 0.98765), revalidated={"val/loss": 0.25, "val/acc": 0.98765}, revalidation_seconds=1.5,
        files=[("weights/best.pt", 580_000), ("weights/last.pt", 580_000)],
    )
    text = "\n".join(lines)
    assert lines[0] == "7/10 epochs in 2m15s; stopped: early stopping: val/acc did not improve for 3 epochs (patience: 3)"
    assert "best epoch: 4, val/acc 0.9877 (fitness, higher is better)" in text
    assert "weights/best.pt validated again in 1.5s: val/loss 0.25  val/acc 0.9877" in text
    assert "results: runs/my run" in text and "weights/best.pt (0.58 MB)" in text
    assert next_commands("runs/my run") == ["lightrainer test --ckpt_path 'runs/my run/weights/best.pt'",
                                            "lightrainer export --weights 'runs/my run/weights/best.pt'"]
    assert lines[-2:] == [f"  {c}" for c in next_commands("runs/my run")]
    interrupted = summary_lines(run_dir="r", epochs_run=2, max_epochs=10, seconds=5, reason="interrupted (SIGTERM)",
                                monitor="val/loss", mode="min", best=None, files=[("weights/best.pt", 1)],
                                finished=False)
    assert "best epoch: none (val/loss was never logged)" in interrupted and "next:" not in interrupted


def test_model_table_leaves_out_bookkeeping_and_zero_flops(tmp_path) -> None:
    module = ClassificationModule(SmallCNN(num_classes=10, in_channels=1), _cfg(tmp_path))
    hidden = bookkeeping_children(module)
    assert {"_stage_means", "metrics"} <= hidden and "net" not in hidden
    columns = [(" ", ["0", "1", "2"]), ("Name", ["net", "_stage_means", "metrics"]),
               ("Type", ["SmallCNN", "ModuleDict", "ModuleDict"]), ("Params", ["140 K", "0", "0"]),
               ("Mode", ["train"] * 3), ("FLOPs", ["0", "0", "0"])]
    lines = format_model_table(columns, hidden, 140_000, 140_000, 0.563, 0)
    assert lines[0].split() == ["Name", "Type", "Params", "Mode"]
    assert lines[1].split() == ["net", "SmallCNN", "140", "K", "train"] and len(lines) == 3
    assert lines[2] == "140 K params (0.563 MB)"
    flops = format_model_table(columns, hidden, 150_000, 140_000, 0.6, 2_000_000)
    assert "FLOPs" in flops[0] and flops[2] == "150 K params (0.600 MB), 10.0 K not trainable, 2.0 M FLOPs a forward pass"


def test_weights_files_hold_no_optimizer_state_while_the_run_goes_on(tmp_path) -> None:
    # best.pt/last.pt never carry the optimizer (resume reads last.ckpt): checked on the file the
    # first epoch wrote, while the second runs, against the network and the checkpoint beside it.
    seen: dict[str, Any] = {}

    class LookAtLastPt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == 1:
                weights = Path(pl_module.cfg.run_dir) / "weights"
                seen["payload"] = torch.load(weights / "last.pt", weights_only=True)
                seen["sizes"] = ((weights / "last.pt").stat().st_size, (weights / "last.ckpt").stat().st_size)
                seen["net"] = {k: v.detach().clone() for k, v in pl_module.net.state_dict().items()}

    cfg = _cfg(tmp_path, epochs=2, optimizer="Adam")
    trainer = lt.build_trainer(cfg, callbacks=[LookAtLastPt()])
    trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=DigitsDataModule(cfg))
    payload = seen["payload"]
    assert payload["optimizer"] is None and payload["epoch"] == 0 and "best_fitness" in payload
    for key, value in seen["net"].items():
        assert torch.equal(payload["model"][key], value)
    assert seen["sizes"][0] < seen["sizes"][1] / 2  # Adam keeps two moments of every weight, in last.ckpt only


def test_amp_accepts_fp16_and_bf16_names() -> None:
    assert [lt.load_config(amp=v).amp for v in (False, True, "fp16", "BF16", "false")] == [False, True, True, "bf16",
                                                                                           False]
    with pytest.raises(ConfigError, match=r"amp: 'bf61' is not one of False, True, fp16, bf16 .*did you mean 'bf16'"):
        lt.load_config(amp="bf61")
    assert resolve_precision(lt.load_config(amp="bf16"), "cpu") == "bf16-mixed"
    assert resolve_precision(lt.load_config(amp="bf16"), "gpu", bf16_gpu=True) == "bf16-mixed"
    assert resolve_precision(lt.load_config(amp=True), "gpu") == "16-mixed"
    with pytest.raises(ConfigError, match=r"amp: bf16 is not supported on this gpu device .*amp: True"):
        resolve_precision(lt.load_config(amp="bf16"), "gpu", bf16_gpu=False)
    with pytest.warns(UserWarning, match=r"amp=True needs a CUDA device for fp16; .*amp: bf16"):
        assert resolve_precision(lt.load_config(amp=True), "cpu") == "32-true"


def test_mlflow_location_is_the_run_folder_unless_a_uri_is_given(tmp_path) -> None:
    uri, artifacts = mlflow_location(lt.load_config(mlflow=True), tmp_path / "run")
    assert uri == f"sqlite:///{(tmp_path / 'run').resolve() / 'mlflow.db'}"
    assert artifacts == (tmp_path / "run").resolve().joinpath("mlartifacts").as_uri()
    assert mlflow_location(lt.load_config(mlflow=True, mlflow_uri="http://host:5000"), tmp_path) == (
        "http://host:5000", None)


def test_missing_mlflow_is_one_line_naming_the_extra(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed: the import fails
    with pytest.raises(ConfigError, match=r'^mlflow: True needs MLflow: pip install "lightrainer\[mlflow\]"$'):
        lt.build_trainer(_cfg(tmp_path, mlflow=True))
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- real runs
def _results(run: Path) -> list[dict[str, str]]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_redirected_fit_writes_a_line_an_epoch_and_a_closing_summary(tmp_path) -> None:
    epochs = 4
    log_file = tmp_path / "train.log"
    start = time.monotonic()
    with open(log_file, "wb") as out:  # what `lightrainer fit ... > train.log 2>&1` does
        code = subprocess.call([LIGHTRAINER, "fit", "--config", DIGITS, "--save_dir", str(tmp_path / "runs"),
                                "--epochs", str(epochs)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - start
    text = log_file.read_text()
    assert code == 0, text
    assert "\r" not in text and "it/s" not in text  # no bar frames
    assert log_file.stat().st_size < FIXED_BYTES + BYTES_PER_EPOCH * epochs, text
    lines = text.splitlines()
    epoch_lines = [line for line in lines if re.match(rf"\s+\d+/{epochs}\s", line)]
    assert len(epoch_lines) == epochs and sum(line.split()[:2] == ["Epoch", "Time"] for line in lines) == 1, text
    for noise in ("TPU available", "`Trainer.fit` stopped", "Tip:", "FLOPs", "_stage_means", "Warning"):
        assert noise not in text, noise

    run = tmp_path / "runs" / "digits"
    rows = _results(run)
    accs = [float(r["val/acc"]) for r in rows]
    best = accs.index(max(accs))  # the first epoch with the best val/acc, computed here
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times) and 0 < times[-1] < wall
    assert f"{epochs}/{epochs} epochs in " in text and "stopped: reached epochs: 4" in text
    assert f"best epoch: {best + 1}, val/acc {max(accs):.4g} (fitness, higher is better)" in text
    again = re.search(r"weights/best\.pt validated again in \S+: val/loss (\S+)\s+val/acc (\S+)", text)
    assert again, text
    assert float(again.group(2)) == pytest.approx(float(rows[best]["val/acc"]), abs=1e-3)
    assert float(again.group(1)) == pytest.approx(float(rows[best]["val/loss"]), rel=2e-3)
    for command in next_commands(run):
        assert f"  {command}" in lines
    # The shipped files hold no optimizer; resuming keeps it in last.ckpt.
    for name in ("best.pt", "last.pt"):
        payload = torch.load(run / "weights" / name, weights_only=True)
        assert payload["optimizer"] is None and payload["model"]
    assert (run / "weights" / "best.pt").stat().st_size < (run / "weights" / "best.ckpt").stat().st_size / 2
    assert torch.load(run / "weights" / "last.ckpt", weights_only=True)["optimizer_states"]
    assert text.index("results plotted to") < text.index("best epoch:")  # the summary closes the output


def test_lines_mode_in_process_and_a_resumed_run_counts_time_on(tmp_path, caplog) -> None:
    cfg = _cfg(tmp_path, epochs=2, progress="lines", name="cut")
    data = DigitsDataModule(cfg)
    with caplog.at_level(logging.INFO, logger="lightrainer"):
        trainer = lt.build_trainer(cfg, limit_train_batches=3, limit_val_batches=2, max_epochs=1)
        trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=data)
    run = Path(cfg.run_dir)
    first = float(_results(run)[0]["time"])
    messages = [r.getMessage() for r in caplog.records]
    assert sum(re.match(r"\s+1/1\s", m) is not None for m in messages) == 1
    assert any(m.startswith("1/1 epochs in ") for m in messages)
    time.sleep(1.0)  # a pause between the parts is not training time
    start = time.monotonic()
    trainer = lt.build_trainer(cfg, run_dir=run, limit_train_batches=3, limit_val_batches=2)
    trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=data,
                ckpt_path=str(run / "weights" / "last.ckpt"), weights_only=True)
    second_part = time.monotonic() - start
    rows = _results(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["time"]) == first
    assert first < float(rows[1]["time"]) < first + second_part  # continues the count of the first part


def test_bf16_trains_on_the_cpu(tmp_path) -> None:
    cfg = _cfg(tmp_path, epochs=1, amp="bf16", progress="off")
    trainer = lt.build_trainer(cfg, limit_train_batches=2, limit_val_batches=1)
    assert trainer.precision == "bf16-mixed"
    trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=DigitsDataModule(cfg))
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_qat_fit_says_it_calibrated_and_trains_fake_quantized(tmp_path, caplog) -> None:
    pytest.importorskip("pytorch_quantization")
    cfg = _cfg(tmp_path, epochs=1, qat=True, method="max", num_batches=2, quant_backend="pytorch_quantization",
               progress="off")
    with caplog.at_level(logging.INFO, logger="lightrainer"):
        trainer = lt.build_trainer(cfg, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg),
                    datamodule=DigitsDataModule(cfg))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "QAT: 12 int8 quantizers inserted (pytorch_quantization); training at lr0 x 0.1" in text
    assert re.search(r"calibrated 12 quantizers with max on 2 batches", text), text
    assert "QAT: training with int8 fake-quant (activation amax from the max calibration" in text


def test_importing_a_quantization_library_keeps_the_programs_log_lines() -> None:
    pytest.importorskip("pytorch_quantization")
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from lightrainer.quant import get_backend\n"
            "get_backend('pytorch_quantization')\n"
            "from pytorch_quantization import nn, calib\n"
            "logging.getLogger('lightrainer.export').info('exported best.onnx')\n")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1:] == ["exported best.onnx"], done.stderr
    assert "FutureWarning" not in done.stderr and "torch.jit.script" not in done.stderr, done.stderr


@pytest.mark.slow
def test_mlflow_store_in_the_run_folder_reads_back(tmp_path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(tmp_path, epochs=2, mlflow=True, progress="off", name="ml")
    trainer = lt.build_trainer(cfg, limit_train_batches=2, limit_val_batches=2)
    trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=DigitsDataModule(cfg))
    run = Path(cfg.run_dir)
    assert (run / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=mlflow_location(cfg, run)[0])
    experiment = client.get_experiment_by_name("ml")
    [found] = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.name and found.data.params["lr0"] == "0.002"
    history = client.get_metric_history(found.info.run_id, "val/acc")
    written = [float(r["val/acc"]) for r in _results(run)]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(written, abs=1e-6)


SCRIPT = """
import logging, sys
import lightrainer as lt
from lightrainer.datamodules import DigitsDataModule
from lightrainer.modules import ClassificationModule, SmallCNN
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.INFO, format="mine: %(message)s")
elif sys.argv[2] == "warnings only":
    logging.basicConfig(level=logging.WARNING, format="mine: %(message)s")
cfg = lt.load_config({config!r}, epochs=2, save_dir=sys.argv[1], progress="lines")
trainer = lt.build_trainer(cfg)
trainer.fit(ClassificationModule(SmallCNN(num_classes=10, in_channels=1), cfg), datamodule=DigitsDataModule(cfg))
"""


@pytest.mark.parametrize("logging_setup", ["none", "configured", "warnings only"])
def test_a_script_sees_the_epoch_lines_and_summary_once(tmp_path, logging_setup) -> None:
    # A notebook or script that set up no logging still gets the lines (build_trainer gives the
    # lightrainer logger a handler of last resort); one that did gets them once, in its own format,
    # or not at all where it asked for warnings only.
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(config=DIGITS))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "runs"), logging_setup], capture_output=True,
                          text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix = "mine: " if logging_setup == "configured" else ""
    lines = proc.stderr.splitlines()
    if logging_setup == "warnings only":
        assert not any("best epoch: " in line or re.match(r"\s+2/2\s", line) for line in lines), proc.stderr
        return
    assert sum(line.startswith(f"{prefix}best epoch: ") for line in lines) == 1, proc.stderr
    assert sum(bool(re.match(rf"{prefix}\s+2/2\s", line)) for line in lines) == 1, proc.stderr
