"""Graph indexes, constant evaluation and the rewrite API that every fold pattern builds on.

The pattern protocol
--------------------
A fold is *pattern -> check -> rewrite*. A pattern is any object with

``name: str``
    Short identifier used in logs (e.g. ``"conv-bn"``).
``anchors: frozenset[str]``
    The op types of the nodes it starts from (``{"BatchNormalization"}`` for the BN patterns,
    ``{"Mul", "Sub", ...}`` for decomposed-BN patterns).
``__call__(node, index) -> Rewrite | Skip | None``
    ``None``: the pattern does not apply to ``node`` at all (the next pattern is tried and nothing
    is reported). ``Skip(reason)``: it applies but cannot fold exactly; the reason reaches the
    user's report unless a later pattern folds the node. ``Rewrite``: a complete plan, computed
    without touching the graph; the pass applies it.

Patterns never mutate the graph or the index: they read through the `GraphIndex` (``producer``,
``consumers``, ``constant``, ``fetch``, ``rank``, ``read_batchnorm``, ...), reserve the names of new
tensors with `GraphIndex.fresh_name`, build new nodes with `replace_node`, cast folded float64
values with `GraphIndex.cast_folded`, and return a `Rewrite`. Each pattern module exports its
patterns, in the order they are tried, as a module-level list ``PATTERNS``; `bnfold.folding.fold_pass`
lists the modules. ``FunctionPattern`` / `pattern` wrap a plain function::

    @pattern("conv-bn", "BatchNormalization")
    def conv_bn(node, index):
        producer = index.producer.get(node.input[0])
        ...
        return Rewrite(into=producer.name, remove=[node], replace=[(producer, [new_conv])],
                       constants={w_name: w_array}, tensor_map={...})

Index rules (each pattern may rely on them)
-------------------------------------------
1. The index is built once per graph (or model-local function) and updated incrementally when a
   rewrite is applied, so patterns see the effect of earlier folds in the same graph and the pass
   stays linear in the graph size.
2. ``consumers[name]`` lists every node that reads ``name``, including nodes whose subgraph bodies
   (If / Loop / Scan) read it from the outer scope; graph outputs are in ``outputs``.
3. ``constant(name)`` evaluates initializers (NumPy views of their raw bytes), ``Constant`` nodes and
   small constant subgraphs: Identity, Cast, CastLike (its second input is read for its dtype only),
   ConstantOfShape, Reshape, Unsqueeze, Squeeze, Expand, Transpose (PyTorch's exporter writes a
   Linear weight as ``Transpose(W)`` without constant folding), Concat, and Shape of a statically
   shaped value
   (the PyTorch ``dynamo=True`` zero bias is ``Shape -> Expand -> CastLike -> Expand``). Names not
   defined in a subgraph are looked up in the enclosing graph. Results are cached; callers must not
   write into returned arrays.
4. Initializers that are also graph inputs are constants unless the fold runs with
   ``keep_initializer_inputs=True``; using one marks it for removal from the inputs if it ends up
   unused.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.algebra import bn_affine, check_representable
from bnfold.folding.chunked import Cast, Deferred
from bnfold.io.mapped import covers, defer, spill

if TYPE_CHECKING:
    from bnfold.folding.report import FoldReport

__all__ = [
    "FoldedTensors",
    "Skip",
    "ChainSkip",
    "Invalid",
    "Rewrite",
    "Pattern",
    "FunctionPattern",
    "pattern",
    "FoldOptions",
    "ModelContext",
    "GraphIndex",
    "BatchNormParams",
    "replace_node",
    "get_attr",
    "node_label",
    "array_to_tensor",
    "tensor_to_array",
    "MAX_CONSTANT_ELEMENTS",
    "AttributeRef",
    "validate_batchnorm",
    "np_dtype",
    "attr_graphs",
]

log = logging.getLogger(__name__)

#: Constant subgraphs that would materialize more elements than this are not evaluated.
MAX_CONSTANT_ELEMENTS = 1 << 26

#: Initializer values larger than this are read again when needed rather than cached.
_CACHE_MAX_BYTES = 1 << 16

#: Ops whose outputs are pure functions of their inputs, removed when a fold leaves them unused.
_PURE_CONSTANT_OPS = frozenset(
    {"Constant", "Identity", "Cast", "CastLike", "ConstantOfShape", "Reshape", "Unsqueeze",
     "Squeeze", "Expand", "Shape", "Transpose", "Concat", "Gather"}
)

_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Skip:
    """A pattern applies to a node but cannot fold it exactly; ``reason`` reaches the report."""

    reason: str


@dataclass(frozen=True)
class FoldedTensors:
    """A fold's new weight and bias: their names, values by name, and subnormals flushed."""

    weight: str
    bias: str
    constants: dict[str, np.ndarray]
    subnormals: int


@dataclass(frozen=True)
class ChainSkip(Skip):
    """A decomposed BN (per-channel Mul/Add chain) was recognised but cannot be folded.

    ``node`` is the chain's first scaling node, which names the chain in the report.
    """

    node: onnx.NodeProto | None = None


@dataclass(frozen=True)
class Invalid(Skip):
    """The model is invalid at this node, e.g. BN parameters for 3 channels after a 4-channel Conv.

    Patterns anchored on other ops (decomposed chains) treat it as a `Skip`; for a
    BatchNormalization node the pass raises `BnfoldError` with ``reason`` instead of keeping it.
    """


@dataclass
class Rewrite:
    """A complete, not yet applied, plan for one fold.

    Attributes
    ----------
    into : str or None
        Name of the node that absorbs the BN (reported as "folded into <into>").
    remove : list of NodeProto
        Nodes deleted (the BN, a bias Add, the Mul/Add of a decomposed BN, ...).
    replace : list of (NodeProto, list of NodeProto)
        Each anchor node is replaced by the new nodes, at the anchor's position in the graph (so
        topological order holds if the new nodes read values defined before the anchor and the
        anchor's former consumers come after it).
    constants : dict of str to numpy.ndarray
        New constant tensors, keyed by names reserved with `GraphIndex.fresh_name`; written as
        initializers (as Constant nodes inside functions) once, with ``raw_data``.
    tensor_map : dict of str to str
        Original tensor name -> new tensor name, for the report.
    status : {"folded", "decomposed"}
    subnormals : int
        Values flushed to zero by `GraphIndex.cast_folded` while building this plan.
    bn : NodeProto or None
        The node reported on; defaults to the anchor node the pattern was called with.
    """

    into: str | None
    remove: list[onnx.NodeProto] = field(default_factory=list)
    replace: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    tensor_map: dict[str, str] = field(default_factory=dict)
    status: str = "folded"
    subnormals: int = 0
    bn: onnx.NodeProto | None = None


class Pattern(Protocol):
    """See the module docstring."""

    name: str
    anchors: frozenset[str]

    def __call__(self, node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None: ...


@dataclass(frozen=True)
class FunctionPattern:
    """A `Pattern` made from a plain function ``func(node, index)``."""

    name: str
    anchors: frozenset[str]
    func: Callable[[onnx.NodeProto, GraphIndex], Rewrite | Skip | None]

    def __call__(self, node: onnx.NodeProto, index: GraphIndex) -> Rewrite | Skip | None:
        return self.func(node, index)


def pattern(name: str, *anchors: str) -> Callable[[Callable], FunctionPattern]:
    """Decorator turning ``func(node, index)`` into a `FunctionPattern` anchored on ``anchors``."""

    def wrap(func: Callable) -> FunctionPattern:
        return FunctionPattern(name=name, anchors=frozenset(anchors), func=func)

    return wrap


@dataclass(frozen=True)
class FoldOptions:
    """The switches of `bnfold.folding.fold` that patterns may read (``index.options``)."""

    decompose_rest: bool = False
    keep_initializer_inputs: bool = False
    exclude: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def get_attr(node: onnx.NodeProto, name: str, default=None):
    """Value of attribute ``name`` of ``node`` (``default`` if absent)."""
    for attr in node.attribute:
        if attr.name == name:
            if attr.ref_attr_name:
                raise AttributeRef(name)
            return helper.get_attribute_value(attr)
    return default


class AttributeRef(Exception):
    """An attribute of a function body node refers to a function attribute (value unknown).

    Raised by `get_attr`; the pass turns it into a `Skip`.
    """


def node_label(node: onnx.NodeProto) -> str:
    """The node's name, or ``<OpType -> first output>`` for unnamed nodes."""
    if node.name:
        return node.name
    first = node.output[0] if len(node.output) else "?"
    return f"<{node.op_type} -> {first}>"


def replace_node(
    node: onnx.NodeProto,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    attrs: dict | None = None,
    drop_attrs: Iterable[str] = (),
    op_type: str | None = None,
) -> onnx.NodeProto:
    """A copy of ``node`` (same name, domain, doc string) with some fields replaced.

    ``attrs`` maps attribute names to new values (set or overwritten); ``drop_attrs`` removes
    attributes. The original node is not modified.
    """
    new = onnx.NodeProto()
    new.CopyFrom(node)
    if op_type is not None:
        new.op_type = op_type
    if inputs is not None:
        del new.input[:]
        new.input.extend(inputs)
    if outputs is not None:
        del new.output[:]
        new.output.extend(outputs)
    drop = set(drop_attrs) | set(attrs or {})
    if drop:
        kept = [a for a in new.attribute if a.name not in drop]
        del new.attribute[:]
        new.attribute.extend(kept)
    for key, value in (attrs or {}).items():
        new.attribute.append(helper.make_attribute(key, value))
    return new


_RAW_DTYPES = {
    TensorProto.FLOAT: np.dtype(np.float32),
    TensorProto.DOUBLE: np.dtype(np.float64),
    TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.INT8: np.dtype(np.int8),
    TensorProto.UINT8: np.dtype(np.uint8),
    TensorProto.INT16: np.dtype(np.int16),
    TensorProto.UINT16: np.dtype(np.uint16),
    TensorProto.INT32: np.dtype(np.int32),
    TensorProto.UINT32: np.dtype(np.uint32),
    TensorProto.INT64: np.dtype(np.int64),
    TensorProto.UINT64: np.dtype(np.uint64),
    TensorProto.BOOL: np.dtype(np.bool_),
}


_tensor_dtype = functools.lru_cache(maxsize=None)(helper.np_dtype_to_tensor_dtype)


@functools.lru_cache(maxsize=None)
def np_dtype(elem_type: int) -> np.dtype | None:
    """NumPy dtype of an ONNX element type (ml_dtypes' bfloat16 for BFLOAT16), or None."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # noqa: BLE001 - unknown / undefined element types
        return None


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values; a read-only view of ``raw_data`` for the common numeric types.

    External data of a model opened with `bnfold.io.mapped.open_model` is a read-only view of
    the memory-mapped file: nothing is read until the values are used.
    """
    dtype = _RAW_DTYPES.get(tensor.data_type)
    if tensor.data_location == TensorProto.EXTERNAL:
        from bnfold.io.mapped import external_array

        if dtype is not None and sys.byteorder == "little":
            return external_array(tensor, dtype)
        # Other element types: their bytes, decoded as if they had been loaded.
        raw = np.ascontiguousarray(external_array(tensor, np.dtype(np.uint8)).reshape(-1))
        loaded = TensorProto()
        loaded.CopyFrom(tensor)
        loaded.ClearField("data_location")
        del loaded.external_data[:]
        loaded.raw_data = raw.tobytes()
        return numpy_helper.to_array(loaded)
    if dtype is not None and tensor.HasField("raw_data") and sys.byteorder == "little":
        raw = tensor.raw_data
        return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor)


def array_to_tensor(
    array: np.ndarray, name: str, elem_type: int | None = None, *, into: onnx.TensorProto | None = None
) -> onnx.TensorProto:
    """A TensorProto holding ``array`` as ``raw_data``, written once.

    ``into``: an empty tensor to fill (e.g. ``graph.initializer.add()``), which saves copying
    the bytes again when the tensor is appended to a graph.
    """
    array = np.asarray(array)
    if elem_type is None:
        elem_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor = TensorProto() if into is None else into
    if elem_type in _RAW_DTYPES and sys.byteorder == "little":
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(array.shape)
        values = np.ascontiguousarray(array, dtype=_RAW_DTYPES[elem_type])
        # A large initializer of a model opened from disk goes to a scratch file, not memory.
        if into is None or not spill(tensor, values):
            tensor.raw_data = values.tobytes()
    else:
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    return tensor


# --------------------------------------------------------------------------------------------
# Model-wide context
# --------------------------------------------------------------------------------------------
def _graph_names(graph: onnx.GraphProto, names: set[str]) -> None:
    names.update(v.name for v in graph.input)
    names.update(v.name for v in graph.output)
    names.update(v.name for v in graph.value_info)
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _graph_names(sub, names)


def attr_graphs(attr: AttributeProto) -> list[onnx.GraphProto]:
    """The subgraph bodies held by a node attribute (If branches, Loop / Scan bodies)."""
    if attr.type == AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


class ModelContext:
    """What every graph of one model shares: names, opsets, options, the report, shape info."""

    def __init__(
        self,
        model: onnx.ModelProto,
        options: FoldOptions,
        report: FoldReport,
        *,
        original: onnx.ModelProto | None = None,
    ) -> None:
        self.model = model
        self.original = original if original is not None else model
        self.options = options
        self.report = report
        self.opsets = {imp.domain or "": imp.version for imp in model.opset_import}
        self._names: set[str] | None = None
        self._counter = 0
        self._inferred: dict[str, onnx.TypeProto] | None = None
        #: initializer names that folds stopped using; removed at the end if nothing else uses them
        self.released: set[str] = set()
        self._workspace = np.empty(0, dtype=np.float64)

    @property
    def names(self) -> set[str]:
        if self._names is None:
            names: set[str] = set()
            _graph_names(self.model.graph, names)
            names.update(t.name for t in self.original.graph.initializer)
            for function in self.model.functions:
                names.update(function.input)
                names.update(function.output)
                for node in function.node:
                    names.update(node.input)
                    names.update(node.output)
            self._names = names
        return self._names

    def workspace(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 scratch array of ``shape``, reused across folds (valid until the next call)."""
        size = math.prod(shape)
        if self._workspace.size < size:
            self._workspace = np.empty(max(size, 2 * self._workspace.size), dtype=np.float64)
        return self._workspace[:size].reshape(shape)

    def fresh_name(self, hint: str) -> str:
        """A tensor name unused anywhere in the model, derived from ``hint``."""
        names = self.names
        candidate = hint
        while candidate in names or not candidate:
            self._counter += 1
            candidate = f"{hint}_{self._counter}"
        names.add(candidate)
        return candidate

    def inferred_type(self, name: str) -> onnx.TypeProto | None:
        """Type of ``name`` from ONNX shape inference on the input model (run once, lazily)."""
        if self._inferred is None:
            self._inferred = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.original, strict_mode=False)
            except Exception as exc:  # noqa: BLE001 - inference is best effort
                log.debug("shape inference failed: %s", exc)
            else:
                graphs = [inferred.graph]
                while graphs:
                    graph = graphs.pop()
                    for vi in (*graph.value_info, *graph.output, *graph.input):
                        self._inferred.setdefault(vi.name, vi.type)
                    for node in graph.node:
                        for attr in node.attribute:
                            graphs.extend(attr_graphs(attr))
        return self._inferred.get(name)


# --------------------------------------------------------------------------------------------
# BatchNormalization parameters
# --------------------------------------------------------------------------------------------
@dataclass
class BatchNormParams:
    """The constant parameters of one inference-mode BatchNormalization node.

    ``gamma``, ``beta``, ``mean``, ``var`` are the stored arrays flattened to (C,), in their
    own dtype; ``names`` maps the roles to the input tensor names (for ``tensor_map``).
    """

    node: onnx.NodeProto
    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float
    names: dict[str, str]

    @property
    def channels(self) -> int:
        return int(self.gamma.shape[0])

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Float64 ``(scale, shift)`` with ``BN(x) = scale * x + shift`` (`algebra.bn_affine`)."""
        return bn_affine(self.gamma, self.beta, self.mean, self.var, self.eps)


_BN_ROLES = ("scale", "bias", "mean", "var")


# --------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------
class GraphIndex:
    """Producer / consumer / constant index of one graph body or model-local function.

    Built once (linear in the size of the body, subgraphs included); `apply` keeps it current.

    Parameters
    ----------
    nodes : list of NodeProto
        The body's nodes, in order.
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
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
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
        self._uses_cache: dict[int, set[str]] = {}
        for node in self.nodes:
            self._link(node)
        self._removed: set[int] = set()
        self._replacement: dict[int, list[onnx.NodeProto]] = {}
        self._new_constant_nodes: dict[int, list[onnx.NodeProto]] = {}
        self._vanished: set[str] = set()
        self._released: set[str] = set()
        self._cache: dict[str, tuple[np.ndarray | None, str | None]] = {}
        self.changed = False

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def for_graph(cls, graph, ctx, path="main", parent=None, initializers=None) -> GraphIndex:
        """Index of ``graph``; ``initializers`` (read only) replaces ``graph.initializer``."""
        return cls(ctx, path, graph=graph, parent=parent, initializers=initializers)

    @classmethod
    def for_function(cls, function, ctx) -> GraphIndex:
        path = f"function:{function.domain}.{function.name}" if function.domain else f"function:{function.name}"
        return cls(ctx, path, function=function)

    def _uses(self, node: onnx.NodeProto) -> set[str]:
        # Cached by identity: nodes are never edited in place (rewrites build new ones), and every
        # node seen here stays referenced by ``nodes`` or a replacement list, so ids are stable.
        key = id(node)
        used = self._uses_cache.get(key)
        if used is None:
            used = self._uses_cache[key] = self._compute_uses(node)
        return used

    def _compute_uses(self, node: onnx.NodeProto) -> set[str]:
        used = {name for name in node.input if name}
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH or attr.type == AttributeProto.GRAPHS:
                for sub in attr_graphs(attr):
                    used |= _captured(sub)
        return used

    def _link(self, node: onnx.NodeProto) -> None:
        for name in self._uses(node):
            self.consumers.setdefault(name, []).append(node)
        for name in node.output:
            if name:
                self.producer[name] = node

    def _unlink(self, node: onnx.NodeProto) -> None:
        for name in self._uses(node):
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
        return id(node) in self._removed or id(node) in self._replacement

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
        if node is not None and node.op_type == "Cast" and node.domain in _DEFAULT_DOMAINS:
            try:
                return int(get_attr(node, "to"))
            except AttributeRef:
                return None
        value = self.constant(name)
        if value is not None:
            try:
                return helper.np_dtype_to_tensor_dtype(value.dtype)
            except Exception:  # noqa: BLE001
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
        cached = self._cache.get(name)
        if cached is not None and cached[0] is not None:
            return tuple(cached[0].shape)
        return None

    def rank(self, name: str) -> int | None:
        """Rank of ``name`` from type info / shape inference, or None if unknown."""
        shape = self.shape(name)
        return None if shape is None else len(shape)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shape(name)
        if shape is None or not all(isinstance(d, int) for d in shape):
            return None
        return tuple(shape)  # type: ignore[return-value]

    # ---- constants ----------------------------------------------------------------------
    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a compile-time constant (see rule 3), else None."""
        return self._evaluate(name, 0)[0]

    def nonconstant_reason(self, name: str) -> str:
        """Why ``constant(name)`` is None (a phrase such as ``"'x' is a graph input"``)."""
        return self._evaluate(name, 0)[1] or f"'{name}' is constant"

    def fetch(self, **roles: str | None) -> dict[str, np.ndarray | None] | Skip:
        """Constant values of several inputs, or `Skip` naming the first that is not constant.

        ``index.fetch(weight=conv.input[1], bias=...)``; a role whose name is None or ``""``
        (an absent optional input) maps to None.
        """
        values: dict[str, np.ndarray | None] = {}
        for role, name in roles.items():
            if not name:
                values[role] = None
                continue
            value, reason = self._evaluate(name, 0)
            if value is None:
                return Skip(f"{role} is not constant: {reason}")
            values[role] = value
        return values

    def _evaluate(self, name: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if depth > 64:
            return None, f"'{name}' is computed by a constant chain too deep to evaluate"
        result = self._evaluate_uncached(name, depth)
        value = result[0]
        # Large initializers are not kept: re-reading one is a single copy, and holding every
        # weight of a deep model alive makes each new array land on fresh (page-faulting) memory.
        if value is None or value.nbytes <= _CACHE_MAX_BYTES or name not in self.initializers:
            self._cache[name] = result
        return result

    def _evaluate_uncached(self, name: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        node = self.producer.get(name)
        if node is not None:
            return self._evaluate_node(node, name, depth)
        tensor = self.initializers.get(name)
        if tensor is not None:
            if name in self.inputs and self.options.keep_initializer_inputs:
                return None, (
                    f"'{name}' is an initializer also listed as a graph input (kept as an input:"
                    " keep_initializer_inputs)"
                )
            if tensor.data_location == TensorProto.EXTERNAL and not covers(tensor):
                return None, f"'{name}' is stored as external data that was not loaded"
            try:
                return tensor_to_array(tensor), None
            except Exception as exc:  # noqa: BLE001 - exotic element types
                return None, f"'{name}' has an unsupported element type ({exc})"
        if name in self.inputs:
            kind = "function input" if self.function is not None else "graph input"
            return None, f"'{name}' is a {kind} (computed at run time)"
        if self.parent is not None:
            return self.parent._evaluate(name, depth + 1)
        return None, f"'{name}' is not defined in this graph"

    def _evaluate_node(self, node, name, depth) -> tuple[np.ndarray | None, str | None]:
        op = node.op_type
        label = f"'{name}' is computed at run time by {op} '{node_label(node)}'"
        if node.domain not in _DEFAULT_DOMAINS or op not in _CONSTANT_OPS:
            return None, label
        if op == "Gather" and len(node.input) == 2 and self._evaluate(node.input[0], depth + 1)[0] is None:
            return self._gather_static_dims(node, label, depth)
        args = []
        for i, inp in enumerate(node.input):
            if op == "CastLike" and i == 1:
                args.append(inp)  # only its element type is read
                continue
            if op == "Shape" and i == 0:
                args.append(inp)
                continue
            if not inp:
                args.append(None)
                continue
            value, reason = self._evaluate(inp, depth + 1)
            if value is None:
                return None, reason
            args.append(value)
        try:
            value = _CONSTANT_OPS[op](self, node, args)
        except AttributeRef:
            return None, f"{label} with an attribute given by the calling function"
        except Exception as exc:  # noqa: BLE001 - malformed constant subgraphs are not constants
            log.debug("cannot evaluate %s: %s", label, exc)
            return None, f"{label} (not evaluable: {exc})"
        if value is None:
            return None, label
        if value.size > MAX_CONSTANT_ELEMENTS:
            return None, f"{label} (constant too large to evaluate)"
        return value, None

    def _gather_static_dims(self, node, label: str, depth: int) -> tuple[np.ndarray | None, str | None]:
        """``Gather(Shape(x), i)`` where ``x`` is computed at run time but dimension ``i`` of its
        shape is static: a constant (exporters build reshape targets this way, e.g. Keras 3's
        depthwise convolution bias ``Reshape(b, Concat(1, 1, 1, Gather(Shape(x), 3)))``)."""
        shape_node = self.producer.get(node.input[0])
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.domain not in _DEFAULT_DOMAINS:
            return None, label
        dims = self.shape(shape_node.input[0])
        indices, reason = self._evaluate(node.input[1], depth + 1)
        if dims is None or indices is None:
            return None, reason or f"{label} (the shape of '{shape_node.input[0]}' is unknown)"
        rank = len(dims)
        start = int(get_attr(shape_node, "start", 0))  # ONNX Shape-15 start/end, clamped as the spec says
        end = get_attr(shape_node, "end")
        end = rank if end is None else int(end)
        start = min(max(start + rank if start < 0 else start, 0), rank)
        end = min(max(end + rank if end < 0 else end, 0), rank)
        if int(get_attr(node, "axis", 0)) not in (0, -1):
            return None, label
        try:
            picked = np.take(np.array(dims[start:end], dtype=object), np.asarray(indices, dtype=np.int64))
        except IndexError as exc:
            return None, f"{label} (not evaluable: {exc})"
        picked = np.asarray(picked, dtype=object)
        if not all(isinstance(d, (int, np.integer)) for d in picked.flat):
            return None, f"{label} (a symbolic dimension of '{shape_node.input[0]}')"
        return picked.astype(np.int64), None

    # ---- folding helpers ----------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """Reserve a tensor name unused anywhere in the model."""
        return self.ctx.fresh_name(hint)

    def read_batchnorm(self, node: onnx.NodeProto) -> BatchNormParams | Skip:
        """Constant parameters of BN ``node``, flattened to (C,), or `Skip`."""
        try:
            eps = float(get_attr(node, "epsilon", 1e-5))  # ONNX BatchNormalization default
        except AttributeRef:
            return Skip("epsilon is given by the calling function")
        names = {role: node.input[i + 1] for i, role in enumerate(_BN_ROLES) if len(node.input) > i + 1}
        if len(names) < 4:
            return Skip("BatchNormalization has fewer than 5 inputs")
        values = self.fetch(**names)
        if isinstance(values, Skip):
            return Skip(f"BN {values.reason}")
        arrays = {}
        channels = None
        for role in _BN_ROLES:
            value = np.asarray(values[role])
            squeezed = value.reshape(-1) if value.ndim >= 1 and value.size == value.shape[0] else None
            if squeezed is None:
                return Skip(f"BN {role} '{names[role]}' has shape {value.shape}, not one value per channel")
            if channels is None:
                channels = squeezed.shape[0]
            elif squeezed.shape[0] != channels:
                return Skip(f"BN parameters disagree on the number of channels ({channels} vs {squeezed.shape[0]})")
            arrays[role] = squeezed
        return BatchNormParams(
            node=node, gamma=arrays["scale"], beta=arrays["bias"], mean=arrays["mean"],
            var=arrays["var"], eps=eps, names=names,
        )

    def folded_tensors(self, weight64: np.ndarray, bias64: np.ndarray, elem_type: int, *, weight_name: str,
                       bias_name: str | None, hint: str) -> FoldedTensors | Skip:
        """Cast a fold's float64 weight and bias to ``elem_type`` (`cast_folded`) and reserve
        fresh names for them: ``<weight>_folded`` and ``<bias>_folded`` (``<hint>_bias_folded``
        when the linear node had no bias)."""
        what = f"folded weight of '{weight_name}'"
        if isinstance(weight64, str):  # computed and checked block by block (bnfold.folding.chunked)
            return Skip(f"{what}: {weight64}")
        if isinstance(weight64, (Cast, Deferred)):
            cast_w: tuple[np.ndarray | Deferred, int] | Skip = (
                weight64.array if isinstance(weight64, Cast) else weight64, weight64.flushed)
        else:
            cast_w = self.cast_folded(weight64, elem_type, what)
        if isinstance(cast_w, Skip):
            return cast_w
        cast_b = self.cast_folded(bias64, elem_type, "folded bias")
        if isinstance(cast_b, Skip):
            return cast_b
        weight = self.fresh_name(f"{weight_name}_folded")
        bias = self.fresh_name(f"{bias_name}_folded" if bias_name else f"{hint}_bias_folded")
        return FoldedTensors(weight=weight, bias=bias, constants={weight: cast_w[0], bias: cast_b[0]},
                             subnormals=cast_w[1] + cast_b[1])

    def cast_folded(self, values: np.ndarray, elem_type: int, what: str) -> tuple[np.ndarray, int] | Skip:
        """Cast float64 folded ``values`` to ``elem_type``; flush subnormals to zero.

        Returns ``(array, n_flushed)`` or `Skip` if a value overflows the target type.
        """
        dtype = np_dtype(elem_type)
        if dtype is None:
            return Skip(f"{what} has element type {elem_type}, which bnfold does not fold")
        reason = check_representable(values, dtype)
        if reason is not None:
            return Skip(f"{what}: {reason}")
        cast = np.asarray(values, dtype=np.float64).astype(dtype)
        tiny = _smallest_normal(dtype)
        if tiny is None or not cast.size:
            return cast, 0
        probe = cast if cast.dtype.kind == "f" else cast.astype(np.float32)
        # Boolean temporaries only (1 byte per value): no float-sized scratch arrays.
        subnormal = (probe < tiny) & (probe > -tiny)
        if not subnormal.any():  # the common case
            return cast, 0
        subnormal &= probe != 0
        count = int(np.count_nonzero(subnormal))
        cast[subnormal] = 0
        return cast, count

    # ---- applying rewrites --------------------------------------------------------------
    def apply(self, rewrite: Rewrite) -> None:
        """Apply ``rewrite``: update this index and queue the graph edits for `commit`."""
        self.changed = True
        new_nodes: list[onnx.NodeProto] = []
        for node in rewrite.remove:
            self._drop(node)
            self._removed.add(id(node))
        for anchor, replacement in rewrite.replace:
            self._drop(anchor)
            self._replacement[id(anchor)] = list(replacement)
            new_nodes.extend(replacement)
        constant_nodes = []
        for name, array in rewrite.constants.items():
            if isinstance(array, Deferred):
                if self.function is None:
                    # Computed when written (bnfold.folding.chunked): never in memory as a whole.
                    tensor = self.graph.initializer.add()
                    tensor.name, tensor.data_type = name, _tensor_dtype(array.dtype)
                    tensor.dims.extend(array.shape)
                    defer(tensor, array)
                    self.initializers[name] = tensor
                    self._cache.pop(name, None)
                    continue
                array = array.materialize()
            elem_type = _tensor_dtype(np.asarray(array).dtype)
            if self.function is not None:
                tensor = array_to_tensor(array, name, elem_type)
                constant_nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            else:
                # Written straight into the graph; `commit` / the pass's cleanup drop it if a
                # later fold in this graph makes it unused.
                self.initializers[name] = array_to_tensor(array, name, elem_type, into=self.graph.initializer.add())
            # Not cached: the array can be freed now; a later fold re-reads the tensor.
            self._cache.pop(name, None)
        if constant_nodes:
            if not rewrite.replace:
                raise AssertionError("a rewrite with new constants inside a function must replace a node")
            first_anchor = rewrite.replace[0][0]
            self._replacement[id(first_anchor)][:0] = constant_nodes
            new_nodes[:0] = constant_nodes
        for node in new_nodes:
            self._link(node)
            for name in node.output:
                self._vanished.discard(name)
                self._cache.pop(name, None)
        self.ctx.report.subnormals_flushed += rewrite.subnormals

    def _drop(self, node: onnx.NodeProto) -> None:
        self._unlink(node)
        self._released.update(self._uses(node))
        for name in node.output:
            if name:
                self._vanished.add(name)
                self._cache.pop(name, None)

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
                node.op_type not in _PURE_CONSTANT_OPS
                or node.domain not in _DEFAULT_DOMAINS
                or any(self.users(out) or out in self.outputs for out in node.output if out)
            ):
                continue
            self._drop(node)
            self._removed.add(id(node))
            pending.extend(self._uses(node))

    def _expand(self, node: onnx.NodeProto, out: list[onnx.NodeProto]) -> None:
        # A replacement node may itself have been replaced by a later fold (Conv -> BN -> BN).
        key = id(node)
        if key in self._replacement:
            for new in self._replacement[key]:
                self._expand(new, out)
        elif key not in self._removed:
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
        self._uses_cache.clear()  # the node objects changed: ids may be reused
        stale = self._vanished - set(self.producer)
        value_info = getattr(body, "value_info", None)
        if stale and value_info is not None and any(vi.name in stale for vi in value_info):
            kept = [vi for vi in value_info if vi.name not in stale]
            del value_info[:]
            value_info.extend(kept)
        self._removed.clear()
        self._replacement.clear()
        self.changed = False


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


@functools.lru_cache(maxsize=None)
def _smallest_normal(dtype: np.dtype) -> float | None:
    try:
        return float(np.finfo(dtype).tiny)
    except (TypeError, ValueError):
        try:
            import ml_dtypes

            return float(ml_dtypes.finfo(dtype).tiny)
        except Exception:  # noqa: BLE001
            return None


# --------------------------------------------------------------------------------------------
# Constant evaluation of small subgraphs (ONNX operator semantics, default domain)
# --------------------------------------------------------------------------------------------
def _eval_constant(index: GraphIndex, node, args):
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


def _eval_identity(index, node, args):
    return args[0]


def _eval_cast(index, node, args):
    dtype = np_dtype(int(get_attr(node, "to")))
    return None if dtype is None else np.asarray(args[0]).astype(dtype)


def _eval_castlike(index, node, args):
    elem_type = index.elem_type(args[1])
    dtype = None if elem_type is None else np_dtype(elem_type)
    return None if dtype is None else np.asarray(args[0]).astype(dtype)


def _eval_constant_of_shape(index, node, args):
    shape = tuple(int(d) for d in np.asarray(args[0]).reshape(-1))
    if math.prod(shape) > MAX_CONSTANT_ELEMENTS:
        return None
    value = get_attr(node, "value")
    # ONNX ConstantOfShape: default is a float32 zero.
    fill = np.zeros(1, dtype=np.float32) if value is None else numpy_helper.to_array(value).reshape(-1)
    return np.full(shape, fill[0], dtype=fill.dtype)


def _eval_reshape(index, node, args):
    data, shape = np.asarray(args[0]), [int(d) for d in np.asarray(args[1]).reshape(-1)]
    allowzero = int(get_attr(node, "allowzero", 0))
    if not allowzero:
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _axes(index, node, args) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in np.asarray(args[1]).reshape(-1)]
    axes = get_attr(node, "axes")
    return None if axes is None else [int(a) for a in axes]


def _eval_unsqueeze(index, node, args):
    data = np.asarray(args[0])
    axes = _axes(index, node, args)
    rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(sorted(a % rank for a in axes)))


def _eval_squeeze(index, node, args):
    data = np.asarray(args[0])
    axes = _axes(index, node, args)
    if axes is None:
        return np.squeeze(data)
    return np.squeeze(data, axis=tuple(a % data.ndim for a in axes))


def _eval_expand(index, node, args):
    data = np.asarray(args[0])
    shape = tuple(int(d) for d in np.asarray(args[1]).reshape(-1))
    target = np.broadcast_shapes(data.shape, shape)  # Expand broadcasts both ways
    if math.prod(target) > MAX_CONSTANT_ELEMENTS:
        return None
    return np.broadcast_to(data, target)


def _eval_shape(index, node, args):
    value = index.constant(args[0])
    shape = tuple(value.shape) if value is not None else index.static_shape(args[0])
    if shape is None:
        return None
    rank = len(shape)
    start = int(get_attr(node, "start", 0))
    end = get_attr(node, "end")
    end = rank if end is None else int(end)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _eval_transpose(index, node, args):
    perm = get_attr(node, "perm")  # ONNX Transpose default: reverse the axes
    return np.transpose(np.asarray(args[0]), None if perm is None else [int(p) for p in perm])


def _eval_concat(index, node, args):
    return np.concatenate([np.asarray(a) for a in args], axis=int(get_attr(node, "axis")))


def _eval_gather(index, node, args):
    # ONNX Gather: axis defaults to 0; negative indices count from the end of that axis.
    return np.take(np.asarray(args[0]), np.asarray(args[1], dtype=np.int64), axis=int(get_attr(node, "axis", 0)))


_CONSTANT_OPS: dict[str, Callable] = {
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


def validate_batchnorm(node: onnx.NodeProto, index: GraphIndex) -> None:
    """Raise `BnfoldError` for a BN whose constant parameters are invalid.

    Invalid: negative or non-finite epsilon, a non-finite or negative variance, or
    ``var + eps <= 0`` (division by zero in ``1 / sqrt(var + eps)``). Parameters that are not
    constant are not checked (their values are unknown until run time).
    """
    label = node_label(node)
    try:
        eps = float(get_attr(node, "epsilon", 1e-5))
    except AttributeRef:
        eps = None
    if eps is not None and (not math.isfinite(eps) or eps < 0):
        raise BnfoldError(f"BatchNormalization '{label}' in {index.path}: epsilon is {eps:.6g}, must be >= 0")
    if len(node.input) < 5:
        return
    _validate_parameter_shapes(node, index, label)
    var = index.constant(node.input[4])
    if var is None:
        return
    var = np.asarray(var, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(var) | (var < 0)
    if eps is not None:
        bad |= (var + eps) <= 0
    if bad.any():
        channel = int(np.flatnonzero(bad)[0])
        raise BnfoldError(
            f"BatchNormalization '{label}' in {index.path}: variance '{node.input[4]}' channel"
            f" {channel} is {float(var[channel])!r} (epsilon {eps:.6g}); variance must be finite and"
            " var + epsilon > 0"
        )


def _validate_parameter_shapes(node: onnx.NodeProto, index: GraphIndex, label: str) -> None:
    """Raise `BnfoldError` unless BN ``node``'s constant parameters have one shape, with C values.

    The ONNX spec (BatchNormalization-9 and later, and ``spatial=1`` before) gives scale, B, mean
    and var the shape (C,), C being dimension 1 of X; with ``spatial=0`` (versions 1 to 7) they
    are (C, D1, ..., Dn). onnxruntime refuses anything else when it loads the model, so such a
    model is invalid input, not a BN to keep: folding or passing it on would hide that.
    """
    try:
        spatial_zero = index.opset("") < 9 and not int(get_attr(node, "spatial", 1))
    except AttributeRef:
        return  # per-channel or per-element is decided by the caller: nothing to check against
    # Declared shapes only: `index.shape` may run shape inference over the whole model, which costs
    # more than the fold. A producer's channel count is checked when the fold reads its weight.
    channels = None
    declared = index.types.get(node.input[0])
    if declared is not None and declared.HasField("tensor_type") and len(declared.tensor_type.shape.dim) > 1:
        dim = declared.tensor_type.shape.dim[1]
        channels = int(dim.dim_value) if dim.HasField("dim_value") else None
    where = f"BatchNormalization '{label}' in {index.path}"
    first: tuple[str, str, tuple[int, ...]] | None = None
    for role, name in zip(_BN_ROLES, node.input[1:5]):
        value = index.constant(name) if name else None
        if value is None:  # computed at run time: unknown until then
            continue
        shape = tuple(np.shape(value))
        if (len(shape) != 1) if not spatial_zero else (len(shape) < 1):
            raise BnfoldError(f"{where}: {role} '{name}' has shape {shape}, must be (C,): one value per channel")
        if first is not None and shape != first[2]:
            raise BnfoldError(
                f"{where}: {role} '{name}' has shape {shape} but {first[0]} '{first[1]}' has shape {first[2]}"
            )
        if channels is not None and shape[0] != channels:
            raise BnfoldError(
                f"{where}: {role} '{name}' has shape {shape}, {shape[0]} values for the {channels} channels"
                f" of input '{node.input[0]}'"
            )
        first = first or (role, name, shape)
