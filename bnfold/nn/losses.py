"""Softmax cross-entropy: the loss of the digits classifier, with its gradient."""

from __future__ import annotations

import numpy as np

__all__ = ["softmax_cross_entropy", "log_softmax"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    r"""Numerically stable :math:`\log \mathrm{softmax}(z)` over the last axis.

    :math:`\log p_k = (z_k - m) - \log \sum_j e^{z_j - m}` with :math:`m = \max_j z_j`, so no
    exponential overflows and the largest term of the sum is exactly 1 (no log of zero).
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    r"""Mean cross-entropy of softmax probabilities against integer labels, and its gradient.

    Parameters
    ----------
    logits : numpy.ndarray
        (N, K) unnormalised scores, finite.
    labels : numpy.ndarray
        (N,) integer classes in ``0..K-1``.

    Returns
    -------
    loss : float
        :math:`L = -\frac{1}{N} \sum_n \log p_{n, y_n}`, :math:`p = \mathrm{softmax}(z)`.
    dlogits : numpy.ndarray
        (N, K), dtype of ``logits``: :math:`\partial L / \partial z = (p - \mathrm{onehot}(y)) / N`.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"softmax_cross_entropy: expected logits (N, K) and labels (N,), got {logits.shape} and {labels.shape}")
    n, k = logits.shape
    if n == 0:
        raise ValueError("softmax_cross_entropy: empty batch")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"softmax_cross_entropy: labels must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"softmax_cross_entropy: labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    log_p = log_softmax(logits)
    rows = np.arange(n)
    loss = -float(log_p[rows, labels].mean(dtype=np.float64))
    dlogits = np.exp(log_p)
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits.astype(logits.dtype, copy=False)
