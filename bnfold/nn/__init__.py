"""NumPy neural-network pieces: batch normalization with moving statistics, and a small MLP trainer."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "BatchNorm",
    "Dense",
    "ReLU",
    "LeakyReLU",
    "Sequential",
    "SGD",
    "Adam",
    "softmax_cross_entropy",
    "load_digits",
    "train",
    "recompute_statistics",
    "save_checkpoint",
    "load_checkpoint",
]

_LAZY = {
    "BatchNorm": "bnfold.nn.batchnorm",
    "Dense": "bnfold.nn.layers",
    "ReLU": "bnfold.nn.layers",
    "LeakyReLU": "bnfold.nn.layers",
    "Sequential": "bnfold.nn.model",
    "SGD": "bnfold.nn.optim",
    "Adam": "bnfold.nn.optim",
    "softmax_cross_entropy": "bnfold.nn.losses",
    "load_digits": "bnfold.nn.data",
    "train": "bnfold.nn.train",
    "recompute_statistics": "bnfold.nn.train",
    "save_checkpoint": "bnfold.nn.checkpoint",
    "load_checkpoint": "bnfold.nn.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.nn' has no attribute {name!r}")
