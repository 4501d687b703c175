"""Your own images: a folder of JPEGs, a timm backbone and batched augmentation, through `lightrainer fit`.

    python examples/image_folder.py                   # 5,000 JPEGs, timm/resnet18, 5 epochs (about 5 min)
    python examples/image_folder.py --count 20000     # the size the benchmarks use

1. Build a folder of JPEGs from the built-in data, laid out as your own photos would be
   (``root/<class>/*.jpg``): MNIST-5k digits, coloured (random ink and paper colours), shifted and
   scaled to 32x32 RGB. Nothing is downloaded.
2. Write ``image_folder.yaml``: ``net: timm/resnet18`` (a backbone by name), augmentation keys
   (rotation, shift, random resized crop, HSV jitter, erasing, cutmix: no flips, a flipped 2 is
   not a 2), and a ``data:`` section streaming the folder (``stream: True``: workers decode each
   batch, which stays uint8 until the device).
3. ``lightrainer fit --config image_folder.yaml``, run in this process as the command line runs it.
4. Show ``aug_preview.png`` (the first augmented batch), ``confusion_matrix.png``, then
   ``lightrainer export --weights RUN/weights/best.pt``: the run rebuilds from its weights file
   alone and writes ``best.onnx``, verified in ONNX Runtime.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lightrainer.cli import main as lightrainer
from lightrainer.datamodules.mnist import read_mnist5k

CONFIG = """\
# Written by examples/image_folder.py: a timm backbone on a folder of JPEGs.
save_dir: {save_dir}
name: image_folder
epochs: {epochs}
batch: {batch}
nbs: {batch}
num_workers: {workers}
optimizer: AdamW
lr0: 0.002
warmup_epochs: 1.0
label_smoothing: 0.1
# A backbone by name: any timm or torchvision classifier (timm/resnet18, torchvision/resnet18, ...).
net: {net}
pretrained: False       # True: weights from the local cache only (the error names the file if absent)
# Augmentation, batched on the device; every key is 0 (off) by default. No flips: a flipped 2 is no 2.
degrees: 10
translate: 0.1
scale: 0.3
hsv_h: 0.015
hsv_s: 0.5
hsv_v: 0.3
erasing: 0.2
cutmix: 0.1

data:
  class_path: lightrainer.datamodules.ImageFolderDataModule
  init_args:
    root: {root}
    image_size: {size}
    stream: True        # decode in DataLoader workers each epoch (automatic above max_memory_gb)
"""


def make_digit_folder(root: str | Path, count: int = 5000, size: int = 32, seed: int = 0, quality: int = 90) -> Path:
    """Write ``count`` JPEGs of coloured MNIST-5k digits, ``size`` x ``size`` RGB, as
    ``root/<digit>/<i>.jpg``. Image i is the MNIST-5k digit ``i % 5000`` of a seeded order, with its
    own colours, shift and scale, so any count works. An existing folder of that count is reused.

    Returns:
        ``root``.
    """
    from PIL import Image

    root = Path(root)
    if root.is_dir() and sum(1 for _ in root.glob("*/*.jpg")) == count:
        return root
    images, labels = read_mnist5k()
    digits = images.astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(digits))  # the digits are sorted by label: any count gets every class
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        row = rows[i % len(digits)]
        ink, paper = rng.uniform(0.45, 1.0, 3), rng.uniform(0.0, 0.4, 3)
        if rng.random() < 0.5:  # light paper, dark ink half of the time
            ink, paper = paper, ink
        pad = int(rng.integers(2, 7))
        digit = np.pad(digits[row], pad)
        dy, dx = rng.integers(-2, 3, 2)
        digit = np.roll(digit, (int(dy), int(dx)), axis=(0, 1))
        rgb = paper * (1 - digit[..., None]) + ink * digit[..., None]
        image = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        image.save(root / str(labels[row]) / f"{i:06d}.jpg", quality=quality)
    return root


def main(save_dir: str = "runs", count: int = 5000, epochs: int = 5, size: int = 32, batch: int = 64,
         net: str = "timm/resnet18", workers: int = 2, flags: tuple[str, ...] = ()) -> Path:
    """Build the folder, train on it with ``lightrainer fit``, export with ``lightrainer export``.

    Args:
        flags: more command-line flags for ``fit`` (``--trainer.limit_train_batches 4``, ...).

    Returns:
        The run folder.
    """
    save = Path(save_dir).resolve()
    root = make_digit_folder(save / f"digits_jpg_{count}_{size}", count, size)
    config = save / "image_folder.yaml"
    config.write_text(CONFIG.format(save_dir=save, epochs=epochs, batch=batch, workers=workers, net=net, root=root,
                                    size=size))
    if lightrainer(["fit", "--config", str(config), *flags]) != 0:
        raise SystemExit("lightrainer fit failed")
    run = max(save.glob("image_folder*/weights/best.pt"), key=lambda p: p.stat().st_mtime).parent.parent
    print(f"augmented training images: {run / 'aug_preview.png'}")
    print(f"confusion matrix:          {run / 'confusion_matrix.png'}")
    if lightrainer(["export", "--weights", str(run / "weights" / "best.pt")]) != 0:
        raise SystemExit("lightrainer export failed")
    print(f"ONNX model:                {run / 'weights' / 'best.onnx'} (report: best.onnx.verify.json)")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save_dir", default="runs")
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--net", default="timm/resnet18")
    args = parser.parse_args()
    main(args.save_dir, args.count, args.epochs, args.size, net=args.net)
