"""How fast does data held in memory reach the training step? (issue 7, "data path")

One epoch of pure iteration over the MNIST-5k training split (4,000 x 1x28x28 float tensors):

* ``InMemoryBatchLoader``: whole batches by indexing the tensors with a slice of the epoch's
  permutation (what lightrainer uses for tensor/array data);
* ``DataLoader``: torch's default ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True)``
  (per-sample ``__getitem__`` and ``default_collate``, no workers).

Both as they are used for training (shuffled) and, in a second pair, with the +-2 px random shift
of configs/mnist.yaml applied to each batch. Variants alternate within every repeat; the first
``--warmup`` repeats are dropped; medians.

    python benchmarks/data_path.py
    python benchmarks/data_path.py --repeats 30 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_note, median, mnist_cfg, pin_threads, spread, write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pin_threads(args.threads)

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from lightrainer.datamodules import InMemoryBatchLoader, MNIST5kDataModule
    from lightrainer.datamodules.memory import RandomShift

    cfg = mnist_cfg(tempfile.mkdtemp(), batch=args.batch)
    dm = MNIST5kDataModule(cfg)
    dm.setup()
    x, y = dm.train_data
    shift = RandomShift(2, fill=dm.fill_value)
    generator = torch.Generator().manual_seed(0)

    def dataloader_shifted():
        for bx, by in DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True):
            yield shift(bx, generator), by

    variants = {
        "InMemoryBatchLoader": InMemoryBatchLoader((x, y), args.batch, shuffle=True, seed=0),
        "DataLoader(TensorDataset)": DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True),
        "InMemoryBatchLoader + shift": InMemoryBatchLoader((x, y), args.batch, shuffle=True, seed=0, transform=shift),
        "DataLoader(TensorDataset) + shift": None,
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for repeat in range(args.warmup + args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for name in order:
            loader = variants[name]
            start = time.perf_counter()
            batches = 0
            for batch in (loader if loader is not None else dataloader_shifted()):
                batches += 1
            elapsed = time.perf_counter() - start
            if repeat >= args.warmup:
                times[name].append(elapsed)
    assert batches == -(-len(x) // args.batch)

    rows = []
    for name, values in times.items():
        base = "DataLoader(TensorDataset)" + (" + shift" if "shift" in name else "")
        rows.append({
            "loader": name,
            "epoch_ms": 1e3 * median(values),
            "range_ms": spread([1e3 * v for v in values]),
            "speedup_vs_dataloader": median(times[base]) / median(values),
            "samples_per_s": len(x) / median(values),
        })
    write_results("data_path", rows, "Data path: one epoch of MNIST-5k training batches, pure iteration", [
        machine_note(args.threads),
        f"{len(x)} samples, batch {args.batch}, shuffled, {args.repeats} repeats after {args.warmup} warm-up, "
        "variants alternated; medians",
        "speedup_vs_dataloader: DataLoader time / this loader's time (same augmentation)",
    ])


if __name__ == "__main__":
    main()
