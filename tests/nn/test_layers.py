"""Dense, ReLU and LeakyReLU: forward values and gradients against float64 finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.nn.layers import Dense, LeakyReLU, ReLU

# Central differences in float64 with step 1e-6: truncation error O(h^2 f''') is zero for the
# linear Dense and for the piecewise-linear activations away from 0; rounding error is about
# eps * |f| / h ~ 1e-16 * 10 / 1e-6 = 1e-9. rtol 1e-6 / atol 1e-8 leave a wide margin above that
# and far below any real bug (a wrong transpose or a missing term is an O(1) error).
STEP = 1e-6
RTOL, ATOL = 1e-6, 1e-8


def numerical_gradient(f, array: np.ndarray) -> np.ndarray:
    """d f / d array by central differences; f() reads `array`, which is perturbed in place."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + STEP
        plus = f()
        array[index] = saved - STEP
        minus = f()
        array[index] = saved
        grad[index] = (plus - minus) / (2 * STEP)
    return grad


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_gradients_match_finite_differences(use_bias):
    rng = np.random.default_rng(1)
    layer = Dense(5, 3, use_bias=use_bias, rng=rng, dtype=np.float64)
    if use_bias:
        layer.bias[:] = rng.standard_normal(3)
    x = rng.standard_normal((4, 5))
    weights = rng.standard_normal((4, 3))  # loss = sum(y * weights), so dL/dy = weights

    def loss() -> float:
        return float(np.sum(layer.forward(x, training=True) * weights))

    loss()
    dx = layer.backward(weights)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.dweight, numerical_gradient(loss, layer.weight), rtol=RTOL, atol=ATOL)
    if use_bias:
        np.testing.assert_allclose(layer.dbias, numerical_gradient(loss, layer.bias), rtol=RTOL, atol=ATOL)
        assert [name for name, _, _ in layer.parameters()] == ["weight", "bias"]
    else:
        assert layer.bias is None
        assert [name for name, _, _ in layer.parameters()] == ["weight"]


def test_dense_forward_is_x_times_w_plus_b_elementwise():
    rng = np.random.default_rng(2)
    layer = Dense(3, 2, rng=rng, dtype=np.float64)
    layer.bias[:] = [0.5, -1.0]
    x = rng.standard_normal((4, 3))
    expected = np.array([[sum(x[n, i] * layer.weight[i, j] for i in range(3)) + layer.bias[j] for j in range(2)] for n in range(4)])
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12)


def test_dense_init_is_he_normal_and_reproducible():
    a = Dense(64, 128, use_bias=False, rng=np.random.default_rng(3))
    b = Dense(64, 128, use_bias=False, rng=np.random.default_rng(3))
    assert a.weight.dtype == np.float32 and a.weight.shape == (64, 128)
    np.testing.assert_array_equal(a.weight, b.weight)
    # 8,192 draws: the sample std has relative standard error 1/sqrt(2n) = 0.8%; 5% is > 6 sigma.
    assert a.weight.std() == pytest.approx(np.sqrt(2 / 64), rel=0.05)
    assert abs(a.weight.mean()) < 6 * np.sqrt(2 / 64) / np.sqrt(a.weight.size)


def test_dense_rejects_wrong_input_shape():
    layer = Dense(4, 2, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4\), got \(3, 5\)"):
        layer.forward(np.zeros((3, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        Dense(0, 2)


@pytest.mark.parametrize("layer", [ReLU(), LeakyReLU(0.01), LeakyReLU(0.3)], ids=repr)
def test_activation_gradients_match_finite_differences(layer):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 7))
    # Keep every value at least 1e-3 from the kink at 0, so that no +-STEP probe crosses it.
    x[np.abs(x) < 1e-3] = 0.5
    weights = rng.standard_normal(x.shape)

    def loss() -> float:
        return float(np.sum(layer.forward(x, training=True) * weights))

    loss()
    dx = layer.backward(weights)
    np.testing.assert_allclose(dx, numerical_gradient(loss, x), rtol=RTOL, atol=ATOL)
    assert layer.parameters() == []


def test_activation_values():
    x = np.array([[-2.0, -0.0, 0.0, 3.0]])
    np.testing.assert_array_equal(ReLU().forward(x), [[0.0, 0.0, 0.0, 3.0]])
    np.testing.assert_array_equal(LeakyReLU(0.25).forward(x), [[-0.5, 0.0, 0.0, 3.0]])
    x32 = x.astype(np.float32)
    assert ReLU().forward(x32).dtype == np.float32
    assert LeakyReLU().forward(x32).dtype == np.float32
    with pytest.raises(ValueError):
        LeakyReLU(-1.0)


def test_activations_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).standard_normal((5, 9))
    np.testing.assert_array_equal(ReLU().forward(x), torch.relu(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(
        LeakyReLU(0.01).forward(x), torch.nn.functional.leaky_relu(torch.from_numpy(x), 0.01).numpy()
    )
