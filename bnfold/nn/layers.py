"""Dense (fully connected) layers and pointwise activations, forward and backward side by side.

Every layer has ``forward(x, training) -> y``, ``backward(dy) -> dx`` (using the cache that the
forward kept) and ``parameters() -> [(name, array, grad), ...]`` for the optimizers. Gradients
are overwritten by each backward, never accumulated.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["Dense", "ReLU", "LeakyReLU", "Parameter"]

log = logging.getLogger(__name__)

Parameter = tuple[str, np.ndarray, np.ndarray]


class Dense:
    r"""Fully connected layer :math:`y = x W + b`.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output feature axes.
    use_bias : bool
        Leave it False when a batch normalization follows: BN subtracts any bias again and its
        ``beta`` takes the bias's role, so the bias would be a parameter with zero gradient
        signal (in exact arithmetic).
    rng : numpy.random.Generator, optional
        Source of the initial weights (He/Kaiming normal, :math:`W \sim N(0, 2 / \mathrm{in})`,
        suited to ReLU). A fresh unseeded generator when omitted.
    dtype : numpy dtype
        Dtype of the weights (float32 by default).

    Attributes
    ----------
    weight : numpy.ndarray
        (in_features, out_features).
    bias : numpy.ndarray or None
        (out_features,), initialised to zero; None when ``use_bias`` is False.
    dweight, dbias : numpy.ndarray
        Gradients of the loss from the last ``backward``.

    Notes
    -----
    For ``x`` of shape (N, in) and upstream gradient ``dy`` of shape (N, out)::

        y  = x @ W + b
        dW = x.T @ dy          (in, out)
        db = sum_n dy          (out,)
        dx = dy @ W.T          (N, in)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        rng: np.random.Generator | None = None,
        dtype: np.dtype | type = np.float32,
    ) -> None:
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"Dense: feature sizes must be positive, got ({in_features}, {out_features})")
        rng = np.random.default_rng() if rng is None else rng
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(use_bias)
        std = np.sqrt(2.0 / self.in_features)
        self.weight = (rng.standard_normal((self.in_features, self.out_features)) * std).astype(dtype)
        self.bias = np.zeros(self.out_features, dtype=dtype) if self.use_bias else None
        self.dweight = np.zeros_like(self.weight)
        self.dbias = np.zeros_like(self.bias) if self.use_bias else None
        self._x: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Return ``x @ W + b`` for ``x`` of shape (N, in_features)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Dense: expected input of shape (N, {self.in_features}), got {x.shape}")
        self._x = x
        y = x @ self.weight
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Set ``dweight`` (and ``dbias``) from ``dy`` (N, out_features); return ``dx`` (N, in_features)."""
        if self._x is None:
            raise RuntimeError("Dense.backward called before forward")
        self.dweight = self._x.T @ dy
        if self.bias is not None:
            self.dbias = dy.sum(axis=0)
        return dy @ self.weight.T

    def parameters(self) -> list[Parameter]:
        """``[("weight", W, dW), ("bias", b, db)]`` (no bias entry when ``use_bias`` is False)."""
        params = [("weight", self.weight, self.dweight)]
        if self.bias is not None:
            params.append(("bias", self.bias, self.dbias))
        return params

    def __repr__(self) -> str:
        return f"Dense({self.in_features}, {self.out_features}, use_bias={self.use_bias})"


class ReLU:
    r"""Rectified linear unit :math:`y = \max(x, 0)`; :math:`dx = dy \cdot [x > 0]`."""

    def __init__(self) -> None:
        self._positive: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Return ``max(x, 0)`` elementwise (any shape)."""
        self._positive = x > 0
        return np.where(self._positive, x, np.zeros((), dtype=x.dtype))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Return ``dy * [x > 0]`` (the subgradient 0 is used at ``x == 0``)."""
        if self._positive is None:
            raise RuntimeError("ReLU.backward called before forward")
        return np.where(self._positive, dy, np.zeros((), dtype=dy.dtype))

    def parameters(self) -> list[Parameter]:
        """No parameters."""
        return []

    def __repr__(self) -> str:
        return "ReLU()"


class LeakyReLU:
    r"""Leaky rectifier :math:`y = x` for :math:`x > 0`, :math:`\alpha x` otherwise.

    :math:`dx = dy` where :math:`x > 0`, :math:`\alpha\, dy` elsewhere. The default
    ``alpha = 0.01`` is PyTorch's ``negative_slope`` and ONNX ``LeakyRelu``'s ``alpha`` default.
    """

    def __init__(self, alpha: float = 0.01) -> None:
        alpha = float(alpha)
        if not np.isfinite(alpha) or alpha < 0:
            raise ValueError(f"LeakyReLU: alpha must be finite and >= 0, got {alpha}")
        self.alpha = alpha
        self._positive: np.ndarray | None = None

    def forward(self, x: np.ndarray, training: bool = False) -> np.ndarray:
        """Return ``x`` where positive, ``alpha * x`` elsewhere (any shape)."""
        self._positive = x > 0
        return np.where(self._positive, x, x * x.dtype.type(self.alpha))

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """Return ``dy`` where ``x > 0``, ``alpha * dy`` elsewhere."""
        if self._positive is None:
            raise RuntimeError("LeakyReLU.backward called before forward")
        return np.where(self._positive, dy, dy * dy.dtype.type(self.alpha))

    def parameters(self) -> list[Parameter]:
        """No parameters."""
        return []

    def __repr__(self) -> str:
        return f"LeakyReLU(alpha={self.alpha})"
