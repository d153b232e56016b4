"""`bnfold train`: fit the batch-normalized MLP on the shipped digits and save a checkpoint."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import click

from bnfold.errors import BnfoldError

__all__ = ["command"]

# Keras-convention momentum 0.9 averages over roughly the last 1 / (1 - 0.9) = 10 batches, so the
# moving statistics follow the changing weights closely, and the initial values (mean 0, var 1)
# weigh 0.9**860 = 4e-40 after the 860 steps of the default run. Keras's own default 0.99 needs
# ~10x more steps (see BACKGROUND: 0.9 / 0.99 / 0.999 for ~100 / 1,000 / 10,000 steps). The torch
# default 0.1 is the same EMA written the other way round.
_DEFAULT_MOMENTUM = {"keras": 0.9, "torch": 0.1}
_DEFAULT_LR = {"sgd": 0.1, "adam": 0.01}
# Test accuracy (fraction) by which moving statistics may trail recomputed ones before we warn:
# 2 points, above the +-1 point that separates them on converged runs (1 point = 4.5 images).
_LAG_WARNING = 0.02
_CUMULATIVE = "cumulative"
_ERASE_PREVIOUS_LINE = "\033[F\033[K"  # ANSI: cursor to start of previous line, clear it


class _Momentum(click.ParamType):
    """One momentum, or several separated by commas (one training run each)."""

    name = "FLOAT[,FLOAT...]|cumulative"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        return tuple(self._one(part, param, ctx) for part in str(value).split(","))

    def _one(self, value: str, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if value.strip().lower() == _CUMULATIVE:
            return _CUMULATIVE
        try:
            number = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'cumulative'", param, ctx)
        if not math.isfinite(number) or not 0.0 <= number <= 1.0:
            self.fail(f"{value!r} must lie in [0, 1]", param, ctx)
        return number


def _parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise BnfoldError(f"--hidden {text!r}: expected comma-separated positive integers, e.g. 128,64") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 4096:
        raise BnfoldError(f"--hidden {text!r}: every size must lie in 1..4096")
    return sizes


def _percent(value: float) -> str:
    return f"{100 * value:5.1f}%"


def _epoch_line(result: Any, epochs: int) -> str:
    ev = result.evaluation
    return (
        f"epoch {result.epoch:>{len(str(epochs))}}/{epochs}  steps {result.steps:>5}  loss {result.loss:.4f}  "
        f"test accuracy: batch stats {_percent(ev.batch)}  moving stats {_percent(ev.moving)}  "
        f"recomputed {_percent(ev.population)}"
    )


@click.command()
@click.option("--epochs", type=click.IntRange(min=1, max=100_000), default=20, show_default=True, help="Passes over the training set.")
@click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True, help="Training batch size (>= 2: BN needs two values per channel).")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True, help="SGD with momentum, or Adam.")
@click.option("--lr", type=float, default=None, help="Learning rate [default: 0.1 for sgd, 0.01 for adam].")
@click.option("--sgd-momentum", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.9, show_default=True, help="Momentum of the SGD optimizer (not of BN).")
@click.option(
    "--momentum",
    type=_Momentum(),
    default=None,
    help="BatchNorm momentum in the chosen convention (keras: weight of the old moving value; torch: weight of the"
    " new batch statistic; 'cumulative' = PyTorch's momentum=None) [default: 0.9 keras, 0.1 torch]. Several values"
    " separated by commas (0.9,0.99,0.999) train one model each, e.g. to compare them with --plot.",
)
@click.option("--convention", type=click.Choice(["keras", "torch"]), default="keras", show_default=True, help="Moving-statistics convention of the BN layers.")
@click.option("--hidden", default="128,64", show_default=True, help="Comma-separated widths of the hidden Dense+BN+activation blocks.")
@click.option("--activation", type=click.Choice(["relu", "leaky_relu"]), default="relu", show_default=True, help="Activation after each BN.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the generator for initial weights and shuffling.")
@click.option(
    "--recompute-stats",
    is_flag=True,
    help="Before saving, replace the moving statistics with exact population statistics over the training set.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the checkpoint (.npz) here.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw loss and the three test accuracies per epoch to this PNG file (needs the 'plot' extra).")
@click.option("--force", is_flag=True, help="Overwrite the output files if they exist.")
def command(
    epochs: int,
    batch_size: int,
    optimizer: str,
    lr: float | None,
    sgd_momentum: float,
    momentum: Any,
    convention: str,
    hidden: str,
    activation: str,
    seed: int,
    recompute_stats: bool,
    output: Path | None,
    plot: Path | None,
    force: bool,
) -> None:
    """Train the batch-normalized MLP on the shipped 8x8 digits.

    The network is Dense(no bias) -> BatchNorm -> ReLU per hidden size, then Dense -> 10 logits,
    trained with softmax cross-entropy. After every epoch it prints the training loss and the
    test accuracy three ways: with batch statistics (training mode), with the moving statistics
    (what inference uses), and with population statistics recomputed over the training set.
    A large gap between the last two means the moving averages have not converged.
    With several --momentum values, one model is trained per value (same seed).
    """
    from bnfold.cli import output as out
    from bnfold.io import check_output_path
    from bnfold.nn.checkpoint import save_checkpoint
    from bnfold.nn.training import recompute_statistics

    sizes = _parse_hidden(hidden)
    momenta = momentum or (None,)
    if len(momenta) > 1 and output is not None:
        raise BnfoldError(f"--momentum {','.join(map(str, momenta))} trains {len(momenta)} models; -o saves one:"
                          " give a single --momentum to save a checkpoint")
    if plot is not None:
        from bnfold.plots import require_matplotlib

        require_matplotlib("--plot")
        check_output_path(plot, overwrite=force)
    if output is not None:
        check_output_path(output, overwrite=force)
        if plot is not None and output.resolve() == plot.resolve():
            raise BnfoldError(f"{plot}: --plot and -o name the same file")
    if lr is None:
        lr = _DEFAULT_LR[optimizer]
    if not math.isfinite(lr) or lr <= 0:
        raise BnfoldError(f"--lr {lr}: must be a finite number > 0")
    if _CUMULATIVE in momenta and convention != "torch":
        raise BnfoldError("--momentum cumulative: only the torch convention has a cumulative average")
    settings = {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                "sgd_momentum": sgd_momentum, "convention": convention, "sizes": sizes, "activation": activation,
                "seed": seed}
    runs = []
    for value in momenta:
        bn_momentum = _DEFAULT_MOMENTUM[convention] if value is None else None if value == _CUMULATIVE else value
        model, history = _train_one(bn_momentum, several=len(momenta) > 1, **settings)
        runs.append((bn_momentum, model, history))

    results = []
    for bn_momentum, model, history in runs:
        ev = history[-1].evaluation
        label = "cumulative" if bn_momentum is None else str(bn_momentum)
        results.append(f"{'momentum ' + label + ': ' if len(runs) > 1 else ''}test accuracy with moving statistics"
                       f" {100 * ev.moving:.1f}%")
    model = runs[-1][1]
    if recompute_stats and len(runs) == 1:
        from bnfold.nn.data import load_digits

        recompute_statistics(model, load_digits().x_train)
        out.echo("replaced the moving statistics with population statistics recomputed over the training set")
    if output is not None:
        save_checkpoint(model, output)
        results.append(f"saved {output}")
    if plot is not None:
        _plot(runs, plot, convention)
        results.append(f"plot {plot}")
    out.final("; ".join(results))


def _train_one(bn_momentum: float | None, *, several: bool, epochs: int, batch_size: int, optimizer: str, lr: float,
               sgd_momentum: float, convention: str, sizes: tuple[int, ...], activation: str, seed: int):
    """Train one model, printing a line per epoch; returns it with its `EpochResult` history."""
    import numpy as np

    from bnfold.cli import output as out
    from bnfold.nn.data import load_digits
    from bnfold.nn.model import build_mlp
    from bnfold.nn.optim import SGD, Adam
    from bnfold.nn.training import EpochResult, evaluate, train_epoch

    data = load_digits()
    rng = np.random.default_rng(seed)
    try:
        model = build_mlp(sizes, convention=convention, momentum=bn_momentum, activation=activation, rng=rng)
    except ValueError as exc:
        raise BnfoldError(f"--momentum {bn_momentum} --convention {convention}: {exc}") from None
    opt = SGD(model, lr=lr, momentum=sgd_momentum) if optimizer == "sgd" else Adam(model, lr=lr)

    out.echo(
        f"digits: {len(data.y_train)} train / {len(data.y_test)} test images; network 64-{'-'.join(map(str, sizes))}-10,"
        f" BN {convention} momentum {'cumulative' if bn_momentum is None else bn_momentum}; {optimizer} lr {lr}; seed {seed}"
    )
    show_bar = sys.stderr.isatty() and out.verbosity() >= out.NORMAL
    started = time.perf_counter()
    history = []
    for epoch in range(1, epochs + 1):
        with click.progressbar(length=len(data.y_train), label=f"epoch {epoch}/{epochs}", file=sys.stderr, hidden=not show_bar) as bar:
            try:
                loss = train_epoch(model, data.x_train, data.y_train, optimizer=opt, batch_size=batch_size, rng=rng, on_batch=bar.update)
            except BnfoldError as exc:
                raise BnfoldError(f"training diverged in epoch {epoch} (try a smaller --lr than {lr}): {exc}") from None
        if show_bar:
            sys.stderr.write(_ERASE_PREVIOUS_LINE)  # the epoch's summary line takes the bar's place
        if not math.isfinite(loss):
            raise BnfoldError(f"training diverged in epoch {epoch}: loss is {loss} (try a smaller --lr than {lr})")
        evaluation = evaluate(model, data.x_test, data.y_test, x_train=data.x_train, batch_size=batch_size)
        history.append(EpochResult(epoch=epoch, steps=opt.steps, loss=loss, evaluation=evaluation))
        out.echo(_epoch_line(history[-1], epochs))
    last = history[-1]
    out.echo(f"trained and evaluated {last.steps} steps in {time.perf_counter() - started:.1f} s")
    ev = last.evaluation
    if ev.population - ev.moving > _LAG_WARNING:
        out.warn(
            (f"momentum {bn_momentum}: " if several else "") + f"moving statistics trail recomputed ones by {100 * (ev.population - ev.moving):.1f} points of test"
            f" accuracy: the moving averages have not caught up with the network after {last.steps} steps; train"
            " longer, use a faster average (keras: lower --momentum; torch: higher), or pass --recompute-stats"
        )
    return model, history


def _plot(runs: list, path: Path, convention: str) -> None:
    from bnfold.plots import TrainingRun, training_curves

    drawn = []
    for bn_momentum, _, history in runs:
        label = f"momentum {'cumulative' if bn_momentum is None else bn_momentum}"
        drawn.append(TrainingRun(
            label=label, steps=[r.steps for r in history], loss=[r.loss for r in history],
            batch=[r.evaluation.batch for r in history], moving=[r.evaluation.moving for r in history],
            recomputed=[r.evaluation.population for r in history]))
    steps = runs[0][2][-1].steps
    training_curves(drawn, path, title=f"digits MLP, BN {convention} convention, {steps} steps")
