"""``stale``: moving statistics against the exact statistics of each BN's input over data.

The exact per-channel mean and variance of every BN input over the data come from
`bnfold.population.bn_input_moments` (the model as it is, float64, streamed in batches, merged with
Chan's formula): this module only compares them with the stored moving statistics.

With ``m``, ``v`` the moving mean and variance, ``mu``, ``d`` the data's (population variance),
and ``eps`` the BN's epsilon, per channel (the units `bnfold recalibrate` reports in too):

- mean shift ``|m - mu| / sqrt(d + eps)``: the error of the stored mean in units of the data's
  standard deviation (``+ eps``, negligible unless the channel barely varies, is what the BN
  divides by, and keeps a constant channel finite);
- variance ratio ``(v + eps) / (d + eps)``: above 1 the stored variance is too large, below 1 too
  small.

A BN is flagged ``stale`` when some channel has a mean shift of `MEAN_SHIFT` (0.5) or more, or a
variance ratio of `VAR_RATIO` (1.5) or more, or of ``1 / VAR_RATIO`` (0.667) or less. Statistics
equal to the data's give 0 and 1. Half a standard deviation moves every normalized value by 0.5,
and a variance off by 1.5 scales them by 0.82 (or 1.22): well past what sampling noise produces
on a few hundred samples (the standard error of a mean over n samples is 1/sqrt(n) standard
deviations: 0.05 at n = 400), and what the trainer's slow-EMA trap leaves behind.
"""

from __future__ import annotations


from bnfold.diagnosis.report import BNDiagnosis
from bnfold.moments import drift

__all__ = ["MEAN_SHIFT", "VAR_RATIO", "drift", "flag_stale"]

#: A moving mean this many data standard deviations off, in some channel, is stale.
MEAN_SHIFT = 0.5
#: A moving variance off by this factor (either way), in some channel, is stale.
VAR_RATIO = 1.5


def flag_stale(diagnosis: BNDiagnosis, result: dict[str, object]) -> None:
    """Add the ``stale`` flag to ``diagnosis`` if ``result`` (from `drift`) crosses a threshold."""
    diagnosis.drift = result
    shift, ratio = result["max_mean_shift"], result["worst_var_ratio"]
    parts = []
    if shift >= MEAN_SHIFT:
        parts.append(f"moving mean off by {shift:.3g} std in channel {result['channel_mean_shift']}")
    if ratio >= VAR_RATIO or ratio <= 1 / VAR_RATIO:
        parts.append(f"moving variance {ratio:.3g} x the data's in channel {result['channel_var_ratio']}")
    if parts:
        diagnosis.add("stale", "; ".join(parts) + f" (thresholds: {MEAN_SHIFT} std, a factor {VAR_RATIO})")
