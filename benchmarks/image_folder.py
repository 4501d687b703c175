"""A folder of JPEGs, streamed: lightrainer against a hand-written loop over torchvision's ImageFolder (issue 16).

The folder is made from the built-in data by ``examples/image_folder.py`` (coloured MNIST-5k
digits, 64x64 RGB JPEGs, ``root/<digit>/*.jpg``; ``--files`` of them, 20,000 by default). Both
loops train on the same 80% of its files:

* ``lightrainer``: ``ImageFolderDataModule(stream=True)`` (``--workers`` processes decode each
  batch with torchvision into uint8; it becomes float and normalised in the training process),
  ``ClassificationModule`` and the Lightning Trainer, no progress bar, no plots;
* ``hand``: ``DataLoader(torchvision.datasets.ImageFolder(root, ToTensor + Normalize),
  shuffle=True, num_workers=--workers, persistent_workers=True)`` over the same training files,
  and the loop of ``benchmarks/_common.HandLoop`` (lightrainer's semantics in plain PyTorch).

Same network (SmallCNN, width 8, 64x64x3 input), batch 64, AdamW, one torch thread in the
training process, ``--workers`` decoding processes each. This machine is shared and its load
swings, so the two are measured *paired*: one lightrainer fit runs a hand-written step (its own
batch from its own DataLoader) after each of its steps, L H L H ... (``_common.paired_steps_callback``),
and the hand loop validates after each of the fit's validations. images/s = batch / median step
time (data included); the epoch columns pair whole epochs (validation and checkpoints included).
The first epoch is warm-up. ``--rounds`` fits, medians over all.

A second table trains lightrainer alone on folders of a quarter, half and all of ``--files``,
sizes interleaved over ``--rounds`` rounds: seconds per training epoch and the exponent of time
in the number of files (1 = linear).

    python benchmarks/image_folder.py
    python benchmarks/image_folder.py --files 20000 --epochs 4 --rounds 2 --workers 1
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO,
    EpochClock,
    HandLoop,
    child_result,
    fit_exponent,
    lightning_clock_callback,
    machine_note,
    median,
    paired_steps_callback,
    pin_threads,
    run_child,
    spread,
    write_results,
)

#: Where the generated folders are kept between runs (the benchmark's data, not results).
DATA = Path(tempfile.gettempdir()) / "lightrainer_bench_images"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def make_folder(files: int, size: int = 64) -> Path:
    """The example's folder of ``files`` JPEGs (made once, reused)."""
    spec = importlib.util.spec_from_file_location("image_folder_example", REPO / "examples" / "image_folder.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.make_digit_folder(DATA / f"digits_jpg_{files}_{size}", files, size)


def bench_cfg(save_dir: str, epochs: int, workers: int):
    import lightrainer as lt
    from lightrainer.modules import ClassificationModule

    return lt.load_config({
        "save_dir": save_dir, "epochs": epochs, "batch": 64, "nbs": 64, "num_workers": workers, "optimizer": "AdamW",
        "lr0": 0.002, "warmup_epochs": 1.0, "plots": False, "device": "cpu", "seed": 0,
    }, task_class=ClassificationModule)


def hand_loader(root: str, cfg, workers: int):
    """torchvision's ImageFolder over lightrainer's training and validation files, as a user writes it."""
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from lightrainer.datamodules import stratified_split

    folder = torchvision.datasets.ImageFolder(root, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    train, val = stratified_split(len(folder), folder.targets, cfg.val_split, cfg.seed)
    return (DataLoader(Subset(folder, train.tolist()), batch_size=cfg.batch, shuffle=True, num_workers=workers,
                       persistent_workers=workers > 0),
            DataLoader(Subset(folder, val.tolist()), batch_size=cfg.batch, num_workers=workers,
                       persistent_workers=workers > 0))


def child(mode: str, root: str, epochs: int, workers: int) -> None:
    """One lightrainer fit, paired with the hand loop (``paired``) or alone (``alone``); prints JSON."""
    import logging

    import torch
    import torch.nn.functional as F

    import lightrainer as lt
    from lightrainer.datamodules import ImageFolderDataModule
    from lightrainer.modules import ClassificationModule, SmallCNN

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    cfg = bench_cfg(tempfile.mkdtemp(), epochs, workers)
    torch.manual_seed(0)
    module = ClassificationModule(SmallCNN(10, 3, width=8), cfg)
    data = ImageFolderDataModule(cfg, root, image_size=64, stream=True, mean=MEAN, std=STD)
    clock = EpochClock()
    callbacks = [lightning_clock_callback(clock)]
    if mode == "paired":
        train_loader, val_loader = hand_loader(root, cfg, workers)
        torch.manual_seed(0)
        loop = HandLoop(cfg, SmallCNN(10, 3, width=8), len(train_loader), lambda m, b: F.cross_entropy(m(b[0]), b[1]))
        paired = paired_steps_callback(loop, lambda epoch: iter(train_loader), warmup_epochs=1,
                                       val_batches=lambda: iter(val_loader), val_fn=lambda m, b: m(b[0]))
        callbacks.append(paired)
    trainer = lt.build_trainer(cfg, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    out = {"images": len(data.train_data), "batch": cfg.batch, **clock.result(warmup=1)}
    if mode == "paired":
        out.update(lightrainer=paired.lightrainer, hand=paired.hand, lightrainer_epochs=paired.lightrainer_epochs,
                   hand_epochs=paired.hand_epochs)
    child_result(**out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    pin_threads(args.threads)
    if args.child:
        child(args.child, args.root, args.epochs, args.workers)
        return

    roots = {n: make_folder(n) for n in sorted({args.files // 4, args.files // 2, args.files})}

    def fit(mode: str, files: int) -> dict:
        return run_child(Path(__file__), ["--child", mode, "--root", str(roots[files]), "--epochs", str(args.epochs),
                                          "--workers", str(args.workers)], args.threads)

    steps: dict[str, list[float]] = {"lightrainer": [], "hand": []}
    epochs: dict[str, list[float]] = {"lightrainer": [], "hand": []}
    for round_ in range(args.rounds):
        out = fit("paired", args.files)
        for loop in steps:
            steps[loop] += out[loop]
            epochs[loop] += out[f"{loop}_epochs"]
        print(f"paired round {round_}: lightrainer {out['batch'] / median(out['lightrainer']):.0f} images/s, "
              f"hand {out['batch'] / median(out['hand']):.0f} images/s", flush=True)
    batch, images = out["batch"], out["images"]
    rows = []
    for loop, name in (("lightrainer", "lightrainer (streamed ImageFolderDataModule)"),
                       ("hand", "hand-written (DataLoader(ImageFolder))")):
        rates = [batch / s for s in steps[loop]]
        rows.append({"loop": name, "images_per_s": median(rates), "step_ms": 1e3 * median(steps[loop]),
                     "step_range_ms": spread([1e3 * s for s in steps[loop]]),
                     "vs_hand_step": median(steps["hand"]) / median(steps[loop]),
                     "epoch_s": median(epochs[loop]) if epochs[loop] else float("nan"),
                     "vs_hand_epoch": (median(epochs["hand"]) / median(epochs[loop])) if epochs[loop] else float("nan")})
    write_results("image_folder", rows, "Streaming an image folder: training images/s, paired with a hand-written loop", [
        machine_note(args.threads),
        f"{args.files} JPEG files 64x64x3 (examples/image_folder.py), {images} trained on per epoch, batch {batch}, "
        f"SmallCNN width 8, AdamW, {args.workers} decoding worker(s) each",
        f"paired in one process (L H L H ...): {len(steps['hand'])} steps and {len(epochs['hand'])} whole epochs of "
        f"each over {args.rounds} fit(s) of {args.epochs} epochs, the first epoch as warm-up; medians",
        "vs_hand: hand time / lightrainer time (above 1: lightrainer is faster); steps include fetching the batch, "
        "epochs include validation (and lightrainer's checkpoints and results.csv)",
    ])

    sizes = sorted(roots)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for round_ in range(args.rounds):
        for files in sizes if round_ % 2 == 0 else sizes[::-1]:
            train_s = fit("alone", files)["train_s"]
            times[files] += train_s
            print(f"{files} files: {', '.join(f'{t:.1f}' for t in train_s)} s a training epoch", flush=True)
    srows = [{"files": n, "trained_per_epoch": int(0.8 * n), "epoch_train_s": median(times[n]),
              "range_s": spread(times[n]), "us_per_image": 1e6 * median(times[n]) / (0.8 * n)} for n in sizes]
    exponent = fit_exponent(sizes, [median(times[n]) for n in sizes])
    write_results("image_folder_scaling", srows, "Streaming an image folder: time per epoch against the number of files", [
        machine_note(args.threads),
        f"fitted exponent of training time in the number of files: {exponent:.3f} (linear = 1)",
        f"lightrainer alone (as above), {args.rounds} rounds with the sizes interleaved, {args.epochs} epochs a fit, "
        "the first as warm-up; medians",
    ])


if __name__ == "__main__":
    main()
