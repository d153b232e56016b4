"""`bnfold recalibrate MODEL --data DATA.npz -o OUT`: recompute BatchNormalization statistics from data.

The work is `bnfold.recalibration.recalibrate_file`; this module maps options to it, shows a
progress bar on a terminal (stderr), and prints the report.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from typing import Any

import click

from bnfold.cli import printable

__all__ = ["command"]


class _Bar:
    """A click progress bar on stderr, created on the first update (the total is known then)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label="recalibrating", file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.command()
@click.argument("input_path", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--data", "data", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="A .npz of samples keyed by the model's input names (a single array for a single input);"
                   " repeat for more files, read as one data set.")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the recalibrated model.")
@click.option("--method", type=click.Choice(["exact", "batch"]), default="exact", show_default=True,
              help="exact: population statistics, level by level; batch: average of batch statistics"
                   " (PyTorch's update_bn), one pass.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per onnxruntime run (exact gives the same statistics for any size).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes to run the passes in (each runs shards of the data).")
@click.option("--fold", is_flag=True, help="Then fold the BNs and verify, as bnfold convert does.")
@click.option("--labels", default=None, metavar="KEY",
              help="Key of integer labels in the data: print accuracy (argmax of the first output) before and after.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write a machine-readable report (per-BN statistics and changes) to this file.")
def command(input_path: str, data: tuple[str, ...], output_path: str, method: str, batch_size: int, workers: int,
            fold: bool, labels: str | None, force: bool, json_path: str | None) -> None:
    """Recompute the mean and variance of every BatchNormalization in MODEL from data; write OUT.

    exact (default): each BN gets the mean and population variance (denominator N) of its input
    over all the data, every BN before it already using its new statistics. OUT keeps every BN
    node and name, with the new statistics; MODEL is never modified. Exit code 0 on success, 1 if
    --fold's verification failed, 2 on usage or input errors.
    """
    from bnfold.errors import VerificationError
    from bnfold.recalibration import recalibrate_file

    bar = _Bar() if sys.stderr.isatty() else None
    pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1
            else nullcontext())
    try:
        with pool as executor:
            result, converted = recalibrate_file(
                input_path, output_path, list(data), fold=fold, force=force, json_path=json_path, method=method,
                batch_size=batch_size, executor=executor, labels=labels, progress=bar)
    except VerificationError as exc:
        if exc.report is not None:
            for line in exc.report.lines():
                click.echo(printable(line))
        raise
    finally:
        if bar is not None:
            bar.close()
    for line in result.lines():
        click.echo(printable(line))
    if converted is not None:
        for line in converted.lines()[1:]:
            click.echo(printable(line))
    click.echo(printable(f"wrote {output_path}"))
