"""Batch normalization in NumPy: training and inference modes, Keras and PyTorch moving statistics.

For an input ``x`` whose channel axis ``axis`` holds ``C`` channels, every other axis (batch and
spatial positions) is reduced: each channel sees ``m = x.size // C`` values.

Training mode (per channel, over the ``m`` values)::

    mean    = sum(x) / m
    var     = sum((x - mean)**2) / m                (biased: this is what normalizes)
    inv_std = 1 / sqrt(var + eps)
    x_hat   = (x - mean) * inv_std
    y       = gamma * x_hat + beta

Inference mode uses the stored moving statistics and changes no state::

    y = gamma * (x - moving_mean) / sqrt(moving_var + eps) + beta

Backward (training mode only; ``mean`` and ``var`` depend on ``x``)::

    dbeta  = sum(dy)
    dgamma = sum(dy * x_hat)
    dx     = gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)

Moving statistics, updated once per training-mode forward (``t`` = updates so far, this one
included). Each convention reproduces one framework exactly; both were checked against the real
frameworks (fixtures made by ``tests/fixtures/make_bn_fixtures.py``):

============================  =====================================================================
``convention="keras"``        ``keras.layers.BatchNormalization`` (Keras 3):
                              ``moving = momentum * moving + (1 - momentum) * batch``, with the
                              BIASED batch variance ``var`` (denominator ``m``).
                              Defaults: ``axis=-1``, ``momentum=0.99``, ``eps=1e-3``.
``convention="torch"``        ``torch.nn.BatchNorm1d/2d/3d``:
                              ``running = (1 - momentum) * running + momentum * batch``, with the
                              UNBIASED batch variance ``var * m / (m - 1)`` in the update (the
                              biased one still normalizes). ``momentum=None`` is the cumulative
                              average of every batch seen (PyTorch's ``num_batches_tracked``):
                              factor ``1 / t`` in place of ``momentum``.
                              Defaults: ``axis=1``, ``momentum=0.1``, ``eps=1e-5``.
============================  =====================================================================

``debias=True`` is zero-debiasing as ``tf.train.ExponentialMovingAverage(zero_debias=True)``:
accumulators start at 0 and follow the convention's EMA with ``decay`` (the weight of the old
value: ``decay = momentum`` for keras, ``decay = 1 - momentum`` for torch); the moving statistics
that inference uses are ``accumulator / (1 - decay**t)``. The initial ``moving_mean = 0`` and
``moving_var = 1`` are used only before the first update. The variance fed to the accumulator is
the convention's (biased for keras, unbiased for torch). It is implemented as the equivalent update
``moving += (batch - moving) * (1 - decay) / (1 - decay**t)`` on the debiased values themselves,
so assigning ``moving_*`` keeps working. ``debias=True`` with the torch cumulative average
(``momentum=None``) is rejected: that average is unbiased already.

Which variance feeds the moving variance was measured, not assumed: ``make_bn_fixtures.py`` runs
several training steps and fits both recurrences to the framework's recorded moving variance.

- PyTorch 2.13 ``BatchNorm1d/2d/3d`` (float64): the unbiased recurrence matches to 4e-16
  (relative), the biased one misses by 6e-3 to 2e-1. So ``running_var`` is built from
  ``var * m / (m - 1)``, also with ``momentum=None``.
- Keras 3.15 ``BatchNormalization`` (torch backend): the biased recurrence matches to 1.6e-7
  (float32 rounding), the unbiased one misses by 8e-3 to 3e-2. Keras computes in float32 even in
  a float64 layer (its type promotion of (float64, float32) gives float32) and takes the variance
  as ``E[x^2] - E[x]^2``; bnfold uses the two-pass ``mean((x - mean)^2)``, which is more accurate
  in float32 and equal up to rounding.

Moving statistics are the ONNX ``BatchNormalization`` ``input_mean``/``input_var`` of the exported
layer; ``eps`` is its ``epsilon`` attribute (ONNX default 1e-5, PyTorch's).
"""

from __future__ import annotations

import logging
import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from bnfold.errors import BnfoldError

__all__ = ["BatchNorm", "BatchNormError", "CONVENTIONS"]

log = logging.getLogger(__name__)


class BatchNormError(BnfoldError, ValueError):
    """Bad argument or input for `BatchNorm` (a `ValueError`, and a user-facing `BnfoldError`)."""


class _Default:
    """Sentinel for "use the convention's default": ``None`` is a valid torch momentum."""

    def __repr__(self) -> str:
        return "<default>"


_DEFAULT: Any = _Default()

#: Per-convention defaults: the framework layers' own defaults.
CONVENTIONS: dict[str, dict[str, Any]] = {
    "keras": {"axis": -1, "momentum": 0.99, "eps": 1e-3},
    "torch": {"axis": 1, "momentum": 0.1, "eps": 1e-5},
}

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_MIN_RANK, _MAX_RANK = 2, 5


def _check_momentum(momentum: Any, convention: str, debias: bool) -> float | None:
    if momentum is None:
        if convention != "torch":
            raise BatchNormError(
                "BatchNorm: momentum=None (cumulative average) exists only in the torch convention"
            )
        if debias:
            raise BatchNormError(
                "BatchNorm: debias=True needs an exponential moving average; momentum=None "
                "(cumulative average) is unbiased already"
            )
        return None
    if isinstance(momentum, bool) or not isinstance(momentum, Real):
        raise BatchNormError(f"BatchNorm: momentum must be a number in [0, 1], got {momentum!r}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:
        raise BatchNormError(f"BatchNorm: momentum must be in [0, 1], got {momentum!r}")
    decay = value if convention == "keras" else 1.0 - value
    if debias and decay == 1.0:
        raise BatchNormError(
            f"BatchNorm: debias=True needs decay < 1, got momentum={momentum!r} ({convention})"
        )
    return value


def _check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, Real) or not math.isfinite(float(eps)):
        raise BatchNormError(f"BatchNorm: eps must be a finite number > 0, got {eps!r}")
    if float(eps) <= 0.0:
        raise BatchNormError(f"BatchNorm: eps must be > 0, got {eps!r}")
    return float(eps)


class BatchNorm:
    r"""Batch normalization over one channel axis, with Keras or PyTorch moving statistics.

    Parameters
    ----------
    num_features : int
        ``C``, the number of channels (length of the channel axis).
    convention : {"keras", "torch"}
        Which framework's moving-statistics update (and defaults) to reproduce; see the module
        docstring for the equations.
    axis : int, optional
        Channel axis of the input; negative values count from the end. Default -1 (keras,
        channels last) or 1 (torch, channels first). Any axis valid for the input's rank works.
    momentum : float or None, optional
        Keras: weight of the OLD value, ``moving = momentum * moving + (1 - momentum) * batch``
        (default 0.99). Torch: weight of the NEW value,
        ``running = (1 - momentum) * running + momentum * batch`` (default 0.1); ``None`` means
        the cumulative average of all batches (torch only).
    eps : float, optional
        Added to the variance before the square root, > 0. Default 1e-3 (keras), 1e-5 (torch).
    center : bool
        Learn ``beta``. If False, ``beta`` is fixed at 0 and has no gradient.
    scale : bool
        Learn ``gamma``. If False, ``gamma`` is fixed at 1 and has no gradient.
    debias : bool
        Zero-debiased EMA as ``tf.train.ExponentialMovingAverage(zero_debias=True)``.

    Attributes
    ----------
    gamma, beta : ndarray of float64, shape (C,)
        Scale (init 1) and shift (init 0). Assignment validates the shape and copies in place, so
        arrays returned by `parameters` stay the live parameters.
    moving_mean, moving_var : ndarray of float64, shape (C,)
        The statistics inference uses (init 0 and 1). Assignable like ``gamma``.
    dgamma, dbeta : ndarray of float64, shape (C,), or None
        Gradients of the last `backward` (overwritten in place by every backward, never
        accumulated); None when the parameter is disabled by ``scale``/``center``.
    num_batches_tracked : int
        Number of moving-statistics updates so far (``t`` in the module docstring).

    Notes
    -----
    Computation runs in the input's dtype (float32 or float64); parameters and moving statistics
    are kept in float64 and cast per call.

    The training forward keeps ``(x_centered, inv_std)`` for the backward, with
    ``x_centered = x - mean`` of shape (A, C) or (A, C, B) (the input viewed with the channel
    axis in the middle) and ``inv_std`` of shape (C,); ``x_hat = x_centered * inv_std`` is folded
    into per-channel factors instead of being stored, which saves a pass over the data. The
    ``x_centered`` array is reused by later forwards of the same shape: `backward` always
    differentiates the latest training-mode forward (and may be called again for it).

    Errors (bad arguments, wrong rank or channel count, non-float or non-finite input, one value
    per channel in training mode, backward without a training forward) raise `BatchNormError`,
    which is both a `ValueError` and a `bnfold.errors.BnfoldError`.
    """

    def __init__(
        self,
        num_features: int,
        *,
        convention: str = "keras",
        axis: int = _DEFAULT,
        momentum: float | None = _DEFAULT,
        eps: float = _DEFAULT,
        center: bool = True,
        scale: bool = True,
        debias: bool = False,
    ) -> None:
        if isinstance(num_features, bool) or not isinstance(num_features, Integral):
            raise BatchNormError(f"BatchNorm: num_features must be an int, got {num_features!r}")
        if num_features < 1:
            raise BatchNormError(f"BatchNorm: num_features must be >= 1, got {num_features}")
        if convention not in CONVENTIONS:
            raise BatchNormError(
                f"BatchNorm: convention must be 'keras' or 'torch', got {convention!r}"
            )
        defaults = CONVENTIONS[convention]
        axis = defaults["axis"] if axis is _DEFAULT else axis
        if isinstance(axis, bool) or not isinstance(axis, Integral):
            raise BatchNormError(f"BatchNorm: axis must be an int, got {axis!r}")
        if not -_MAX_RANK <= axis < _MAX_RANK:
            raise BatchNormError(
                f"BatchNorm: axis {axis} is out of range for inputs of rank {_MIN_RANK}-{_MAX_RANK}"
            )
        momentum = defaults["momentum"] if momentum is _DEFAULT else momentum
        self.num_features = int(num_features)
        self.convention = convention
        self.axis = int(axis)
        self.debias = bool(debias)
        self.momentum = _check_momentum(momentum, convention, self.debias)
        self.eps = _check_eps(defaults["eps"] if eps is _DEFAULT else eps)
        self.center = bool(center)
        self.scale = bool(scale)
        c = self.num_features
        self._gamma = np.ones(c)
        self._beta = np.zeros(c)
        self._moving_mean = np.zeros(c)
        self._moving_var = np.ones(c)
        self._dgamma = np.zeros(c) if self.scale else None
        self._dbeta = np.zeros(c) if self.center else None
        self.num_batches_tracked = 0
        self._cache: tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None = None
        self._x_centered_buffer: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"BatchNorm({self.num_features}, convention={self.convention!r}, axis={self.axis}, "
            f"momentum={self.momentum!r}, eps={self.eps!r}, center={self.center}, "
            f"scale={self.scale}, debias={self.debias})"
        )

    # ----------------------------------------------------------------- parameters and state
    def _assign(self, name: str, target: np.ndarray, value: Any) -> None:
        target[...] = self._validated(name, value)

    def _validated(self, name: str, value: Any) -> np.ndarray:
        """``value`` as a float64 array of shape (C,), finite, or a `BatchNormError`."""
        array = np.asarray(value)
        if array.shape != (self.num_features,):
            raise BatchNormError(
                f"BatchNorm: {name} must have shape ({self.num_features},), got {array.shape}"
            )
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise BatchNormError(f"BatchNorm: {name} must be real numbers, got dtype {array.dtype}")
        array = array.astype(np.float64)
        if not np.isfinite(array).all():
            raise BatchNormError(f"BatchNorm: {name} contains NaN or inf")
        return array

    @property
    def gamma(self) -> np.ndarray:
        return self._gamma

    @gamma.setter
    def gamma(self, value: Any) -> None:
        if not self.scale and np.any(np.asarray(value) != 1):
            raise BatchNormError("BatchNorm: gamma is fixed at 1 because scale=False")
        self._assign("gamma", self._gamma, value)

    @property
    def beta(self) -> np.ndarray:
        return self._beta

    @beta.setter
    def beta(self, value: Any) -> None:
        if not self.center and np.any(np.asarray(value) != 0):
            raise BatchNormError("BatchNorm: beta is fixed at 0 because center=False")
        self._assign("beta", self._beta, value)

    @property
    def moving_mean(self) -> np.ndarray:
        return self._moving_mean

    @moving_mean.setter
    def moving_mean(self, value: Any) -> None:
        self._assign("moving_mean", self._moving_mean, value)

    @property
    def moving_var(self) -> np.ndarray:
        return self._moving_var

    @moving_var.setter
    def moving_var(self, value: Any) -> None:
        array = self._validated("moving_var", value)
        if np.any(array < 0):
            raise BatchNormError(
                f"BatchNorm: moving_var must be >= 0, got {float(np.min(array))!r}"
            )
        self._moving_var[...] = array

    @property
    def dgamma(self) -> np.ndarray | None:
        return self._dgamma

    @property
    def dbeta(self) -> np.ndarray | None:
        return self._dbeta

    def parameters(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """Trainable ``(name, array, grad)`` triples; the arrays are updated in place.

        ``gamma`` is listed only if ``scale``, ``beta`` only if ``center``. The grad arrays are
        the ones every `backward` overwrites, so references kept by an optimizer stay current.
        """
        params = []
        if self.scale:
            params.append(("gamma", self._gamma, self._dgamma))
        if self.center:
            params.append(("beta", self._beta, self._dbeta))
        return params

    # ------------------------------------------------------------------------ forward
    def _canonical(self, x: np.ndarray, what: str) -> tuple[np.ndarray, int]:
        """Validate ``x`` and view it as (A, C) if channels are last, else (A, C, B)."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype not in _FLOAT_DTYPES:
            raise BatchNormError(
                f"BatchNorm: {what} must be float32 or float64, got dtype {x.dtype}"
            )
        if not _MIN_RANK <= x.ndim <= _MAX_RANK:
            raise BatchNormError(
                f"BatchNorm: {what} must have rank {_MIN_RANK}-{_MAX_RANK}, got shape {x.shape}"
            )
        if not -x.ndim <= self.axis < x.ndim:
            raise BatchNormError(
                f"BatchNorm: axis {self.axis} is out of range for {what} of shape {x.shape}"
            )
        axis = self.axis % x.ndim
        if x.shape[axis] != self.num_features:
            raise BatchNormError(
                f"BatchNorm: {what} has {x.shape[axis]} channels on axis {self.axis} "
                f"(shape {x.shape}), expected {self.num_features}"
            )
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis + 1 :])
        x = np.ascontiguousarray(x)
        if inner == 1:
            return x.reshape(outer, self.num_features), axis
        return x.reshape(outer, self.num_features, inner), axis

    def _raise_non_finite(self, x: np.ndarray, what: str) -> None:
        bad = ~np.isfinite(x)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise BatchNormError(
                f"BatchNorm: {what} contains {np.count_nonzero(bad)} NaN/inf value(s), "
                f"first {float(x[index])!r} at index {index}"
            )
        raise BatchNormError(
            f"BatchNorm: batch statistics of {what} overflow {x.dtype} (max |value| "
            f"{float(np.max(np.abs(x)))!r})"
        )

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        """Normalize ``x`` (any shape of rank 2-5 with ``C`` channels on ``axis``).

        Parameters
        ----------
        x : ndarray, float32 or float64
            Input; not modified.
        training : bool
            True: batch statistics, update the moving statistics, keep the cache for `backward`.
            False: moving statistics, no state change.

        Returns
        -------
        y : ndarray, same shape and dtype as ``x``
        """
        self._cache = None  # a failed or inference-mode forward leaves nothing to backpropagate
        z, _ = self._canonical(x, "input")
        if training:
            y = self._forward_train(z, x)
        else:
            y = self._forward_infer(z, x)
        return y.reshape(np.shape(x))

    def _forward_infer(self, z: np.ndarray, x: Any) -> np.ndarray:
        if not np.isfinite(z).all():
            self._raise_non_finite(np.asarray(x), "input")
        dtype = z.dtype
        inv_std = 1.0 / np.sqrt(self._moving_var + self.eps)
        scale = (self._gamma * inv_std).astype(dtype)
        mean = self._moving_mean.astype(dtype)
        y = np.subtract(z, _per_channel(mean, z))
        y *= _per_channel(scale, z)
        if self.center:
            y += _per_channel(self._beta.astype(dtype), z)
        return y

    def _forward_train(self, z: np.ndarray, x: Any) -> np.ndarray:
        c = self.num_features
        m = z.size // c
        if m < 2:
            raise BatchNormError(
                f"BatchNorm: expected more than 1 value per channel when training, got input "
                f"shape {np.shape(x)} (the batch variance is undefined)"
            )
        dtype = z.dtype
        x_centered = self._buffer(z)
        blocks = _blocks(z)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite stats are checked below
            mean = _channel_sum(z) / dtype.type(m)
            mean_c = _per_channel(mean, z)
            sum_sq = np.zeros(c, dtype=dtype)
            for b in blocks:  # x - mean is squared while its block is still in cache
                block = np.subtract(z[b], mean_c, out=x_centered[b])
                sum_sq += _channel_dot(block, block)
            var = sum_sq / dtype.type(m)
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            self._raise_non_finite(np.asarray(x), "input")
        inv_std = 1.0 / np.sqrt(var + dtype.type(self.eps))
        # x_hat = x_centered * inv_std is never materialized: y and the backward fold inv_std
        # into their per-channel factors, which saves a full pass over the data.
        self._cache = (x_centered, inv_std, np.shape(x))
        self._update_moving(mean, var, m)
        scale_c = _per_channel(inv_std * self._gamma.astype(dtype) if self.scale else inv_std, z)
        beta_c = _per_channel(self._beta.astype(dtype), z)
        y = np.empty_like(z)
        for b in blocks:
            np.multiply(x_centered[b], scale_c, out=y[b])
            if self.center:
                y[b] += beta_c
        return y

    def _buffer(self, z: np.ndarray) -> np.ndarray:
        """The array that holds ``x - mean`` for the backward, reused while shape/dtype match."""
        buffer = self._x_centered_buffer
        if buffer is None or buffer.shape != z.shape or buffer.dtype != z.dtype:
            log.debug("BatchNorm(%d): new x_centered buffer %s %s", self.num_features, z.shape,
                      z.dtype)
            buffer = self._x_centered_buffer = np.empty_like(z)
        return buffer

    def _update_moving(self, mean: np.ndarray, var: np.ndarray, m: int) -> None:
        """One EMA / cumulative-average step of the moving statistics (module docstring)."""
        self.num_batches_tracked += 1
        t = self.num_batches_tracked
        mean = mean.astype(np.float64)
        var = var.astype(np.float64)
        if self.convention == "torch":
            var = var * (m / (m - 1))  # torch updates with the unbiased variance
        if self.momentum is None:
            new_weight = 1.0 / t  # torch cumulative average
        else:
            new_weight = self.momentum if self.convention == "torch" else 1.0 - self.momentum
        if self.debias:
            decay = 1.0 - new_weight
            new_weight = new_weight / (1.0 - decay**t)
        old_weight = 1.0 - new_weight
        self._moving_mean *= old_weight
        self._moving_mean += new_weight * mean
        self._moving_var *= old_weight
        self._moving_var += new_weight * var

    # ----------------------------------------------------------------------- backward
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Gradient with respect to the input of the last training-mode `forward`.

        Parameters
        ----------
        dy : ndarray, same shape as that input
            Gradient of the loss with respect to ``y``.

        Returns
        -------
        dx : ndarray, same shape as ``dy``, in the input's dtype
            ``gamma * inv_std / m * (m * dy - dbeta - x_hat * dgamma)``. Also sets ``dgamma =
            sum(dy * x_hat)`` and ``dbeta = sum(dy)`` (shape (C,), in place).
        """
        if self._cache is None:
            raise BatchNormError(
                "BatchNorm: backward needs a preceding forward(x, training=True) "
                "(none yet, or the last forward was in inference mode)"
            )
        x_centered, inv_std, x_shape = self._cache
        if np.shape(dy) != x_shape:
            raise BatchNormError(
                f"BatchNorm: dy has shape {np.shape(dy)}, expected the input's shape {x_shape}"
            )
        g, _ = self._canonical(dy, "dy")
        dtype = x_centered.dtype
        g = g.astype(dtype, copy=False)
        m = dtype.type(x_centered.size // self.num_features)
        blocks = _blocks(g)
        dbeta = np.zeros(self.num_features, dtype=dtype)
        dot = np.zeros(self.num_features, dtype=dtype)
        with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums are checked below
            for b in blocks:  # both sums read the block of dy once
                dbeta += _channel_sum(g[b])
                dot += _channel_dot(g[b], x_centered[b])
        dgamma = dot * inv_std  # sum(dy * x_hat)
        if not (np.isfinite(dbeta).all() and np.isfinite(dgamma).all()):
            self._raise_non_finite(np.asarray(dy), "dy")
        k = inv_std * self._gamma.astype(dtype) if self.scale else inv_std
        # dx = k * dy - k * dbeta / m - k * dgamma / m * x_hat, x_hat = x_centered * inv_std
        k_c = _per_channel(k, g)
        shift_c = _per_channel(-k * dbeta / m, g)
        slope_c = _per_channel(-k * dgamma * inv_std / m, g)
        dx = np.empty_like(g)
        scratch = np.empty_like(g[blocks[0]])
        for b in blocks:  # three terms summed per block: dy, x_centered and dx read/written once
            out = np.multiply(x_centered[b], slope_c, out=dx[b])
            out += shift_c
            out += np.multiply(g[b], k_c, out=scratch[: out.shape[0]])
        if self.scale:
            self._dgamma[...] = dgamma
        if self.center:
            self._dbeta[...] = dbeta
        return dx.reshape(x_shape)


_BLOCK_BYTES = 1 << 20  # fastest of 256 KiB to 2 MiB on the benchmark shapes (1 MiB L2 per core)


def _blocks(z: np.ndarray) -> list[slice]:
    """Slices of the outer axis of the canonical view, about `_BLOCK_BYTES` each.

    Element-wise passes that follow each other run block by block, so the second pass reads
    from cache instead of memory (NumPy has no fused multiply-add to do it in one pass).
    """
    rows = max(1, _BLOCK_BYTES // (z.itemsize * (z.size // z.shape[0])))
    return [slice(start, start + rows) for start in range(0, z.shape[0], rows)]


def _per_channel(vector: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Broadcast a (C,) vector against the canonical (A, C) or (A, C, B) view.

    For (A, C, B) the vector is repeated along B into a small (C, B) array: NumPy's inner loop then
    runs over two contiguous operands, measurably faster than a (C, 1) operand with stride 0.
    """
    if z.ndim == 2:
        return vector
    return np.repeat(vector, z.shape[2]).reshape(z.shape[1], z.shape[2])


def _channel_sum(z: np.ndarray) -> np.ndarray:
    """``sum`` over every axis but the channel axis of the (A, C[, B]) view, shape (C,)."""
    if z.ndim == 2:
        return np.einsum("ac->c", z)
    return np.einsum("acb->ac", z).sum(axis=0)


def _channel_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum(a * b)`` over every axis but the channel axis, without the product temporary."""
    if a.ndim == 2:
        return np.einsum("ac,ac->c", a, b)
    return np.einsum("acb,acb->ac", a, b).sum(axis=0)
