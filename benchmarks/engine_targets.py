"""Issue-2 targets: the main jobs from the command line, as a user runs them.

For each config: wall time of `lightrainer fit --config FILE` (start-up included), time from the
command to the first training step, best val accuracy. Prints a table and writes
benchmarks/results/engine_targets.{csv,md}.

    python benchmarks/engine_targets.py            # mnist.yaml and digits.yaml
    python benchmarks/engine_targets.py --startup  # only the time to the first step (3 runs)
    python benchmarks/engine_targets.py --vqvae    # configs/vqvae.yaml: PSNR, SSIM, perplexity, usage
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TIMER = "{callbacks: [{class_path: _timing.FirstStepTimer}]}"


def run(config: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stamp = Path(tmp) / "first_step"
        env = {**os.environ, "PYTHONPATH": str(HERE), "LT_FIRST_STEP_FILE": str(stamp)}
        cmd = [sys.executable, "-m", "lightrainer", "fit", "--config", str(REPO / "configs" / config), "--save_dir", tmp,
               "--trainer", TIMER, *extra]
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        first = float(stamp.read_text()) - start
        (run_dir,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        with open(run_dir / "results.csv") as f:
            rows = list(csv.DictReader(f))
    result = {"config": config, "epochs": len(rows), "wall_s": round(wall, 1), "first_step_s": round(first, 2),
              "s_per_epoch": round((wall - first) / len(rows), 1)}
    if "val/acc" in rows[0]:
        accs = [float(r["val/acc"]) for r in rows]
        result.update({"best_val_acc": round(100 * max(accs), 2), "final_val_acc": round(100 * accs[-1], 2)})
    else:  # the VQ-VAE
        last = rows[-1]
        result.update({k.split("/")[1]: round(float(last[k]), 3) for k in
                       ("val/psnr", "val/ssim", "val/perplexity", "val/usage")})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--startup", action="store_true")
    parser.add_argument("--vqvae", action="store_true", help="the VQ-VAE main job (about 4 min)")
    args = parser.parse_args()
    if args.startup:
        rows = [run("mnist.yaml", ["--epochs", "1", "--trainer.limit_train_batches", "2",
                                   "--trainer.limit_val_batches", "1"]) for _ in range(3)]
        rows = [{k: r[k] for k in ("config", "first_step_s", "wall_s")} for r in rows]
    elif args.vqvae:
        rows = [run("vqvae.yaml", [])]
    else:
        rows = [run("mnist.yaml", []), run("digits.yaml", [])]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows]
    print("\n".join(lines))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    name = "engine_startup" if args.startup else "vqvae_target" if args.vqvae else "engine_targets"
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    print(f"torch threads: default; python {sys.version.split()[0]}", file=sys.stderr)


if __name__ == "__main__":
    main()
