"""Softmax cross-entropy: value against the textbook formula and PyTorch, gradient against
finite differences, and stability for large logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnfold.nn.losses import softmax_cross_entropy


def naive_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    """-mean log(exp(z_y) / sum exp(z)), written directly (fine for |z| < 700 in float64)."""
    return float(np.mean([-math.log(math.exp(row[y]) / sum(math.exp(v) for v in row)) for row, y in zip(logits, labels)]))


def test_loss_matches_textbook_formula():
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((8, 10))
    labels = rng.integers(0, 10, size=8)
    loss, _ = softmax_cross_entropy(logits, labels)
    # Same quantity, different evaluation order: agreement to a few float64 ulps of O(1) numbers.
    assert loss == pytest.approx(naive_loss(logits, labels), rel=1e-12)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    logits = 2 * rng.standard_normal((5, 4))
    labels = rng.integers(0, 4, size=5)
    _, dlogits = softmax_cross_entropy(logits, labels)
    numeric = np.zeros_like(logits)
    step = 1e-5
    for index in np.ndindex(logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (softmax_cross_entropy(plus, labels)[0] - softmax_cross_entropy(minus, labels)[0]) / (2 * step)
    # Central differences: truncation O(h^2 * |f'''|) ~ 1e-10 (softmax derivatives are O(1)),
    # rounding ~ 1e-16 / 1e-5 = 1e-11; gradients are O(0.1), so atol 1e-8 has a 100x margin.
    np.testing.assert_allclose(dlogits, numeric, rtol=0, atol=1e-8)
    # Each row of (softmax - onehot) / N sums to zero.
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)


def test_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    logits = 5 * rng.standard_normal((16, 10))
    labels = rng.integers(0, 10, size=16)
    z = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(z, torch.from_numpy(labels))
    expected.backward()
    loss, dlogits = softmax_cross_entropy(logits, labels)
    # float64 on both sides; different summation order only.
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(dlogits, z.grad.numpy(), rtol=1e-10, atol=1e-15)


def test_large_logits_are_stable():
    # Closed form: for logits (1000, 0) and label 1, loss = log(1 + e^1000) - 0 = 1000 + log(1 + e^-1000).
    loss, dlogits = softmax_cross_entropy(np.array([[1000.0, 0.0]]), np.array([1]))
    assert loss == 1000.0
    np.testing.assert_array_equal(dlogits, [[1.0, -1.0]])
    # Adding a constant to every logit changes nothing (softmax is shift invariant).
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((4, 6)).astype(np.float32)
    labels = np.array([0, 5, 2, 2])
    base_loss, base_grad = softmax_cross_entropy(logits, labels)
    shifted_loss, shifted_grad = softmax_cross_entropy(logits + np.float32(1e4), labels)
    # float32: adding 1e4 rounds each logit to a multiple of 2**-10 ~ 1e-3, so values agree to ~1e-3.
    assert shifted_loss == pytest.approx(base_loss, abs=5e-3)
    np.testing.assert_allclose(shifted_grad, base_grad, atol=5e-4)
    assert shifted_grad.dtype == np.float32


def test_rejects_bad_labels():
    logits = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"0\.\.2"):
        softmax_cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match="integers"):
        softmax_cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        softmax_cross_entropy(logits, np.array([0]))
