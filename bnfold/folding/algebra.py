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

__all__ = ["bn_affine", "fold_affine", "fold_bias", "fold_affine_into_consumer", "fold_batchnorm", "check_representable"]


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


def fold_affine(weight, bias, scale, shift, *, axis: int, out: np.ndarray | None = None):
    """Fold ``y = scale * z + shift`` into ``z = linear(x; weight) + bias``, all in float64.

    ``axis`` is the axis of ``weight`` that indexes output channels (its length equals
    ``len(scale)``); ``bias`` is None or has one value per output channel. Returns float64
    ``(weight', bias')``; the caller casts them (see `check_representable`). ``out``: an
    optional float64 array of ``weight``'s shape to write ``weight'`` into (a reused scratch
    buffer saves allocating, and page-faulting, a fresh one per fold in large models).
    """
    w = np.asarray(weight)
    if w.dtype.kind != "f":  # e.g. bfloat16 (ml_dtypes): convert explicitly
        w = w.astype(np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    assert w.shape[axis] == scale.shape[0] == shift.shape[0], (w.shape, axis, scale.shape)
    # One pass: the ufunc widens each (exactly representable) weight to float64 on the fly.
    new_weight = np.multiply(w, _along(scale, axis, w.ndim), dtype=np.float64, out=out)
    return new_weight, fold_bias(bias, scale, shift)


def fold_bias(bias, scale, shift) -> np.ndarray:
    """``b' = shift + b * scale`` in float64 (``shift`` when there is no bias): the bias half of
    `fold_affine`, for callers that compute the weight in blocks (`bnfold.folding.chunked`)."""
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    return shift if bias is None else shift + np.asarray(bias, dtype=np.float64) * scale


def fold_affine_into_consumer(weight, bias, scale, shift, *, in_axis: int, out_axis: int, groups: int = 1):
    """Fold ``x -> scale * x + shift`` (per input channel) into the linear op that follows it.

    For a linear consumer ``y[o] = sum_{c, k} W[o, c, k] x[c, k] + b[o]`` (``c`` on ``in_axis``
    of ``W``, ``o`` on ``out_axis``, ``k`` every other axis, e.g. a convolution's kernel taps)::

        W'[o, c, k] = W[o, c, k] * scale[c]
        b'[o]       = b[o] + sum_{c, k} W[o, c, k] * shift[c]

    Exact only if every tap reads a normalized value (a convolution without padding: a padded
    zero is not ``shift``). With ``groups`` (ONNX Conv), ``W`` holds ``C_in / groups`` input
    channels and output channel ``o`` of group ``g = o // (C_out / groups)`` reads input channel
    ``g * (C_in / groups) + c``: ``scale`` and ``shift`` have ``C_in`` values.

    Parameters
    ----------
    weight : array, any rank >= 2
    bias : array of shape (C_out,) or None
    scale, shift : arrays of shape (C_in,)
    in_axis, out_axis : int
        Axes of ``weight`` indexing input and output channels (Conv: 1 and 0; Gemm/MatMul
        weight (K, M): 0 and 1, or 1 and 0 with ``transB``).
    groups : int

    Returns
    -------
    (weight', bias') in float64; ``bias'`` has shape (C_out,).
    """
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), (out_axis, in_axis), (0, 1))
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    c_out, c_in_group = w.shape[0], w.shape[1]
    assert c_out % groups == 0 and scale.shape == shift.shape == (groups * c_in_group,), (
        w.shape, groups, scale.shape, shift.shape)
    # Row o holds the scale / shift of the input channels output channel o reads.
    per_out_scale = np.repeat(scale.reshape(groups, c_in_group), c_out // groups, axis=0)
    per_out_shift = np.repeat(shift.reshape(groups, c_in_group), c_out // groups, axis=0)
    taps = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    new_w = w * per_out_scale[taps]
    delta = (w * per_out_shift[taps]).reshape(c_out, -1).sum(axis=1)
    new_bias = delta if bias is None else np.asarray(bias, dtype=np.float64) + delta
    return np.moveaxis(new_w, (0, 1), (out_axis, in_axis)), new_bias


def fold_batchnorm(weight, bias, gamma, beta, mean, var, eps: float, *, axis: int, dtype=None):
    """``W' = W * s`` and ``b' = beta + (b - mean) * s`` with ``s = gamma / sqrt(var + eps)``.

    Computed in float64 and cast to ``dtype`` (default: the weight's dtype).
    """
    scale, shift = bn_affine(gamma, beta, mean, var, eps)
    new_weight, new_bias = fold_affine(weight, bias, scale, shift, axis=axis)
    dtype = np.asarray(weight).dtype if dtype is None else np.dtype(dtype)
    return new_weight.astype(dtype), new_bias.astype(dtype)


def _finfo(dtype: np.dtype):
    try:
        return np.finfo(dtype)
    except (TypeError, ValueError):  # bfloat16 and other ml_dtypes types
        import ml_dtypes

        return ml_dtypes.finfo(dtype)


def check_representable(values: np.ndarray, dtype) -> str | None:
    """Return a reason if float64 ``values`` overflow ``dtype`` when cast, else None."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating) and dtype.kind != "V":
        return None
    values = np.asarray(values)
    if not values.size:
        return None
    # NumPy's max / min propagate NaN and inf; no |values| temporary is needed.
    high, low = float(values.max()), float(values.min())
    if not (np.isfinite(high) and np.isfinite(low)):
        return "folded value is not finite"
    peak = max(high, -low)
    limit = float(_finfo(dtype).max)
    if peak > limit:
        return f"folded value {peak:.6g} overflows {dtype.name} (max {limit:.6g})"
    return None
