"""Condition evaluation for training switches (`bnfold.folding.switches`, rules 2 and 7).

A `Scope` holds the names one graph defines and sees its enclosing scopes; `Scope.value`
evaluates a name through the few operators a condition is computed with, on tensors of at most
`MAX_ELEMENTS` elements, and says which main-graph inputs it depends on. `ARITHMETIC` is the
elementwise arithmetic that rule 7 computes once a resolution made its operands constant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto

from bnfold.folding.nodes import DEFAULT_DOMAINS, get_attr
from bnfold.folding.tensors import np_dtype, tensor_to_array

__all__ = [
    "ARITHMETIC", "DEFAULT_DOMAINS", "MAX_COMPUTED", "MAX_ELEMENTS", "UNKNOWN", "Scope", "Value", "branch_of",
    "condition_of", "constant_node_value", "is_if", "is_small", "small_enough",
]

#: Largest tensor (in elements) that condition evaluation looks at (rule 2): conditions are
#: single values; anything bigger is data, not a switch.
MAX_ELEMENTS = 64


@dataclass(frozen=True)
class Value:
    """A tensor as condition evaluation sees it.

    ``array`` is its value, or None if unknown. ``closed`` says whether it is determined by
    constants and main-graph inputs alone (``deps``), through the ops of rule 2: then knowing
    ``deps`` makes it known.
    """

    array: np.ndarray | None
    deps: frozenset[str] = frozenset()
    closed: bool = True


UNKNOWN = Value(None, frozenset(), False)


def is_small(shape: Iterable[int]) -> bool:
    return int(np.prod(list(shape), dtype=np.int64)) <= MAX_ELEMENTS


def small_enough(shape: Iterable[int]) -> bool:
    return int(np.prod(list(shape), dtype=np.int64)) <= MAX_COMPUTED


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.ref_attr_name:
            return None
        if attr.name == "value" and is_small(attr.t.dims):
            return tensor_to_array(attr.t)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_ints" and len(attr.ints) <= MAX_ELEMENTS:
            return np.array(list(attr.ints), dtype=np.int64)
        if attr.name == "value_floats" and len(attr.floats) <= MAX_ELEMENTS:
            return np.array(list(attr.floats), dtype=np.float32)
    return None


def _single(array: np.ndarray) -> np.ndarray | None:
    """Shape ops on a single value (all a condition needs): the value as a scalar."""
    return array.reshape(()) if array.size == 1 else None


def _cast(node: onnx.NodeProto, args: list[np.ndarray]) -> np.ndarray | None:
    try:
        dtype = np_dtype(int(get_attr(node, "to")))
    except Exception:  # noqa: BLE001 - missing or function-referenced attribute
        return None
    return None if dtype is None else args[0].astype(dtype)


# op type -> (number of inputs evaluated, function of the node and their values)
_EVAL = {
    "Identity": (1, lambda node, a: a[0]),
    "Cast": (1, _cast),
    "CastLike": (2, lambda node, a: a[0].astype(a[1].dtype)),
    "Not": (1, lambda node, a: np.logical_not(a[0])),
    "Squeeze": (1, lambda node, a: _single(a[0])),
    "Unsqueeze": (1, lambda node, a: _single(a[0])),
    "Reshape": (1, lambda node, a: _single(a[0])),
    "Flatten": (1, lambda node, a: _single(a[0])),
    "And": (2, lambda node, a: np.logical_and(a[0], a[1])),
    "Or": (2, lambda node, a: np.logical_or(a[0], a[1])),
    "Xor": (2, lambda node, a: np.logical_xor(a[0], a[1])),
    "Equal": (2, lambda node, a: np.equal(a[0], a[1])),
}


class Scope:
    """The names one graph defines, for condition evaluation; ``parent`` is the enclosing scope.

    Nodes are registered as the walk reaches them (``define``), so a name is known exactly when
    a node that reads it may run.
    """

    def __init__(self, graph: onnx.GraphProto, parent: Scope | None, known_inputs: Mapping[str, np.ndarray]):
        self.parent = parent
        self.main = parent is None
        self.inputs = {v.name for v in graph.input}
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers: dict[str, onnx.NodeProto] = {}
        self.known_inputs = known_inputs
        self._cache: dict[str, Value] = {}

    def define(self, node: onnx.NodeProto) -> None:
        for name in node.output:
            if name:
                self.producers[name] = node

    def value(self, name: str, depth: int = 0) -> Value:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if depth > 64:
            return UNKNOWN
        if name in self.producers:
            result = self._evaluate(self.producers[name], depth)
        elif name in self.inputs:
            result = self._input(name)
        elif name in self.initializers:
            tensor = self.initializers[name]
            result = Value(tensor_to_array(tensor)) if is_small(tensor.dims) else UNKNOWN
        elif self.parent is not None:
            return self.parent.value(name, depth + 1)
        else:
            result = UNKNOWN
        self._cache[name] = result
        return result

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer that is not a graph input, at any size (rule 7)."""
        if name in self.producers or name in self.inputs:
            return None
        if name in self.initializers:
            tensor = self.initializers[name]
            return tensor_to_array(tensor) if small_enough(tensor.dims) else None
        return self.parent.constant(name) if self.parent is not None else None

    def _input(self, name: str) -> Value:
        if not self.main:
            return UNKNOWN  # a Loop / Scan body's own input: data
        return Value(self.known_inputs.get(name), frozenset([name]), True)

    def _evaluate(self, node: onnx.NodeProto, depth: int) -> Value:
        if node.domain not in DEFAULT_DOMAINS:
            return UNKNOWN
        if node.op_type == "Constant":
            array = constant_node_value(node)
            return UNKNOWN if array is None else Value(array)
        spec = _EVAL.get(node.op_type)
        if spec is None or len(node.input) < spec[0]:
            return UNKNOWN
        args = [self.value(name, depth + 1) for name in node.input[: spec[0]]]
        if not all(arg.closed for arg in args):
            return UNKNOWN
        deps = frozenset().union(*(arg.deps for arg in args))
        if any(arg.array is None for arg in args):
            return Value(None, deps, True)
        try:
            with np.errstate(all="ignore"):
                array = spec[1](node, [np.asarray(arg.array) for arg in args])
        except (TypeError, ValueError):
            return UNKNOWN
        if array is None or not is_small(np.shape(array)):
            return UNKNOWN
        return Value(np.asarray(array), deps, True)


# Rule 7: elementwise arithmetic with ONNX's (NumPy's) multidirectional broadcasting.
ARITHMETIC = {
    "Identity": lambda node, a: a[0],
    "Cast": lambda node, a: _cast(node, a),
    "Add": lambda node, a: a[0] + a[1],
    "Sub": lambda node, a: a[0] - a[1],
    "Mul": lambda node, a: a[0] * a[1],
    "Div": lambda node, a: a[0] / a[1] if a[0].dtype.kind == "f" else None,
    "Sqrt": lambda node, a: np.sqrt(a[0]),
    "Reciprocal": lambda node, a: np.reciprocal(a[0]) if a[0].dtype.kind == "f" else None,
    "Neg": lambda node, a: np.negative(a[0]),
}
#: Largest constant (in elements) rule 7 computes: per-channel vectors, not weight tensors.
MAX_COMPUTED = 1 << 20


def condition_of(scope: Scope, node: onnx.NodeProto) -> Value:
    """The If's condition; known only when it is a single value (the ONNX If contract)."""
    if not node.input or not node.input[0]:
        return UNKNOWN
    value = scope.value(node.input[0])
    if value.array is not None and value.array.size != 1:
        return UNKNOWN
    return value


def is_if(node: onnx.NodeProto) -> bool:
    return node.op_type == "If" and node.domain in DEFAULT_DOMAINS


def branch_of(node: onnx.NodeProto, take_then: bool) -> onnx.GraphProto | None:
    wanted = "then_branch" if take_then else "else_branch"
    for attr in node.attribute:
        if attr.name == wanted and attr.type == AttributeProto.GRAPH:
            return attr.g
    return None
