"""Figures (PNG) for the command line, drawn with matplotlib from the optional ``plot`` extra.

matplotlib is imported only when a figure is drawn, with its headless Agg canvas (no display and
no global pyplot state), and files are written atomically like every bnfold output. Commands
call `require_matplotlib` before any work, so that a missing extra is a one-line error up front
rather than after a long run.

- `training_curves`: loss and the three test accuracies per epoch, one run per BN momentum.
- `new_figure` / `save_png`: the building blocks, for other commands' figures.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfold.errors import BnfoldError

__all__ = ["require_matplotlib", "new_figure", "save_png", "TrainingRun", "training_curves"]


def require_matplotlib(option: str = "--plot") -> None:
    """Raise `BnfoldError` naming the ``plot`` extra if matplotlib is not installed."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BnfoldError(f"{option} needs matplotlib, which is in the optional extra 'plot':"
                          " pip install 'bnfold[plot]'")


def new_figure(ncols: int = 1, *, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on an Agg canvas with ``ncols`` side-by-side axes of ``width`` x ``height`` inches."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def save_png(figure: Any, path: str | os.PathLike) -> None:
    """Write ``figure`` as PNG to ``path`` atomically (callers check overwrite rules first)."""
    from bnfold.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        figure.savefig(handle, format="png")


@dataclass
class TrainingRun:
    """One training run to draw: its label (e.g. ``"momentum 0.99"``) and per-epoch values.

    ``loss`` and the accuracies (fractions) are sequences with one value per epoch; ``steps`` are
    the optimizer steps reached at the end of each epoch.
    """

    label: str
    steps: Sequence[int]
    loss: Sequence[float]
    batch: Sequence[float]
    moving: Sequence[float]
    recomputed: Sequence[float]


def training_curves(runs: Sequence[TrainingRun], path: str | os.PathLike, *, title: str = "") -> None:
    """Loss (left) and test accuracy with batch, moving and recomputed statistics (right), per epoch.

    One colour per run; the line style tells the statistics apart (solid: moving statistics, what
    an exported model uses; dashed: batch statistics; dotted: recomputed population statistics).
    """
    if not runs:
        raise ValueError("training_curves needs at least one run")
    from matplotlib.lines import Line2D

    figure, (ax_loss, ax_acc) = new_figure(2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    styles = {"moving stats": "-", "batch stats": "--", "recomputed": ":"}
    for run, color in zip(runs, colors):
        epochs = range(1, len(run.loss) + 1)
        ax_loss.plot(epochs, run.loss, color=color, marker="o", markersize=3, label=run.label)
        for values, style in ((run.moving, "-"), (run.batch, "--"), (run.recomputed, ":")):
            ax_acc.plot(epochs, [100 * a for a in values], color=color, linestyle=style,
                        marker="o" if style == "-" else None, markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss (colour: run)")
    ax_loss.legend(fontsize="small")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (line style: statistics)")
    # The colours are explained by the loss panel; here one legend entry per kind of statistics.
    ax_acc.legend(handles=[Line2D([], [], color="0.3", linestyle=style, label=name) for name, style in styles.items()],
                  fontsize="small", loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    save_png(figure, path)
