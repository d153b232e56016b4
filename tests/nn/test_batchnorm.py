"""`BatchNorm`: gradients by finite differences, moving statistics in closed form, modes, errors.

References here are independent of the implementation: central finite differences, NumPy's own
``mean``/``var`` on the un-reshaped input, and closed-form sums for the moving statistics.
Comparisons against PyTorch and Keras live in ``test_batchnorm_fixtures.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnfold.errors import BnfoldError
from bnfold.nn import batchnorm
from bnfold.nn.batchnorm import BatchNorm, BatchNormError

# (convention, shape, axis): rank 2-5, channels first and last, positive and negative axes.
LAYOUTS = [
    ("keras", (7, 3), -1),
    ("torch", (7, 3), 1),
    ("torch", (3, 4, 5), 1),
    ("keras", (3, 5, 4), -1),
    ("torch", (3, 2, 3, 2), 1),
    ("keras", (3, 2, 3, 2), -1),
    ("keras", (2, 3, 2, 3), 1),
    ("torch", (2, 2, 2, 3, 2), -4),
    ("keras", (2, 2, 3, 2, 2), 2),
]


@pytest.fixture(params=["one-block", "many-blocks"])
def blocks(request, monkeypatch):
    """Run a test with the default block size and with tiny blocks (a few rows each).

    Small test inputs fit in one block; tiny blocks exercise the block-by-block code path.
    """
    if request.param == "many-blocks":
        monkeypatch.setattr(batchnorm, "_BLOCK_BYTES", 64)
    return request.param


def _reference(x, gamma, beta, mean, var, eps, axis):
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` with per-channel vectors on ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.reshape(v, shape)  # noqa: E731
    return r(gamma) * (x - r(mean)) / np.sqrt(r(var) + eps) + r(beta)


def _reduce_axes(x, axis):
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def _random_layer(rng, convention, c, axis, **kw) -> BatchNorm:
    bn = BatchNorm(c, convention=convention, axis=axis, **kw)
    if bn.scale:
        bn.gamma = rng.uniform(0.5, 2.0, size=c)
    if bn.center:
        bn.beta = rng.normal(size=c)
    return bn


def _input(rng, shape, axis, dtype=np.float64):
    c = shape[axis]
    per_channel = [1] * len(shape)
    per_channel[axis] = c
    offset = rng.uniform(-2, 2, size=c).reshape(per_channel)
    spread = rng.uniform(0.5, 2.0, size=c).reshape(per_channel)
    return (rng.standard_normal(shape) * spread + offset).astype(dtype)


@pytest.mark.parametrize("convention,shape,axis", LAYOUTS)
def test_training_forward_matches_numpy_statistics(convention, shape, axis, blocks) -> None:
    # float64, closed form with np.mean/np.var over the original layout: rounding only, 1e-13.
    rng = np.random.default_rng(1)
    c = shape[axis]
    bn = _random_layer(rng, convention, c, axis)
    x = _input(rng, shape, axis)
    x_before = x.copy()
    y = bn.forward(x, training=True)
    axes = _reduce_axes(x, axis)
    expected = _reference(x, bn.gamma, bn.beta, x.mean(axis=axes), x.var(axis=axes), bn.eps, axis)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13 * np.abs(expected).max())
    np.testing.assert_array_equal(x, x_before)  # the input is never modified


@pytest.mark.parametrize("convention,shape,axis", LAYOUTS)
def test_backward_matches_central_finite_differences(convention, shape, axis, blocks) -> None:
    """dx, dgamma, dbeta of L = sum(y * w) against central differences, float64.

    Step h = 1e-6: truncation O(h^2 |L'''|) ~ 1e-12 and cancellation O(eps * |L| / h) ~ 1e-9, so
    the difference quotient is good to ~1e-8 relative to the gradient's scale; 1e-6 leaves margin
    while a wrong term in the formula (e.g. dropping the path through the mean) is O(1).
    """
    rng = np.random.default_rng(2)
    c = shape[axis]
    bn = _random_layer(rng, convention, c, axis)
    x = _input(rng, shape, axis)
    w = rng.standard_normal(shape)
    bn.forward(x, training=True)
    dx = bn.backward(w)

    def loss(x_, gamma, beta) -> float:
        probe = BatchNorm(c, convention=convention, axis=axis)
        probe.gamma, probe.beta = gamma, beta
        return float(np.sum(probe.forward(x_, training=True) * w))

    def central(array, f) -> np.ndarray:
        grad = np.zeros_like(array)
        h = 1e-6
        for index in np.ndindex(array.shape):
            plus, minus = array.copy(), array.copy()
            plus[index] += h
            minus[index] -= h
            grad[index] = (f(plus) - f(minus)) / (2 * h)
        return grad

    g, b = bn.gamma.copy(), bn.beta.copy()
    expected = {
        "dx": central(x, lambda v: loss(v, g, b)),
        "dgamma": central(g, lambda v: loss(x, v, b)),
        "dbeta": central(b, lambda v: loss(x, g, v)),
    }
    for name, actual in (("dx", dx), ("dgamma", bn.dgamma), ("dbeta", bn.dbeta)):
        ref = expected[name]
        np.testing.assert_allclose(actual, ref, rtol=0, atol=1e-6 * np.abs(ref).max(), err_msg=name)


def test_grads_are_overwritten_not_accumulated_and_live_in_parameters() -> None:
    rng = np.random.default_rng(3)
    bn = _random_layer(rng, "keras", 4, -1)
    params = bn.parameters()  # taken before any backward, as an optimizer would
    assert [name for name, _, _ in params] == ["gamma", "beta"]
    x = _input(rng, (10, 4), -1)
    dy1, dy2 = rng.standard_normal((2, 10, 4))
    bn.forward(x, training=True)
    bn.backward(dy1)
    bn.forward(x, training=True)
    bn.backward(dy2)
    # Closed form of the second backward alone: dbeta = sum(dy), dgamma = sum(dy * x_hat).
    x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + bn.eps)
    np.testing.assert_allclose(bn.dbeta, dy2.sum(0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bn.dgamma, (dy2 * x_hat).sum(0), rtol=1e-13, atol=1e-13)
    (_, gamma, dgamma), (_, beta, dbeta) = params
    assert gamma is bn.gamma and beta is bn.beta
    assert dgamma is bn.dgamma and dbeta is bn.dbeta  # the optimizer's references are current


def test_parameters_follow_center_and_scale() -> None:
    rng = np.random.default_rng(4)
    x = _input(rng, (6, 3), -1)
    for center, scale, names in [(True, False, ["beta"]), (False, True, ["gamma"]),
                                 (False, False, [])]:
        bn = BatchNorm(3, center=center, scale=scale)
        assert [n for n, _, _ in bn.parameters()] == names
        y = bn.forward(x, training=True)
        dx = bn.backward(rng.standard_normal(x.shape))
        assert dx.shape == x.shape
        assert (bn.dgamma is None) == (not scale) and (bn.dbeta is None) == (not center)
        np.testing.assert_array_equal(bn.gamma, np.ones(3))
        np.testing.assert_array_equal(bn.beta, np.zeros(3))
        expected = _reference(x, 1.0, 0.0, x.mean(0), x.var(0), bn.eps, -1)
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="beta is fixed at 0 because center=False"):
        BatchNorm(3, center=False).beta = np.ones(3)
    with pytest.raises(ValueError, match="gamma is fixed at 1 because scale=False"):
        BatchNorm(3, scale=False).gamma = np.full(3, 2.0)


def test_defaults_per_convention() -> None:
    keras, torch = BatchNorm(2), BatchNorm(2, convention="torch")
    assert (keras.axis, keras.momentum, keras.eps) == (-1, 0.99, 1e-3)
    assert (torch.axis, torch.momentum, torch.eps) == (1, 0.1, 1e-5)
    assert BatchNorm(2, convention="torch", momentum=None).momentum is None


def _batches(rng, steps, shape, axis):
    return [_input(rng, shape, axis) for _ in range(steps)]


def _run(bn, xs):
    for x in xs:
        bn.forward(x, training=True)


def _batch_stats(xs, axis, ddof):
    axes = _reduce_axes(xs[0], axis)
    return np.stack([x.mean(axis=axes) for x in xs]), np.stack([x.var(axis=axes, ddof=ddof)
                                                             for x in xs])


@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_ema_closed_form(convention) -> None:
    """After t steps from (0, 1): moving = d^t * init + sum_k (1 - d) d^(t-k) batch_k.

    d (weight of the old value) is momentum for keras and 1 - momentum for torch; torch feeds the
    unbiased variance, keras the biased one. float64 sums of 5 terms: 1e-14.
    """
    rng = np.random.default_rng(5)
    momentum = 0.7 if convention == "keras" else 0.3
    xs = _batches(rng, 5, (4, 3, 2), 1)
    bn = BatchNorm(3, convention=convention, axis=1, momentum=momentum)
    _run(bn, xs)
    d = momentum if convention == "keras" else 1.0 - momentum
    means, variances = _batch_stats(xs, 1, ddof=1 if convention == "torch" else 0)
    weights = (1 - d) * d ** np.arange(4, -1, -1.0)
    np.testing.assert_allclose(bn.moving_mean, weights @ means, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(bn.moving_var, d**5 + weights @ variances, rtol=1e-14)
    assert bn.num_batches_tracked == 5


def test_torch_momentum_none_is_the_cumulative_average() -> None:
    # Plain averages of the per-batch statistics (unbiased variance), float64: 1e-14.
    rng = np.random.default_rng(6)
    xs = _batches(rng, 6, (5, 2, 3), 1)
    bn = BatchNorm(2, convention="torch", momentum=None)
    _run(bn, xs)
    means, variances = _batch_stats(xs, 1, ddof=1)
    np.testing.assert_allclose(bn.moving_mean, means.mean(0), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(bn.moving_var, variances.mean(0), rtol=1e-14)


@pytest.mark.parametrize("convention", ["keras", "torch"])
def test_debias_matches_zero_debiased_ema(convention) -> None:
    """tf.train.ExponentialMovingAverage(zero_debias=True): accumulator from 0, / (1 - d^t).

    The reference runs the accumulator literally; bnfold updates the debiased value directly,
    so agreement is to rounding (float64, 1e-13).
    """
    rng = np.random.default_rng(7)
    momentum = 0.9 if convention == "keras" else 0.1  # decay 0.9 in both directions
    d = 0.9
    xs = _batches(rng, 4, (6, 3), 1)
    bn = BatchNorm(3, convention=convention, axis=1, momentum=momentum, debias=True)
    means, variances = _batch_stats(xs, 1, ddof=1 if convention == "torch" else 0)
    acc_mean, acc_var = np.zeros(3), np.zeros(3)
    for t, x in enumerate(xs, start=1):
        bn.forward(x, training=True)
        acc_mean = d * acc_mean + (1 - d) * means[t - 1]
        acc_var = d * acc_var + (1 - d) * variances[t - 1]
        np.testing.assert_allclose(bn.moving_mean, acc_mean / (1 - d**t), rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(bn.moving_var, acc_var / (1 - d**t), rtol=1e-13)
    # After the first step the debiased EMA is exactly the first batch's statistics.
    first = BatchNorm(3, convention=convention, axis=1, momentum=momentum, debias=True)
    first.forward(xs[0], training=True)
    np.testing.assert_allclose(first.moving_mean, means[0], rtol=1e-15, atol=1e-15)


def test_inference_uses_moving_statistics_and_changes_nothing() -> None:
    rng = np.random.default_rng(8)
    bn = _random_layer(rng, "torch", 4, 1)
    bn.moving_mean = rng.normal(size=4)
    bn.moving_var = rng.uniform(0.5, 3.0, size=4)
    state = [a.copy() for a in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_var)]
    x = _input(rng, (1, 4, 3, 3), 1)  # batch of one: fine at inference
    y = bn.forward(x, training=False)
    np.testing.assert_allclose(
        y, _reference(x, *state, bn.eps, 1), rtol=0, atol=1e-13 * np.abs(y).max()
    )
    for before, after in zip(state, (bn.gamma, bn.beta, bn.moving_mean, bn.moving_var)):
        np.testing.assert_array_equal(before, after)
    assert bn.num_batches_tracked == 0
    with pytest.raises(ValueError, match="backward needs a preceding forward"):
        bn.backward(np.ones_like(x))


@pytest.mark.parametrize("convention,shape,axis", [("torch", (16, 6, 8, 8), 1),
                                                   ("keras", (16, 8, 8, 6), -1)])
def test_float32_is_computed_in_float32_and_accurate(convention, shape, axis) -> None:
    """float32 against the float64 computation of the same (float32) input.

    m = 16 * 8 * 8 = 1024 values per channel: a few float32 ulps times sqrt(m) for the
    reductions (rounding errors of a sum grow like a random walk), 4 * 1.2e-7 * 32 = 1.5e-5
    relative to each result's scale.
    """
    rng = np.random.default_rng(9)
    x32 = _input(rng, shape, axis, np.float32)
    dy32 = rng.standard_normal(x32.shape).astype(np.float32)
    results = {}
    for dtype in (np.float32, np.float64):
        bn = BatchNorm(6, convention=convention, axis=axis)
        bn.gamma = np.linspace(0.5, 2.0, 6)
        y = bn.forward(x32.astype(dtype), training=True)
        dx = bn.backward(dy32.astype(dtype))
        assert y.dtype == dtype and dx.dtype == dtype
        results[dtype] = (y, dx, bn.dgamma.copy(), bn.dbeta.copy(), bn.moving_var.copy())
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(1024)
    for a, b in zip(results[np.float32], results[np.float64]):
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max())


def test_large_input_in_many_blocks() -> None:
    """(32, 8, 32, 32) float64, 8 MiB: several blocks with the default block size; closed form.

    Tolerances are the worst-case bound for recursive summation of m = 32768 terms, m * eps times
    the summed magnitudes (both sides sum the same terms in different orders). For y and dx the
    summed magnitudes are those of x (through mean and var) and dy, scaled by gamma * inv_std.
    """
    rng = np.random.default_rng(12)
    x = _input(rng, (32, 8, 32, 32), 1)
    assert len(batchnorm._blocks(x.reshape(32, 8, -1))) > 1
    dy = rng.standard_normal(x.shape)
    bn = _random_layer(rng, "torch", 8, 1)
    y = bn.forward(x, training=True)
    dx = bn.backward(dy)
    axes, shape = (0, 2, 3), (1, -1, 1, 1)
    m = x.size // 8
    bound = m * np.finfo(np.float64).eps
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    k = bn.gamma / np.sqrt(var + bn.eps)
    x_hat = _reference(x, 1.0, 0.0, mean, var, bn.eps, 1)
    expected_y = _reference(x, bn.gamma, bn.beta, mean, var, bn.eps, 1)
    np.testing.assert_allclose(y, expected_y, rtol=0, atol=bound * k.max() * np.abs(x).max())
    dbeta, dgamma = dy.sum(axis=axes), (dy * x_hat).sum(axis=axes)
    error = np.abs(bn.dbeta - dbeta)
    assert np.all(error <= bound * np.abs(dy).sum(axis=axes)), error
    error = np.abs(bn.dgamma - dgamma)
    assert np.all(error <= bound * np.abs(dy * x_hat).sum(axis=axes)), error
    expected_dx = (k / m).reshape(shape) * (
        m * dy - dbeta.reshape(shape) - x_hat * dgamma.reshape(shape)
    )
    dx_scale = k.max() * (np.abs(dy).max() + np.abs(x_hat).max() * np.abs(x).max())
    np.testing.assert_allclose(dx, expected_dx, rtol=0, atol=bound * dx_scale)


def test_non_contiguous_input() -> None:
    rng = np.random.default_rng(10)
    x = _input(rng, (5, 8, 3), 1)[:, ::2, :]  # strided view, 4 channels
    bn = BatchNorm(4, convention="torch")
    y = bn.forward(x, training=True)
    expected = _reference(x, 1.0, 0.0, x.mean((0, 2)), x.var((0, 2)), bn.eps, 1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"convention": "tf"}, "convention must be 'keras' or 'torch', got 'tf'"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\], got 1.5"),
        ({"momentum": -0.1, "convention": "torch"}, r"momentum must be in \[0, 1\], got -0.1"),
        ({"momentum": "0.9"}, "momentum must be a number"),
        ({"momentum": None}, "momentum=None .* only in the torch convention"),
        ({"momentum": None, "convention": "torch", "debias": True}, "debias=True needs"),
        ({"momentum": 1.0, "debias": True}, "debias=True needs decay < 1"),
        ({"eps": 0.0}, "eps must be > 0, got 0.0"),
        ({"eps": float("nan")}, "eps must be a finite number > 0, got nan"),
        ({"axis": 1.0}, "axis must be an int, got 1.0"),
        ({"axis": 5}, "axis 5 is out of range"),
        ({"axis": -6}, "axis -6 is out of range"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        BatchNorm(3, **kwargs)
    assert isinstance(info.value, BnfoldError)  # the CLI reports it as a one-line error


@pytest.mark.parametrize("num_features", [0, -2, 2.0, True])
def test_bad_num_features(num_features) -> None:
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(num_features)


@pytest.mark.parametrize(
    "x,training,match",
    [
        (np.ones((1, 3)), True, r"expected more than 1 value per channel when training"),
        (np.ones((1, 1, 1, 3)), True, r"more than 1 value per channel"),
        (np.ones(3), False, r"rank 2-5, got shape \(3,\)"),
        (np.ones((2, 1, 1, 1, 1, 3)), False, r"rank 2-5, got shape \(2, 1, 1, 1, 1, 3\)"),
        (np.ones((4, 2)), True, r"input has 2 channels on axis -1 \(shape \(4, 2\)\), expected 3"),
        (np.ones((4, 3), dtype=np.int64), True, "must be float32 or float64, got dtype int64"),
        (np.array([[1.0, 2, 3], [4, np.nan, 6]]), True, r"1 NaN/inf value\(s\), first nan"),
        (np.array([[1.0, 2, 3], [4, np.inf, 6]]), True, r"NaN/inf value\(s\), first inf at"),
        (np.array([[1.0, 2, 3], [4, np.nan, 6]]), False, r"NaN/inf value\(s\), first nan"),
    ],
)
def test_bad_inputs(x, training, match) -> None:
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match=match):
        bn.forward(x, training=training)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.moving_mean, np.zeros(3))


def test_overflowing_statistics_are_reported() -> None:
    x = np.full((4, 3), 3e38, dtype=np.float32)
    x[0] = -3e38
    with pytest.raises(ValueError, match="overflow float32"):
        BatchNorm(3).forward(x, training=True)


def test_backward_errors() -> None:
    rng = np.random.default_rng(11)
    bn = BatchNorm(3)
    with pytest.raises(ValueError, match="backward needs a preceding forward"):
        bn.backward(np.ones((4, 3)))
    x = _input(rng, (4, 3), -1)
    bn.forward(x, training=True)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 2\), expected the input's shape"):
        bn.backward(np.ones((4, 2)))
    dy = np.ones((4, 3))
    dy[2, 1] = np.nan
    message = r"dy contains 1 NaN/inf value\(s\), first nan at index \(2, 1\)"
    with pytest.raises(ValueError, match=message):
        bn.backward(dy)
    bn.forward(x, training=False)
    with pytest.raises(ValueError, match="last forward was in inference mode"):
        bn.backward(np.ones((4, 3)))
    bn.forward(x, training=True)
    with pytest.raises(ValueError, match="NaN"):
        bn.forward(np.full((4, 3), np.nan), training=True)
    with pytest.raises(ValueError, match="backward needs a preceding forward"):
        bn.backward(np.ones((4, 3)))  # the failed forward left nothing to backpropagate


@pytest.mark.parametrize(
    "name,value,match",
    [
        ("gamma", np.ones(4), r"gamma must have shape \(3,\), got \(4,\)"),
        ("beta", np.ones((3, 1)), r"beta must have shape \(3,\), got \(3, 1\)"),
        ("moving_mean", [0.0, np.nan, 1.0], "moving_mean contains NaN or inf"),
        ("moving_var", [1.0, -0.5, 1.0], "moving_var must be >= 0, got -0.5"),
        ("moving_var", np.array(["a", "b", "c"]), "moving_var must be real numbers"),
    ],
)
def test_bad_assignments(name, value, match) -> None:
    bn = BatchNorm(3)
    before = getattr(bn, name).copy()
    with pytest.raises(ValueError, match=match):
        setattr(bn, name, value)
    np.testing.assert_array_equal(getattr(bn, name), before)


def test_assignment_copies_into_the_live_array() -> None:
    bn = BatchNorm(3)
    gamma = bn.gamma
    bn.gamma = [1.0, 2.0, 3.0]
    assert gamma is bn.gamma and gamma.dtype == np.float64
    np.testing.assert_array_equal(gamma, [1.0, 2.0, 3.0])


def test_errors_are_bnfold_errors() -> None:
    assert issubclass(BatchNormError, ValueError) and issubclass(BatchNormError, BnfoldError)
