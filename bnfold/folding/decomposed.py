"""Decomposed BN (per-channel Mul / Add / Sub / Div by constants) and ``decompose_rest``.

Some exporters write an inference-mode BN as elementwise ops instead of a BatchNormalization
node. Keras 3's ``model.export(format="onnx")`` (torch backend) writes every BN as
``Sub(mean) -> Mul(gamma / sqrt(var + eps)) -> Add(beta)`` by constants of shape (1, ..., C),
with no-op Casts between the ops, its Dense bias as one more ``Add``, and for channels-last
convolutions ``Conv -> Transpose(0, 2, 3, 1) -> ...``. Such a chain is one per-channel affine
map ``y = scale * z + shift`` of the producer's output ``z`` and folds into the producer with
the same algebra as a BN node (`bnfold.folding.algebra.fold_affine`).

Rules (cited in the code as "rule N"):

1. Anchor: a linear producer (Conv, ConvTranspose, Gemm, MatMul with a constant 2-D weight).
   Its output channel axis is 1 (Conv, ConvTranspose, Gemm: ONNX specs) or the last axis
   (MatMul ``A @ W``: columns of ``W``).
2. The chain follows the producer's output through nodes that each feed only the next one (no
   intermediate value is a graph output or has another reader): ``Cast`` to the producer's own
   element type and ``Identity`` (no-ops), ``Transpose`` (moves the channel axis: tracked
   through ``perm``), and ``Add`` / ``Mul`` / ``Sub`` (either operand order) or ``Div`` (``z / c``,
   ``c`` without zeros) by a constant ``c`` that is one value per channel: every axis of ``c`` has
   length 1 except, right-aligned with the value, the channel axis (length 1 or C); ``c`` has no
   more axes than the value (so broadcasting never changes the value's shape).
3. The chain ends at its last Add / Mul / Sub / Div or BN; it is a BN-like chain, folded and reported,
   only if it scales (has a Mul or Div): a bare bias Add is not a BN, and is left to rule 4 of
   `bnfold.folding.into_producer` or to the model as it is.
4. The collapsed ``(scale, shift)`` (float64) is folded into the producer by
   `bnfold.folding.into_producer.fold_into_linear` for Conv / ConvTranspose / Gemm; a MatMul becomes
   ``MatMul(A, W') -> Add(b')`` (exact for any rank of ``A``: the bias broadcasts along the last
   axis, which is the channel axis). The chain's Transposes are kept, in order, after the
   producer; its Casts, Identities and arithmetic nodes are removed; the chain's final value
   keeps its name. The report entry is named after the chain's first Sub / Mul / Div; that
   name in ``exclude`` leaves the chain as it is.
5. ``decompose_rest``: a BN that nothing could fold (inference mode, constant parameters, known
   input rank >= 2) becomes ``Mul(x, s) -> Add(., t)`` with ``s``, ``t`` of shape
   (C, 1, ..., 1), computed in float64 and cast once to the input's dtype (status
   "decomposed").
6. A BatchNormalization node (inference mode, opset >= 9, one output) is one more step of a
   chain when the producer's channel axis, moved by the chain's Transposes, is the BN's channel
   axis 1: ``MatMul (N, L, C) -> Transpose(0, 2, 1) -> BatchNormalization`` (how PyTorch exports
   ``Linear`` followed by ``BatchNorm1d`` over a permuted sequence), ``Conv -> Add(bias) -> BN``,
   ``Conv -> BN -> Mul(per-channel scale)``. A BN right after the producer with nothing else in
   the chain is left to `bnfold.folding.into_producer`; a BN after a scaling step (Sub, Mul, Div, or
   another BN) ends the chain, so that the chain's report entry, named after its first scaling
   node, is the BN's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.folding.algebra import affine_step, compose_affine, fold_affine
from bnfold.folding.batchnorm import read_batchnorm, validate_batchnorm
from bnfold.folding.casting import FLOAT_TYPES, cast_folded
from bnfold.folding.finish import bn_sources, cast_and_name, finish
from bnfold.folding.index import GraphIndex
from bnfold.folding.into_producer import LinearFold, fold_into_linear
from bnfold.folding.linear_ops import LINEAR_OPS
from bnfold.folding.nodes import get_attr, is_default, node_label, replace_node
from bnfold.folding.patterns import ChainSkip, Rewrite, Skip, pattern
from bnfold.folding.tensors import np_dtype

__all__ = ["PATTERNS", "fold_decomposed_chain", "decompose_rest", "AffineChain", "collapse_chain"]

log = logging.getLogger(__name__)

_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div"})
_BN = "BatchNormalization"
_PASS_THROUGH = frozenset({"Cast", "Identity", "Transpose"})


@dataclass
class AffineChain:
    """A collapsed chain: ``final = scale * producer_output + shift`` per channel (rule 2, 3).

    ``nodes`` are the chain's nodes in order (ending at its last arithmetic node);
    ``transposes`` the Transpose nodes among them; ``constants`` maps each arithmetic node's
    constant input name (and each BN parameter) to ``"scale"`` (it reaches ``scale`` and ``shift``:
    Mul, Div, gamma, var) or ``"shift"`` (it reaches ``shift`` only: Add, Sub, beta, mean).
    """

    nodes: list[onnx.NodeProto]
    transposes: list[onnx.NodeProto]
    scale: np.ndarray
    shift: np.ndarray
    constants: dict[str, str]

    @property
    def final(self) -> str:
        return self.nodes[-1].output[0]

    @property
    def first_scaling(self) -> onnx.NodeProto:
        return next(n for n in self.nodes if n.op_type in ("Sub", "Mul", "Div", _BN))

    @property
    def scales(self) -> bool:
        return any(n.op_type in ("Mul", "Div", _BN) for n in self.nodes)

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    def sources(self) -> tuple[list[str], list[str]]:
        """``(scale sources, shift sources)``: the chain's constants each reaches."""
        scale_from = [name for name, role in self.constants.items() if role == "scale"]
        return scale_from, list(self.constants)


def _per_channel(value: np.ndarray, rank: int | None, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as (C,) float64 if it is one value per channel on ``axis`` (negative, counted
    from the end), else None (rule 2)."""
    value = np.asarray(value)
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        return None
    if value.ndim > (rank if rank is not None else 1):
        return None
    for j, dim in enumerate(value.shape):
        tensor_axis = j - value.ndim
        if dim != 1 and not (tensor_axis == axis and dim == channels):
            return None
    return np.broadcast_to(np.asarray(value, dtype=np.float64).reshape(-1), (channels,))


def _constant_operand(node: onnx.NodeProto, current: str, index: GraphIndex) -> tuple[str, np.ndarray, bool] | None:
    """``(name, value, current_first)`` for a binary node whose other operand is constant."""
    if len(node.input) != 2 or list(node.input).count(current) != 1:
        return None
    first = node.input[0] == current
    other = node.input[1] if first else node.input[0]
    value = index.constant(other)
    if value is None:
        return None
    return other, value, first


def collapse_chain(
    start: str, index: GraphIndex, *, channels: int, rank: int | None, axis: int, elem_type: int
) -> AffineChain | None:
    """Follow ``start`` through a per-channel affine chain (rule 2); None if it has no arithmetic.

    ``axis`` is the channel axis of ``start`` counted from the end (negative); ``rank`` its rank
    if known.
    """
    scale = np.ones(channels)
    shift = np.zeros(channels)
    walked: list[onnx.NodeProto] = []
    kept: AffineChain | None = None
    constants: dict[str, str] = {}
    current = start
    while not index.is_graph_output(current):
        readers = index.users(current)
        if len(readers) != 1:
            break
        (node,) = readers
        if not is_default(node) or not node.output or not node.output[0]:
            break
        op = node.op_type
        if op in _PASS_THROUGH:
            if list(node.input) != [current]:
                break
            if op == "Cast" and int(get_attr(node, "to", 0)) != elem_type:
                break
            if op == "Transpose":
                moved = _transpose_axis(node, rank, axis)
                if moved is None:
                    break
                rank, axis = moved
        elif op == _BN:
            # Rule 6: a BatchNormalization after a Transpose (e.g. Linear -> permute -> BatchNorm1d).
            step = _batchnorm_step(node, current, index, walked, rank=rank, axis=axis, channels=channels)
            if step is None:
                break
            c_scale, c_shift, names = step
            scale, shift = compose_affine(scale, shift, c_scale, c_shift)
            _merge_roles(constants, names)
        elif op in _ARITHMETIC:
            operand = _constant_operand(node, current, index)
            if operand is None:
                break
            name, value, current_first = operand
            c = _per_channel(value, rank, axis, channels)
            if c is None:
                break
            step = affine_step(scale, shift, op, c, value_first=current_first)
            if step is None:
                break
            scale, shift = step
            _merge_roles(constants, {name: "scale" if op in ("Mul", "Div") else "shift"})
        else:
            break
        walked.append(node)
        if op in _ARITHMETIC or op == _BN:
            kept = AffineChain(
                nodes=list(walked), transposes=[n for n in walked if n.op_type == "Transpose"],
                scale=scale, shift=shift, constants=dict(constants),
            )
        current = node.output[0]
    return kept


def _merge_roles(constants: dict[str, str], roles: dict[str, str]) -> None:
    """Record the roles of a step's constants; a constant that scales anywhere is a "scale" one."""
    for name, role in roles.items():
        constants[name] = "scale" if role == "scale" else constants.get(name, "shift")


def _batchnorm_step(node: onnx.NodeProto, current: str, index: GraphIndex, walked: list[onnx.NodeProto], *,
                    rank: int | None, axis: int, channels: int) -> tuple[np.ndarray, np.ndarray, dict[str, str]] | None:
    """``(scale, shift, constants)`` of BN ``node`` as a chain step (rule 6), or None.

    Only BatchNormalization-9 and later in inference mode with a single output (no ``spatial`` or
    ``is_test`` to interpret, no training), and only if the producer's channel axis is (after the
    chain's Transposes) the BN's channel axis 1.
    """
    if rank is None or rank + axis != 1:
        return None
    if any(n.op_type in ("Sub", "Mul", "Div", _BN) for n in walked):
        # The chain's report entry is named after its first scaling node: a BN must be that node,
        # so that every BN keeps an entry of its own (a later BN folds on its own).
        return None
    if index.opset("") < 9 or node.input[0] != current or len([o for o in node.output if o]) != 1:
        return None
    if int(get_attr(node, "training_mode", 0)) or node_label(node) in index.options.exclude:
        return None
    validate_batchnorm(node, index)
    params = read_batchnorm(node, index)
    if isinstance(params, Skip) or params.channels != channels:
        return None
    c_scale, c_shift = params.affine()
    roles = {"scale": "scale", "var": "scale", "bias": "shift", "mean": "shift"}
    return c_scale, c_shift, {name: roles[role] for role, name in params.names.items()}


def _lone_batchnorm(chain: AffineChain, producer: onnx.NodeProto) -> bool:
    """True if the chain is a pattern of `bnfold.folding.into_producer`: one BN reading the
    producer's output, or for a MatMul, one bias Add and then the BN (its rule 4)."""
    ops = [n.op_type for n in chain.nodes]
    if ops == [_BN]:
        return chain.nodes[0].input[0] == producer.output[0]
    return producer.op_type == "MatMul" and ops == ["Add", _BN] and producer.output[0] in chain.nodes[0].input


def _transpose_axis(node: onnx.NodeProto, rank: int | None, axis: int) -> tuple[int, int] | None:
    """``(rank, axis)`` after Transpose ``node``; None if the permutation is unknown."""
    perm = get_attr(node, "perm")
    if perm is None:
        if rank is None:
            return None
        perm = list(range(rank))[::-1]  # ONNX Transpose default: reverse the axes
    perm = [int(p) for p in perm]
    if rank is not None and len(perm) != rank:
        return None
    rank = len(perm)
    position = rank + axis
    if not 0 <= position < rank or sorted(perm) != list(range(rank)):
        return None
    return rank, perm.index(position) - rank


def _producer_layout(producer: onnx.NodeProto, index: GraphIndex) -> tuple[int, int | None, int, int] | None:
    """``(channels, rank, axis, elem_type)`` of the producer's output (rule 1), or None.

    ``axis`` is the output's channel axis counted from the end (`LINEAR_OPS`' ``output_axis``).
    """
    op = LINEAR_OPS[producer.op_type]
    weight_name = op.weight_name(producer)
    weight = index.constant(weight_name) if weight_name else None
    elem_type = index.elem_type(weight_name) if weight is not None else None
    if weight is None or elem_type not in FLOAT_TYPES or not op.weight_rank_ok(weight.ndim):
        return None
    channels = op.layout(producer).output_channels(weight.shape)
    rank = op.output_rank(weight.ndim)
    if rank is None:
        rank = index.rank(producer.output[0])
    if rank is None:
        rank = index.rank(producer.input[0])
    axis = op.output_axis if op.output_axis < 0 else op.output_axis - rank
    return channels, rank, axis, elem_type


@pattern("decomposed-bn", "Conv", "ConvTranspose", "Gemm", "MatMul")
def fold_decomposed_chain(node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
    """Fold a per-channel Mul/Add/Sub/Div chain after linear node ``node`` into it (rules 1-4)."""
    if not is_default(node) or not node.output or not node.output[0]:
        return None
    readers = index.users(node.output[0])
    if len(readers) != 1:
        return None
    first = readers[0]
    if first.op_type == _BN and first.output and first.output[0]:
        # Only worth a chain if the BN is followed by more of one (rule 6): Conv -> BN -> Relu is
        # `into_producer`'s.
        after = index.users(first.output[0])
        if len(after) != 1 or after[0].op_type not in _ARITHMETIC | _PASS_THROUGH:
            return None
    elif first.op_type not in _ARITHMETIC | _PASS_THROUGH:
        return None  # cheap exit for the common case (Conv -> Relu, ...)
    layout = _producer_layout(node, index)
    if layout is None:
        return None
    channels, rank, axis, elem_type = layout
    chain = collapse_chain(node.output[0], index, channels=channels, rank=rank, axis=axis, elem_type=elem_type)
    if chain is None or not chain.scales:
        return None  # rule 3
    if _lone_batchnorm(chain, node):
        return None  # producer -> BN alone is `bnfold.folding.into_producer`'s (rule 6)
    if node_label(chain.first_scaling) in index.options.exclude:
        return ChainSkip("excluded", chain.first_scaling)
    target = node.output[0] if chain.transposes else chain.final
    if node.op_type == "MatMul":
        folded = _fold_matmul(node, chain, target, index)
    else:
        folded = fold_into_linear(node, (chain.scale, chain.shift), chain.channels, index, output=target)
    if isinstance(folded, Skip):
        log.debug("decomposed BN after %s not folded: %s", node_label(node), folded.reason)
        return ChainSkip(f"decomposed BN after {node.op_type} '{node_label(node)}' not folded: {folded.reason}",
                         chain.first_scaling)
    return _finish(node, chain, folded)


def _finish(producer: onnx.NodeProto, chain: AffineChain, folded: LinearFold) -> Rewrite:
    """Re-target a producer fold to the chain: keep its Transposes, remove the rest (rule 4).

    The new weight reads the producer's weight and the chain's scaling constants; the new bias
    reads the producer's bias and every constant of the chain.
    """
    new_nodes = folded.nodes
    previous = new_nodes[-1].output[0]
    transposes = []
    for i, transpose in enumerate(chain.transposes):
        out = chain.final if i == len(chain.transposes) - 1 else transpose.output[0]
        transposes.append(replace_node(transpose, inputs=[previous], outputs=[out]))
        previous = out
    scale_from, shift_from = chain.sources()
    return finish(
        into=node_label(producer), remove=list(chain.nodes), replace=[(producer, [*new_nodes, *transposes])],
        constants=folded.constants, subnormals=folded.subnormals, bn=chain.first_scaling,
        sources={folded.new_weight: [folded.weight, *scale_from], folded.new_bias: [folded.bias, *shift_from]},
    )


def _fold_matmul(matmul: onnx.NodeProto, chain: AffineChain, target: str, index: GraphIndex) -> LinearFold | Skip:
    """``MatMul(A, W) -> chain`` becomes ``MatMul(A, W') -> Add(b')`` (rule 4)."""
    if len(matmul.input) != 2:
        return Skip("MatMul does not have two inputs")
    weight_name = matmul.input[1]
    elem_type = index.elem_type(weight_name)
    out_axis = LINEAR_OPS["MatMul"].layout(matmul).out_axis
    weight64, bias64 = fold_affine(index.constant(weight_name), None, chain.scale, chain.shift, axis=out_axis)
    hint = matmul.name or matmul.output[0]
    folded = cast_and_name(index, weight64, bias64, elem_type, weight_name=weight_name, bias_name=None, hint=hint)
    if isinstance(folded, Skip):
        return folded
    product = matmul.output[0] if matmul.output[0] != target else index.fresh_name(f"{hint}_product")
    new_matmul = replace_node(matmul, inputs=[matmul.input[0], folded.weight], outputs=[product])
    add = onnx.helper.make_node("Add", [product, folded.bias], [target], name=chain.nodes[-1].name)
    return LinearFold(producer=matmul, nodes=[new_matmul, add], weight=weight_name, bias=None,
                      new_weight=folded.weight, new_bias=folded.bias, constants=folded.constants,
                      subnormals=folded.subnormals)


@pattern("decompose-rest", "BatchNormalization")
def decompose_rest(node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
    """Rule 5: BN -> Mul + Add by precomputed constants (only with ``decompose_rest``)."""
    if not index.options.decompose_rest:
        return None
    params = read_batchnorm(node, index)
    if isinstance(params, Skip):
        return params
    x, y = node.input[0], node.output[0]
    rank = index.rank(x)
    if rank is None:
        rank = index.rank(y)
    if rank is None or rank < 2:
        what = "unknown" if rank is None else str(rank)
        return Skip(f"not decomposed: rank of BN input '{x}' is {what} (the constants need shape (C, 1, ...))")
    elem_type = index.elem_type(x)
    if elem_type is None and index.opset("") < 15:
        elem_type = index.elem_type(params.names["scale"])  # before opset 15 X and scale share T
    if elem_type is None or np_dtype(elem_type) is None:
        return Skip(f"not decomposed: element type of BN input '{x}' is unknown")
    scale, shift = params.affine()
    shape = (params.channels,) + (1,) * (rank - 2)
    cast_s = cast_folded(scale.reshape(shape), elem_type, "decomposed BN scale")
    if isinstance(cast_s, Skip):
        return cast_s
    cast_t = cast_folded(shift.reshape(shape), elem_type, "decomposed BN shift")
    if isinstance(cast_t, Skip):
        return cast_t
    label = node.name or y
    s_name = index.fresh_name(f"{label}_scale")
    t_name = index.fresh_name(f"{label}_shift")
    scaled = index.fresh_name(f"{y}_scaled")
    mul = onnx.helper.make_node("Mul", [x, s_name], [scaled], name=f"{node.name}_mul" if node.name else "")
    add = onnx.helper.make_node("Add", [scaled, t_name], [y], name=f"{node.name}_add" if node.name else "")
    scale_from, shift_from = bn_sources(params)
    return finish(
        into=None, remove=[], replace=[(node, [mul, add])], constants={s_name: cast_s[0], t_name: cast_t[0]},
        sources={s_name: scale_from, t_name: shift_from}, status="decomposed", subnormals=cast_s[1] + cast_t[1],
    )


PATTERNS = [fold_decomposed_chain, decompose_rest]
