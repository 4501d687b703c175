"""Issue-6 target: epochs lost when a run is killed with SIGKILL, then resumed with --resume.

Each trial starts `lightrainer fit` on the digits config, kills it (kill -9) at a random moment
after its first checkpoint, and reads what survived: the epoch in progress at the kill, the last
complete epoch in weights/last.ckpt (it must load). Lost = epochs of work redone = the epoch in
progress only. Then `--resume` must finish with all epochs and the uninterrupted lr curve.

    python benchmarks/resume_after_kill.py --trials 3
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
EPOCHS = 6


class EpochMarker(L.Callback):
    """Writes the 0-based epoch in progress to $LT_EPOCH_FILE at each epoch start."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        Path(os.environ["LT_EPOCH_FILE"]).write_text(str(trainer.current_epoch))


def command(save_dir: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightrainer", "fit", "--config", str(REPO / "configs" / "digits.yaml"),
            "--save_dir", str(save_dir), "--name", name, "--epochs", str(EPOCHS), "--device", "cpu",
            "--patience", "0", "--plots", "False", "--trainer.limit_train_batches", "10",
            "--trainer.enable_progress_bar", "False", *extra]


def lrs(run: Path) -> list[tuple]:
    with open(run / "results.csv") as f:
        return [(r["epoch"], r["lr/decay"], r["lr/bias"]) for r in csv.DictReader(f)]


def trial(save_dir: Path, name: str, rng: random.Random) -> dict:
    import torch

    marker = save_dir / f"{name}.epoch"
    env = {**os.environ, "PYTHONPATH": str(HERE), "LT_EPOCH_FILE": str(marker), "OMP_NUM_THREADS": "1"}
    timer = "[{class_path: resume_after_kill.EpochMarker}]"
    proc = subprocess.Popen(command(save_dir, name, "--trainer.callbacks", timer), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = save_dir / name / "weights" / "last.ckpt"
    while not ckpt.exists():
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 3.0))
    in_progress = int(marker.read_text())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt, weights_only=True)["epoch"]  # last complete epoch, 0-based
    start = time.time()
    subprocess.run(command(save_dir, name, "--resume"), env=env, check=True, capture_output=True)
    return {"killed_in": in_progress + 1, "last_complete": saved + 1, "lost": in_progress - saved,
            "resume_s": time.time() - start, "lrs": lrs(save_dir / name)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = Path(tmp)
        subprocess.run(command(save_dir, "full"), check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        reference = lrs(save_dir / "full")
        results = [trial(save_dir, f"cut{i}", rng) for i in range(args.trials)]
    print(f"digits, {EPOCHS} epochs, SIGKILL at a random moment, then --resume")
    print("| trial | killed in epoch | last complete epoch | epochs lost | resume run s | epochs, lr curve = uninterrupted |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        same = "yes" if r["lrs"] == reference else "NO"
        print(f"| {i} | {r['killed_in']} | {r['last_complete']} | {r['lost']} | {r['resume_s']:.1f} | {same} |")


if __name__ == "__main__":
    main()
