"""Does anything grow faster than the work? (issue 7, "scaling")

Time per training epoch of a lightrainer fit (no progress bar, no plots) and of the hand-written
loop doing the same work, on MNIST-5k with SmallCNN, as three things grow one at a time:

* dataset size N (the first N of a fixed shuffle of the training split; batch 64, width 32);
* batch (N = 2,000, width 32; ``nbs`` = batch so every batch steps);
* model width (N = 1,000, batch 64).

Each setting: 2 epochs, the training part of the second timed (the first is warm-up), settings
and loops alternated, ``--repeats`` rounds, medians. The exponent of time in N is the
least-squares slope of log(time) on log(N) (linear = 1).

    python benchmarks/scaling.py
    python benchmarks/scaling.py --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    EpochClock,
    fit_exponent,
    hand_written_fit,
    lightning_clock_callback,
    machine_note,
    median,
    mnist_cfg,
    pin_threads,
    write_results,
)

SIZES = (500, 1000, 2000, 4000)
BATCHES = (16, 32, 64, 128)
WIDTHS = (8, 16, 32, 64)


def one_epoch(loop: str, n: int, batch: int, width: int, data: Any) -> float:
    """Training time of the second epoch of a 2-epoch fit."""
    import torch
    import torch.nn.functional as F

    import lightrainer as lt
    from lightrainer.datamodules import ArrayDataModule
    from lightrainer.modules import ClassificationModule, SmallCNN

    (x, y), val = data
    x, y = x[:n], y[:n]
    cfg = mnist_cfg(tempfile.mkdtemp(), epochs=2, batch=batch, nbs=batch, shift=0, plots=False)
    net = SmallCNN(10, 1, width=width)
    clock = EpochClock()
    if loop == "lightrainer":
        trainer = lt.build_trainer(cfg, callbacks=[lightning_clock_callback(clock)], enable_progress_bar=False,
                                   enable_model_summary=False)
        trainer.fit(ClassificationModule(net, cfg), datamodule=ArrayDataModule(cfg, train=(x, y), val=val))
    else:
        nb = -(-n // batch)

        def batches(epoch: int):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for i in range(nb):
                idx = order[i * batch:(i + 1) * batch]
                yield x[idx], y[idx]

        vx, vy = val
        hand_written_fit(
            cfg, net, batches, nb,
            lambda m, b: F.cross_entropy(m(b[0]), b[1], label_smoothing=cfg.label_smoothing),
            lambda: ((vx[i:i + batch], vy[i:i + batch]) for i in range(0, len(vx), batch)),
            lambda m, b: m(b[0]), clock,
        )
    return clock.result()["train_s"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pin_threads(args.threads)

    import logging

    import torch

    from lightrainer.datamodules import MNIST5kDataModule

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    dm = MNIST5kDataModule(mnist_cfg(tempfile.mkdtemp()))
    dm.setup()
    x, y = dm.train_data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    vx, vy = dm.val_data
    data = ((x[order], y[order]), (vx[:256], vy[:256]))

    settings = ([("N", n, n, 64, 32) for n in SIZES] + [("batch", b, 2000, b, 32) for b in BATCHES]
                + [("width", w, 1000, 64, w) for w in WIDTHS])
    times: dict[tuple, list[float]] = {}
    for repeat in range(args.repeats):
        for setting in settings if repeat % 2 == 0 else settings[::-1]:
            for loop in ("lightrainer", "hand") if repeat % 2 == 0 else ("hand", "lightrainer"):
                t = one_epoch(loop, *setting[2:], data)
                times.setdefault((*setting, loop), []).append(t)
                print(f"{setting[0]}={setting[1]} {loop}: {t:.2f} s", flush=True)

    rows = []
    for axis, value, n, batch, width in settings:
        ours, hand = median(times[(axis, value, n, batch, width, "lightrainer")]), median(times[(axis, value, n, batch, width, "hand")])
        rows.append({"grows": axis, "N": n, "batch": batch, "width": width, "lightrainer_s": ours, "hand_s": hand,
                     "ratio": ours / hand, "lightrainer_ms_per_sample": 1e3 * ours / n})
    sizes = [r["N"] for r in rows if r["grows"] == "N"]
    exp_ours = fit_exponent(sizes, [r["lightrainer_s"] for r in rows if r["grows"] == "N"])
    exp_hand = fit_exponent(sizes, [r["hand_s"] for r in rows if r["grows"] == "N"])
    write_results("scaling", rows, "Scaling: training time per epoch as N, batch and width grow", [
        machine_note(args.threads),
        f"fitted exponent of time in N: lightrainer {exp_ours:.3f}, hand-written {exp_hand:.3f} (linear = 1)",
        f"{args.repeats} rounds, settings and loops alternated; the training part of epoch 2 of 2 timed; medians",
        "lightrainer: build_trainer without progress bar and plots; hand: the same work in plain PyTorch",
    ])


if __name__ == "__main__":
    main()
