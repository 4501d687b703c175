"""Crash safety: SIGKILL mid-epoch then `--resume` gives the uninterrupted run; a kill at any
moment never leaves a partial file under a final name; --resume skips an incomplete checkpoint."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lightrainer as lt
from lightrainer.cli import check_checkpoint, find_last_checkpoint, main
from lightrainer.config import ConfigError

CONFIG = """\
epochs: 4
batch: 32
nbs: 64
optimizer: SGD
lr0: 0.02
warmup_epochs: 0.5
patience: 0
plots: False
device: cpu
num_workers: 0
data:
  class_path: lightrainer.datamodules.DigitsDataModule
trainer:
  limit_train_batches: 4
  limit_val_batches: 2
  enable_progress_bar: False
"""

# A callback that parks the run in the middle of its third epoch, so the test kills it there.
PARK = textwrap.dedent(
    """
    import time
    from pathlib import Path
    import lightning as L

    class ParkMidEpoch(L.Callback):
        def __init__(self, epoch: int, batch: int, marker: str):
            self.epoch, self.batch, self.marker = epoch, batch, marker

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == self.epoch and batch_idx == self.batch:
                Path(self.marker).write_text("parked")
                time.sleep(600)
    """
)


def rows(run: Path) -> list[dict]:
    """results.csv's rows without the ``time`` column (wall-clock seconds differ between runs)."""
    with open(run / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "time"} for row in csv.DictReader(f)]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was killed:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < end, "the run never reached the kill point"
        time.sleep(0.1)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path) -> None:
    config = tmp_path / "digits.yaml"
    config.write_text(CONFIG)
    (tmp_path / "park.py").write_text(PARK)
    marker = tmp_path / "parked"
    base = ["fit", "--config", str(config), "--save_dir", str(tmp_path / "runs")]
    park = f"[{{class_path: park.ParkMidEpoch, init_args: {{epoch: 2, batch: 2, marker: '{marker}'}}}}]"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("LIGHTRAINER_RUN_DIR", None)
    proc = subprocess.Popen([sys.executable, "-m", "lightrainer", *base, "--name", "cut", "--trainer.callbacks", park],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(marker, proc)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    cut = tmp_path / "runs" / "cut"
    assert [r["epoch"] for r in rows(cut)] == ["1", "2"]  # epoch 3 was in progress: lost, nothing else
    last = torch.load(cut / "weights" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1 and torch.load(cut / "weights" / "last.pt", weights_only=True)["epoch"] == 1

    assert main([*base, "--name", "cut", "--resume"]) == 0
    assert main([*base, "--name", "full"]) == 0
    full = tmp_path / "runs" / "full"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cut", "full"]  # resumed in place
    assert rows(cut) == rows(full)  # 4 epochs, same lr of every group, losses and metrics
    assert [r["epoch"] for r in rows(full)] == ["1", "2", "3", "4"]
    got = torch.load(cut / "weights" / "last.pt", weights_only=True)["model"]
    want = torch.load(full / "weights" / "last.pt", weights_only=True)["model"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)

    # --resume takes the newest *complete* checkpoint: a newer run whose last.ckpt was cut short is skipped.
    broken = tmp_path / "runs" / "cut2" / "weights"
    broken.mkdir(parents=True)
    data = (cut / "weights" / "last.ckpt").read_bytes()
    (broken / "last.ckpt").write_bytes(data[: len(data) // 2])
    cfg = lt.load_config(dict(save_dir=str(tmp_path / "runs"), name="cut"))
    with pytest.warns(UserWarning, match=r"skipping .*cut2/weights/last.ckpt: .*(truncated or corrupt|corrupt or truncated)"):
        assert find_last_checkpoint(cfg) == cut / "weights" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"is not a lightrainer checkpoint, or it is damaged: it cannot be read"):
        check_checkpoint(broken / "last.ckpt")


# Writes the same files over and over, as a run does each epoch, until it is killed.
WRITER = textwrap.dedent(
    """
    import sys, torch
    from lightrainer.io import atomic_torch_save
    from lightrainer.callbacks.results import ResultsCSV
    folder = sys.argv[1]
    results = ResultsCSV(folder, plots=False)
    i = 0
    while True:
        i += 1
        atomic_torch_save({"i": i, "w": torch.full((256, 1024), float(i))}, f"{folder}/last.pt")  # 1 MB
        results.rows = [{"epoch": e, "loss": 1.0 / e} for e in range(1, i % 200 + 2)]
        results._write()
    """
)


def test_a_kill_at_any_moment_leaves_complete_files(tmp_path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stderr=subprocess.PIPE)
        while not (tmp_path / "last.pt").exists() or not (tmp_path / "results.csv").exists():
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        time.sleep(rng.uniform(0.05, 0.6))  # somewhere in the middle of some write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        payload = torch.load(tmp_path / "last.pt", weights_only=True)
        assert torch.equal(payload["w"], torch.full((256, 1024), float(payload["i"])))
        lines = (tmp_path / "results.csv").read_text().splitlines()
        assert lines[0] == "epoch,loss" and [int(r.split(",")[0]) for r in lines[1:]] == list(range(1, len(lines)))
