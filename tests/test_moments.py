"""bnfold.moments: per-channel (count, mean, M2) from batches and Chan's merge, against float64
np.mean / np.var of the concatenated data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.moments import BatchAverage, Moments, merge_all

# All arithmetic is float64 and the data are O(1e3) values of magnitude <= ~10: the merged moments
# differ from a one-shot float64 computation only by rounding, a few ulps times log(pieces).
RTOL = 1e-12


def _reference(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    x64 = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    return x64.mean(axis=0), x64.var(axis=0)


def _pieces(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


@pytest.mark.parametrize("shape, axis", [((37, 5), 1), ((23, 3, 4, 5), 1), ((11, 6, 7, 4), -1), ((9, 2, 8), 1)])
def test_one_batch_matches_numpy(shape, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 7).astype(np.float32)
    moments = Moments.from_batch(x, axis=axis)
    mean, var = _reference(x, axis)
    assert moments.count == x.size // x.shape[axis]
    assert moments.mean.dtype == np.float64 and moments.m2.dtype == np.float64
    np.testing.assert_allclose(moments.mean, mean, rtol=RTOL)
    np.testing.assert_allclose(moments.var, var, rtol=RTOL)
    np.testing.assert_allclose(moments.sample_var, var * moments.count / (moments.count - 1), rtol=RTOL)


@pytest.mark.parametrize("sizes", [[1] * 40, [1, 39], [39, 1], [3, 17, 1, 19], [40]])
def test_merge_of_uneven_pieces_and_batch_size_one(sizes):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3, 2, 2)) * np.array([1e-3, 1.0, 50.0]).reshape(1, 3, 1, 1) + 5.0
    merged = merge_all(Moments.from_batch(piece) for piece in _pieces(x, sizes))
    mean, var = _reference(x, 1)
    assert merged.count == 40 * 4
    np.testing.assert_allclose(merged.mean, mean, rtol=RTOL)
    np.testing.assert_allclose(merged.var, var, rtol=1e-10)  # channel 0: var 1e-6 around mean 5, relative rounding larger


def test_merge_is_order_independent_and_tree_shaped():
    rng = np.random.default_rng(2)
    pieces = [rng.standard_normal((n, 4)) + i for i, n in enumerate([5, 1, 12, 7, 2, 30])]
    left = merge_all(Moments.from_batch(p) for p in pieces)
    tree = (Moments.from_batch(pieces[0]) + Moments.from_batch(pieces[1])) + (
        Moments.from_batch(pieces[2]) + (Moments.from_batch(pieces[3]) + Moments.from_batch(np.concatenate(pieces[4:])))
    )
    backwards = merge_all(Moments.from_batch(p) for p in reversed(pieces))
    mean, var = _reference(np.concatenate(pieces), 1)
    for result in (left, tree, backwards):
        np.testing.assert_allclose(result.mean, mean, rtol=RTOL)
        np.testing.assert_allclose(result.var, var, rtol=RTOL)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=8), st.integers(0, 2**32 - 1))
def test_any_split_gives_the_concatenated_statistics(sizes, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sum(sizes), 3)) * rng.uniform(0.1, 10, 3) + rng.uniform(-100, 100, 3)
    merged = merge_all(Moments.from_batch(piece) for piece in _pieces(x, sizes))
    mean, var = _reference(x, 1)
    np.testing.assert_allclose(merged.mean, mean, rtol=RTOL)
    # |mean| / std up to ~1e3 here; the merge never subtracts sum(x^2) - n mean^2, so no cancellation.
    np.testing.assert_allclose(merged.var, var, rtol=1e-9, atol=1e-12)


def test_empty_pieces_are_the_identity():
    x = np.arange(12.0).reshape(4, 3)
    one = Moments.from_batch(x)
    empty = Moments.from_batch(np.zeros((0, 3)))
    assert empty.count == 0
    for merged in (one + empty, empty + one, merge_all([empty, one, empty])):
        np.testing.assert_array_equal(merged.mean, one.mean)
        np.testing.assert_array_equal(merged.m2, one.m2)
    assert merge_all([], channels=3).count == 0


def test_channel_mismatch_and_nothing_to_merge_are_errors():
    with pytest.raises(ValueError, match="3 channels against 2"):
        Moments.from_batch(np.zeros((2, 3))) + Moments.from_batch(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no pieces"):
        merge_all([])


@pytest.mark.parametrize("module", ["bnfold.moments", "bnfold.nn.training"])
def test_statistics_and_training_import_no_onnx(module):
    code = f"import sys, {module}; bad = [m for m in ('onnx', 'onnxruntime', 'click') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_batch_average_is_the_mean_of_batch_statistics_with_unbiased_variance():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 2, 3)) * np.array([1.0, 4.0]).reshape(1, 2, 1) + 2 for n in (5, 5, 2)]
    average = merge_all(BatchAverage.from_batch(b) for b in batches)
    assert average.batches == 3
    # Each batch weighs the same whatever its size (update_bn with momentum=None).
    expected_mean = np.mean([b.mean(axis=(0, 2)) for b in batches], axis=0)
    expected_var = np.mean([b.transpose(1, 0, 2).reshape(2, -1).var(axis=1, ddof=1) for b in batches], axis=0)
    np.testing.assert_allclose(average.mean, expected_mean, rtol=RTOL)
    np.testing.assert_allclose(average.var, expected_var, rtol=RTOL)
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        BatchAverage.from_batch(np.zeros((1, 3)))


def test_numpy_trainer_recomputes_statistics_with_this_module(monkeypatch):
    """One implementation of the statistics math: `recompute_statistics` merges Moments."""
    from bnfold.nn.batchnorm import BatchNorm
    from bnfold.nn.layers import Dense, ReLU
    from bnfold.nn.model import Sequential
    from bnfold.nn.training import recompute_statistics

    calls = []
    original = Moments.from_batch.__func__
    monkeypatch.setattr(Moments, "from_batch", classmethod(lambda cls, x, axis=1: calls.append(x.shape) or original(cls, x, axis)))
    rng = np.random.default_rng(4)
    model = Sequential([Dense(3, 2, rng=rng), BatchNorm(2), ReLU()])
    x = rng.standard_normal((10, 3))
    recompute_statistics(model, x, batch_size=4)
    assert len(calls) == 3 and sum(shape[0] for shape in calls) == 10  # three chunks of at most 4 rows
    h = x.astype(np.float32) @ model.layers[0].weight + model.layers[0].bias
    np.testing.assert_allclose(model.layers[1].moving_mean, h.mean(axis=0), rtol=1e-6)
