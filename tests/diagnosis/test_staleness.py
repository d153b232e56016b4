"""The ``stale`` thresholds, on closed-form statistics (eps = 0 so that the numbers are exact)."""

from __future__ import annotations

import pytest

from bnfold.diagnosis.report import BNDiagnosis
from bnfold.diagnosis.staleness import MEAN_SHIFT, VAR_RATIO, drift, flag_stale


def stale(moving_mean, moving_var, data_mean, data_var) -> bool:
    diagnosis = BNDiagnosis(name="bn", graph="main", kind="BatchNormalization")
    flag_stale(diagnosis, drift(moving_mean, moving_var, data_mean, data_var, 0.0))
    return [flag.name for flag in diagnosis.flags] == ["stale"]


def test_equal_statistics_are_not_stale():
    result = drift([1.0, -2.0], [4.0, 0.25], [1.0, -2.0], [4.0, 0.25], 0.0)
    assert result["max_mean_shift"] == 0.0 and result["var_ratio"] == [1.0, 1.0]
    assert not stale([1.0, -2.0], [4.0, 0.25], [1.0, -2.0], [4.0, 0.25])


@pytest.mark.parametrize("moving_mean, expected", [(1.0 + 2 * MEAN_SHIFT, True), (1.0 + 2 * 0.49, False)])
def test_mean_shift_in_data_standard_deviations(moving_mean, expected):
    # data std 2: a shift of 2 * 0.5 is exactly half a standard deviation.
    assert drift([moving_mean], [4.0], [1.0], [4.0], 0.0)["max_mean_shift"] == pytest.approx(
        (moving_mean - 1.0) / 2.0)
    assert stale([moving_mean], [4.0], [1.0], [4.0]) is expected


@pytest.mark.parametrize("moving_var, expected", [
    (VAR_RATIO * 2.0, True), (2.0 / VAR_RATIO, True), (1.4 * 2.0, False), (2.0 / 1.4, False),
])
def test_variance_ratio_either_way(moving_var, expected):
    assert stale([0.0], [moving_var], [0.0], [2.0]) is expected


def test_worst_channel_is_named():
    result = drift([0.0, 0.0, 3.0], [1.0, 0.1, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], 0.0)
    assert result["channel_var_ratio"] == 1 and result["worst_var_ratio"] == pytest.approx(0.1)
    assert result["channel_mean_shift"] == 2 and result["max_mean_shift"] == pytest.approx(3.0)
