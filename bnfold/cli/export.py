"""`bnfold export CHECKPOINT -o OUT`: write a trained NumPy model as an ONNX inference graph."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["command"]


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.option("-o", "--output", "output_path", type=click.Path(), required=True, help="Where to write the ONNX model.")
@click.option("--fold", is_flag=True, help="Fold each BatchNorm into the Dense layer before it (Gemm with one bias).")
@click.option("--opset", type=int, default=None,
              help="ONNX opset, 9 up to the newest both onnx and onnxruntime accept [default: 17].")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def command(checkpoint: str, output_path: str, fold: bool, opset: int | None, force: bool) -> None:
    """Export the checkpoint CHECKPOINT (.npz from `bnfold train`) to ONNX.

    Unfolded (default): MatMul/Gemm -> BatchNormalization (inference mode, moving statistics)
    -> activation ..., input "input" (N, features), output "logits".
    """
    from bnfold.export import export_onnx, save_onnx
    from bnfold.io import check_output_path

    check_output_path(output_path, overwrite=force, inputs=(checkpoint,))
    model = export_onnx(checkpoint, fold=fold, opset=opset)
    path = save_onnx(model, output_path, overwrite=force, inputs=(checkpoint,))
    opset_used = model.opset_import[0].version
    kind = "folded" if fold else "unfolded"
    click.echo(f"{checkpoint} -> {path} (ONNX opset {opset_used}, {kind}, {len(model.graph.node)} nodes,"
               f" {Path(path).stat().st_size} bytes)")
