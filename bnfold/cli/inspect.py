"""`bnfold inspect MODEL`: diagnose the BatchNormalization statistics of an ONNX model.

The work is `bnfold.diagnosis.inspect`; this module maps options to it, prints the report and
writes the JSON and the plot.
"""

from __future__ import annotations

from pathlib import Path

import click

from bnfold.cli import printable
from bnfold.errors import BnfoldError

__all__ = ["command"]


def _check_report_path(path: str | None, model: str, data: str | None) -> None:
    if path is None:
        return
    from bnfold.io import check_output_path

    inputs = [Path(model).resolve()] + ([Path(data).resolve()] if data else [])
    if Path(path).resolve() in inputs:
        raise BnfoldError(f"{path}: the output would overwrite an input")
    # Checked before any work, so that a bad report path fails fast. Reports are replaced, as
    # `convert --json` and `verify --json` do.
    check_output_path(path, overwrite=True)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(dir_okay=True))
@click.option("--data", "data_path", type=click.Path(dir_okay=False), default=None,
              help="An .npz of samples keyed by the model's input names (a single array for a single input):"
                   " compares each BN's moving statistics with its input's exact statistics over them (stale).")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the report as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="With --data: write a PNG of each BN's mean shift and variance ratio (needs bnfold[plot]).")
@click.option("--no-run", is_flag=True,
              help="Skip the onnxruntime runs that find cross-sample dependence and randomness.")
@click.option("--batch", type=click.IntRange(min=2), default=4, show_default=True,
              help="Batch length given to a symbolic batch axis in those runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Samples per onnxruntime run over --data (memory only: the statistics are exact).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs of those runs.")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=1, show_default=True,
              help="onnxruntime intra-op and inter-op threads.")
@click.pass_context
def command(ctx: click.Context, model_path: str, data_path: str | None, json_path: str | None,
            plot_path: str | None, no_run: bool, batch: int, batch_size: int, seed: int, threads: int) -> None:
    """Diagnose every BatchNormalization of the ONNX model MODEL (and every decomposed BN).

    Per BN: channels, epsilon, moving mean and variance, what `bnfold convert` would do with it,
    and flags. Wrong (exit 1): never updated, invalid, batch statistics, not deterministic,
    stale (with --data). Warnings (exit 0): huge fold scale, float16, dead channels, training
    switch. Exit 2 on usage or input errors.
    """
    from bnfold.diagnosis import inspect

    if plot_path is not None:
        if data_path is None:
            raise BnfoldError("--plot needs --data: the plot shows each BN's statistics against the data's")
        from bnfold.diagnosis.drift_plot import require_matplotlib

        require_matplotlib()
    _check_report_path(json_path, model_path, data_path)
    _check_report_path(plot_path, model_path, data_path)
    if json_path is not None and plot_path is not None and Path(json_path).resolve() == Path(plot_path).resolve():
        raise BnfoldError(f"{json_path}: --json and --plot name the same file")
    report = inspect(model_path, data_path, run=not no_run, batch=batch, seed=seed, batch_size=batch_size,
                     threads=threads, label=model_path)
    for line in report.lines():
        click.echo(printable(line))
    if json_path is not None:
        from bnfold.io import write_json

        write_json(json_path, report.to_dict())
    if plot_path is not None:
        from bnfold.diagnosis.drift_plot import plot_drift

        plot_drift(report, plot_path)
    if not report.ok:
        ctx.exit(1)
