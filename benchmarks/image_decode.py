"""Which decoder should a streaming image folder use here? (issue 16)

Decodes JPEG files to uint8 (C, H, W) tensors at the training size, one process, one thread:

* ``torchvision``: ``torchvision.io.decode_image`` (libjpeg-turbo straight into a tensor), then
  lightrainer's resize (antialiased bilinear on uint8) where the size differs;
* ``pillow``: ``PIL.Image.open(...).convert("RGB")`` to a tensor, same resize;
* ``pillow draft``: the same with ``Image.draft`` (the JPEG decoded already scaled down by 1/2,
  1/4 or 1/8 in the DCT: only helps for files at least twice the target);
* ``pillow + ToTensor``: what ``torchvision.datasets.ImageFolder`` with ``ToTensor()`` does by
  default (Pillow, then a float tensor), for reference.

Two sets of ``--count`` files: 64x64 (the benchmark folder) and 256x256 (a photo larger than the
64x64 target). Variants alternate within each repeat; medians. ``lightrainer.datamodules.stream``
picks torchvision, and Pillow's draft for JPEGs at least twice the target size.

    python benchmarks/image_decode.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_note, median, pin_threads, spread, write_results  # noqa: E402


def make_jpegs(folder: Path, count: int, size: int) -> list[str]:
    """Smooth random colour JPEGs (quality 90), made once."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(size)
    paths = []
    for i in range(count):
        path = folder / f"{i}.jpg"
        if not path.is_file():
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--target", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    pin_threads(1)

    import torch
    from torchvision.transforms import functional as TF

    from lightrainer.datamodules.stream import PIL, PIL_DRAFT, TORCHVISION, decode_image

    size = (args.target, args.target)
    data = Path(tempfile.gettempdir()) / "lightrainer_bench_decode"
    sets = {source: make_jpegs(data / str(source), args.count, source) for source in (64, 256)}

    def to_tensor(path: str) -> torch.Tensor:
        from PIL import Image

        with open(path, "rb") as f:
            image = Image.open(f).convert("RGB")
        if image.size != (args.target, args.target):
            image = image.resize((args.target, args.target), Image.Resampling.BILINEAR)
        return TF.to_tensor(image)

    decoders = {
        "torchvision": lambda p: decode_image(p, size, 3, TORCHVISION),
        "pillow": lambda p: decode_image(p, size, 3, PIL),
        "pillow draft": lambda p: decode_image(p, size, 3, PIL_DRAFT),
        "pillow + ToTensor (ImageFolder)": to_tensor,
    }
    times: dict[tuple[int, str], list[float]] = {(s, d): [] for s in sets for d in decoders}
    for repeat in range(args.warmup + args.repeats):
        order = list(times) if repeat % 2 == 0 else list(times)[::-1]
        for source, name in order:
            start = time.perf_counter()
            for path in sets[source]:
                decoders[name](path)
            if repeat >= args.warmup:
                times[(source, name)].append(1e6 * (time.perf_counter() - start) / args.count)

    rows = []
    for (source, name), values in times.items():
        fastest = min(median(times[(source, d)]) for d in decoders if d != "pillow + ToTensor (ImageFolder)")
        rows.append({"file": f"{source}x{source} JPEG", "decoder": name, "us_per_image": median(values),
                     "range": spread(values), "vs_fastest_uint8": median(values) / fastest})
    write_results("image_decode", rows, f"Decoding JPEGs to {args.target}x{args.target} tensors", [
        machine_note(1),
        f"{args.count} files a set, {args.repeats} repeats after {args.warmup} warm-up, variants alternated; medians",
        "uint8 decoders include lightrainer's resize and centre crop where the size differs; "
        "'pillow + ToTensor' resizes with Pillow and returns float",
    ])


if __name__ == "__main__":
    main()
