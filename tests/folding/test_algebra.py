"""The fold formula, without ONNX: folded linear layer == linear layer followed by BN.

Reference: the BN inference equation ``gamma * (z - mean) / sqrt(var + eps) + beta`` applied to
``z = x W + b`` in float64 (``numpy.longdouble`` where it is wider, for the tiny-variance case).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from bnfold.folding.algebra import (
    bn_affine,
    check_representable,
    fold_affine,
    fold_batchnorm,
)


def _bn(z, gamma, beta, mean, var, eps, axis):
    shape = [1] * z.ndim
    shape[axis] = -1
    r = lambda a: np.asarray(a).reshape(shape)  # noqa: E731
    return r(gamma) * (z - r(mean)) / np.sqrt(r(var) + eps) + r(beta)


@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_fold_matches_bn(with_bias):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 5)), rng.standard_normal((5, 3))
    b = rng.standard_normal(3) if with_bias else None
    gamma, beta, mean, var = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(3), rng.uniform(0.1, 2, 3)
    z = x @ w + (0 if b is None else b)
    ref = _bn(z, gamma, beta, mean, var, 1e-3, axis=1)
    w2, b2 = fold_batchnorm(w, b, gamma, beta, mean, var, 1e-3, axis=1)
    # float64 throughout: a few ulp of the output scale.
    np.testing.assert_allclose(x @ w2 + b2, ref, rtol=0, atol=1e-13 * np.abs(ref).max())


def test_conv_style_axis0():
    """Per-output-filter scaling on axis 0 equals scaling the filter's response."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, 3))
    scale, shift = rng.standard_normal(4), rng.standard_normal(4)
    w2, b2 = fold_affine(w, None, scale, shift, axis=0)
    for o in range(4):
        np.testing.assert_array_equal(w2[o], w[o] * scale[o])
    np.testing.assert_array_equal(b2, shift)


def test_bias_formula_when_bias_exists():
    """b' = beta + (b - mean) * s, not b + ..."""
    scale, shift = bn_affine([2.0], [0.5], [1.0], [3.0], 1.0)  # s = 2 / sqrt(4) = 1
    _, b2 = fold_affine(np.ones((1, 1)), np.array([4.0]), scale, shift, axis=0)
    assert b2[0] == 0.5 + (4.0 - 1.0) * 1.0


def test_float16_computed_in_float64():
    """The float16 result is the float64 result rounded once."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 4)).astype(np.float16)
    gamma = np.array([3.0, 0.1, 7.0, 1.0], dtype=np.float16)
    var = np.array([1e-4, 2.0, 3e-3, 1.0], dtype=np.float16)
    zeros = np.zeros(4, dtype=np.float16)
    w2, b2 = fold_batchnorm(w, None, gamma, zeros, zeros, var, 1e-5, axis=1)
    expected = (w.astype(np.float64) * (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5))).astype(np.float16)
    assert w2.dtype == np.float16
    np.testing.assert_array_equal(w2, expected)


def test_tiny_variance_is_exact_in_float64():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 2))
    var, eps = np.array([1e-12, 1e-8]), 1e-9
    gamma, beta, mean = np.ones(2), np.zeros(2), np.array([0.3, -0.2])
    w2, b2 = fold_batchnorm(w, None, gamma, beta, mean, var, eps, axis=1)
    x = rng.standard_normal((5, 6))
    ld = np.longdouble
    ref = _bn(x.astype(ld) @ w.astype(ld), gamma, beta, mean, var.astype(ld), ld(eps), axis=1)
    got = x @ w2 + b2
    np.testing.assert_allclose(got, ref.astype(np.float64), rtol=1e-12, atol=1e-12 * float(np.abs(ref).max()))


@pytest.mark.parametrize("dtype,value,ok", [
    (np.float16, 65504.0, True), (np.float16, 70000.0, False), (np.float32, 1e39, False),
    (ml_dtypes.bfloat16, 1e38, True), (ml_dtypes.bfloat16, 4e38, False), (np.float64, 1e300, True),
])
def test_check_representable(dtype, value, ok):
    reason = check_representable(np.array([1.0, -value]), dtype)
    assert (reason is None) == ok
    if not ok:
        assert "overflows" in reason


def test_check_representable_nonfinite():
    assert "not finite" in check_representable(np.array([np.nan]), np.float32)


@pytest.mark.parametrize("c_shape", [None, (), (3,), (1, 3), (5, 1), (5, 3)])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, -2.0)])
def test_gemm_fold_matches_gemm_then_bn(c_shape, alpha, beta):
    """``BN(alpha * A B + beta * C)`` == ``A B' + C'`` (the Gemm after folding has alpha = beta = 1)."""
    from bnfold.folding.algebra import fold_affine_general

    rng = np.random.default_rng(len(c_shape or ()) + int(alpha * 10))
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    c = None if c_shape is None else rng.standard_normal(c_shape)
    gamma, beta_bn, mean = rng.standard_normal((3, 3))
    var = rng.uniform(0.1, 2, 3)
    ref = _bn(alpha * a @ b + (0 if c is None else beta * c), gamma, beta_bn, mean, var, 1e-5, axis=1)
    scale, shift = bn_affine(gamma, beta_bn, mean, var, 1e-5)
    b2, c2 = fold_affine_general(b, c, scale, shift, axis=1, alpha=alpha, beta=beta)
    # float64 throughout: a few ulp of the output scale.
    np.testing.assert_allclose(a @ b2 + c2, ref, rtol=0, atol=1e-13 * np.abs(ref).max())


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("c_shape", [None, (3,), (5, 3)])
def test_gemm_input_fold_matches_bn_then_gemm(trans_b, c_shape):
    """``alpha * BN(A) B + beta * C`` == ``alpha * A B' + C'`` (the Gemm keeps alpha, beta = 1)."""
    from bnfold.folding.algebra import fold_affine_into_gemm_input

    rng = np.random.default_rng(3 + trans_b)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    c = None if c_shape is None else rng.standard_normal(c_shape)
    alpha, beta = 1.5, -0.5
    gamma, beta_bn, mean = rng.standard_normal((3, 4))
    var = rng.uniform(0.1, 2, 4)
    ref = alpha * _bn(a, gamma, beta_bn, mean, var, 1e-5, axis=1) @ b + (0 if c is None else beta * c)
    scale, shift = bn_affine(gamma, beta_bn, mean, var, 1e-5)
    stored = b.T if trans_b else b
    in_axis, out_axis = (1, 0) if trans_b else (0, 1)
    b2, c2 = fold_affine_into_gemm_input(stored, c, scale, shift, in_axis=in_axis, out_axis=out_axis, alpha=alpha,
                                         beta=beta)
    got = alpha * a @ (b2.T if trans_b else b2) + c2
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * np.abs(ref).max())


@pytest.mark.parametrize(("op", "value_first"), [("Add", True), ("Add", False), ("Sub", True), ("Sub", False),
                                                 ("Mul", True), ("Div", True)])
def test_affine_step_matches_the_elementwise_op(op, value_first):
    """After ``v = s z + t``, the step's ``(s', t')`` give ``s' z + t' == op(v, c)`` (float64)."""
    from bnfold.folding.algebra import affine_step

    rng = np.random.default_rng(len(op) + value_first)
    z, c = rng.standard_normal((6, 3)), rng.uniform(0.5, 2.0, 3)
    scale, shift = rng.standard_normal(3), rng.standard_normal(3)
    v = scale * z + shift
    ops = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide}
    ref = ops[op](v, c) if value_first else ops[op](c, v)
    new_scale, new_shift = affine_step(scale, shift, op, c, value_first=value_first)
    np.testing.assert_allclose(new_scale * z + new_shift, ref, rtol=1e-14, atol=1e-14)


def test_affine_step_refuses_what_is_not_affine():
    from bnfold.folding.algebra import affine_step

    ones = np.ones(2)
    assert affine_step(ones, ones, "Div", np.array([1.0, 2.0]), value_first=False) is None  # c / v
    assert affine_step(ones, ones, "Div", np.array([1.0, 0.0]), value_first=True) is None  # v / 0
    assert affine_step(ones, ones, "Pow", ones, value_first=True) is None


def test_compose_affine():
    from bnfold.folding.algebra import compose_affine

    z = np.linspace(-2, 2, 5)[:, None]
    s1, t1, s2, t2 = np.array([2.0]), np.array([1.0]), np.array([-3.0]), np.array([0.5])
    s, t = compose_affine(s1, t1, s2, t2)
    np.testing.assert_array_equal(s * z + t, s2 * (s1 * z + t1) + t2)  # small integers: exact
