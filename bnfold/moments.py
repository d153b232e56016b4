r"""Per-channel moments (count, mean, M2) of data seen in pieces: the one implementation of the
statistics math that recalibration, inspection and the NumPy trainer share.

For the values :math:`x_1 .. x_n` of one channel (every position along every axis but the
channel axis, over all batches):

.. math::

    \text{mean} = \frac{1}{n}\sum_i x_i, \qquad
    M_2 = \sum_i (x_i - \text{mean})^2, \qquad
    \text{var} = M_2 / n

``var`` is the *population* variance (denominator n): what batch normalization divides by, and
what inference must use to reproduce a training-mode forward of all the data as one batch.
`Moments.sample_var` (denominator n - 1) is what PyTorch stores in its running variance.

Two pieces are merged with Chan, Golub & LeVeque's pairwise formula (1979), exact in exact
arithmetic whatever the split, and stable in floating point because it never forms
:math:`\sum x^2 - n\,\text{mean}^2`:

.. math::

    n = n_a + n_b, \quad \delta = \text{mean}_b - \text{mean}_a, \quad
    \text{mean} = \text{mean}_a + \delta\,\frac{n_b}{n}, \quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n}

`BatchAverage` is the other estimate: the plain average, batch by batch, of each batch's mean
and unbiased variance, as PyTorch's ``torch.optim.swa_utils.update_bn`` computes it (a cumulative
average with ``momentum=None``: every batch weighs the same, whatever its size). It merges by
adding sums.

Everything is float64, whatever the dtype of the data. This module imports only NumPy: the
NumPy trainer uses it without onnx.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Moments", "BatchAverage", "merge_all", "drift"]


@dataclass(frozen=True)
class Moments:
    """Count, mean and M2 (sum of squared deviations from the mean) per channel, in float64.

    Attributes
    ----------
    count : int
        Values per channel (batch size times the product of the non-channel axes).
    mean : numpy.ndarray
        Shape (C,), float64.
    m2 : numpy.ndarray
        Shape (C,), float64: sum over the values of ``(x - mean) ** 2``.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> Moments:
        """Moments of no data (the identity of `merge`)."""
        return cls(0, np.zeros(channels, dtype=np.float64), np.zeros(channels, dtype=np.float64))

    @classmethod
    def from_batch(cls, x: np.ndarray, axis: int = 1) -> Moments:
        """Moments of one batch, reduced over every axis of ``x`` but ``axis`` (the channel axis).

        ``axis=1`` is ONNX BatchNormalization's channel axis (N, C, D1, ...); the NumPy layers
        pass their own (-1 for channels last).
        """
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError("Moments.from_batch: need an array with a channel axis, got a scalar")
        axis = axis % x.ndim
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        channels = x.shape[axis]
        count = int(np.prod([x.shape[i] for i in reduce], dtype=np.int64))
        if count == 0:
            return cls.empty(channels)
        x64 = x.astype(np.float64, copy=True)
        mean = x64.mean(axis=reduce, keepdims=True)
        x64 -= mean
        np.square(x64, out=x64)
        m2 = x64.sum(axis=reduce)
        return cls(count, mean.reshape(channels), m2.reshape(channels))

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def var(self) -> np.ndarray:
        """Population variance ``M2 / count`` (what BN normalizes with); NaN for no data."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / self.count

    @property
    def sample_var(self) -> np.ndarray:
        """Unbiased variance ``M2 / (count - 1)`` (PyTorch's running-variance convention)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.m2 / (self.count - 1)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation."""
        return np.sqrt(self.var)

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of the data behind ``self`` and ``other`` (Chan et al.)."""
        if self.channels != other.channels:
            raise ValueError(f"Moments.merge: {self.channels} channels against {other.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def __add__(self, other: Moments) -> Moments:
        return self.merge(other)


def merge_all(pieces: Iterable, channels: int | None = None):
    """Merge any number of `Moments` (or `BatchAverage`) pieces, in order; ``channels`` gives
    empty `Moments` for no pieces."""
    result = None if channels is None else Moments.empty(channels)
    for piece in pieces:
        result = piece if result is None else result.merge(piece)
    if result is None:
        raise ValueError("merge_all: no pieces and no channel count")
    return result


@dataclass(frozen=True)
class BatchAverage:
    """Sums, over batches, of each batch's per-channel mean and unbiased variance.

    Attributes
    ----------
    batches : int
        Number of batches summed.
    mean_sum, var_sum : numpy.ndarray
        Shape (C,), float64: sum of the batch means, sum of the batch variances with
        denominator n - 1 (n values per channel in the batch).
    """

    batches: int
    mean_sum: np.ndarray
    var_sum: np.ndarray

    @classmethod
    def from_stats(cls, mean: np.ndarray, biased_var: np.ndarray, count: int) -> BatchAverage:
        """One batch, from its mean and population variance over ``count`` values per channel."""
        if count < 2:
            raise ValueError(f"an unbiased batch variance needs at least 2 values per channel, got {count}")
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        var = np.asarray(biased_var, dtype=np.float64).reshape(-1) * (count / (count - 1))
        return cls(1, mean, var)

    @classmethod
    def from_batch(cls, x: np.ndarray, axis: int = 1) -> BatchAverage:
        """One batch of data, reduced over every axis but ``axis``."""
        moments = Moments.from_batch(x, axis)
        return cls.from_stats(moments.mean, moments.var, moments.count)

    @property
    def mean(self) -> np.ndarray:
        return self.mean_sum / self.batches

    @property
    def var(self) -> np.ndarray:
        """Average of the unbiased batch variances (what ``update_bn`` stores)."""
        return self.var_sum / self.batches

    def merge(self, other: BatchAverage) -> BatchAverage:
        return BatchAverage(self.batches + other.batches, self.mean_sum + other.mean_sum, self.var_sum + other.var_sum)

    def __add__(self, other: BatchAverage) -> BatchAverage:
        return self.merge(other)


def drift(moving_mean, moving_var, data_mean, data_var, eps: float) -> dict[str, object]:
    """How far stored statistics are from the data's, per channel, as lists, and the worst channels.

    With ``m``, ``v`` the stored (moving) mean and variance, ``mu``, ``d`` the data's population
    mean and variance and ``eps`` the BN's epsilon: mean shift ``|m - mu| / sqrt(d + eps)`` (data
    standard deviations: what the BN divides by) and variance ratio ``(v + eps) / (d + eps)``
    (above 1 too large, below 1 too small; the worst channel is the one furthest from 1 on a log
    scale). Statistics equal to the data's give 0 and 1. `bnfold inspect` (``stale``) and
    `bnfold recalibrate` (its report) both use this one definition.
    """
    moving_mean = np.asarray(moving_mean, dtype=np.float64)
    moving_var = np.asarray(moving_var, dtype=np.float64) + eps
    data_mean = np.asarray(data_mean, dtype=np.float64)
    data_var = np.asarray(data_var, dtype=np.float64) + eps
    # eps = 0 (flagged invalid) on a constant channel divides by zero: inf, reported as such.
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.abs(moving_mean - data_mean) / np.sqrt(data_var)
        ratio = moving_var / data_var
        # The worst variance channel is the one furthest from 1 on a log scale (2 and 0.5 alike).
        worst = int(np.nanargmax(np.abs(np.log(ratio)))) if not np.all(np.isnan(ratio)) else 0
    return {
        "mean_shift": shift.tolist(),
        "var_ratio": ratio.tolist(),
        "max_mean_shift": float(shift.max()),
        "worst_var_ratio": float(ratio[worst]),
        "channel_mean_shift": int(np.argmax(shift)),
        "channel_var_ratio": worst,
        "data_mean": data_mean.tolist(),
        "data_var": (data_var - eps).tolist(),
    }
