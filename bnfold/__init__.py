"""bnfold: batch normalization done right in NumPy, and exact BN folding for ONNX models."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from bnfold.errors import BnfoldError, VerificationError

__version__ = "0.1.0"

__all__ = [
    "BnfoldError",
    "VerificationError",
    "BatchNorm",
    "export_onnx",
    "fold",
    "verify",
    "convert",
    "__version__",
]

# Public names resolved on first use, so that `import bnfold` stays light (no onnxruntime).
_LAZY = {
    "BatchNorm": "bnfold.nn.batchnorm",
    "export_onnx": "bnfold.export",
    "fold": "bnfold.fold",
    "verify": "bnfold.verify",
    "convert": "bnfold.conversion",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
