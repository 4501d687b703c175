"""Batched augmentation against per-sample torchvision transforms of the same kinds (issue 16).

A batch of ``--batch`` float images (3 x ``--size`` x ``--size``) goes through each augmentation
key of lightrainer, applied to the whole batch at once (``BatchAugment``: one draw of all the
randomness, one kornia warp for the geometry, one HSV conversion for the colour keys), and through
the torchvision transform of the same kind applied image by image, as a DataLoader worker would:

=========================  =============================================================
lightrainer key(s)          torchvision (``transforms.v2``)
=========================  =============================================================
``fliplr``                  ``RandomHorizontalFlip``
``flipud``                  ``RandomVerticalFlip``
``degrees``                 ``RandomRotation``
``translate``               ``RandomAffine(translate=...)``
``scale``                   ``RandomResizedCrop(scale=(1 - scale, 1))``
``hsv_h/s/v``               ``ColorJitter(brightness=v, saturation=s, hue=h)``
``erasing``                 ``RandomErasing``
``mixup``, ``cutmix``       ``MixUp``, ``CutMix`` (batched in torchvision too)
all of them                 all of them, composed
=========================  =============================================================

Time per image, on the CPU with ``--threads`` torch threads; variants alternate within each
repeat; medians.

    python benchmarks/augment_speed.py
    python benchmarks/augment_speed.py --batch 256 --size 64 --repeats 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_note, median, pin_threads, spread, write_results  # noqa: E402

KEYS = {"fliplr": 0.5, "flipud": 0.5, "degrees": 10.0, "translate": 0.1, "scale": 0.5,
        "hsv": {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}, "erasing": 0.4, "mixup": 0.5, "cutmix": 0.5}


def torchvision_transform(name: str, size: int) -> tuple[Any, bool]:
    """(the per-sample or batched torchvision transform of ``name``, whether it takes the batch)."""
    from torchvision.transforms import v2

    per_sample = {
        "fliplr": v2.RandomHorizontalFlip(0.5),
        "flipud": v2.RandomVerticalFlip(0.5),
        "degrees": v2.RandomRotation(10.0),
        "translate": v2.RandomAffine(0, translate=(0.1, 0.1)),
        "scale": v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
        "hsv": v2.ColorJitter(brightness=0.4, saturation=0.7, hue=0.015),
        "erasing": v2.RandomErasing(0.4),
    }
    if name in per_sample:
        return per_sample[name], False
    if name == "mixup":
        return v2.MixUp(alpha=32.0, num_classes=10), True
    if name == "cutmix":
        return v2.CutMix(alpha=1.0, num_classes=10), True
    return v2.Compose([per_sample[k] for k in ("scale", "degrees", "fliplr", "flipud", "hsv", "erasing")]), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pin_threads(args.threads)

    import torch

    from lightrainer.datamodules import BatchAugment

    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    all_keys = {k: v for k, v in KEYS.items() if k != "hsv"} | KEYS["hsv"]
    names = [*KEYS, "all"]

    def ours(name: str) -> Callable[[], Any]:
        values = all_keys if name == "all" else (KEYS[name] if name == "hsv" else {name: KEYS[name]})
        aug = BatchAugment(values, num_classes=10)

        def run() -> Any:
            params = aug.draw(args.batch, g)
            wanted = aug.partner_indices(params, args.batch)
            return aug.apply_batch((x, y), params, None if wanted is None else (x[wanted], y[wanted]))

        return run

    def theirs(name: str) -> Callable[[], Any]:
        transform, batched = torchvision_transform(name, args.size)
        if batched:
            return lambda: transform(x, y)
        if name == "all":
            mix = torchvision_transform("mixup", args.size)[0]
            return lambda: mix(torch.stack([transform(image) for image in x]), y)
        return lambda: torch.stack([transform(image) for image in x])

    variants = {(name, side): (ours if side == "lightrainer" else theirs)(name)
                for name in names for side in ("lightrainer", "torchvision")}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    for repeat in range(args.warmup + args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for key in order:
            start = time.perf_counter()
            variants[key]()
            if repeat >= args.warmup:
                times[key].append(time.perf_counter() - start)

    rows = []
    for name in names:
        ours_us = [1e6 * t / args.batch for t in times[(name, "lightrainer")]]
        theirs_us = [1e6 * t / args.batch for t in times[(name, "torchvision")]]
        rows.append({"augmentation": name, "lightrainer_us_per_image": median(ours_us), "range": spread(ours_us),
                     "torchvision_us_per_image": median(theirs_us), "range_tv": spread(theirs_us),
                     "speedup": median(theirs_us) / median(ours_us)})
    write_results("augment_speed", rows, "Augmentation: batched (lightrainer, kornia) vs per-sample torchvision", [
        machine_note(args.threads),
        f"batch {args.batch} of 3x{args.size}x{args.size} float images on the CPU; {args.repeats} repeats after "
        f"{args.warmup} warm-up, variants alternated; medians",
        "values: " + ", ".join(f"{k} {v}" for k, v in all_keys.items()) + "; torchvision MixUp/CutMix are batched "
        "(per batch, one lambda); 'all' composes every per-sample transform, then MixUp",
        "speedup: torchvision time / lightrainer time (same kinds of transforms, same image count)",
    ])


if __name__ == "__main__":
    main()
