"""``stale``: moving statistics against the exact statistics of each BN's input over data.

The exact per-channel mean and variance of every BN input over the data come from
`bnfold.population.bn_input_moments` (the model as it is, float64, streamed in batches, merged with
Chan's formula): this module only compares them with the stored moving statistics.

With ``m``, ``v`` the moving mean and variance, ``mu``, ``d`` the data's, and ``eps`` the BN's
epsilon, per channel:

- mean shift ``|m - mu| / sqrt(d + eps)``: the error of the stored mean in units of the standard
  deviation the BN divides by (``+ eps`` keeps a constant channel finite);
- variance ratio ``max(v + eps, d + eps) / min(v + eps, d + eps)``: how far off the normalizing
  variance is, in either direction (a factor of 2 too large and 2 too small both read 2).

A BN is flagged ``stale`` when some channel has a mean shift of `MEAN_SHIFT` (0.5) or more, or
a variance ratio of `VAR_RATIO` (1.5) or more. Statistics equal to the data's give 0 and 1.
Half a standard deviation moves every normalized value by 0.5, and a variance off by 1.5 scales
them by 1.22 or 0.82: well past what sampling noise produces on a few hundred samples (the
standard error of a mean over n samples is 1/sqrt(n) standard deviations: 0.05 at n = 400),
and what the trainer's slow-EMA trap leaves behind.
"""

from __future__ import annotations

import numpy as np

from bnfold.diagnosis.report import BNDiagnosis

__all__ = ["MEAN_SHIFT", "VAR_RATIO", "drift", "flag_stale"]

#: A moving mean this many data standard deviations off, in some channel, is stale.
MEAN_SHIFT = 0.5
#: A moving variance off by this factor (either way), in some channel, is stale.
VAR_RATIO = 1.5


def drift(moving_mean, moving_var, data_mean, data_var, eps: float) -> dict[str, object]:
    """Per-channel mean shift and variance ratio (module docstring), as lists, and their maxima."""
    moving_mean = np.asarray(moving_mean, dtype=np.float64)
    moving_var = np.asarray(moving_var, dtype=np.float64) + eps
    data_mean = np.asarray(data_mean, dtype=np.float64)
    data_var = np.asarray(data_var, dtype=np.float64) + eps
    shift = np.abs(moving_mean - data_mean) / np.sqrt(data_var)
    ratio = np.maximum(moving_var, data_var) / np.minimum(moving_var, data_var)
    return {
        "mean_shift": shift.tolist(),
        "var_ratio": ratio.tolist(),
        "max_mean_shift": float(shift.max()),
        "max_var_ratio": float(ratio.max()),
        "channel_mean_shift": int(np.argmax(shift)),
        "channel_var_ratio": int(np.argmax(ratio)),
        "data_mean": data_mean.tolist(),
        "data_var": (data_var - eps).tolist(),
    }


def flag_stale(diagnosis: BNDiagnosis, result: dict[str, object]) -> None:
    """Add the ``stale`` flag to ``diagnosis`` if ``result`` (from `drift`) crosses a threshold."""
    diagnosis.drift = result
    shift, ratio = result["max_mean_shift"], result["max_var_ratio"]
    parts = []
    if shift >= MEAN_SHIFT:
        parts.append(f"moving mean off by {shift:.3g} std in channel {result['channel_mean_shift']}")
    if ratio >= VAR_RATIO:
        parts.append(f"moving variance off by a factor {ratio:.3g} in channel {result['channel_var_ratio']}")
    if parts:
        diagnosis.add("stale", "; ".join(parts) + f" (thresholds: {MEAN_SHIFT} std, factor {VAR_RATIO})")
