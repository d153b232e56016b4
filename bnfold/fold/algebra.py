"""The fold formula, in one place, in pure NumPy.

Batch normalization in inference mode is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta = scale * x + shift
    scale = gamma / sqrt(var + eps)
    shift = beta - mean * scale

Folding that affine map into a linear producer ``z = x W + b`` (channels on ``axis`` of ``W``)::

    W' = W * scale            (per output channel)
    b' = shift + b * scale    (= beta + (b - mean) * scale)

Everything is computed in float64 and cast back once, to the dtype of the weight: tiny variances
make ``scale`` large, and float16 weights would lose accuracy or overflow if folded in place.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bn_affine", "fold_affine", "fold_batchnorm", "check_representable"]


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scale, shift)`` in float64 such that ``BN(x) = scale * x + shift``."""
    var = np.asarray(var, dtype=np.float64)
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(var + float(eps))
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * scale
    return scale, shift


def _along(vector: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return vector.reshape(shape)


def fold_affine(weight, bias, scale, shift, *, axis: int):
    """Fold ``y = scale * z + shift`` into ``z = linear(x; weight) + bias``, all in float64.

    ``axis`` is the axis of ``weight`` that indexes output channels (its length equals
    ``len(scale)``); ``bias`` is None or has one value per output channel. Returns float64
    ``(weight', bias')``; the caller casts them (see `check_representable`).
    """
    w = np.asarray(weight, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    assert w.shape[axis] == scale.shape[0] == shift.shape[0], (w.shape, axis, scale.shape)
    new_weight = w * _along(scale, axis, w.ndim)
    new_bias = shift if bias is None else shift + np.asarray(bias, dtype=np.float64) * scale
    return new_weight, new_bias


def fold_batchnorm(weight, bias, gamma, beta, mean, var, eps: float, *, axis: int, dtype=None):
    """``W' = W * s`` and ``b' = beta + (b - mean) * s`` with ``s = gamma / sqrt(var + eps)``.

    Computed in float64 and cast to ``dtype`` (default: the weight's dtype).
    """
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    new_weight, new_bias = fold_affine(weight, bias, scale, shift, axis=axis)
    dtype = np.asarray(weight).dtype if dtype is None else np.dtype(dtype)
    return new_weight.astype(dtype), new_bias.astype(dtype)


def check_representable(values: np.ndarray, dtype) -> str | None:
    """Return a reason if float64 ``values`` overflow ``dtype`` when cast, else None."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating) and dtype.kind != "V":
        return None
    finite = np.isfinite(values)
    if not finite.all():
        return "folded value is not finite"
    limit = float(np.finfo(dtype).max)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if peak > limit:
        return f"folded value {peak:.6g} overflows {dtype.name} (max {limit:.6g})"
    return None
