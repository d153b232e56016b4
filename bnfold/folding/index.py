"""The index of one graph body: who produces and who reads each value, types, constants, edits.

Index rules (each pattern may rely on them)
-------------------------------------------
1. The index is built once per graph (or model-local function) and updated incrementally when a
   rewrite is applied, so patterns see the effect of earlier folds in the same graph and the pass
   stays linear in the graph size.
2. ``consumers[name]`` lists every node that reads ``name``, including nodes whose subgraph bodies
   (If / Loop / Scan) read it from the outer scope; graph outputs are in ``outputs``.
3. ``constants`` (`bnfold.folding.constants.Constants`) evaluates initializers, ``Constant`` nodes
   and small constant subgraphs. Names not defined in a subgraph are looked up in the enclosing
   graph. Results are cached; callers must not write into returned arrays.
4. Initializers that are also graph inputs are constants unless the fold runs with
   ``keep_initializer_inputs=True``; using one marks it for removal from the inputs if it ends up
   unused.
5. Edits are queued by `GraphIndex.apply` and written by `GraphIndex.commit` in one pass over the
   body's nodes. Nodes are never edited in place (rewrites build new ones).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
import onnx
from onnx import AttributeProto, helper

from bnfold.folding.constants import CONSTANT_OPS, Constants
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.nodes import (
    AttributeRef,
    attr_graphs,
    get_attr,
    is_default,
    node_label,
)
from bnfold.folding.patterns import Rewrite
from bnfold.folding.chunked import Deferred
from bnfold.folding.tensors import array_to_tensor, elem_type_of
from bnfold.io.mapped import defer

if TYPE_CHECKING:
    from bnfold.folding.report import FoldReport

__all__ = ["GraphIndex", "NodeMap"]

V = TypeVar("V")


class NodeMap(Generic[V]):
    """A mapping keyed by node identity.

    ``NodeProto`` messages are unhashable and compare by value (two ``Relu`` nodes with the same
    inputs are equal), so the key is the object's identity. The map holds a reference to each key
    node, so no other object can take a key's identity while it is in the map.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[onnx.NodeProto, V]] = {}

    def __contains__(self, node: onnx.NodeProto) -> bool:
        return id(node) in self._items

    def __getitem__(self, node: onnx.NodeProto) -> V:
        return self._items[id(node)][1]

    def __setitem__(self, node: onnx.NodeProto, value: V) -> None:
        self._items[id(node)] = (node, value)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[onnx.NodeProto]:
        return (node for node, _ in self._items.values())

    def get(self, node: onnx.NodeProto, default: V | None = None) -> V | None:
        found = self._items.get(id(node))
        return default if found is None else found[1]

    def clear(self) -> None:
        self._items.clear()


def _captured(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph body reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                used |= _captured(sub)
        defined.update(node.output)
    used.update(v.name for v in graph.output)
    return used - defined


def _uses(node: onnx.NodeProto) -> set[str]:
    """Names ``node`` reads: its inputs, and the outer-scope names its subgraphs read."""
    used = {name for name in node.input if name}
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH or attr.type == AttributeProto.GRAPHS:
            for sub in attr_graphs(attr):
                used |= _captured(sub)
    return used


class GraphIndex:
    """Producer / consumer / constant index of one graph body or model-local function.

    Parameters
    ----------
    ctx : ModelContext
    path : str
        Name used in reports (``"main"``, ``"main/loop.body"``, ``"function:domain.name"``).
    graph : GraphProto, optional
        The graph (None for functions).
    function : FunctionProto, optional
    parent : GraphIndex, optional
        The enclosing graph, for outer-scope names of subgraph bodies.
    initializers : iterable of TensorProto, optional
        Read-only initializers to index instead of ``graph.initializer`` (the pass indexes the
        input model's tensors and copies only the survivors into the output).
    """

    def __init__(
        self,
        ctx: ModelContext,
        path: str,
        *,
        graph: onnx.GraphProto | None = None,
        function: onnx.FunctionProto | None = None,
        parent: GraphIndex | None = None,
        initializers: Iterable[onnx.TensorProto] | None = None,
    ) -> None:
        self.ctx = ctx
        self.path = path
        self.graph = graph
        self.function = function
        self.parent = parent
        body = graph if graph is not None else function
        assert body is not None
        self.nodes: list[onnx.NodeProto] = list(body.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        # Who reads each value: built on first use (`consumers`), then kept up to date by every
        # edit. A check that only reads constants (`bnfold.diagnosis.preflight`) never builds it.
        self._consumers: dict[str, list[onnx.NodeProto]] | None = None
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.types: dict[str, onnx.TypeProto] = {}
        if graph is not None:
            self.inputs = {v.name for v in graph.input}
            self.outputs = {v.name for v in graph.output}
            for vi in (*graph.input, *graph.output, *graph.value_info):
                self.types.setdefault(vi.name, vi.type)
            for tensor in graph.initializer if initializers is None else initializers:
                self.initializers[tensor.name] = tensor
            self.opsets = ctx.opsets
        else:
            self.inputs = set(function.input)
            self.outputs = set(function.output)
            for vi in getattr(function, "value_info", ()):
                self.types.setdefault(vi.name, vi.type)
            self.opsets = {**ctx.opsets, **{i.domain or "": i.version for i in function.opset_import}}
        self._uses: NodeMap[set[str]] = NodeMap()
        for node in self.nodes:
            self._link(node)
        self._removed: NodeMap[None] = NodeMap()
        self._replacement: NodeMap[list[onnx.NodeProto]] = NodeMap()
        self._vanished: set[str] = set()
        self._released: set[str] = set()
        self.constants = Constants(self)
        self.changed = False

    @classmethod
    def for_graph(cls, graph, ctx, path="main", parent=None, initializers=None) -> GraphIndex:
        """Index of ``graph``; ``initializers`` (read only) replaces ``graph.initializer``."""
        return cls(ctx, path, graph=graph, parent=parent, initializers=initializers)

    @classmethod
    def for_function(cls, function, ctx) -> GraphIndex:
        path = f"function:{function.domain}.{function.name}" if function.domain else f"function:{function.name}"
        return cls(ctx, path, function=function)

    def _uses_of(self, node: onnx.NodeProto) -> set[str]:
        used = self._uses.get(node)
        if used is None:
            used = _uses(node)
            self._uses[node] = used
        return used

    @property
    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        """``consumers[name]``: every node reading ``name`` (rule 2 of the module docstring)."""
        if self._consumers is None:
            if self.changed:
                raise AssertionError("consumers must be built before the first edit")
            self._consumers = {}
            for node in self.nodes:
                for name in self._uses_of(node):
                    self._consumers.setdefault(name, []).append(node)
        return self._consumers

    def _link(self, node: onnx.NodeProto) -> None:
        if self._consumers is not None:
            for name in self._uses_of(node):
                self._consumers.setdefault(name, []).append(node)
        for name in node.output:
            if name:
                self.producer[name] = node

    def _unlink(self, node: onnx.NodeProto) -> None:
        for name in self._uses_of(node):
            users = self.consumers.get(name)
            if users is not None:
                self.consumers[name] = [n for n in users if n is not node]
        for name in node.output:
            if name and self.producer.get(name) is node:
                del self.producer[name]

    # ---- queries ------------------------------------------------------------------------
    @property
    def options(self) -> FoldOptions:
        return self.ctx.options

    @property
    def report(self) -> FoldReport:
        return self.ctx.report

    def opset(self, domain: str = "") -> int:
        """Opset version imported for ``domain`` (0 if not imported)."""
        if domain == "ai.onnx":
            domain = ""
        return int(self.opsets.get(domain, 0))

    def is_removed(self, node: onnx.NodeProto) -> bool:
        return node in self._removed or node in self._replacement

    def users(self, name: str) -> list[onnx.NodeProto]:
        """Nodes reading ``name`` in this body (outer-scope reads by subgraphs count)."""
        return self.consumers.get(name, [])

    def is_graph_output(self, name: str) -> bool:
        return name in self.outputs

    def sole_consumer_reason(self, name: str, expected: onnx.NodeProto) -> str | None:
        """Why ``name`` is not read by ``expected`` alone, or None if it is."""
        if self.is_graph_output(name):
            return f"'{name}' is a graph output"
        others = [n for n in self.users(name) if n is not expected]
        if others:
            return f"'{name}' is also read by {others[0].op_type} '{node_label(others[0])}'" + (
                f" and {len(others) - 1} more" if len(others) > 1 else ""
            )
        return None

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a compile-time constant (rule 3), else None."""
        return self.constants.value(name)

    def value_type(self, name: str) -> onnx.TypeProto | None:
        found = self.types.get(name)
        if found is None and self.parent is not None and not self._defined_here(name):
            return self.parent.value_type(name)
        if found is None and self.function is None:
            found = self.ctx.inferred_type(name)
        return found

    def _defined_here(self, name: str) -> bool:
        return name in self.producer or name in self.initializers or name in self.inputs

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of ``name``: initializer, declared type, constant value, or (last,
        since it runs ONNX shape inference on the whole model once) inferred type."""
        tensor = self.initializers.get(name)
        if tensor is not None:
            return tensor.data_type
        vtype = self.types.get(name)
        if vtype is not None and vtype.HasField("tensor_type") and vtype.tensor_type.elem_type:
            return vtype.tensor_type.elem_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast" and is_default(node):
            try:
                return int(get_attr(node, "to"))
            except AttributeRef:
                return None
        value = self.constant(name)
        if value is not None:
            try:
                return elem_type_of(value.dtype)
            except (KeyError, ValueError, TypeError):  # a dtype ONNX has no element type for
                return None
        vtype = self.value_type(name)
        if vtype is not None and vtype.HasField("tensor_type") and vtype.tensor_type.elem_type:
            return vtype.tensor_type.elem_type
        return None

    def shape(self, name: str) -> tuple[int | str | None, ...] | None:
        """Shape of ``name`` (ints for static dims, str/None for symbolic ones), or None."""
        tensor = self.initializers.get(name)
        if tensor is not None:
            return tuple(tensor.dims)
        vtype = self.value_type(name)
        if vtype is not None and vtype.HasField("tensor_type") and vtype.tensor_type.HasField("shape"):
            dims = []
            for dim in vtype.tensor_type.shape.dim:
                if dim.HasField("dim_value"):
                    dims.append(int(dim.dim_value))
                else:
                    dims.append(dim.dim_param or None)
            return tuple(dims)
        cached = self.constants.cached(name)
        return None if cached is None else tuple(cached.shape)

    def rank(self, name: str) -> int | None:
        """Rank of ``name`` from type info / shape inference, or None if unknown."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(shape)  # type: ignore[return-value]

    def fresh_name(self, hint: str) -> str:
        """Reserve a tensor name unused anywhere in the model."""
        return self.ctx.fresh_name(hint)

    # ---- applying rewrites --------------------------------------------------------------
    def apply(self, rewrite: Rewrite) -> None:
        """Apply ``rewrite``: update this index and queue the graph edits for `commit`."""
        self.consumers  # noqa: B018 - built from the graph as it is, before this edit
        self.changed = True
        new_nodes: list[onnx.NodeProto] = []
        for node in rewrite.remove:
            self._drop(node)
            self._removed[node] = None
        for anchor, replacement in rewrite.replace:
            self._drop(anchor)
            self._replacement[anchor] = list(replacement)
            new_nodes.extend(replacement)
        constant_nodes = []
        for name, array in rewrite.constants.items():
            if isinstance(array, Deferred):
                if self.function is None:
                    # Computed when written (bnfold.folding.chunked): never in memory as a whole.
                    tensor = self.graph.initializer.add()
                    tensor.name, tensor.data_type = name, elem_type_of(array.dtype)
                    tensor.dims.extend(array.shape)
                    defer(tensor, array)
                    self.initializers[name] = tensor
                    self.constants.forget(name)
                    continue
                array = array.materialize()
            elem_type = elem_type_of(np.asarray(array).dtype)
            if self.function is not None:
                tensor = array_to_tensor(array, name, elem_type)
                constant_nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            else:
                # Written straight into the graph; `commit` / the pass's cleanup drop it if a
                # later fold in this graph makes it unused.
                self.initializers[name] = array_to_tensor(array, name, elem_type, into=self.graph.initializer.add())
            # Not cached: the array can be freed now; a later fold re-reads the tensor.
            self.constants.forget(name)
        if constant_nodes:
            if not rewrite.replace:
                raise AssertionError("a rewrite with new constants inside a function must replace a node")
            first_anchor = rewrite.replace[0][0]
            self._replacement[first_anchor][:0] = constant_nodes
            new_nodes[:0] = constant_nodes
        for node in new_nodes:
            self._link(node)
            for name in node.output:
                self._vanished.discard(name)
                self.constants.forget(name)
        self.ctx.report.subnormals_flushed += rewrite.subnormals

    def _drop(self, node: onnx.NodeProto) -> None:
        self._unlink(node)
        self._released.update(self._uses_of(node))
        for name in node.output:
            if name:
                self._vanished.add(name)
                self.constants.forget(name)

    def _dead_constant_nodes(self) -> None:
        """Remove pure constant-subgraph nodes whose outputs folding left unused."""
        pending = list(self._released)
        while pending:
            name = pending.pop()
            if self.users(name) or name in self.outputs:
                continue
            if name in self.initializers:
                self.ctx.released.add(name)
                continue
            node = self.producer.get(name)
            if node is None:
                if name not in self.inputs:
                    self.ctx.released.add(name)  # an outer-scope initializer
                continue
            if (
                node.op_type not in CONSTANT_OPS
                or not is_default(node)
                or any(self.users(out) or out in self.outputs for out in node.output if out)
            ):
                continue
            self._drop(node)
            self._removed[node] = None
            pending.extend(self._uses_of(node))

    def _expand(self, node: onnx.NodeProto, out: list[onnx.NodeProto]) -> None:
        # A replacement node may itself have been replaced by a later fold (Conv -> BN -> BN).
        replacement = self._replacement.get(node)
        if replacement is not None:
            for new in replacement:
                self._expand(new, out)
        elif node not in self._removed:
            out.append(node)

    def commit(self) -> None:
        """Write the queued edits into the graph / function (one pass over its nodes).

        This ends the index's life: its node references point at the old node list afterwards.
        """
        if not self.changed:
            return
        self._dead_constant_nodes()
        body = self.graph if self.graph is not None else self.function
        rebuilt: list[onnx.NodeProto] = []
        for node in self.nodes:
            self._expand(node, rebuilt)
        del body.node[:]
        body.node.extend(rebuilt)
        self.nodes = list(body.node)
        self._uses.clear()  # the node objects changed
        stale = self._vanished - set(self.producer)
        value_info = getattr(body, "value_info", None)
        if stale and value_info is not None and any(vi.name in stale for vi in value_info):
            kept = [vi for vi in value_info if vi.name not in stale]
            del value_info[:]
            value_info.extend(kept)
        self._removed.clear()
        self._replacement.clear()
        self.changed = False
