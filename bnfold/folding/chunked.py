"""The folded weight ``W' = cast(W * scale)``, computed block by block.

`bnfold.folding.algebra.fold_affine` states the formula on whole arrays; a float64 copy of a
256 MiB float32 weight is 512 MiB, so the weight of a producer fold is computed here in blocks of
rows (axis 0, contiguous in memory) with the same element-wise operations: widen to float64,
(Gemm: multiply by ``alpha``), multiply by the channel's scale, check the range, cast once, flush
subnormals (`bnfold.folding.casting`). Every element sees exactly the operations of the
whole-array computation, so the result is bit-identical to
``cast_folded(fold_affine_general(...)[0])``; memory is one block of float64
plus the result. A block read from a memory-mapped weight is released once used
(`bnfold.io.mapped.release`), so the input's pages do not accumulate either.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from bnfold.folding.algebra import _finfo
from bnfold.folding.casting import flush_subnormals

__all__ = ["BLOCK_BYTES", "Cast", "Deferred", "block_rows", "scale_and_cast"]

#: float64 bytes per block: large enough that the per-block overhead is invisible, small enough
#: to be noise next to the weight itself.
BLOCK_BYTES = 16 * 1024**2


@dataclass
class Cast:
    """A folded weight already cast to its dtype; ``flushed`` subnormal values were set to zero."""

    array: np.ndarray
    flushed: int


def block_rows(shape: tuple[int, ...]) -> int:
    """Rows (axis 0) of an array of ``shape`` per block: `BLOCK_BYTES` of float64, at least one."""
    per_row = max(1, math.prod(shape[1:]))
    return max(1, BLOCK_BYTES // (8 * per_row))


@functools.lru_cache(maxsize=None)
def _range_of(dtype: np.dtype) -> tuple[bool, float]:
    """``(floating, largest finite value)`` of ``dtype`` (``0.0`` if not floating): asked once per
    dtype, not per fold (``np.issubdtype`` and ``finfo`` cost microseconds each)."""
    floating = bool(np.issubdtype(dtype, np.floating) or dtype.kind == "V")
    return floating, float(_finfo(dtype).max) if floating else 0.0


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


@dataclass
class Deferred:
    """A folded weight not computed yet: the recipe of `scale_and_cast`, already checked.

    Its bytes are computed block by block when the model is written (`blocks`), so a folded
    weight of a model whose data stays on disk never sits in memory, nor in a scratch file.
    ``flushed``: subnormal values the computation sets to zero (counted by the checking pass).
    """

    weight: np.ndarray
    scale: np.ndarray
    axis: int
    dtype: np.dtype
    alpha: float | None
    flushed: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return int(self.weight.size) * self.dtype.itemsize

    def arrays(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start row, values)``: the folded weight, one block of rows (axis 0) at a time."""
        for start, cast, *_ in _blocks(self.weight, self.scale, self.axis, self.dtype, self.alpha, None):
            yield start, cast

    def blocks(self) -> Iterator[memoryview]:
        """The folded weight's bytes (C order), one block of rows at a time."""
        for _, cast in self.arrays():
            yield memoryview(np.ascontiguousarray(cast)).cast("B")

    def materialize(self) -> np.ndarray:
        """The whole folded weight in memory (for a later fold that reads it again)."""
        out = np.empty(self.shape, dtype=self.dtype)
        for start, cast in self.arrays():
            out[start:start + cast.shape[0]] = cast
        return out


def scale_and_cast(weight: np.ndarray, scale: np.ndarray, *, axis: int, dtype: np.dtype,
                   alpha: float | None = None,
                   scratch: Callable[[tuple[int, ...]], np.ndarray] | None = None,
                   defer: bool = False) -> Cast | Deferred | str:
    """``cast(W * scale)`` along ``axis`` (``cast((alpha * W) * scale)`` with ``alpha``).

    ``scratch(shape)``: a float64 buffer for one block, reused across calls (a fresh one per fold
    page-faults again in deep models); default a new array. ``defer``: the caller can take a
    `Deferred` (its weight is ``W`` itself, not a rearranged view); it gets one when ``W`` is a
    large tensor still on disk (`bnfold.io.mapped.defers`): the values are checked now and
    computed again, block by block, when written.

    Returns the `Cast` (or `Deferred`), or the reason (as
    `bnfold.folding.algebra.check_representable` words it) if a folded value is not finite or
    overflows ``dtype``.
    """
    from bnfold.io.mapped import defers

    dtype = np.dtype(dtype)
    scale = np.asarray(scale, dtype=np.float64)
    assert weight.shape[axis] == scale.shape[0], (weight.shape, axis, scale.shape)
    keep = not (defer and weight.size and defers(weight))
    out = np.empty(weight.shape, dtype=dtype) if keep else None
    if not weight.size:
        return Cast(out, 0)
    floating, limit = _range_of(dtype)
    high, low, flushed = -np.inf, np.inf, 0
    # Kept results are cast straight into ``out``: no block-sized temporary, whose fresh pages
    # cost more than the cast itself on small weights.
    for _, _, block_high, block_low, block_flushed in _blocks(weight, scale, axis, dtype, alpha, scratch, out):
        flushed += block_flushed
        if floating:
            # NumPy's max / min propagate NaN (as in check_representable); Python's max does not.
            if np.isnan(block_high) or np.isnan(block_low) or np.isnan(high):
                high = low = float("nan")
            else:
                high, low = max(high, block_high), min(low, block_low)
    if floating:
        if not (np.isfinite(high) and np.isfinite(low)):
            return "folded value is not finite"
        peak = max(high, -low)
        if peak > limit:
            return f"folded value {peak:.6g} overflows {dtype.name} (max {limit:.6g})"
    if not keep:
        return Deferred(weight=weight, scale=scale, axis=axis, dtype=dtype, alpha=alpha, flushed=flushed)
    return Cast(out, flushed)


def _blocks(weight, scale, axis, dtype, alpha, scratch, out=None):
    """``(start row, cast block, max, min, flushed)`` per block of rows of ``weight`` (the float64
    range of the block before the cast; subnormals of the cast block set to zero and counted).

    ``out``: an array of ``weight``'s shape and ``dtype`` that receives the cast blocks (each
    yielded block is then a view of it); default a new array per block."""
    from bnfold.io.mapped import release

    rows = block_rows(weight.shape)
    block_shape = (min(rows, weight.shape[0]), *weight.shape[1:])
    buffer = np.empty(block_shape, dtype=np.float64) if scratch is None else scratch(block_shape)
    whole = _along(scale, axis, weight.ndim)
    floating, limit = _range_of(dtype)
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
        block_high = float(w64.max()) if floating else 0.0
        block_low = float(w64.min()) if floating else 0.0
        # astype and copyto run the same cast (round to nearest, overflow to inf).
        cast = np.empty(w64.shape, dtype=dtype) if out is None else out[start:start + w64.shape[0]]
        if floating and not (-limit <= block_low and block_high <= limit):  # NaN lands here too
            with np.errstate(over="ignore", invalid="ignore"):  # reported by the caller, not warned
                np.copyto(cast, w64, casting="unsafe")
        else:
            np.copyto(cast, w64, casting="unsafe")
        yield start, cast, block_high, block_low, flush_subnormals(cast)
