"""Build ``digits.npz`` from the copy of the UCI digits that scikit-learn distributes.

Run once, by hand, with scikit-learn installed (it is not a bnfold dependency)::

    python -m bnfold.nn.data.make_digits [path/to/digits.csv.gz]

The CSV has 1,797 rows of 65 integers: 64 pixel counts in 0..16 (an 8x8 image, row-major) and
the class label 0..9 last. The output holds

- ``images``: uint8 (1797, 64), the pixel counts unchanged;
- ``labels``: uint8 (1797,);
- ``is_test``: bool (1797,), a fixed stratified split: in each class, ``round(n_class / 4)``
  images chosen by ``numpy.random.default_rng(SPLIT_SEED)`` are test images.

Storing the split (instead of recomputing it at load time) keeps it fixed even if NumPy's
generators change their streams.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np

__all__ = ["build", "SPLIT_SEED", "TEST_FRACTION"]

SPLIT_SEED = 20260
TEST_FRACTION = 0.25
# Published class counts of the scikit-learn copy (sklearn.datasets.load_digits, DESCR):
# 1,797 images; every class between 174 and 183.
EXPECTED_TOTAL = 1797
EXPECTED_CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)


def _default_source() -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


def build(source: Path, output: Path) -> None:
    """Read the CSV at `source`, check it, and write the compact archive to `output`."""
    with gzip.open(source, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    if table.shape != (EXPECTED_TOTAL, 65):
        raise SystemExit(f"{source}: expected shape (1797, 65), got {table.shape}")
    images, labels = table[:, :64], table[:, 64]
    if images.min() < 0 or images.max() > 16:
        raise SystemExit(f"{source}: pixel values outside 0..16")
    counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
    if counts != EXPECTED_CLASS_COUNTS:
        raise SystemExit(f"{source}: class counts {counts} differ from {EXPECTED_CLASS_COUNTS}")
    rng = np.random.default_rng(SPLIT_SEED)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        n_test = int(round(len(members) * TEST_FRACTION))
        is_test[rng.choice(members, size=n_test, replace=False)] = True
    np.savez_compressed(
        output,
        images=images.astype(np.uint8),
        labels=labels.astype(np.uint8),
        is_test=is_test,
    )


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else _default_source()
    build(src, Path(__file__).with_name("digits.npz"))
