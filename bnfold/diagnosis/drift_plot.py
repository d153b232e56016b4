"""``bnfold inspect --plot drift.png``: each BN's drift from the data, one column per BN.

Top panel: the mean shift of every channel (moving mean against the data's, in data standard
deviations); bottom panel: the variance ratio, moving over data (log scale). The stale thresholds are drawn as
lines, the worst channel of each BN as a larger marker. matplotlib is an optional extra
(``pip install 'bnfold[plot]'``), used with its non-interactive Agg backend.
"""

from __future__ import annotations

import os

import numpy as np

from bnfold.diagnosis.report import InspectReport
from bnfold.diagnosis.staleness import MEAN_SHIFT, VAR_RATIO
from bnfold.errors import BnfoldError

__all__ = ["plot_drift", "require_matplotlib"]


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or a `BnfoldError` naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise BnfoldError("--plot needs matplotlib: pip install 'bnfold[plot]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def plot_drift(report: InspectReport, path: str | os.PathLike) -> None:
    """Write the drift figure of ``report`` (BNs measured with data) to ``path`` as PNG, atomically."""
    plt = require_matplotlib()
    from bnfold.io import atomic_path

    measured = [bn for bn in report.bns if bn.drift is not None]
    if not measured:
        raise BnfoldError("--plot: no BN could be measured over the data, nothing to plot")
    width = min(max(6.0, 0.5 * len(measured) + 2.0), 40.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.0), sharex=True, constrained_layout=True)
    rng = np.random.default_rng(0)  # horizontal jitter only, so that channels do not hide each other
    for position, bn in enumerate(measured):
        stale = any(flag.name == "stale" for flag in bn.flags)
        color = "tab:red" if stale else "tab:blue"
        for axis, key in ((top, "mean_shift"), (bottom, "var_ratio")):
            values = np.asarray(bn.drift[key], dtype=np.float64)
            x = position + rng.uniform(-0.2, 0.2, size=values.size)
            axis.scatter(x, values, s=6, color=color, alpha=0.5, linewidths=0)
            worst = values.max() if key == "mean_shift" else values[np.argmax(np.abs(np.log(values)))]
            axis.scatter([position], [worst], s=40, color=color, marker="D")
    top.axhline(MEAN_SHIFT, color="tab:red", linestyle="--", linewidth=1, label=f"stale: {MEAN_SHIFT} std")
    bottom.axhline(VAR_RATIO, color="tab:red", linestyle="--", linewidth=1, label=f"stale: a factor {VAR_RATIO}")
    bottom.axhline(1 / VAR_RATIO, color="tab:red", linestyle="--", linewidth=1)
    bottom.axhline(1.0, color="gray", linewidth=0.8)
    top.set_ylabel("|moving mean - data mean|\n/ data std")
    bottom.set_ylabel("moving variance\n/ data variance")
    bottom.set_yscale("log")
    top.set_title(f"BN statistics against the data: {report.model}", fontsize=10)
    bottom.set_xticks(range(len(measured)))
    bottom.set_xticklabels([bn.label for bn in measured], rotation=45 if len(measured) > 4 else 0,
                           ha="right" if len(measured) > 4 else "center", fontsize=8)
    for axis in (top, bottom):
        axis.legend(loc="best", fontsize=8)
        axis.grid(True, alpha=0.3)
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png", dpi=100)
    finally:
        plt.close(fig)
