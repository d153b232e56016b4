"""bnfold: batch normalization done right in NumPy, and exact BN folding for ONNX models.

The public functions live in modules named differently from them (``bnfold.fold`` is the function
of `bnfold.folding`, ``bnfold.verify`` that of `bnfold.verification`, ``bnfold.inspect`` that of
`bnfold.diagnosis`, ``bnfold.recalibrate`` that of `bnfold.recalibration`), so importing a submodule
never replaces a public name: every name below works after ``import bnfold`` in any order, any
number of times. They are resolved on first use, so that ``import bnfold`` stays light (no onnx,
no onnxruntime); the ``TYPE_CHECKING`` imports let type checkers and IDEs see them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from bnfold.errors import BnfoldError, VerificationError

if TYPE_CHECKING:
    from bnfold import nn
    from bnfold.conversion import convert
    from bnfold.diagnosis import inspect
    from bnfold.export import export_onnx
    from bnfold.folding import fold
    from bnfold.nn.batchnorm import BatchNorm
    from bnfold.recalibration import recalibrate
    from bnfold.verification import verify

__version__ = "0.1.0"

__all__ = [
    "BnfoldError",
    "VerificationError",
    "BatchNorm",
    "nn",
    "export_onnx",
    "fold",
    "verify",
    "convert",
    "inspect",
    "recalibrate",
    "__version__",
]

# Public name -> (module, attribute); attribute None means the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "nn": ("bnfold.nn", None),
    "BatchNorm": ("bnfold.nn.batchnorm", "BatchNorm"),
    "export_onnx": ("bnfold.export", "export_onnx"),
    "fold": ("bnfold.folding", "fold"),
    "verify": ("bnfold.verification", "verify"),
    "convert": ("bnfold.conversion", "convert"),
    "inspect": ("bnfold.diagnosis", "inspect"),
    "recalibrate": ("bnfold.recalibration", "recalibrate"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'bnfold' has no attribute {name!r}") from None
    value = import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
