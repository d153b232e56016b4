"""Folding BatchNormalization into neighbouring linear nodes of ONNX models.

- `algebra`: the one fold formula, pure NumPy, float64.
- `graph`: per-graph indexes, constant evaluation, the pattern protocol and rewrite API.
- `into_producer`: Conv / ConvTranspose / Gemm / MatMul(+Add) -> BN.
- `into_consumer`: BN -> Conv / Gemm / MatMul.
- `decomposed`: per-channel Mul / Add / Sub chains (exporters' decomposed BN), ``decompose_rest``.
- `switches`: If nodes whose condition is known (constants, training-switch inputs such as
  tf2onnx's ``training:0``) replaced by the selected branch, run first by the fold pass;
  `conditions` evaluates conditions, `inlining` inlines branches and prunes what they leave.
- `fold_pass`: the pass that visits every graph and applies the patterns, in that order.
- `report`: `FoldReport` / `FoldEntry`, what happened to each BN.
"""

from __future__ import annotations

from bnfold.folding.fold_pass import fold
from bnfold.folding.report import FoldEntry, FoldReport

__all__ = ["fold", "FoldReport", "FoldEntry"]
