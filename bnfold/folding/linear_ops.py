"""The one table of linear ops: where each keeps its channels and how it is rebuilt.

Every fold (into the producer, into the consumer, decomposed chains) reads the layout of the
linear node from `LINEAR_OPS`; none of them knows an op's axes by itself.

=============  ===============  ==========  =========  ======  =============================
op             weight (input 1)  out axis    in axis    groups  output channel axis
=============  ===============  ==========  =========  ======  =============================
Conv           (C_out, C_in/g,   0           1          in      1 (N, C, ...)
               k...)
ConvTranspose  (C_in, C_out/g,   1           0          out     1
               k...)
Gemm           (K, N), or (N, K) 1, or 0     0, or 1    -       1 (rank 2)
               with transB
MatMul         (K, N)            1           0          -       last
=============  ===============  ==========  =========  ======  =============================

(ONNX Conv, ConvTranspose, Gemm and MatMul specs.) "groups in": the weight holds one group's
``C_in / group`` input channels, and output channel ``o`` of group ``g = o // (C_out / group)``
reads input channels ``g * (C_in / group) + c``. "groups out": the weight holds one group's
``C_out / group`` output channels; output channel ``o = g * (C_out / group) + j`` is
``weight[g * (C_in / group):(g + 1) * (C_in / group), j]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.nodes import get_attr, is_default, replace_node

__all__ = ["WeightLayout", "LinearOp", "LINEAR_OPS", "linear_op"]


@dataclass(frozen=True)
class WeightLayout:
    """The channel axes of one node's weight, its attributes read.

    Attributes
    ----------
    out_axis, in_axis : int
        Weight axes indexing output and input channels (per group on the grouped axis).
    groups : int
    grouped : {"in", "out"} or None
        Which axis holds only one group's channels.
    alpha, beta : float
        Gemm's factors of the product and of C (1 for every other op).
    """

    out_axis: int
    in_axis: int
    groups: int = 1
    grouped: str | None = None
    alpha: float = 1.0
    beta: float = 1.0

    def output_channels(self, shape: Sequence[int]) -> int:
        return int(shape[self.out_axis]) * (self.groups if self.grouped == "out" else 1)

    def input_channels(self, shape: Sequence[int]) -> int:
        return int(shape[self.in_axis]) * (self.groups if self.grouped == "in" else 1)

    def output_view(self, weight: np.ndarray) -> tuple[np.ndarray, int, Callable[[np.ndarray], np.ndarray]]:
        """``(view, axis, restore)``: ``weight`` seen with all output channels on ``axis``.

        Only grouped output channels (ConvTranspose with ``group > 1``) need a different view:
        (C_in, C_out/g, k...) -> (g, C_in/g, C_out/g, k...) -> (C_in/g, g, C_out/g, k...) ->
        (C_in/g, C_out, k...), whose axis 1 is ``o = g * (C_out/g) + j``. ``restore`` maps an
        array of the view's shape back to the weight's layout.
        """
        if self.grouped != "out" or self.groups == 1:
            return weight, self.out_axis, lambda w: w
        group = self.groups
        c_in, c_out_g, *kernel = weight.shape
        c_in_g = c_in // group
        perm = (1, 0, 2, *range(3, 3 + len(kernel)))
        view = weight.reshape(group, c_in_g, c_out_g, *kernel).transpose(perm).reshape(c_in_g, group * c_out_g, *kernel)

        def restore(w: np.ndarray) -> np.ndarray:
            return w.reshape(c_in_g, group, c_out_g, *kernel).transpose(perm).reshape(c_in, c_out_g, *kernel)

        return view, 1, restore


@dataclass(frozen=True)
class LinearOp:
    """How one linear op type stores its channels (see the module table).

    Attributes
    ----------
    op_type : str
    weight_rank : int or None
        The weight's rank (2), or None for "at least 3" (convolutions: (C, C, k...)).
    out_axis, in_axis : int
        Weight axes of output / input channels (before ``transposed_by``).
    grouped : {"in", "out"} or None
        Which weight axis the ``group`` attribute divides.
    transposed_by : str or None
        An attribute that, when 1, swaps the two weight axes (Gemm's ``transB``).
    has_bias : bool
        Input 2 is an optional bias (Conv, ConvTranspose: (C_out,); Gemm: C).
    bias_broadcasts : bool
        The bias is any shape that broadcasts to the (M, N) output (Gemm's C), not (C_out,).
    scalars : tuple of str
        Attributes scaling the product and the bias (Gemm's ``alpha``, ``beta``; default 1).
    output_axis : int
        Channel axis of the node's output: 1 (N, C, ...) or -1 (MatMul: the last axis).
    channel_word : str
        What the report calls the weight's output channels ("output channels", "output columns").
    """

    op_type: str
    weight_rank: int | None
    out_axis: int
    in_axis: int
    grouped: str | None = None
    transposed_by: str | None = None
    has_bias: bool = True
    bias_broadcasts: bool = False
    scalars: tuple[str, ...] = ()
    output_axis: int = 1
    channel_word: str = "output channels"

    def layout(self, node: onnx.NodeProto) -> WeightLayout:
        """The weight layout of ``node`` (reads ``group`` / ``transB``; ONNX defaults 1 and 0)."""
        out_axis, in_axis = self.out_axis, self.in_axis
        if self.transposed_by and int(get_attr(node, self.transposed_by, 0)):
            out_axis, in_axis = in_axis, out_axis
        groups = int(get_attr(node, "group", 1)) if self.grouped else 1
        # ONNX Gemm defaults: alpha = beta = 1.
        alpha, beta = (float(get_attr(node, name, 1.0)) for name in self.scalars) if self.scalars else (1.0, 1.0)
        return WeightLayout(out_axis=out_axis, in_axis=in_axis, groups=groups, grouped=self.grouped, alpha=alpha,
                            beta=beta)

    def weight_rank_ok(self, ndim: int) -> bool:
        return ndim == self.weight_rank if self.weight_rank is not None else ndim >= 3

    def output_rank(self, weight_ndim: int) -> int | None:
        """Rank of the node's output when the weight's rank fixes it (convolutions, Gemm)."""
        if self.weight_rank is None:
            return weight_ndim
        return 2 if self.op_type == "Gemm" else None

    @staticmethod
    def weight_name(node: onnx.NodeProto) -> str:
        return node.input[1] if len(node.input) > 1 else ""

    def bias_name(self, node: onnx.NodeProto) -> str | None:
        return node.input[2] if self.has_bias and len(node.input) > 2 and node.input[2] else None

    def rebuild(self, node: onnx.NodeProto, *, data: str, weight: str, bias: str, outputs: Sequence[str],
                absorbed: Sequence[str] = ()) -> onnx.NodeProto:
        """``node`` computing ``data @ weight + bias`` into ``outputs``.

        ``absorbed``: attributes whose effect the new weight and bias already carry (Gemm's
        ``alpha`` / ``beta``). A MatMul becomes a Gemm with its name: the bias then belongs to the
        linear node, and Gemm accepts any bias that broadcasts to (M, N).
        """
        if self.op_type != "MatMul":
            return replace_node(node, inputs=[data, weight, bias], outputs=outputs, drop_attrs=absorbed)
        gemm = onnx.helper.make_node("Gemm", [data, weight, bias], list(outputs), name=node.name)
        if node.doc_string:
            gemm.doc_string = node.doc_string
        return gemm


#: op type -> layout; the one place that knows which axis of which weight holds which channels.
LINEAR_OPS: dict[str, LinearOp] = {
    "Conv": LinearOp("Conv", weight_rank=None, out_axis=0, in_axis=1, grouped="in"),
    "ConvTranspose": LinearOp("ConvTranspose", weight_rank=None, out_axis=1, in_axis=0, grouped="out"),
    "Gemm": LinearOp("Gemm", weight_rank=2, out_axis=1, in_axis=0, transposed_by="transB", bias_broadcasts=True,
                     scalars=("alpha", "beta"), channel_word="output columns"),
    "MatMul": LinearOp("MatMul", weight_rank=2, out_axis=1, in_axis=0, has_bias=False, output_axis=-1,
                       channel_word="output columns"),
}


def linear_op(node: onnx.NodeProto) -> LinearOp | None:
    """The `LinearOp` of ``node``, or None if it is not a linear op of the default domain."""
    return LINEAR_OPS.get(node.op_type) if is_default(node) else None
