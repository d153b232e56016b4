"""Fold a BatchNormalization into the linear node that produces its input.

Rules (cited in the code as "rule N"):

1. ``Conv -> BN``: the Conv weight is (C_out, C_in/group, k...) for any group, rank and
   padding, so output channels are weight axis 0 (ONNX Conv spec); the new bias is (C_out,).
2. ``ConvTranspose -> BN``: the weight is (C_in, C_out/group, k...); output channel
   ``o = g * (C_out/group) + j`` is ``weight[g*(C_in/group):(g+1)*(C_in/group), j]`` (ONNX
   ConvTranspose spec). The weight is viewed as (C_in/group, C_out, k...) to scale axis 1.
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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.algebra import fold_bias
from bnfold.folding.chunked import Cast, Deferred, scale_and_cast
from bnfold.folding.graph import (
    BatchNormParams,
    GraphIndex,
    Invalid,
    Rewrite,
    Skip,
    get_attr,
    node_label,
    np_dtype,
    pattern,
    replace_node,
)

__all__ = ["PATTERNS", "PRODUCERS", "ProducerSpec", "fold_into_producer", "fold_affine_into_linear"]

_FLOATS = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)


@dataclass(frozen=True)
class ProducerSpec:
    """How a linear producer stores its output channels.

    ``channel_axis`` is the weight axis that indexes output channels; ``grouped_axis_1`` marks
    ConvTranspose, whose output channels are split across ``group`` blocks of axis 0 (rule 2).
    ``transposed_attr`` names the attribute that moves the channel axis from 1 to 0 (Gemm's
    ``transB``, rule 3).
    """

    weight_rank: int | None
    channel_axis: int
    grouped_axis_1: bool = False
    transposed_attr: str | None = None


#: op type -> output-channel layout of the weight (input 1). The one table producers differ by.
PRODUCERS: dict[str, ProducerSpec] = {
    "Conv": ProducerSpec(weight_rank=None, channel_axis=0),
    "ConvTranspose": ProducerSpec(weight_rank=None, channel_axis=1, grouped_axis_1=True),
    "Gemm": ProducerSpec(weight_rank=2, channel_axis=1, transposed_attr="transB"),
    "MatMul": ProducerSpec(weight_rank=2, channel_axis=1),
}


def _channel_view(weight: np.ndarray, spec: ProducerSpec, node: onnx.NodeProto):
    """``(view, axis, restore)``: a view of ``weight`` whose ``axis`` indexes output channels."""
    if spec.transposed_attr and int(get_attr(node, spec.transposed_attr, 0)):
        return weight, 0, lambda w: w
    if not spec.grouped_axis_1:
        return weight, spec.channel_axis, lambda w: w
    group = int(get_attr(node, "group", 1))
    c_in, c_out_g, *kernel = weight.shape
    if group == 1:
        return weight, 1, lambda w: w
    c_in_g = c_in // group
    # (C_in, C_out/g, k...) -> (g, C_in/g, C_out/g, k...) -> (C_in/g, g, C_out/g, k...) ->
    # (C_in/g, C_out, k...): axis 1 is now o = g * (C_out/g) + j.
    perm = (1, 0, 2, *range(3, 3 + len(kernel)))
    view = weight.reshape(group, c_in_g, c_out_g, *kernel).transpose(perm).reshape(c_in_g, group * c_out_g, *kernel)

    def restore(w: np.ndarray) -> np.ndarray:
        return w.reshape(c_in_g, group, c_out_g, *kernel).transpose(perm).reshape(c_in, c_out_g, *kernel)

    return view, 1, restore


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
    if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        # rule 4: MatMul -> Add(constant) -> BN
        bias_add = producer
        matmul_out = _matmul_side(index, bias_add)
        if matmul_out is None:
            return Skip(f"producer is Add '{node_label(bias_add)}' not fed by a MatMul and a constant")
        skip = _sole_reader(index, bias_add.output[0], node)
        if skip:
            return skip
        producer = index.producer[matmul_out]
    spec = PRODUCERS.get(producer.op_type) if producer.domain in ("", "ai.onnx") else None
    if spec is None:
        return Skip(f"producer {producer.op_type} '{node_label(producer)}' is not a linear node bnfold folds into")
    skip = _sole_reader(index, producer.output[0], bias_add if bias_add is not None else node)
    if skip:
        return skip
    params = index.read_batchnorm(node)
    if isinstance(params, Skip):
        return params
    if producer.op_type == "MatMul":
        return _fold_matmul(node, producer, bias_add, params, spec, index)
    return fold_affine_into_linear(node, producer, params, index)


def fold_affine_into_linear(node: onnx.NodeProto, producer: onnx.NodeProto, params: BatchNormParams,
                            index: GraphIndex) -> Rewrite | Skip:
    """Fold the per-channel affine map ``params`` on the output of Conv / ConvTranspose / Gemm
    ``producer`` into its weight and bias (rules 1-3); the rewritten producer writes ``node``'s
    output.

    ``params`` is a `BatchNormParams` or any object with its ``channels``, ``affine()`` and
    ``names`` (the decomposed-BN pattern passes its collapsed Mul/Add chain this way).
    """
    spec = PRODUCERS[producer.op_type]
    if producer.op_type == "Gemm":
        return _fold_gemm(node, producer, params, spec, index)
    return _fold_conv(node, producer, params, spec, index)


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
    if elem_type not in _FLOATS:
        return Skip(f"weight '{name}' has element type {elem_type}, not a float type")
    return elem_type


def _weight_and_bias(producer: onnx.NodeProto, index: GraphIndex):
    """``(weight_name, bias_name, weight, bias, elem_type)`` of a Conv / ConvTranspose / Gemm
    (inputs 1 and 2; the bias is optional), or `Skip` if they are not constant floats."""
    weight_name = producer.input[1] if len(producer.input) > 1 else ""
    bias_name = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
    values = index.fetch(weight=weight_name, bias=bias_name)
    if isinstance(values, Skip):
        return values
    elem_type = _float_weight(index, weight_name)
    if isinstance(elem_type, Skip):
        return elem_type
    return weight_name, bias_name, values["weight"], values["bias"], elem_type


def _restored(weight: Cast | Deferred | str, restore) -> Cast | Deferred | str:
    """The folded weight back in the producer's layout (ConvTranspose groups), or the reason
    (a `Deferred` weight is only made from the weight itself, never from a rearranged view)."""
    return Cast(restore(weight.array), weight.flushed) if isinstance(weight, Cast) else weight


def _finish(
    index: GraphIndex,
    params: BatchNormParams,
    weight64: Cast | Deferred | str,
    bias64: np.ndarray,
    elem_type: int,
    *,
    weight_name: str,
    bias_name: str | None,
    hint: str,
) -> tuple[dict[str, np.ndarray], dict[str, str], tuple[str, str], int] | Skip:
    """Cast the float64 fold results, reserve names, and build ``constants`` / ``tensor_map``."""
    folded = index.folded_tensors(weight64, bias64, elem_type, weight_name=weight_name, bias_name=bias_name,
                                  hint=hint)
    if isinstance(folded, Skip):
        return folded
    new_w, new_b = folded.weight, folded.bias
    tensor_map = {weight_name: new_w}
    if bias_name:
        tensor_map[bias_name] = new_b
    names = params.names
    # gamma scales the weight; beta, mean (and var, through the weight too) end up in the bias.
    tensor_map.setdefault(names["scale"], new_w)
    for role in ("bias", "mean", "var"):
        tensor_map.setdefault(names[role], new_b)
    return folded.constants, tensor_map, (new_w, new_b), folded.subnormals


def _fold_conv(node, producer, params: BatchNormParams, spec: ProducerSpec, index: GraphIndex):
    """Rules 1 and 2."""
    read = _weight_and_bias(producer, index)
    if isinstance(read, Skip):
        return read
    weight_name, bias_name, weight, bias, elem_type = read
    if weight.ndim < 3:
        return Skip(f"{producer.op_type} weight '{weight_name}' has rank {weight.ndim}")
    group = int(get_attr(producer, "group", 1))
    if spec.grouped_axis_1 and weight.shape[0] % group:
        return Skip(f"ConvTranspose weight '{weight_name}' axis 0 ({weight.shape[0]}) not divisible by group {group}")
    view, axis, restore = _channel_view(weight, spec, producer)
    channels = view.shape[axis]
    if channels != params.channels:
        return Invalid(f"{producer.op_type} '{node_label(producer)}' has {channels} output channels but the BN"
                       f" parameters have {params.channels} values")
    if bias is not None and bias.size not in (1, channels):
        return Skip(f"{producer.op_type} bias '{bias_name}' has shape {bias.shape}")
    scale, shift = params.affine()
    bias_vec = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (channels,))
    new_weight = scale_and_cast(view, scale, axis=axis, dtype=np_dtype(elem_type), scratch=index.ctx.workspace,
                                defer=view is weight)
    done = _finish(
        index, params, _restored(new_weight, restore), fold_bias(bias_vec, scale, shift), elem_type,
        weight_name=weight_name, bias_name=bias_name, hint=producer.name or node.output[0],
    )
    if isinstance(done, Skip):
        return done
    constants, tensor_map, (new_w, new_b), flushed = done
    new_node = replace_node(producer, inputs=[producer.input[0], new_w, new_b], outputs=[node.output[0]])
    return Rewrite(
        into=node_label(producer), remove=[node], replace=[(producer, [new_node])],
        constants=constants, tensor_map=tensor_map, subnormals=flushed,
    )


def _fold_gemm(node, producer, params: BatchNormParams, spec: ProducerSpec, index: GraphIndex):
    """Rule 3."""
    if index.opset("") < 7:
        return Skip("Gemm before opset 7 broadcasts C only with the 'broadcast' attribute")
    read = _weight_and_bias(producer, index)
    if isinstance(read, Skip):
        return read
    weight_name, bias_name, weight, bias, elem_type = read
    if weight.ndim != 2:
        return Skip(f"Gemm weight '{weight_name}' has rank {weight.ndim}")
    view, axis, restore = _channel_view(weight, spec, producer)
    if view.shape[axis] != params.channels:
        return Invalid(f"Gemm '{node_label(producer)}' has {view.shape[axis]} output columns but the BN"
                       f" parameters have {params.channels} values")
    # ONNX Gemm defaults: alpha = beta = 1.
    alpha = float(get_attr(producer, "alpha", 1.0))
    beta = float(get_attr(producer, "beta", 1.0))
    c64 = None
    if bias is not None:
        c64 = beta * np.asarray(bias, dtype=np.float64)
        if c64.ndim > 2 or (c64.ndim >= 1 and c64.shape[-1] not in (1, params.channels)):
            return Skip(f"Gemm C '{bias_name}' of shape {bias.shape} does not broadcast to (M, {params.channels})")
        if c64.ndim < 2:
            # scalar, (1,) or (N,): one value per column.
            c64 = np.broadcast_to(c64.reshape(-1), (params.channels,))
    scale, shift = params.affine()
    new_weight = scale_and_cast(view, scale, axis=axis, dtype=np_dtype(elem_type), alpha=alpha,
                                scratch=index.ctx.workspace, defer=view is weight)
    done = _finish(
        index, params, _restored(new_weight, restore), fold_bias(c64, scale, shift), elem_type,
        weight_name=weight_name, bias_name=bias_name, hint=producer.name or node.output[0],
    )
    if isinstance(done, Skip):
        return done
    constants, tensor_map, (new_w, new_b), flushed = done
    new_node = replace_node(
        producer, inputs=[producer.input[0], new_w, new_b], outputs=[node.output[0]], drop_attrs=("alpha", "beta")
    )
    return Rewrite(
        into=node_label(producer), remove=[node], replace=[(producer, [new_node])],
        constants=constants, tensor_map=tensor_map, subnormals=flushed,
    )


def _fold_matmul(node, matmul, bias_add, params: BatchNormParams, spec: ProducerSpec, index: GraphIndex):
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
        return Skip(f"rank of MatMul '{node_label(matmul)}' output is unknown (BN channel axis 1 must be its last axis)")
    if rank != 2:
        return Skip(
            f"MatMul '{node_label(matmul)}' output has rank {rank}: BN normalizes axis 1, not the weight's output axis"
        )
    weight = index.constant(weight_name)
    if weight is None:
        return Skip(f"weight is not constant: {index.nonconstant_reason(weight_name)}")
    if weight.ndim != 2:
        return Skip(f"MatMul weight '{weight_name}' has rank {weight.ndim}, not 2")
    elem_type = _float_weight(index, weight_name)
    if isinstance(elem_type, Skip):
        return elem_type
    if weight.shape[1] != params.channels:
        message = f"MatMul '{node_label(matmul)}' has {weight.shape[1]} output columns but the BN parameters have"
        if bias_add is None or weight.shape[1] != 1:
            # Rank 2: BN's channel axis 1 is the weight's output axis; a bias Add can broadcast
            # a single column to C, never change C columns into another number.
            return Invalid(f"{message} {params.channels} values")
        return Skip(f"{message} {params.channels} values (the bias Add broadcasts the single column)")
    bias_name = None
    b64 = None
    if bias_add is not None:
        bias_name = bias_add.input[1] if bias_add.input[0] == matmul.output[0] else bias_add.input[0]
        if bias_name == matmul.output[0]:
            return Skip("Add adds the MatMul output to itself")
        b64 = np.asarray(index.constant(bias_name), dtype=np.float64)
        if b64.ndim > 2 or (b64.ndim >= 1 and b64.shape[-1] not in (1, params.channels)):
            return Skip(f"bias '{bias_name}' of shape {b64.shape} does not broadcast to (M, {params.channels})")
        if b64.ndim < 2:
            b64 = np.broadcast_to(b64.reshape(-1), (params.channels,))
    scale, shift = params.affine()
    new_weight = scale_and_cast(weight, scale, axis=spec.channel_axis, dtype=np_dtype(elem_type),
                                scratch=index.ctx.workspace, defer=True)
    done = _finish(
        index, params, new_weight, fold_bias(b64, scale, shift), elem_type,
        weight_name=weight_name, bias_name=bias_name, hint=matmul.name or node.output[0],
    )
    if isinstance(done, Skip):
        return done
    constants, tensor_map, (new_w, new_b), flushed = done
    gemm = onnx.helper.make_node("Gemm", [data_name, new_w, new_b], [node.output[0]], name=matmul.name)
    if matmul.doc_string:
        gemm.doc_string = matmul.doc_string
    remove = [node] if bias_add is None else [node, bias_add]
    return Rewrite(
        into=node_label(matmul) if matmul.name else f"<Gemm -> {node.output[0]}>",
        remove=remove, replace=[(matmul, [gemm])],
        constants=constants, tensor_map=tensor_map, subnormals=flushed,
    )


PATTERNS = [fold_into_producer]
