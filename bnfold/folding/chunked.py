"""The folded weight ``W' = cast(W * scale)``, computed block by block.

`bnfold.folding.algebra.fold_affine` states the formula on whole arrays; a float64 copy of a
256 MiB float32 weight is 512 MiB, so the weight of a producer fold is computed here in blocks of
rows (axis 0, contiguous in memory) with the same element-wise operations: widen to float64,
(Gemm: multiply by ``alpha``), multiply by the channel's scale, check the range, cast once, flush
subnormals. Every element sees exactly the operations of the whole-array computation, so the
result is bit-identical to ``cast_folded(fold_affine(...)[0])``; memory is one block of float64
plus the result. A block read from a memory-mapped weight is released once used
(`bnfold.io.mapped.release`), so the input's pages do not accumulate either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnfold.folding.algebra import _finfo

__all__ = ["Cast", "scale_and_cast", "BLOCK_BYTES"]

#: float64 bytes per block: large enough that the per-block overhead is invisible, small enough
#: to be noise next to the weight itself.
BLOCK_BYTES = 16 * 1024**2


@dataclass
class Cast:
    """A folded weight already cast to its dtype; ``flushed`` subnormal values were set to zero."""

    array: np.ndarray
    flushed: int


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def _smallest_normal(dtype: np.dtype) -> float | None:
    """As the cast of `GraphIndex.cast_folded`: the smallest normal value, None for non-floats."""
    try:
        return float(_finfo(dtype).tiny)
    except (TypeError, ValueError, ImportError, AttributeError):
        return None


def scale_and_cast(weight: np.ndarray, scale: np.ndarray, *, axis: int, dtype: np.dtype,
                   alpha: float | None = None,
                   scratch: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> Cast | str:
    """``cast(W * scale)`` along ``axis`` (``cast((alpha * W) * scale)`` with ``alpha``).

    ``scratch(shape)``: a float64 buffer for one block, reused across calls (a fresh one per fold
    page-faults again in deep models); default a new array.

    Returns the `Cast`, or the reason (as `bnfold.folding.algebra.check_representable` words it)
    if a folded value is not finite or overflows ``dtype``.
    """
    from bnfold.io.mapped import release

    dtype = np.dtype(dtype)
    scale = np.asarray(scale, dtype=np.float64)
    assert weight.shape[axis] == scale.shape[0], (weight.shape, axis, scale.shape)
    out = np.empty(weight.shape, dtype=dtype)
    if not weight.size:
        return Cast(out, 0)
    per_row = max(1, weight.size // weight.shape[0])
    rows = max(1, BLOCK_BYTES // (8 * per_row))
    block_shape = (min(rows, weight.shape[0]), *weight.shape[1:])
    buffer = np.empty(block_shape, dtype=np.float64) if scratch is None else scratch(block_shape)
    whole = _along(scale, axis, weight.ndim)
    floating = np.issubdtype(dtype, np.floating) or dtype.kind == "V"
    tiny = _smallest_normal(dtype)
    high, low, flushed = -np.inf, np.inf, 0
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        w64 = buffer[: block.shape[0]]
        factor = whole[start:start + rows] if axis == 0 else whole
        if block.dtype.kind != "f":  # e.g. bfloat16 (ml_dtypes): widen explicitly, as fold_affine does
            block = block.astype(np.float64)
        if alpha is None:
            np.multiply(block, factor, out=w64, dtype=np.float64)
        else:  # the Gemm fold scales alpha * W (float64) by the BN scale: same order here
            np.multiply(alpha, block, out=w64, dtype=np.float64)
            np.multiply(w64, factor, out=w64)
        release(weight[start:start + rows])
        if floating:
            # NumPy's max / min propagate NaN (as in check_representable); Python's max does not.
            block_high, block_low = float(w64.max()), float(w64.min())
            if np.isnan(block_high) or np.isnan(block_low) or np.isnan(high):
                high = low = float("nan")
            else:
                high, low = max(high, block_high), min(low, block_low)
        cast = out[start:start + rows]
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, not warned
            cast[...] = w64.astype(dtype)
        if tiny is not None:
            probe = cast if cast.dtype.kind == "f" else cast.astype(np.float32)
            subnormal = (probe < tiny) & (probe > -tiny)
            if subnormal.any():
                subnormal &= probe != 0
                flushed += int(np.count_nonzero(subnormal))
                cast[subnormal] = 0
    if floating:
        if not (np.isfinite(high) and np.isfinite(low)):
            return "folded value is not finite"
        peak = max(high, -low)
        limit = float(_finfo(dtype).max)
        if peak > limit:
            return f"folded value {peak:.6g} overflows {dtype.name} (max {limit:.6g})"
    return Cast(out, flushed)
