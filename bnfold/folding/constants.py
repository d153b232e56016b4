"""Compile-time constants of a graph: initializers, Constant nodes and small constant subgraphs.

Evaluated ops (ONNX operator semantics, default domain): Constant, Identity, Cast, CastLike (its
second input is read for its element type only), ConstantOfShape, Reshape, Unsqueeze, Squeeze,
Expand, Transpose (PyTorch's exporter writes a Linear weight as ``Transpose(W)`` without constant
folding), Concat, Gather, and Shape of a statically shaped value (the PyTorch ``dynamo=True``
zero bias is ``Shape -> Expand -> CastLike -> Expand``). ``Gather(Shape(x), i)`` is a constant when
dimension ``i`` of ``x`` is static even if ``x`` is not (Keras 3 builds reshape targets this way).

A node whose inputs are malformed for its op (a shape that does not fit, an axis out of range, a
missing attribute) is not a constant: the evaluators raise `NotEvaluable`, or NumPy raises
``ValueError`` / ``IndexError`` (its axis and shape errors) or ``OverflowError`` (an infinite
dimension), and the value is reported as "not evaluable" with the message. Any other exception is
a bug and propagates.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from bnfold.folding.nodes import AttributeRef, get_attr, is_default, node_label
from bnfold.folding.patterns import Skip
from bnfold.folding.tensors import np_dtype, tensor_to_array
from bnfold.io.mapped import covers

if TYPE_CHECKING:
    from bnfold.folding.index import GraphIndex

__all__ = [
    "MAX_CONSTANT_ELEMENTS",
    "CONSTANT_OPS",
    "NotEvaluable",
    "Scope",
    "Constants",
    "EVALUATORS",
]

log = logging.getLogger(__name__)

#: Constant subgraphs that would materialize more elements than this are not evaluated.
MAX_CONSTANT_ELEMENTS = 1 << 26

#: Initializer values larger than this are read again when needed rather than cached.
_CACHE_MAX_BYTES = 1 << 16

#: Chains of constant ops deeper than this are not followed (no recursion limit is reached).
_MAX_DEPTH = 64

#: Errors that mean "these inputs do not make a constant", never "bnfold has a bug".
_EXPECTED = (ValueError, IndexError, OverflowError)


class NotEvaluable(Exception):
    """A constant subgraph node that is malformed (missing input or attribute, wrong type)."""


class Scope(Protocol):
    """What the evaluators read besides their arguments (a `bnfold.folding.index.GraphIndex`)."""

    def constant(self, name: str) -> np.ndarray | None: ...

    def elem_type(self, name: str) -> int | None: ...

    def static_shape(self, name: str) -> tuple[int, ...] | None: ...

    def shape(self, name: str) -> tuple[int | str | None, ...] | None: ...


Evaluator = Callable[[Scope, onnx.NodeProto, list[Any]], "np.ndarray | None"]


def _arg(args: Sequence[Any], i: int) -> np.ndarray:
    if i >= len(args) or args[i] is None:
        raise NotEvaluable(f"input {i} is missing")
    return np.asarray(args[i])


def _int_attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int:
    value = get_attr(node, name, default)
    if not isinstance(value, (int, np.integer)):
        raise NotEvaluable(f"attribute '{name}' is {value!r}, not an integer")
    return int(value)


def _ints_attr(node: onnx.NodeProto, name: str) -> list[int] | None:
    value = get_attr(node, name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (int, np.integer)) for v in value):
        raise NotEvaluable(f"attribute '{name}' is {value!r}, not a list of integers")
    return [int(v) for v in value]


def _dims(value: np.ndarray) -> list[int]:
    return [int(d) for d in np.asarray(value).reshape(-1)]


def _eval_constant(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.ref_attr_name:
            raise AttributeRef(attr.name)
        if attr.name == "value":
            return tensor_to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value and strings are not folded


def _eval_identity(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    return _arg(args, 0)


def _eval_cast(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    dtype = np_dtype(_int_attr(node, "to"))
    return None if dtype is None else _arg(args, 0).astype(dtype)


def _eval_castlike(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    if len(args) < 2:
        raise NotEvaluable("input 1 is missing")
    elem_type = scope.elem_type(args[1])
    dtype = None if elem_type is None else np_dtype(elem_type)
    return None if dtype is None else _arg(args, 0).astype(dtype)


def _eval_constant_of_shape(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    shape = tuple(_dims(_arg(args, 0)))
    if math.prod(shape) > MAX_CONSTANT_ELEMENTS:
        return None
    value = get_attr(node, "value")
    if value is not None and not isinstance(value, TensorProto):
        raise NotEvaluable(f"attribute 'value' is {value!r}, not a tensor")
    # ONNX ConstantOfShape: default is a float32 zero.
    fill = np.zeros(1, dtype=np.float32) if value is None else numpy_helper.to_array(value).reshape(-1)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _eval_reshape(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    data, shape = _arg(args, 0), _dims(_arg(args, 1))
    if not _int_attr(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _axes(node: onnx.NodeProto, args: list) -> list[int] | None:
    """Squeeze / Unsqueeze axes: input 1 (opset 13 and later) or the ``axes`` attribute."""
    if len(args) > 1 and args[1] is not None:
        return _dims(args[1])
    return _ints_attr(node, "axes")


def _eval_unsqueeze(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    data = _arg(args, 0)
    axes = _axes(node, args)
    if axes is None:
        raise NotEvaluable("Unsqueeze has no axes")
    rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(sorted(a % rank for a in axes)))


def _eval_squeeze(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    data = _arg(args, 0)
    axes = _axes(node, args)
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(a % data.ndim for a in axes))


def _eval_expand(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    data = _arg(args, 0)
    shape = tuple(_dims(_arg(args, 1)))
    target = np.broadcast_shapes(data.shape, shape)  # Expand broadcasts both ways
    if math.prod(target) > MAX_CONSTANT_ELEMENTS:
        return None
    return np.broadcast_to(data, target)


def _shape_slice(node: onnx.NodeProto, rank: int) -> slice:
    """ONNX Shape-15 ``start`` / ``end``: negative values count from the end; both are clamped."""
    start = _int_attr(node, "start", 0)
    end = get_attr(node, "end")
    end = rank if end is None else _int_attr(node, "end")
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return slice(start, end)


def _eval_shape(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray | None:
    if not args:
        raise NotEvaluable("input 0 is missing")
    value = scope.constant(args[0])
    shape = tuple(value.shape) if value is not None else scope.static_shape(args[0])
    if shape is None:
        return None
    return np.array(shape[_shape_slice(node, len(shape))], dtype=np.int64)


def _eval_transpose(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    return np.transpose(_arg(args, 0), _ints_attr(node, "perm"))  # ONNX default (None): reverse the axes


def _eval_concat(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    return np.concatenate([_arg(args, i) for i in range(len(args))], axis=_int_attr(node, "axis"))


def _eval_gather(scope: Scope, node: onnx.NodeProto, args: list) -> np.ndarray:
    # ONNX Gather: axis defaults to 0; negative indices count from the end of that axis.
    indices = np.asarray(_arg(args, 1), dtype=np.int64)
    return np.take(_arg(args, 0), indices, axis=_int_attr(node, "axis", 0))


#: op type -> evaluator ``(scope, node, args) -> array or None``; None means "not a constant".
EVALUATORS: dict[str, Evaluator] = {
    "Constant": _eval_constant,
    "Identity": _eval_identity,
    "Cast": _eval_cast,
    "CastLike": _eval_castlike,
    "ConstantOfShape": _eval_constant_of_shape,
    "Reshape": _eval_reshape,
    "Unsqueeze": _eval_unsqueeze,
    "Squeeze": _eval_squeeze,
    "Expand": _eval_expand,
    "Shape": _eval_shape,
    "Transpose": _eval_transpose,
    "Concat": _eval_concat,
    "Gather": _eval_gather,
}

#: Ops whose outputs are pure functions of their inputs: removed when a fold leaves them unused.
CONSTANT_OPS = frozenset(EVALUATORS)

#: Inputs passed to the evaluator by name, not by value (op type -> input position).
_BY_NAME = {"CastLike": 1, "Shape": 0}


class Constants:
    """The constant values of one graph body, evaluated on demand and cached.

    Parameters
    ----------
    index : GraphIndex
        The body: its ``producer``, ``initializers``, ``inputs``, ``options``, ``function`` and
        ``parent`` (whose `Constants` answers for outer-scope names), and the `Scope` queries.
    """

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self._cache: dict[str, tuple[np.ndarray | None, str | None]] = {}

    def value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a compile-time constant, else None."""
        return self.evaluate(name, 0)[0]

    def reason(self, name: str) -> str:
        """Why ``value(name)`` is None (a phrase such as ``"'x' is a graph input"``)."""
        return self.evaluate(name, 0)[1] or f"'{name}' is constant"

    def fetch(self, **roles: str | None) -> dict[str, np.ndarray | None] | Skip:
        """Constant values of several inputs, or `Skip` naming the first that is not constant.

        A role whose name is None or ``""`` (an absent optional input) maps to None.
        """
        values: dict[str, np.ndarray | None] = {}
        for role, name in roles.items():
            if not name:
                values[role] = None
                continue
            value, reason = self.evaluate(name, 0)
            if value is None:
                return Skip(f"{role} is not constant: {reason}")
            values[role] = value
        return values

    def cached(self, name: str) -> np.ndarray | None:
        """The cached value of ``name`` if it was evaluated already (no evaluation)."""
        found = self._cache.get(name)
        return None if found is None else found[0]

    def forget(self, name: str) -> None:
        """Drop ``name`` from the cache (its producer or initializer changed)."""
        self._cache.pop(name, None)

    def evaluate(self, name: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        """``(value, None)`` or ``(None, reason)``."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if depth > _MAX_DEPTH:
            return None, f"'{name}' is computed by a constant chain too deep to evaluate"
        result = self._evaluate_uncached(name, depth)
        value = result[0]
        # Large initializers are not kept: re-reading one is a single copy, and holding every
        # weight of a deep model alive makes each new array land on fresh (page-faulting) memory.
        if value is None or value.nbytes <= _CACHE_MAX_BYTES or name not in self.index.initializers:
            self._cache[name] = result
        return result

    def _evaluate_uncached(self, name: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        index = self.index
        node = index.producer.get(name)
        if node is not None:
            return self._evaluate_node(node, name, depth)
        tensor = index.initializers.get(name)
        if tensor is not None:
            return self._initializer(name, tensor)
        if name in index.inputs:
            kind = "function input" if index.function is not None else "graph input"
            return None, f"'{name}' is a {kind} (computed at run time)"
        if index.parent is not None:
            return index.parent.constants.evaluate(name, depth + 1)
        return None, f"'{name}' is not defined in this graph"

    def _initializer(self, name: str, tensor: onnx.TensorProto) -> tuple[np.ndarray | None, str | None]:
        if name in self.index.inputs and self.index.options.keep_initializer_inputs:
            return None, (
                f"'{name}' is an initializer also listed as a graph input (kept as an input:"
                " keep_initializer_inputs)"
            )
        if tensor.data_location == TensorProto.EXTERNAL and not covers(tensor):
            return None, f"'{name}' is stored as external data that was not loaded"
        try:
            return tensor_to_array(tensor), None
        # onnx raises TypeError for UNDEFINED, KeyError for unknown codes, ValueError when the
        # stored data does not fill the declared shape.
        except (TypeError, KeyError, ValueError) as exc:
            return None, f"'{name}' has an unsupported element type ({exc})"

    def _evaluate_node(self, node: onnx.NodeProto, name: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        op = node.op_type
        label = f"'{name}' is computed at run time by {op} '{node_label(node)}'"
        if not is_default(node) or op not in EVALUATORS:
            return None, label
        if op == "Gather" and len(node.input) == 2 and self.evaluate(node.input[0], depth + 1)[0] is None:
            return self._gather_static_dims(node, label, depth)
        args: list[Any] = []
        for i, inp in enumerate(node.input):
            if _BY_NAME.get(op) == i:
                args.append(inp)
                continue
            if not inp:
                args.append(None)
                continue
            value, reason = self.evaluate(inp, depth + 1)
            if value is None:
                return None, reason
            args.append(value)
        try:
            value = EVALUATORS[op](self.index, node, args)
        except AttributeRef:
            return None, f"{label} with an attribute given by the calling function"
        except (NotEvaluable, *_EXPECTED) as exc:
            log.debug("cannot evaluate %s: %s", label, exc)
            return None, f"{label} (not evaluable: {exc})"
        if value is None:
            return None, label
        if value.size > MAX_CONSTANT_ELEMENTS:
            return None, f"{label} (constant too large to evaluate)"
        return value, None

    def _gather_static_dims(self, node: onnx.NodeProto, label: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        """``Gather(Shape(x), i)`` where ``x`` is computed at run time but dimension ``i`` of its
        shape is static: a constant (exporters build reshape targets this way, e.g. Keras 3's
        depthwise convolution bias ``Reshape(b, Concat(1, 1, 1, Gather(Shape(x), 3)))``)."""
        shape_node = self.index.producer.get(node.input[0])
        if shape_node is None or shape_node.op_type != "Shape" or not is_default(shape_node):
            return None, label
        dims = self.index.shape(shape_node.input[0])
        indices, reason = self.evaluate(node.input[1], depth + 1)
        if dims is None or indices is None:
            return None, reason or f"{label} (the shape of '{shape_node.input[0]}' is unknown)"
        try:
            window = _shape_slice(shape_node, len(dims))
            if _int_attr(node, "axis", 0) not in (0, -1):
                return None, label
            picked = np.take(np.array(dims[window], dtype=object), np.asarray(indices, dtype=np.int64))
        except (NotEvaluable, *_EXPECTED) as exc:
            return None, f"{label} (not evaluable: {exc})"
        picked = np.asarray(picked, dtype=object)
        if not all(isinstance(d, (int, np.integer)) for d in picked.flat):
            return None, f"{label} (a symbolic dimension of '{shape_node.input[0]}')"
        return picked.astype(np.int64), None
