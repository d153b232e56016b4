"""`fold_affine_into_consumer`: a per-channel affine map folded into the linear op after it.

References are computed directly, in float64: the affine map applied to the input, then the
linear op (a dense product, or a naive grouped convolution written out below), compared with
the linear op with the folded weight and bias. Both sides are float64 sums of the same O(100)
terms in different orders, so they agree to ~1e-13 relative; 1e-10 leaves a wide margin while a
wrong axis, group or bias term gives O(1) differences.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bnfold.folding.algebra import bn_affine, fold_affine_into_consumer

RTOL = 1e-10


def conv_valid(x, w, b, *, groups=1, strides=None, dilations=None, pads=None):
    """Naive ONNX Conv (NCHW..., weight (C_out, C_in/groups, k...)), explicit zero ``pads``."""
    n, c_in, *size = x.shape
    c_out, c_in_g, *kernel = w.shape
    dims = len(kernel)
    strides = strides or [1] * dims
    dilations = dilations or [1] * dims
    if pads:
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pads])
        size = list(x.shape[2:])
    out_size = [(size[d] - dilations[d] * (kernel[d] - 1) - 1) // strides[d] + 1 for d in range(dims)]
    y = np.zeros((n, c_out, *out_size))
    c_out_g = c_out // groups
    for o in range(c_out):
        g = o // c_out_g
        xs = x[:, g * c_in_g:(g + 1) * c_in_g]
        for pos in itertools.product(*[range(s) for s in out_size]):
            window = tuple(
                slice(pos[d] * strides[d], pos[d] * strides[d] + dilations[d] * (kernel[d] - 1) + 1, dilations[d])
                for d in range(dims)
            )
            patch = xs[(slice(None), slice(None), *window)]
            y[(slice(None), o, *pos)] = np.tensordot(patch, w[o], axes=w[o].ndim)
        if b is not None:
            y[:, o] += b[o]
    return y


def _affine(rng, channels):
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    return bn_affine(gamma, rng.standard_normal(channels), rng.standard_normal(channels),
                     rng.uniform(0.25, 2.0, channels), 1e-5)


def _along(vector, ndim):
    return vector.reshape((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_consumer_matches_affine_then_conv(dims, groups, bias):
    rng = np.random.default_rng(dims * 100 + groups * 10 + bias)
    c_in, c_out = 4, 8
    x = rng.standard_normal((2, c_in, *[6, 5, 4][:dims]))
    w = rng.standard_normal((c_out, c_in // groups, *[3, 2, 2][:dims]))
    b = rng.standard_normal(c_out) if bias else None
    scale, shift = _affine(rng, c_in)
    strides, dilations = [2, 1, 1][:dims], [1, 2, 1][:dims]

    expected = conv_valid(_along(scale, x.ndim) * x + _along(shift, x.ndim), w, b, groups=groups,
                          strides=strides, dilations=dilations)
    new_w, new_b = fold_affine_into_consumer(w, b, scale, shift, in_axis=1, out_axis=0, groups=groups)
    got = conv_valid(x, new_w, new_b, groups=groups, strides=strides, dilations=dilations)

    assert new_w.shape == w.shape and new_b.shape == (c_out,)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_depthwise_consumer_scales_each_filter_by_its_own_channel():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 1, 3, 3))
    scale, shift = _affine(rng, 6)
    new_w, new_b = fold_affine_into_consumer(w, None, scale, shift, in_axis=1, out_axis=0, groups=6)
    np.testing.assert_allclose(new_w, w * scale[:, None, None, None], rtol=1e-15)
    np.testing.assert_allclose(new_b, w.sum(axis=(1, 2, 3)) * shift, rtol=1e-12)


def test_padded_conv_is_not_exact():
    """Why padded convolutions are skipped: the padded zeros are not ``shift``, so border
    outputs differ (interior outputs still agree)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 3, 5, 5))
    w = rng.standard_normal((2, 3, 3, 3))
    scale, shift = _affine(rng, 3)
    expected = conv_valid(_along(scale, 4) * x + _along(shift, 4), w, None, pads=[1, 1])
    new_w, new_b = fold_affine_into_consumer(w, None, scale, shift, in_axis=1, out_axis=0)
    got = conv_valid(x, new_w, new_b, pads=[1, 1])
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], expected[:, :, 1:-1, 1:-1], rtol=RTOL, atol=1e-10)
    assert np.abs(got[:, :, 0, :] - expected[:, :, 0, :]).max() > 1e-3


@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_consumer(trans_b, bias):
    rng = np.random.default_rng(10 + 2 * trans_b + bias)
    k, m = 5, 3
    x = rng.standard_normal((4, k))
    w = rng.standard_normal((m, k) if trans_b else (k, m))
    b = rng.standard_normal(m) if bias else None
    scale, shift = _affine(rng, k)
    w_km = w.T if trans_b else w
    expected = (scale * x + shift) @ w_km + (0.0 if b is None else b)
    axes = dict(in_axis=1, out_axis=0) if trans_b else dict(in_axis=0, out_axis=1)
    new_w, new_b = fold_affine_into_consumer(w, b, scale, shift, **axes)
    got = x @ (new_w.T if trans_b else new_w) + new_b
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
