"""The shipped data set: 8x8 handwritten digits (UCI, via scikit-learn), with a fixed split.

Data: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine
Learning Repository (1998), licensed CC BY 4.0; taken from the copy distributed with scikit-learn
(BSD 3-Clause). See ``NOTICE`` in this folder for details, and ``make_digits.py`` for how
``digits.npz`` was built. Loading needs only NumPy (no scikit-learn, no network).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

import numpy as np

from bnfold.errors import BnfoldError

__all__ = ["Digits", "load_digits", "NUM_CLASSES", "NUM_FEATURES"]

log = logging.getLogger(__name__)

NUM_CLASSES = 10
NUM_FEATURES = 64
_MAX_PIXEL = 16.0


@dataclass(frozen=True)
class Digits:
    """The digits split into training and test sets.

    Attributes
    ----------
    x_train, x_test : numpy.ndarray
        float32 (N, 64): pixel counts / 16, so every feature lies in [0, 1].
    y_train, y_test : numpy.ndarray
        int64 (N,): class labels 0..9.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> Digits:
    """Load the shipped digits with the fixed stratified split (1,347 train / 450 test images).

    Returns
    -------
    Digits
        Features ``x = pixels / 16`` as float32 (N, 64) and int64 labels (N,).
    """
    from bnfold.io import load_npz

    with resources.as_file(resources.files(__name__) / "digits.npz") as path:
        if not path.is_file():
            raise BnfoldError(f"{path}: shipped data file is missing; reinstall bnfold")
        arrays = load_npz(path)
    images, labels, is_test = arrays["images"], arrays["labels"], arrays["is_test"]
    x = images.astype(np.float32) / np.float32(_MAX_PIXEL)
    y = labels.astype(np.int64)
    log.debug("loaded %d digits (%d test)", len(y), int(is_test.sum()))
    return Digits(x_train=x[~is_test], y_train=y[~is_test], x_test=x[is_test], y_test=y[is_test])
