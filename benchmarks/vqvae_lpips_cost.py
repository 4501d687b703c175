"""What LPIPS costs per VQ-VAE training step: the same step with and without it, side by side.

Runs ``VQVAEModule.step`` + backward + Adam step on random-crop batches of the packaged photos,
alternating the two set-ups round by round (so machine noise hits both alike), warm-up excluded,
medians over rounds. LPIPS uses the random backbone (no weights download), which costs the same
as the pretrained one. Prints a markdown table and writes it (and a CSV) beside ``--out``.

    python benchmarks/vqvae_lpips_cost.py --config configs/vqvae.yaml --threads 1
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import lightrainer.modules.vqvae  # noqa: F401  (registers the VQ-VAE keys)
from lightrainer import load_config
from lightrainer.datamodules.photos import PhotoPatchesDataModule
from lightrainer.modules.vqvae import VQVAEModule, build_vqvae

ROOT = Path(__file__).resolve().parents[1]


def _timed_steps(module: VQVAEModule, optimizer: torch.optim.Optimizer, batches: list, repeats: int) -> float:
    """Seconds per training step over ``repeats`` steps."""
    start = time.perf_counter()
    for i in range(repeats):
        loss, _ = module.step(batches[i % len(batches)], "train")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "vqvae.yaml"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--nets", nargs="+", default=["alex"], help="LPIPS backbones to time")
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vqvae_lpips_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for batch in args.batch:
        cfg = load_config(args.config, batch=batch, patches_per_epoch=batch * args.steps)
        data = PhotoPatchesDataModule(cfg)
        data.setup()
        batches = list(data.train_dataloader())
        setups = {"no LPIPS": load_config(args.config, batch=batch, lpips_weight=0.0)}
        for net in args.nets:
            setups[f"LPIPS {net}"] = load_config(
                args.config, batch=batch, lpips_weight=1.0, lpips_backbone="random", lpips_net=net
            )
        runs = {}
        for name, setup_cfg in setups.items():
            torch.manual_seed(0)
            module = VQVAEModule(build_vqvae(setup_cfg), setup_cfg)
            module.setup("fit")
            optimizer = torch.optim.Adam(module.net.parameters(), lr=1e-3)
            _timed_steps(module, optimizer, batches, 3)  # warm-up
            runs[name] = (module, optimizer, [])
        for _ in range(args.rounds):
            for module, optimizer, times in runs.values():
                times.append(_timed_steps(module, optimizer, batches, args.steps))
        base = statistics.median(runs["no LPIPS"][2])
        for name, (_, _, times) in runs.items():
            median = statistics.median(times)
            rows.append({
                "batch": batch, "setup": name, "ms_per_step": round(1000 * median, 1),
                "ratio": round(median / base, 2), "lpips_ms": round(1000 * (median - base), 1),
            })  # fmt: skip

    shown = Path(args.config).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else Path(shown.name)  # no machine paths
    header = f"VQ-VAE step cost with and without LPIPS ({shown}, {args.threads} thread(s), median of {args.rounds} rounds)"
    lines = [header, "", "| batch | set-up | ms/step | x no LPIPS | LPIPS ms/step |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['batch']} | {r['setup']} | {r['ms_per_step']} | {r['ratio']} | {r['lpips_ms']} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
