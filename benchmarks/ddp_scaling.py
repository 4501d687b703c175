"""Issue-6 target: 2 CPU processes (DDP, gloo) vs 1 on MNIST-5k, same config and global batch.

For each: start-up (command to first training step), mean time per epoch (epochs after the first),
final val accuracy, and the largest relative parameter difference between the two runs. The
comparison runs without dropout and without random shifts (their random draws depend on the rank),
so the two runs are the same training; SyncBatchNorm is on for 2 processes (sync_bn default).

    python benchmarks/ddp_scaling.py --epochs 3

On a shared 2-core machine the figures are noisy; compare the two rows of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NO_RANDOMNESS = ("{class_path: lightrainer.modules.ClassificationModule, init_args: {net: {class_path: "
                 "lightrainer.modules.nets.SmallCNN, init_args: {num_classes: 10, dropout: 0.0}}}}")


class EpochTimer(L.Callback):
    """Rank 0 appends {"event", "time", "epoch"} lines to $LT_EPOCH_TIMES."""

    def _write(self, trainer: L.Trainer, event: str) -> None:
        if trainer.is_global_zero:
            with open(os.environ["LT_EPOCH_TIMES"], "a") as f:
                f.write(json.dumps({"event": event, "time": time.time(), "epoch": trainer.current_epoch}) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._write(trainer, "epoch_start")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._write(trainer, "epoch_end")


def run(devices: int, epochs: int, save_dir: Path) -> dict:
    times = save_dir / f"times{devices}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(HERE), "LT_EPOCH_TIMES": str(times), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightrainer", "fit", "--config", str(REPO / "configs" / "mnist.yaml"),
           "--save_dir", str(save_dir), "--name", f"d{devices}", "--device", "cpu", "--devices", str(devices),
           "--epochs", str(epochs), "--shift", "0", "--plots", "False", "--model", NO_RANDOMNESS,
           "--trainer", "{callbacks: [{class_path: ddp_scaling.EpochTimer}], enable_progress_bar: False}"]
    start = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in times.read_text().splitlines()]
    starts = {e["epoch"]: e["time"] for e in events if e["event"] == "epoch_start"}
    ends = {e["epoch"]: e["time"] for e in events if e["event"] == "epoch_end"}
    epoch_times = [ends[e] - starts[e] for e in sorted(ends)]
    import csv

    with open(save_dir / f"d{devices}" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return {
        "devices": devices,
        "startup_s": starts[0] - start,
        "epoch_s": sum(epoch_times[1:]) / max(len(epoch_times) - 1, 1),
        "first_epoch_s": epoch_times[0],
        "wall_s": wall,
        "val_acc": float(rows[-1]["val/acc"]),
        "weights": save_dir / f"d{devices}" / "weights" / "last.pt",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        results = [run(d, args.epochs, Path(tmp)) for d in (1, 2)]
        one, two = (torch.load(r["weights"], weights_only=True)["model"] for r in results)
        diff = max(((one[k].float() - two[k].float()).abs().max() / one[k].float().abs().max().clamp_min(1e-12)).item()
                   for k in one if one[k].is_floating_point())
    print(f"MNIST-5k, batch 64 global, {args.epochs} epochs, CPU, 1 torch thread per process")
    print("| processes | start-up s | first epoch s | epoch s (later) | wall s | final val acc |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['devices']} | {r['startup_s']:.1f} | {r['first_epoch_s']:.1f} | {r['epoch_s']:.1f} | "
              f"{r['wall_s']:.1f} | {r['val_acc']:.4f} |")
    print(f"largest relative parameter difference, 1 vs 2 processes: {diff:.2e}")


if __name__ == "__main__":
    main()
