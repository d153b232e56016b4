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

__all__ = [
    "bn_affine",
    "compose_affine",
    "affine_step",
    "fold_affine",
    "fold_affine_general",
    "fold_bias",
    "fold_bias_general",
    "fold_affine_into_consumer",
    "fold_affine_into_gemm_input",
    "fold_batchnorm",
    "check_representable",
]


def bn_affine(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(scale, shift)`` in float64 such that ``BN(x) = scale * x + shift``."""
    var = np.asarray(var, dtype=np.float64)
    scale = np.asarray(gamma, dtype=np.float64) / np.sqrt(var + float(eps))
    shift = np.asarray(beta, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * scale
    return scale, shift


def compose_affine(scale, shift, then_scale, then_shift) -> tuple[np.ndarray, np.ndarray]:
    """``z -> then_scale * (scale * z + shift) + then_shift`` as one ``(scale, shift)``."""
    return scale * then_scale, shift * then_scale + then_shift


def affine_step(scale, shift, op: str, c, *, value_first: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The affine map ``z -> scale * z + shift`` followed by an elementwise ``op`` with ``c``.

    ``value_first``: the running value is the op's first operand (``v - c``, ``v / c``) rather
    than its second (``c - v``, ``c / v``). Returns the new ``(scale, shift)``, or None if the
    result is not an affine map of ``z`` with finite coefficients (``c / v``, or ``v / c`` with a
    zero in ``c``).
    """
    if op == "Add":
        return scale, shift + c
    if op == "Sub":
        return (scale, shift - c) if value_first else (-scale, c - shift)
    if op == "Mul":
        return scale * c, shift * c
    if op == "Div" and value_first and np.all(c != 0):
        return scale / c, shift / c
    return None


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
    """``b' = shift + b * scale`` in float64 (``shift`` without a bias): the bias half of
    `fold_affine`, for callers that compute the weight in blocks (`bnfold.folding.chunked`)."""
    scale = np.asarray(scale, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    return shift if bias is None else shift + np.asarray(bias, dtype=np.float64) * scale


def fold_affine_general(weight, c, scale, shift, *, axis: int, alpha: float = 1.0, beta: float = 1.0,
                        out: np.ndarray | None = None):
    """Fold ``y = scale * Y + shift`` into ``Y = alpha * A B + beta * C`` (ONNX Gemm; a MatMul and
    its bias Add, or a convolution with a (C,) bias, are ``alpha = beta = 1``), giving a node with
    ``alpha = beta = 1``::

        B' = alpha * B * scale        C' = shift + scale * beta * C

    ``axis`` is the axis of ``B`` holding output columns. ``C`` is None, a scalar, (N,), (1, N),
    (M, 1) or (M, N): the formula is exact elementwise for every shape that broadcasts to (M, N);
    a scalar or (N,) ``C`` becomes (N,). Returns float64 ``(B', C')``.
    """
    scale = np.asarray(scale, dtype=np.float64)
    c64 = _gemm_c(c, scale, beta)
    # alpha = 1 (the ONNX default) needs no float64 copy of the weight: fold_affine widens it.
    w = weight if alpha == 1.0 else alpha * np.asarray(weight, dtype=np.float64)
    return fold_affine(w, c64, scale, shift, axis=axis, out=out)


def fold_bias_general(c, scale, shift, *, beta: float = 1.0) -> np.ndarray:
    """``C' = shift + scale * beta * C``: the bias half of `fold_affine_general` (its weight half
    is computed in blocks by `bnfold.folding.chunked.scale_and_cast`)."""
    scale = np.asarray(scale, dtype=np.float64)
    return fold_bias(_gemm_c(c, scale, beta), scale, shift)


def _gemm_c(c, scale: np.ndarray, beta: float) -> np.ndarray | None:
    if c is None:
        return None
    c64 = beta * np.asarray(c, dtype=np.float64)
    if c64.ndim < 2:  # scalar, (1,) or (N,): one value per column
        c64 = np.broadcast_to(c64.reshape(-1), (scale.shape[0],))
    return c64


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


def fold_affine_into_gemm_input(weight, c, scale, shift, *, in_axis: int, out_axis: int, alpha: float = 1.0,
                                beta: float = 1.0):
    """Fold ``x -> scale * x + shift`` (per column of ``A``) into ``Y = alpha * A B + beta * C``
    (ONNX Gemm with ``transA = 0``; a MatMul is ``alpha = beta = 1`` without ``C``)::

        B' = B * scale                C' = beta * C + alpha * (shift B)

    for a Gemm that keeps ``alpha`` and has ``beta = 1``. ``in_axis`` / ``out_axis``: the axes of
    ``B`` contracted with ``A`` and holding output columns. ``C`` keeps its shape (any shape that
    broadcasts to (M, N)); without ``C``, ``C'`` is (N,). Returns float64 ``(B', C')``.
    """
    weight64, delta = fold_affine_into_consumer(weight, None, scale, shift, in_axis=in_axis, out_axis=out_axis)
    bias64 = alpha * delta
    if c is not None:
        bias64 = beta * np.asarray(c, dtype=np.float64) + bias64  # broadcasts like C did
    return weight64, bias64


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
    if dtype.kind not in ("f", "V"):  # NumPy's floating types are kind "f"; ml_dtypes' are "V"
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
