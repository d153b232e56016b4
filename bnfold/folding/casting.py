"""Casting float64 fold results to the model's element type, with subnormals flushed to zero.

Folds compute in float64 (`bnfold.folding.algebra`) and cast once, here. A value that overflows
the target type makes the fold a `Skip` (the BN stays); a value that lands in the subnormal range
of the target type is set to zero, because subnormal arithmetic is several times slower on CPUs
and such a value is within one subnormal step of zero anyway.
"""

from __future__ import annotations

import functools

import numpy as np
from onnx import TensorProto

from bnfold.folding.algebra import check_representable
from bnfold.folding.patterns import Skip
from bnfold.folding.tensors import np_dtype

__all__ = ["FLOAT_TYPES", "smallest_normal", "flush_subnormals", "cast_folded"]

#: The element types bnfold folds (the weights' types; float64 results are cast back to them).
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)


@functools.lru_cache(maxsize=None)
def smallest_normal(dtype: np.dtype) -> float | None:
    """The smallest positive normal value of a float dtype (ml_dtypes types too), else None."""
    try:
        return float(np.finfo(dtype).tiny)
    except (TypeError, ValueError):
        pass
    try:
        import ml_dtypes
    except ImportError:
        return None
    try:
        return float(ml_dtypes.finfo(dtype).tiny)
    except (TypeError, ValueError):  # not a float type of ml_dtypes either (integers, bool)
        return None


def flush_subnormals(cast: np.ndarray) -> int:
    """Set the subnormal values of ``cast`` (in its own dtype) to zero in place; return how many."""
    tiny = smallest_normal(cast.dtype)
    if tiny is None or not cast.size:
        return 0
    probe = cast if cast.dtype.kind == "f" else cast.astype(np.float32)
    # Boolean temporaries only (1 byte per value): no float-sized scratch arrays.
    subnormal = (probe < tiny) & (probe > -tiny)
    if not subnormal.any():  # the common case
        return 0
    subnormal &= probe != 0
    count = int(np.count_nonzero(subnormal))
    cast[subnormal] = 0
    return count


def cast_folded(values: np.ndarray, elem_type: int, what: str) -> tuple[np.ndarray, int] | Skip:
    """Cast float64 folded ``values`` to ``elem_type``; flush subnormals to zero.

    Returns ``(array, n_flushed)``, or `Skip` naming ``what`` if the element type is unknown or a
    value overflows it.
    """
    dtype = np_dtype(elem_type)
    if dtype is None:
        return Skip(f"{what} has element type {elem_type}, which bnfold does not fold")
    reason = check_representable(values, dtype)
    if reason is not None:
        return Skip(f"{what}: {reason}")
    cast = np.asarray(values, dtype=np.float64).astype(dtype)
    return cast, flush_subnormals(cast)
