"""Fold a BatchNormalization into the linear node that produces its input.

Rules (cited in the code as "rule N"):

1. ``Conv -> BN``: the Conv weight is (C_out, C_in/group, k...) for any group, rank and
   padding, so output channels are weight axis 0 (ONNX Conv spec); the new bias is (C_out,).
2. ``ConvTranspose -> BN``: the weight is (C_in, C_out/group, k...); output channel
   ``o = g * (C_out/group) + j`` is ``weight[g*(C_in/group):(g+1)*(C_in/group), j]`` (ONNX
   ConvTranspose spec). The weight is viewed as (C_in/group, C_out, k...) to scale axis 1
   (`bnfold.folding.linear_ops.WeightLayout.output_view`).
3. ``Gemm -> BN``: ``Y = alpha * A' B' + beta * C`` is rank 2, BN channels are its columns
   (weight axis 1 if ``transB == 0``, else axis 0). ``alpha`` goes into the weight and
   ``beta`` into the bias, the output Gemm has ``alpha = beta = 1``. ``C`` may be absent, a
   scalar, (N,), (1, N), (M, 1) or (M, N): ``C' = shift + scale * beta * C`` is exact
   elementwise for every broadcastable shape. Gemm before opset 7 (``broadcast`` attribute) is
   skipped.
4. ``MatMul(A, W) [-> Add(bias)] -> BN`` with a constant 2-D ``W`` (K, N): folded only when
   the MatMul output is known to be rank 2, because BN normalizes axis 1 and for a (N, T, C)
   output that is T, not the weight's output axis. The result is one ``Gemm(A, W', b')`` that
   keeps the MatMul's name: rank 2 is then certain, the bias belongs to the linear node (one
   node instead of two or three), and Gemm accepts any broadcastable bias.
5. Conditions for every producer: the producer (and the bias Add) output feeds only the next
   node and is not a graph output; the weight, bias and BN parameters are constants; the
   channel counts agree; folded values are representable in the weight's dtype (computed in
   float64 by `bnfold.folding.algebra`, cast once, subnormals flushed to zero).

The axes come from `bnfold.folding.linear_ops.LINEAR_OPS`; `fold_into_linear` (rules 1 to 3) is
shared with the decomposed-BN chains of `bnfold.folding.decomposed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.algebra import fold_bias_general
from bnfold.folding.batchnorm import BatchNormParams, read_batchnorm
from bnfold.folding.casting import FLOAT_TYPES
from bnfold.folding.chunked import Cast, scale_and_cast
from bnfold.folding.finish import bn_sources, cast_and_name, finish
from bnfold.folding.index import GraphIndex
from bnfold.folding.linear_ops import LINEAR_OPS, LinearOp, linear_op
from bnfold.folding.nodes import is_default, node_label
from bnfold.folding.patterns import Invalid, Rewrite, Skip, pattern
from bnfold.folding.tensors import np_dtype

__all__ = ["PATTERNS", "LinearFold", "fold_into_producer", "fold_into_linear"]

Affine = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class LinearFold:
    """A linear producer rebuilt around a per-channel affine map of its output.

    ``nodes`` replace ``producer``; ``weight`` / ``bias`` are the original input names (``bias``
    None if there was none) and ``new_weight`` / ``new_bias`` the names of ``constants``.
    """

    producer: onnx.NodeProto
    nodes: list[onnx.NodeProto]
    weight: str
    bias: str | None
    new_weight: str
    new_bias: str
    constants: dict[str, np.ndarray]
    subnormals: int


def _sole_reader(index: GraphIndex, name: str, reader: onnx.NodeProto) -> Skip | None:
    reason = index.sole_consumer_reason(name, reader)
    return None if reason is None else Skip(f"producer output {reason}")


@pattern("linear-bn", "BatchNormalization")
def fold_into_producer(node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
    """Fold BN ``node`` into the Conv / ConvTranspose / Gemm / MatMul(+Add) that feeds it."""
    producer = index.producer.get(node.input[0])
    if producer is None:
        return Skip("BN input is not computed by a node of this graph")
    bias_add = None
    if producer.op_type == "Add" and is_default(producer):
        # rule 4: MatMul -> Add(constant) -> BN
        bias_add = producer
        matmul_out = _matmul_side(index, bias_add)
        if matmul_out is None:
            return Skip(f"producer is Add '{node_label(bias_add)}' not fed by a MatMul and a constant")
        skip = _sole_reader(index, bias_add.output[0], node)
        if skip:
            return skip
        producer = index.producer[matmul_out]
    op = linear_op(producer)
    if op is None:
        return Skip(f"producer {producer.op_type} '{node_label(producer)}' is not a linear node bnfold folds into")
    skip = _sole_reader(index, producer.output[0], bias_add if bias_add is not None else node)
    if skip:
        return skip
    params = read_batchnorm(node, index)
    if isinstance(params, Skip):
        return params
    if op.op_type == "MatMul":
        folded = _fold_matmul(node, producer, bias_add, params, index)
    else:
        folded = fold_into_linear(producer, params.affine(), params.channels, index, output=node.output[0])
    if isinstance(folded, Skip):
        return folded
    into = node_label(producer) if producer.name or op.op_type != "MatMul" else f"<Gemm -> {node.output[0]}>"
    scale_from, shift_from = bn_sources(params)
    return finish(
        into=into, remove=[node] if bias_add is None else [node, bias_add], replace=[(producer, folded.nodes)],
        constants=folded.constants, subnormals=folded.subnormals,
        sources={folded.new_weight: [folded.weight, *scale_from], folded.new_bias: [folded.bias, *shift_from]},
    )


def _matmul_side(index: GraphIndex, add: onnx.NodeProto) -> str | None:
    """The Add input computed by a MatMul, if the other Add input is constant."""
    if len(add.input) != 2:
        return None
    for mine, other in ((0, 1), (1, 0)):
        source = index.producer.get(add.input[mine])
        if source is not None and source.op_type == "MatMul" and index.constant(add.input[other]) is not None:
            return add.input[mine]
    return None


def _float_weight(index: GraphIndex, name: str) -> int | Skip:
    elem_type = index.elem_type(name)
    if elem_type not in FLOAT_TYPES:
        return Skip(f"weight '{name}' has element type {elem_type}, not a float type")
    return elem_type


def _weight_and_bias(producer: onnx.NodeProto, op: LinearOp, index: GraphIndex):
    """``(weight_name, bias_name, weight, bias, elem_type)`` (the bias is optional), or `Skip` if
    they are not constant floats."""
    weight_name = op.weight_name(producer)
    bias_name = op.bias_name(producer)
    values = index.constants.fetch(weight=weight_name, bias=bias_name)
    if isinstance(values, Skip):
        return values
    elem_type = _float_weight(index, weight_name)
    if isinstance(elem_type, Skip):
        return elem_type
    return weight_name, bias_name, values["weight"], values["bias"], elem_type


def fold_into_linear(producer: onnx.NodeProto, affine: Affine, channels: int, index: GraphIndex, *,
                     output: str) -> LinearFold | Skip:
    """Fold the per-channel map ``y = scale * z + shift`` (``affine``, ``channels`` values) of the
    output ``z`` of Conv / ConvTranspose / Gemm ``producer`` into its weight and bias (rules 1-3);
    the rebuilt producer writes ``output``."""
    op = LINEAR_OPS[producer.op_type]
    if op.bias_broadcasts and index.opset("") < 7:
        return Skip("Gemm before opset 7 broadcasts C only with the 'broadcast' attribute")
    read = _weight_and_bias(producer, op, index)
    if isinstance(read, Skip):
        return read
    weight_name, bias_name, weight, bias, elem_type = read
    if not op.weight_rank_ok(weight.ndim):
        return Skip(f"{op.op_type} weight '{weight_name}' has rank {weight.ndim}")
    layout = op.layout(producer)
    if layout.grouped == "out" and weight.shape[0] % layout.groups:
        return Skip(f"{op.op_type} weight '{weight_name}' axis 0 ({weight.shape[0]}) not divisible by group"
                    f" {layout.groups}")
    view, axis, restore = layout.output_view(weight)
    found = view.shape[axis]
    if found != channels:
        return Invalid(f"{op.op_type} '{node_label(producer)}' has {found} {op.channel_word} but the BN"
                       f" parameters have {channels} values")
    if bias is not None:
        if op.bias_broadcasts and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels))):
            return Skip(f"Gemm C '{bias_name}' of shape {bias.shape} does not broadcast to (M, {channels})")
        if not op.bias_broadcasts:
            if bias.size not in (1, channels):
                return Skip(f"{op.op_type} bias '{bias_name}' has shape {bias.shape}")
            bias = np.asarray(bias).reshape(-1)
    scale, shift = affine
    # W' = alpha * W * scale, block by block (bnfold.folding.chunked); C' as fold_affine_general.
    new_weight = scale_and_cast(view, scale, axis=axis, dtype=np_dtype(elem_type),
                                alpha=None if layout.alpha == 1.0 else layout.alpha,
                                scratch=index.ctx.workspace, defer=view is weight)
    if isinstance(new_weight, Cast):
        new_weight = Cast(restore(new_weight.array), new_weight.flushed)
    bias64 = fold_bias_general(bias, scale, shift, beta=layout.beta)
    folded = cast_and_name(index, new_weight, bias64, elem_type, weight_name=weight_name, bias_name=bias_name,
                           hint=producer.name or output)
    if isinstance(folded, Skip):
        return folded
    node = op.rebuild(producer, data=producer.input[0], weight=folded.weight, bias=folded.bias, outputs=[output],
                      absorbed=op.scalars)
    return LinearFold(producer=producer, nodes=[node], weight=weight_name, bias=bias_name, new_weight=folded.weight,
                      new_bias=folded.bias, constants=folded.constants, subnormals=folded.subnormals)


def _fold_matmul(node, matmul, bias_add, params: BatchNormParams, index: GraphIndex) -> LinearFold | Skip:
    """Rule 4."""
    if index.opset("") < 7:
        return Skip("MatMul folding needs Gemm with broadcasting bias (opset 7 or later)")
    if len(matmul.input) != 2:
        return Skip("MatMul does not have two inputs")
    data_name, weight_name = matmul.input[0], matmul.input[1]
    rank = index.rank(matmul.output[0])
    if rank is None:
        rank = index.rank(data_name)  # with a 2-D weight, MatMul keeps the rank of A
    if rank is None:
        return Skip(
            f"rank of MatMul '{node_label(matmul)}' output is unknown (BN channel axis 1 must be its last axis)"
        )
    if rank != 2:
        return Skip(
            f"MatMul '{node_label(matmul)}' output has rank {rank}: BN normalizes axis 1, not the weight's output axis"
        )
    weight = index.constant(weight_name)
    if weight is None:
        return Skip(f"weight is not constant: {index.constants.reason(weight_name)}")
    if weight.ndim != 2:
        return Skip(f"MatMul weight '{weight_name}' has rank {weight.ndim}, not 2")
    elem_type = _float_weight(index, weight_name)
    if isinstance(elem_type, Skip):
        return elem_type
    layout = LINEAR_OPS["MatMul"].layout(matmul)
    if weight.shape[layout.out_axis] != params.channels:
        message = (f"MatMul '{node_label(matmul)}' has {weight.shape[layout.out_axis]} output columns but the BN"
                   " parameters have")
        if bias_add is None or weight.shape[layout.out_axis] != 1:
            # Rank 2: BN's channel axis 1 is the weight's output axis; a bias Add can broadcast
            # a single column to C, never change C columns into another number.
            return Invalid(f"{message} {params.channels} values")
        return Skip(f"{message} {params.channels} values (the bias Add broadcasts the single column)")
    bias_name = None
    bias = None
    if bias_add is not None:
        bias_name = bias_add.input[1] if bias_add.input[0] == matmul.output[0] else bias_add.input[0]
        if bias_name == matmul.output[0]:
            return Skip("Add adds the MatMul output to itself")
        bias = np.asarray(index.constant(bias_name))
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, params.channels)):
            return Skip(f"bias '{bias_name}' of shape {bias.shape} does not broadcast to (M, {params.channels})")
    scale, shift = params.affine()
    new_weight = scale_and_cast(weight, scale, axis=layout.out_axis, dtype=np_dtype(elem_type),
                                scratch=index.ctx.workspace, defer=True)
    folded = cast_and_name(index, new_weight, fold_bias_general(bias, scale, shift), elem_type,
                           weight_name=weight_name, bias_name=bias_name, hint=matmul.name or node.output[0])
    if isinstance(folded, Skip):
        return folded
    gemm = LINEAR_OPS["MatMul"].rebuild(matmul, data=data_name, weight=folded.weight, bias=folded.bias,
                                        outputs=[node.output[0]])
    return LinearFold(producer=matmul, nodes=[gemm], weight=weight_name, bias=bias_name, new_weight=folded.weight,
                      new_bias=folded.bias, constants=folded.constants, subnormals=folded.subnormals)


PATTERNS = [fold_into_producer]
