"""Folding BatchNormalization into neighbouring linear nodes of ONNX models.

- `algebra`: the fold formulas (Gemm's alpha / beta included), pure NumPy, float64.
- `linear_ops`: the one table of linear ops (weight axes, groups, how a node is rebuilt).
- `patterns`: the pattern protocol (`Skip`, `Invalid`, `ChainSkip`, `Rewrite`, `pattern`).
- `index`: per-graph producer / consumer index and the edits a rewrite makes; `context`: what
  the graphs of one model share (options, names, shape inference).
- `constants`: constant evaluation of initializers and small constant subgraphs.
- `tensors`: TensorProto <-> NumPy; `casting`: float64 results cast back, subnormals flushed.
- `batchnorm`: reading and validating BN parameters; `nodes`: attributes, labels, node copies.
- `finish`: the last step of every fold, and the tensor-map policy.
- `into_producer`: Conv / ConvTranspose / Gemm / MatMul(+Add) -> BN.
- `into_consumer`: BN -> Conv / Gemm / MatMul.
- `decomposed`: per-channel Mul / Add / Sub chains (exporters' decomposed BN), ``decompose_rest``.
- `fold_pass`: the pass that visits every graph and applies the patterns, in that order.
- `report`: `FoldReport` / `FoldEntry`, what happened to each BN.
"""

from __future__ import annotations

from bnfold.folding.fold_pass import fold
from bnfold.folding.report import FoldEntry, FoldReport

__all__ = ["fold", "FoldReport", "FoldEntry"]
