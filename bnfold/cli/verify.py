"""`bnfold verify A B`: compare two ONNX models in onnxruntime; exit 0 if equivalent, 1 if not.

Also defines the verification options that `bnfold convert` shares.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bnfold.cli import output
from bnfold.errors import BnfoldError, VerificationError
from bnfold.io.writing import write_json

__all__ = ["command", "verification_options", "verify_kwargs", "write_json", "ByteSize"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "t": 1000**4, "tb": 1000**4}


class ByteSize(click.ParamType):
    """A memory size: bytes, or a number with a unit (``512MiB``, ``2GiB``, ``1.5G``)."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            self.fail(f"{value!r} is not a size such as 2GiB, 512MiB or 1000000", param, ctx)
        size = int(float(match.group(1)) * _UNITS[unit])
        if size < 1:
            self.fail(f"{value!r} must be at least 1 byte", param, ctx)
        return size


def verification_options(func: Callable) -> Callable:
    """The options both `verify` and `convert` take, applied as one decorator."""
    options = [
        click.option("--rtol", type=click.FloatRange(min=0), default=None,
                     help="Relative tolerance, scaled by max|reference| [default by dtype: float64 1e-9, float32 1e-4, float16 1e-2]."),
        click.option("--atol", type=click.FloatRange(min=0), default=None,
                     help="Absolute tolerance [default by dtype: float64 1e-11, float32 1e-6, float16 1e-4, i.e. the default rtol / 100]."),
        click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Size given to symbolic (batch) dimensions of random inputs."),
        click.option("--inputs", "inputs_path", type=click.Path(dir_okay=False), default=None,
                     help="An .npz file with one array per model input, used instead of random inputs."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs."),
        click.option("--threads", type=click.IntRange(min=1, max=256), default=1, show_default=True,
                     help="onnxruntime intra-op and inter-op threads."),
        click.option("--max-memory", type=ByteSize(), default="2GiB", show_default=True,
                     help="Keep inputs and compared tensors under this much memory (tensors are requested in"
                          " groups, samples fed in batches); refuse when that is impossible."),
        click.option("--outputs-only", is_flag=True,
                     help="Compare the graph outputs only, not every intermediate tensor both models share."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def verify_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of `bnfold.verification.verify` from the parsed `verification_options`."""
    return {
        "inputs": params["inputs_path"],
        "rtol": params["rtol"],
        "atol": params["atol"],
        "batch": params["batch"],
        "seed": params["seed"],
        "threads": params["threads"],
        "max_bytes": params["max_memory"],
        "outputs_only": params["outputs_only"],
    }


@click.command()
@click.argument("reference", type=click.Path(dir_okay=True))
@click.argument("candidate", type=click.Path(dir_okay=True))
@verification_options
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the report as JSON to this file.")
@click.option("--set", "pins", multiple=True, metavar="NAME=VALUE",
              help="Run REFERENCE with its input NAME fixed to VALUE, as `convert --set` fixed it in CANDIDATE; repeatable.")
def command(reference: str, candidate: str, json_path: str | None, pins: tuple[str, ...], **params: Any) -> None:
    """Compare two ONNX models in onnxruntime (graph optimizations disabled) on the same inputs.

    Layer by layer: for every tensor both models compute under the same name (outputs included),
    in topological order, max|a - b| <= atol + rtol * max|a|, with a the reference. The report
    names the first tensor that exceeds and the nodes producing it. A model whose two runs on the
    same input differ (Dropout in training mode) is refused. Exit code 0 if equivalent, 1 if not,
    2 on errors.
    """
    from bnfold.verification import verify

    if json_path is not None:
        from bnfold.io import check_output_path

        if Path(json_path).resolve() in (Path(reference).resolve(), Path(candidate).resolve()):
            raise BnfoldError(f"{json_path}: the JSON report would overwrite an input model")
        check_output_path(json_path, overwrite=True)
    reference_model: Any = reference
    names = None
    if pins:
        from bnfold.folding.switches import parse_pins, pinned_reference
        from bnfold.io import load_model

        reference_model = pinned_reference(load_model(reference), parse_pins(pins))
        names = (f"{reference} ({', '.join(pins)})", candidate)
    report = verify(reference_model, candidate, names=names, **verify_kwargs(params))
    lines = report.lines()
    for line in lines[:-1]:
        output.echo(line)
    output.final(lines[-1])  # the verdict: also printed with -q
    if json_path is not None:
        write_json(json_path, report.to_dict())
    if not report.ok:
        raise VerificationError(f"{candidate} is not equivalent to {reference}: {report.summary()}", report)
