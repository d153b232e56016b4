"""NumPy neural-network pieces: batch normalization with moving statistics, and a small MLP trainer.

Names resolve on first use; no module is named like a public function (the trainer is
`bnfold.nn.training`, its function `bnfold.nn.train`), so importing a submodule never shadows one.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.nn.batchnorm import BatchNorm
    from bnfold.nn.checkpoint import load_checkpoint, save_checkpoint
    from bnfold.nn.data import load_digits
    from bnfold.nn.layers import Dense, LeakyReLU, ReLU
    from bnfold.nn.losses import softmax_cross_entropy
    from bnfold.nn.model import Sequential
    from bnfold.nn.optim import SGD, Adam
    from bnfold.nn.training import recompute_statistics, train

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
    "train": "bnfold.nn.training",
    "recompute_statistics": "bnfold.nn.training",
    "save_checkpoint": "bnfold.nn.checkpoint",
    "load_checkpoint": "bnfold.nn.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.nn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
