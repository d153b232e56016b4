"""`bnfold convert IN -o OUT`: fold BatchNormalization into neighbouring linear ops, verify, write.

The work is `bnfold.conversion.convert`; this module maps options to it and prints the summary.
"""

from __future__ import annotations

from typing import Any

import click

from bnfold.cli import output
from bnfold.cli.verify import verification_options, verify_kwargs
from bnfold.errors import VerificationError

__all__ = ["command"]


@click.command()
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "output_path", type=click.Path(), default=None,
              help="Where to write the folded model (required unless --in-place).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--in-place", is_flag=True, help="Allow OUT to be IN (replaced atomically after verification).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check (onnxruntime is then not even imported).")
@verification_options
@click.option("--check", is_flag=True, help="Run onnx.checker.check_model(full_check=True) on OUT before writing it.")
@click.option("--decompose-rest", is_flag=True, help="Rewrite BNs that cannot be folded as one Mul + Add by constants.")
@click.option("--keep-initializer-inputs", is_flag=True,
              help="Treat initializers also listed as graph inputs as run-time inputs: BNs that need them stay"
                   " unfolded (any IR version; by default they are constants and folded ones leave the inputs).")
@click.option("--set", "pins", multiple=True, metavar="NAME=VALUE",
              help="Fix the graph input NAME that selects If branches (a training switch such as tf2onnx's"
                   " training:0) to VALUE, inline the branches it selects and remove the input; repeatable."
                   " Inputs with a default (an initializer) are fixed to it without --set.")
@click.option("--inline-functions", is_flag=True,
              help="Inline model-local functions first (PyTorch export_modules_as_functions) so that their BNs fold.")
@click.option("--keep-failing-unfolded", is_flag=True,
              help="If verification fails, leave the BNs responsible unfolded and write the (verified) rest.")
@click.option("--json", "json_path", type=click.Path(), default=None,
              help="Also write a machine-readable report (fold entries, tensor map, verification) to this file.")
@click.option("--strict", is_flag=True,
              help="Refuse (exit 1, OUT not written) when BN statistics look wrong (see bnfold inspect).")
def command(input_path: str, output_path: str | None, force: bool, in_place: bool, no_verify: bool, check: bool,
            decompose_rest: bool, keep_initializer_inputs: bool, pins: tuple[str, ...], inline_functions: bool,
            keep_failing_unfolded: bool, json_path: str | None, strict: bool, **params: Any) -> None:
    """Fold BatchNormalization in the ONNX model IN into its neighbours and write OUT.

    OUT is verified against IN in onnxruntime before it is written. BN statistics that look wrong
    (never updated, invalid, batch statistics, not deterministic) are printed as warnings before
    folding. Exit code 0 on success, 1 if verification failed or, with --strict, if a statistics
    warning was printed (OUT is then not written), 2 on usage or input errors.

    If nodes whose condition is known are replaced by the branch it selects first: constant
    conditions, inputs fixed with --set, and graph inputs that have a default value (the
    training:0 of tf.compat.v1 graphs), which are fixed to it and removed; the report says so.
    """
    from bnfold.conversion import convert
    from bnfold.folding.switches import parse_pins

    pinned = parse_pins(pins)

    try:
        result = convert(input_path, output_path, force=force, in_place=in_place, verify=not no_verify, check=check,
                         decompose_rest=decompose_rest, keep_initializer_inputs=keep_initializer_inputs,
                         keep_failing_unfolded=keep_failing_unfolded, json_path=json_path, pins=pinned,
                         inline_functions=inline_functions, strict=strict, warn=output.warn,
                         **verify_kwargs(params))
    except VerificationError as exc:
        if exc.report is not None:
            for line in exc.report.lines():
                output.echo(line)
        raise
    if output.verbosity() == output.QUIET:
        output.final(result.final_line())
        return
    for line in result.lines(verbose=output.verbosity() == output.VERBOSE):
        output.echo(line)
