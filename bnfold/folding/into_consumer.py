"""Fold a BatchNormalization into the linear node that reads its output (BN in front of it).

With ``BN(x) = s * x + t`` per input channel ``c`` and a linear consumer
``y[o] = sum_{c, k} W[o, c, k] x[c, k] + b[o]``::

    W'[o, c, k] = W[o, c, k] * s[c]          b'[o] = b[o] + sum_{c, k} W[o, c, k] * t[c]

(`bnfold.folding.algebra.fold_affine_into_consumer`). Tried only after the fold into the producer
(`bnfold.folding.into_producer`) found nothing to fold into.

Rules (cited in the code as "rule N"):

1. The BN output feeds exactly one node, as its data input (input 0), and is not a graph output.
2. ``Conv``: the weight is (C_out, C_in/group, k...) (ONNX Conv spec), input channels are weight
   axis 1, and channel ``c`` belongs to group ``c // (C_in/group)``. Exact only if no padded
   zero enters a sum: explicit ``pads`` all zero, or ``auto_pad`` VALID, or ``auto_pad`` SAME_*
   with every kernel extent 1 (the SAME padding is then zero for any input size and stride).
   Otherwise skipped: padded zeros would not be normalized.
3. ``ConvTranspose`` is skipped: each output position sums a different set of kernel taps
   (fewer at the borders, and a stride-dependent subset inside), so the shift ``t`` does not
   become one bias per channel.
4. ``Gemm`` with ``transA = 0``: ``Y = alpha * A B + beta * C``, BN channels are the contraction
   axis (B axis 0, or 1 with ``transB``). ``B' = B * s`` (alpha stays), and
   ``C' = beta * C + alpha * (t B)`` with ``beta = 1``; ``C`` may be absent or any shape that
   broadcasts to (M, N). ``transA = 1`` makes BN's channel axis the row axis: skipped.
5. ``MatMul`` with a constant 2-D weight (K, N), when the BN input is known to be rank 2 (BN
   normalizes axis 1, the contraction axis only for rank 2): one ``Gemm(x, W', b')`` keeping
   the MatMul's name.
6. Weights, biases and BN parameters must be constants; folded values are computed in float64,
   cast once to the weight's dtype and checked for overflow (`bnfold.folding.casting.cast_folded`).

The axes come from `bnfold.folding.linear_ops.LINEAR_OPS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from bnfold.folding.algebra import (
    fold_affine_into_consumer,
    fold_affine_into_gemm_input,
)
from bnfold.folding.batchnorm import BatchNormParams, read_batchnorm
from bnfold.folding.casting import FLOAT_TYPES
from bnfold.folding.finish import bn_sources, cast_and_name, finish
from bnfold.folding.index import GraphIndex
from bnfold.folding.linear_ops import LINEAR_OPS, LinearOp, WeightLayout, linear_op
from bnfold.folding.nodes import get_attr, is_default, node_label
from bnfold.folding.patterns import Invalid, Rewrite, Skip, pattern

__all__ = ["PATTERNS", "fold_into_consumer"]


@pattern("bn-into-consumer", "BatchNormalization")
def fold_into_consumer(node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
    """Fold BN ``node`` into the Conv / Gemm / MatMul that reads its output."""
    y = node.output[0]
    if index.is_graph_output(y):
        return Skip(f"BN output '{y}' is a graph output")
    users = index.users(y)
    linear = [user for user in users if not _reads_dtype_for_bias_of(user, y, users, index)]
    if len(linear) != 1:
        return Skip(f"BN output '{y}' is read by {len(linear)} nodes, not one linear node")
    consumer = linear[0]
    op = linear_op(consumer)
    if op is None:
        return Skip(f"consumer {consumer.op_type} '{node_label(consumer)}' is not a linear node bnfold folds into")
    if consumer.input[0] != y or y in consumer.input[1:]:
        return Skip(f"BN output is not only the data input of {consumer.op_type} '{node_label(consumer)}'")  # rule 1
    params = read_batchnorm(node, index)
    if isinstance(params, Skip):
        return params
    return _FOLDS[op.op_type](node, consumer, op, params, index)


#: Ops through which a computed bias reaches its Conv / Gemm (see `_reads_dtype_for_bias_of`).
_BIAS_PATH_OPS = frozenset({"Expand", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"})


def _reads_dtype_for_bias_of(user: onnx.NodeProto, y: str, users, index: GraphIndex) -> bool:
    """Rule 1's one exception: ``CastLike(c, y)`` reads ``y`` for its element type only.

    PyTorch's ``dynamo=True`` exporter writes a missing bias of the layer after the BN as
    ``Expand(CastLike(0, y), shape)``. It is not a reader of the BN's values if its result
    reaches nothing but the bias input of another reader of ``y`` (which the fold replaces, so
    the whole computed bias is dropped with it).
    """
    if user.op_type != "CastLike" or not is_default(user) or list(user.input[1:]) != [y]:
        return False
    if user.input[0] == y:
        return False
    name = user.output[0]
    for _ in range(8):
        if index.is_graph_output(name):
            return False
        readers = index.users(name)
        if len(readers) != 1:
            return False
        (reader,) = readers
        is_bias = list(reader.input[2:3]) == [name] and name not in reader.input[:2]
        if is_bias and reader is not user and any(reader is u for u in users):
            return True
        if reader.op_type not in _BIAS_PATH_OPS or not is_default(reader):
            return False
        name = reader.output[0]
    return False


def _weight(index: GraphIndex, consumer: onnx.NodeProto, op: LinearOp, rank_note: str = "",
            ) -> tuple[str, np.ndarray, int] | Skip:
    """``(name, value, elem_type)`` of a constant float weight of the rank the op needs, or `Skip`."""
    name = op.weight_name(consumer)
    if not name:
        return Skip(f"{consumer.op_type} '{node_label(consumer)}' has no weight input")
    value = index.constant(name)
    if value is None:
        return Skip(f"weight is not constant: {index.constants.reason(name)}")
    elem_type = index.elem_type(name)
    if elem_type not in FLOAT_TYPES:
        return Skip(f"weight '{name}' has element type {elem_type}, not a float type")
    if not op.weight_rank_ok(value.ndim):
        return Skip(f"{op.op_type} weight '{name}' has rank {value.ndim}{rank_note}")
    return name, value, elem_type


def _contracted_weight(consumer: onnx.NodeProto, op: LinearOp, params: BatchNormParams, index: GraphIndex, *,
                       rank_note: str, unit: str) -> tuple[str, np.ndarray, int, WeightLayout] | Skip:
    """Gemm / MatMul weight whose contracted axis must hold the BN's channels (rules 4 and 5).

    A mismatch is `Invalid`: the BN output has as many channels as its parameters have values.
    """
    found = _weight(index, consumer, op, rank_note)
    if isinstance(found, Skip):
        return found
    weight_name, weight, elem_type = found
    layout = op.layout(consumer)
    if layout.input_channels(weight.shape) != params.channels:
        return Invalid(
            f"{op.op_type} '{node_label(consumer)}' contracts {weight.shape[layout.in_axis]} {unit} but the BN"
            f" parameters have {params.channels} values"
        )
    return weight_name, weight, elem_type, layout


def _bias(index: GraphIndex, consumer: onnx.NodeProto, op: LinearOp) -> tuple[str | None, np.ndarray | None] | Skip:
    name = op.bias_name(consumer)
    if name is None:
        return None, None
    value = index.constant(name)
    if value is None:
        return Skip(f"bias is not constant: {index.constants.reason(name)}")
    return name, value


def _conv_padding_reason(consumer: onnx.NodeProto, kernel: tuple[int, ...]) -> str | None:
    """Rule 2: why padded zeros could enter the convolution, or None."""
    auto_pad = get_attr(consumer, "auto_pad", b"NOTSET")  # ONNX Conv default: NOTSET (explicit pads)
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if all(k == 1 for k in kernel):
            return None
        return f"Conv auto_pad is {auto_pad}: padded zeros would not be normalized"
    if auto_pad == "VALID":
        return None
    pads = get_attr(consumer, "pads")
    if pads is not None and any(int(p) != 0 for p in pads):
        return "Conv pads are non-zero: padded zeros would not be normalized"
    return None


def _finish(node: onnx.NodeProto, consumer: onnx.NodeProto, params: BatchNormParams, index: GraphIndex, *,
            weight: tuple[str, np.ndarray], bias: tuple[str | None, np.ndarray], elem_type: int,
            make_node: Callable[[str, str], onnx.NodeProto]) -> Rewrite | Skip:
    """Cast the float64 results, reserve names, and build the Rewrite (rule 6).

    ``W' = W * s`` reads W, gamma and var; ``b' = b + W t`` reads b, W and every BN parameter.
    """
    (weight_name, weight64), (bias_name, bias64) = weight, bias
    folded = cast_and_name(index, weight64, bias64, elem_type, weight_name=weight_name, bias_name=bias_name,
                           hint=consumer.name or consumer.output[0])
    if isinstance(folded, Skip):
        return folded
    scale_from, shift_from = bn_sources(params)
    return finish(
        into=node_label(consumer), remove=[node], replace=[(consumer, [make_node(folded.weight, folded.bias)])],
        constants=folded.constants, subnormals=folded.subnormals,
        sources={folded.weight: [weight_name, *scale_from], folded.bias: [bias_name, weight_name, *shift_from]},
    )


def _fold_conv(node, consumer, op: LinearOp, params: BatchNormParams, index: GraphIndex) -> Rewrite | Skip:
    """Rule 2."""
    found = _weight(index, consumer, op)
    if isinstance(found, Skip):
        return found
    weight_name, weight, elem_type = found
    reason = _conv_padding_reason(consumer, tuple(weight.shape[2:]))
    if reason is not None:
        return Skip(reason)
    layout = op.layout(consumer)
    c_out, c_in = layout.output_channels(weight.shape), layout.input_channels(weight.shape)
    if c_in != params.channels:
        # The BN output has as many channels as its parameters have values (ONNX BatchNormalization:
        # (C,)), and Conv needs C = C_in/group * group: one of the two nodes is invalid.
        return Invalid(
            f"Conv '{node_label(consumer)}' reads {c_in} input channels (group {layout.groups})"
            f" but the BN parameters have {params.channels} values"
        )
    if c_out % layout.groups:
        return Skip(
            f"Conv '{node_label(consumer)}' has {c_out} output channels, not a multiple of group {layout.groups}"
        )
    found_bias = _bias(index, consumer, op)
    if isinstance(found_bias, Skip):
        return found_bias
    bias_name, bias = found_bias
    if bias is not None and bias.size not in (1, c_out):
        return Skip(f"Conv bias '{bias_name}' has shape {bias.shape}")
    bias_vec = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (c_out,))
    scale, shift = params.affine()
    weight64, bias64 = fold_affine_into_consumer(weight, bias_vec, scale, shift, in_axis=layout.in_axis,
                                                 out_axis=layout.out_axis, groups=layout.groups)
    return _finish(
        node, consumer, params, index, weight=(weight_name, weight64), bias=(bias_name, bias64),
        elem_type=elem_type,
        make_node=lambda w, b: op.rebuild(consumer, data=node.input[0], weight=w, bias=b, outputs=consumer.output),
    )


def _fold_conv_transpose(node, consumer, op: LinearOp, params: BatchNormParams, index: GraphIndex) -> Skip:
    """Rule 3."""
    return Skip(
        "ConvTranspose after BN: output positions sum different numbers of kernel taps, so the BN"
        " shift does not become one bias per channel"
    )


def _fold_gemm(node, consumer, op: LinearOp, params: BatchNormParams, index: GraphIndex) -> Rewrite | Skip:
    """Rule 4."""
    if index.opset("") < 7:
        return Skip("Gemm before opset 7 broadcasts C only with the 'broadcast' attribute")
    if int(get_attr(consumer, "transA", 0)):  # ONNX Gemm default: transA = 0
        return Skip("Gemm has transA=1: BN channels would be its rows, not the contraction axis")
    # Gemm's A is 2-D and (transA = 0) its axis 1, the BN channel axis, is contracted with B.
    found = _contracted_weight(consumer, op, params, index, rank_note="", unit="columns")
    if isinstance(found, Skip):
        return found
    weight_name, weight, elem_type, layout = found
    found_bias = _bias(index, consumer, op)
    if isinstance(found_bias, Skip):
        return found_bias
    bias_name, bias = found_bias
    n_out = layout.output_channels(weight.shape)
    if bias is not None and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, n_out))):
        return Skip(f"Gemm C '{bias_name}' of shape {bias.shape} does not broadcast to (M, {n_out})")
    scale, shift = params.affine()
    weight64, bias64 = fold_affine_into_gemm_input(weight, bias, scale, shift, in_axis=layout.in_axis,
                                                   out_axis=layout.out_axis, alpha=layout.alpha, beta=layout.beta)
    return _finish(
        node, consumer, params, index, weight=(weight_name, weight64), bias=(bias_name, bias64),
        elem_type=elem_type,
        make_node=lambda w, b: op.rebuild(consumer, data=node.input[0], weight=w, bias=b, outputs=consumer.output,
                                          absorbed=("beta",)),
    )


def _fold_matmul(node, consumer, op: LinearOp, params: BatchNormParams, index: GraphIndex) -> Rewrite | Skip:
    """Rule 5."""
    if index.opset("") < 7:
        return Skip("MatMul folding needs Gemm with a broadcasting bias (opset 7 or later)")
    rank = index.rank(node.input[0])
    if rank is None:
        rank = index.rank(node.output[0])
    if rank is None:
        return Skip(
            f"rank of BN input '{node.input[0]}' is unknown (BN channel axis 1 must be the MatMul's contraction axis)"
        )
    if rank != 2:
        return Skip(f"BN input has rank {rank}: BN normalizes axis 1, not the MatMul's contraction axis")
    # Rank 2: the BN channel axis 1 is the axis MatMul contracts with the weight's rows.
    found = _contracted_weight(consumer, op, params, index, rank_note=", not 2", unit="rows")
    if isinstance(found, Skip):
        return found
    weight_name, weight, elem_type, layout = found
    scale, shift = params.affine()
    weight64, bias64 = fold_affine_into_gemm_input(weight, None, scale, shift, in_axis=layout.in_axis,
                                                   out_axis=layout.out_axis)
    return _finish(
        node, consumer, params, index, weight=(weight_name, weight64), bias=(None, bias64),
        elem_type=elem_type,
        make_node=lambda w, b: op.rebuild(consumer, data=node.input[0], weight=w, bias=b, outputs=consumer.output),
    )


#: op type of the consumer -> its fold (the layout comes from `LINEAR_OPS`; the conditions differ).
_FOLDS = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
}
assert set(_FOLDS) == set(LINEAR_OPS), "every linear op needs a rule here"

PATTERNS = [fold_into_consumer]
