"""Training switches: ``If`` nodes whose condition is known before the model runs.

tf2onnx exports a tf.compat.v1 ``placeholder_with_default(False)`` training flag as a graph input
(``training:0``) backed by an initializer (its default), and every BN that reads the flag as an
``If`` on it: the inference-mode BN in one branch, the batch-statistics computation in the other.
No BN inside such branches can be folded while the ``If`` is there. `resolve_switches` replaces
each ``If`` whose condition is known by the branch it selects; `find_switches` lists the inputs
that act as switches and what each value would do.

ResolveSwitchesPass rules (cited in the code as "rule N"):

1. The input model is never modified. When no ``If`` can be resolved the same model object is
   returned; otherwise a resolved copy.
2. A condition is known when it evaluates, through Identity, Cast, CastLike, Not, Squeeze,
   Unsqueeze, Reshape, Flatten, And, Or, Xor and Equal on tensors of at most
   `MAX_ELEMENTS` elements, from:
   a. Constant nodes and initializers that are not graph inputs;
   b. a main-graph input pinned by the caller (``pins``, ``bnfold convert --set NAME=VALUE``);
   c. a main-graph input backed by an initializer, at that default value (``defaults=True``).
      Such an input can be overridden at run time, but a training flag fed ``True`` at inference
      is the bug this resolves; the report names the input and the value it was fixed to.
   A main-graph input with no initializer (a real data input) is never assumed: only a pin
   fixes it.
3. An ``If`` with a known condition is replaced by the branch it selects, inlined in its place:
   the branch's outputs take the names of the ``If`` outputs (an ``Identity`` where the branch
   output is an outer-scope name, an initializer of the branch, or repeated); branch-local names
   defined anywhere else in the model are renamed to fresh ones, in nested bodies too (unless a
   nested body defines the name itself); outer-scope references are kept as they are; the
   branch's initializers and value_info move to the enclosing graph.
4. Every graph is visited in order (main graph, then If / Loop / Scan bodies, recursively, with
   the enclosing scopes' values visible), and so are the nodes of an inlined branch: an ``If``
   nested in a selected branch, or inside a Loop body, on the same condition goes too.
5. Nodes that only fed the removed ``If`` nodes (their conditions, the outer-scope values read by
   the discarded branch) are removed, recursively, as are initializers no longer read. Nodes
   that were unused before are left alone.
6. A resolved main-graph input is removed from the graph inputs. If nothing reads it any more,
   its initializer goes too; otherwise its readers get a plain initializer holding the value.
7. Arithmetic that the resolution made constant is computed once, in the tensors' own dtype
   (Identity, Cast, Add, Sub, Mul, Div, Sqrt, Reciprocal, Neg on constants, starting from the
   values that replaced ``If`` outputs): a Keras-style decomposed BN whose mean and variance came
   through ``If`` nodes computes ``gamma / sqrt(var + eps)`` at run time, and only as constants
   do those become a BN the fold pass recognizes. Nothing else is constant-folded.

``bnfold.fold`` runs this pass first (``pins``; ``defaults`` is off under
``keep_initializer_inputs``, which treats initializer-backed inputs as run-time inputs).
"""

from __future__ import annotations

import collections
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.conditions import (
    DEFAULT_DOMAINS,
    MAX_ELEMENTS,
    Scope,
    condition_of,
    constant_node_value,
    is_if,
    is_small,
)
from bnfold.folding.nodes import attr_graphs, get_attr, node_label
from bnfold.folding.tensors import np_dtype, tensor_to_array
from bnfold.folding.inlining import Resolver, has_if, node_reads, prune

__all__ = [
    "MAX_ELEMENTS",
    "ResolvedSwitch",
    "SwitchOutcome",
    "TrainingSwitch",
    "find_switches",
    "parse_pin",
    "parse_pins",
    "pinned_reference",
    "resolve_switches",
    "switch_inputs",
]

log = logging.getLogger(__name__)

# Reductions that compute batch statistics when they reduce over axis 0.
_REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceVariance")

# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
@dataclass
class ResolvedSwitch:
    """What `resolve_switches` did for one switch input (or for the constant conditions).

    Attributes
    ----------
    input : str or None
        The main-graph input that decided the ``If`` nodes; None for constant conditions.
    value : bool, int, float or None
        The value the input was fixed to (None for constant conditions).
    source : {"default", "pinned", "constant"}
        Where the value came from: the input's initializer, the caller's pins, constants.
    ifs : list of str
        The ``If`` nodes replaced by a branch (``graph path/node``).
    removed : bool
        The input left the graph inputs (always, for an input).
    initializer_kept : bool
        Something besides the ``If`` nodes still reads the input, now a plain initializer.
    """

    input: str | None
    value: Any
    source: Literal["default", "pinned", "constant"]
    ifs: list[str] = field(default_factory=list)
    removed: bool = False
    initializer_kept: bool = False

    def line(self) -> str:
        """``training switch 'training:0' = False (its default): 4 If nodes replaced ...``."""
        count = f"{len(self.ifs)} If node{'s' if len(self.ifs) != 1 else ''}"
        if self.input is None:
            return f"{count} with a constant condition replaced by the branch it selects"
        how = "its default" if self.source == "default" else "pinned"
        text = f"training switch '{self.input}' = {self.value} ({how}): {count} replaced by the branch it selects"
        if self.removed:
            text += f"; input '{self.input}' removed"
            text += " (still read elsewhere: now a constant)" if self.initializer_kept else ""
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "value": self.value, "source": self.source, "ifs": list(self.ifs),
                "removed": self.removed, "initializer_kept": self.initializer_kept}


@dataclass
class SwitchOutcome:
    """What the model does with a switch set to ``value`` (the others at their defaults).

    ``bn_folded`` of ``bn_total`` BatchNormalization nodes would fold; ``batch_reductions``
    counts the reductions over axis 0 (batch statistics) left in the resolved model, and
    ``training_bns`` the BatchNormalization nodes in training mode. ``error`` is the fold
    pass's refusal, if any.
    """

    value: Any
    bn_folded: int
    bn_total: int
    batch_reductions: int
    training_bns: int
    error: str | None = None

    @property
    def batch_statistics(self) -> bool:
        return bool(self.batch_reductions or self.training_bns)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.value}: the fold pass refuses the model ({self.error})"
        if self.batch_statistics:
            parts = []
            if self.batch_reductions:
                parts.append(f"{self.batch_reductions} reductions over the batch axis")
            if self.training_bns:
                parts.append(f"{self.training_bns} BatchNormalization in training mode")
            stats = "batch statistics (" + ", ".join(parts) + ")"
        else:
            stats = "inference statistics"
        return f"{self.value}: {stats}, BN folded {self.bn_folded} of {self.bn_total}"

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "bn_folded": self.bn_folded, "bn_total": self.bn_total,
                "batch_reductions": self.batch_reductions, "training_bns": self.training_bns,
                "batch_statistics": self.batch_statistics, "error": self.error}


@dataclass
class TrainingSwitch:
    """A main-graph input that selects the branches of ``If`` nodes.

    Attributes
    ----------
    input : str
        Graph input name (``training:0``).
    dtype : str
        Its element type (NumPy name).
    default : bool, int, float or None
        Its initializer's value; None for an input with no initializer (only a pin fixes it).
    controls : list of str
        The ``If`` nodes whose condition it decides (``graph path/node``).
    outcomes : list of SwitchOutcome
        What each value (False / True, or 0 / 1) would do, the default first.
    """

    input: str
    dtype: str
    default: Any
    controls: list[str]
    outcomes: list[SwitchOutcome] = field(default_factory=list)

    @property
    def resolved_by_default(self) -> bool:
        return self.default is not None

    def describe(self) -> str:
        """One line: the input, its default, what each value does."""
        default = (f"default {self.default}, resolved to it by convert" if self.default is not None
                   else "no default (a run-time input), left alone unless pinned with --set")
        count = len(self.controls)
        head = f"training switch '{self.input}' ({self.dtype}, {default}) selects {count} If node{'s' * (count != 1)}"
        return head + "".join(f"; {outcome.describe()}" for outcome in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {"input": self.input, "dtype": self.dtype, "default": self.default,
                "resolved_by_default": self.resolved_by_default, "controls": list(self.controls),
                "outcomes": [outcome.to_dict() for outcome in self.outcomes]}


# ---------------------------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------------------------
_TRUE = ("1", "true")
_FALSE = ("0", "false")


def parse_pin(text: str) -> tuple[str, str]:
    """``"NAME=VALUE"`` -> ``(NAME, VALUE)`` (split at the last ``=``)."""
    name, sep, value = str(text).rpartition("=")
    if not sep or not name or not value.strip():
        raise BnfoldError(f"--set expects NAME=VALUE (e.g. training:0=0), got {text!r}")
    return name, value.strip()


def parse_pins(texts: Iterable[str]) -> dict[str, str]:
    """Repeated ``--set NAME=VALUE`` options -> ``{NAME: VALUE}``; a NAME given twice is an error."""
    pins: dict[str, str] = {}
    for text in texts:
        name, value = parse_pin(text)
        if name in pins:
            raise BnfoldError(f"--set gives input '{name}' twice")
        pins[name] = value
    return pins


def _input_info(model: onnx.ModelProto, name: str) -> tuple[np.dtype, tuple[int, ...] | None]:
    """dtype and static shape of a main-graph input (shape from its initializer if any)."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return np.dtype(np_dtype(tensor.data_type) or np.float32), tuple(tensor.dims)
    for value in model.graph.input:
        if value.name == name:
            tensor_type = value.type.tensor_type
            dtype = np_dtype(tensor_type.elem_type) if value.type.HasField("tensor_type") else None
            if dtype is None:
                raise BnfoldError(f"cannot pin input '{name}': it is not a tensor of a numeric or bool type")
            if not tensor_type.HasField("shape"):
                return np.dtype(dtype), None
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
            return np.dtype(dtype), dims
    raise KeyError(name)


def _coerce(name: str, raw: Any, dtype: np.dtype, shape: tuple[int, ...] | None) -> np.ndarray:
    """The pinned value as an array of the input's dtype and shape (a single element)."""
    if shape is not None and any(d != 1 for d in shape):
        dims = ["?" if d < 0 else d for d in shape]
        raise BnfoldError(f"cannot pin input '{name}': shape {dims} is not a single value")
    if isinstance(raw, str):
        text = raw.strip().lower()
        try:
            if dtype.kind == "b":
                if text not in _TRUE + _FALSE:
                    raise ValueError
                value: Any = text in _TRUE
            elif dtype.kind in "iu":
                if not re.fullmatch(r"[+-]?\d+", text):
                    raise ValueError
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            expected = {"b": "a boolean (0, 1, true, false)", "i": "an integer", "u": "an integer"}.get(
                dtype.kind, "a number")
            raise BnfoldError(f"cannot pin input '{name}' to {raw!r}: expected {expected} ({dtype.name})") from None
    else:
        value = np.asarray(raw)
        if value.size != 1:
            raise BnfoldError(f"cannot pin input '{name}': expected a single value, got shape {list(value.shape)}")
        value = value.reshape(()).item()
    try:
        with np.errstate(all="raise"):
            array = np.asarray(value).astype(dtype)
        if dtype.kind in "iu" and int(array) != value:
            raise ValueError
    except (ValueError, OverflowError, FloatingPointError, TypeError):
        raise BnfoldError(f"cannot pin input '{name}' to {raw!r}: out of range for {dtype.name}") from None
    return array.reshape(shape if shape is not None else ())


def _as_python(array: np.ndarray) -> Any:
    return np.asarray(array).reshape(-1)[0].item()


def _pin_arrays(model: onnx.ModelProto, pins: Mapping[str, Any] | None,
                controls: Mapping[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """Validated pins as arrays; with ``controls``, each pin must decide an If."""
    if not pins:
        return {}
    if isinstance(pins, (str, bytes)) or not isinstance(pins, Mapping):
        raise BnfoldError(f"pins must map input names to values, got {type(pins).__name__}")
    inputs = [v.name for v in model.graph.input]
    arrays = {}
    for name, raw in pins.items():
        if name not in inputs:
            listed = ", ".join(f"'{n}'" for n in inputs[:8]) + (" ..." if len(inputs) > 8 else "")
            raise BnfoldError(f"cannot pin '{name}': the model has no input of that name (inputs: {listed})")
        if controls is not None and name not in controls:
            switches = ", ".join(f"'{n}'" for n in sorted(controls)) or "none"
            raise BnfoldError(f"cannot pin input '{name}': it decides no If condition (inputs that do: {switches})")
        dtype, shape = _input_info(model, name)
        arrays[name] = _coerce(name, raw, dtype, shape)
    return arrays


def _controls(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Main-graph input -> the If nodes whose condition it decides (no value assumed)."""
    found: dict[str, list[str]] = collections.defaultdict(list)

    def visit(graph: onnx.GraphProto, scope: Scope, path: str) -> None:
        for node in graph.node:
            if is_if(node):
                condition = condition_of(scope, node)
                if condition.closed and condition.array is None:
                    for name in sorted(condition.deps):
                        found[name].append(f"{path}/{node_label(node)}")
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    visit(sub, Scope(sub, scope, {}), f"{path}/{node_label(node)}.{attr.name}")
            scope.define(node)

    visit(model.graph, Scope(model.graph, None, {}), "main")
    return dict(found)


def _defaults(model: onnx.ModelProto, controls: Mapping[str, list[str]]) -> dict[str, np.ndarray]:
    """Rule 2c: initializer values of the switch inputs."""
    inputs = {v.name for v in model.graph.input}
    values = {}
    for tensor in model.graph.initializer:
        if tensor.name in controls and tensor.name in inputs and is_small(tensor.dims):
            array = tensor_to_array(tensor)
            if array.size == 1:
                values[tensor.name] = array
    return values


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------
def resolve_switches(model: onnx.ModelProto, pins: Mapping[str, Any] | None = None, *,
                     defaults: bool = True) -> tuple[onnx.ModelProto, list[ResolvedSwitch]]:
    """Replace every ``If`` whose condition is known by the branch it selects (module rules).

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified (rule 1).
    pins : mapping of str to value, optional
        Main-graph input name -> value (``True``, ``0``, ``"false"``, ...), converted to the
        input's dtype. Each must decide at least one ``If``.
    defaults : bool
        Also fix switch inputs backed by an initializer to that value (rule 2c).

    Returns
    -------
    (onnx.ModelProto, list of ResolvedSwitch)
        The model (the same object when nothing was resolved) and one record per input that
        decided ``If`` nodes (pinned inputs first), then one for constant conditions, if any.

    Raises
    ------
    BnfoldError
        A pin names no graph input, an input that decides no ``If``, or a value that the
        input's dtype cannot hold.
    """
    if not isinstance(model, onnx.ModelProto):
        raise BnfoldError(f"resolve_switches expects an onnx.ModelProto, got {type(model).__name__}")
    if not has_if(model.graph):
        if pins:
            _pin_arrays(model, pins, {})  # a pin on a model with no If is an error
        return model, []
    controls = _controls(model)
    pinned = _pin_arrays(model, pins, controls)
    known = dict(_defaults(model, controls)) if defaults else {}
    known.update(pinned)
    if not known and not _has_constant_if(model):
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    resolver = Resolver(out, known)
    resolver.run()
    if not resolver.resolved:
        return model, []
    used_inputs = [name for name in resolver.resolved if name is not None]
    prune(out.graph, resolver.released, set())
    records = []
    for name in sorted(used_inputs, key=lambda n: (n not in pinned, n)):
        kept = _retire_input(out.graph, name, known[name])
        records.append(ResolvedSwitch(input=name, value=_as_python(known[name]),
                                      source="pinned" if name in pinned else "default",
                                      ifs=resolver.resolved[name], removed=True, initializer_kept=kept))
    if None in resolver.resolved:
        records.append(ResolvedSwitch(input=None, value=None, source="constant", ifs=resolver.resolved[None]))
    for record in records:
        log.info("%s", record.line())
    return out, records




def switch_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Main-graph inputs that decide ``If`` conditions -> those ``If`` nodes (``path/node``).

    Cheap (no fold, no run): what `find_switches` starts from, and what the fold pass names
    when such an input is left unfixed.
    """
    return _controls(model) if has_if(model.graph) else {}


def _has_constant_if(model: onnx.ModelProto) -> bool:
    found = False

    def visit(graph: onnx.GraphProto, scope: Scope) -> None:
        nonlocal found
        for node in graph.node:
            if found:
                return
            if is_if(node) and condition_of(scope, node).array is not None:
                found = True
                return
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    visit(sub, Scope(sub, scope, {}))
            scope.define(node)

    visit(model.graph, Scope(model.graph, None, {}))
    return found


def _retire_input(graph: onnx.GraphProto, name: str, value: np.ndarray) -> bool:
    """Rule 6. Returns whether the value is still read (and kept as a plain initializer)."""
    kept_inputs = [v for v in graph.input if v.name != name]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    still_read = name in {v.name for v in graph.output}
    for node in graph.node:
        if name in node_reads(node):
            still_read = True
            break
    others = [t for t in graph.initializer if t.name != name]
    del graph.initializer[:]
    graph.initializer.extend(others)
    if still_read:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return still_read


def pinned_reference(model: onnx.ModelProto, pins: Mapping[str, Any] | None) -> onnx.ModelProto:
    """``model`` with each pinned input's initializer set to the pinned value.

    onnxruntime then runs the original graph as the pins select (an initializer that is also a
    graph input is its default value): the reference against which a resolved model is verified.
    Returns ``model`` itself when there is nothing to pin.
    """
    pinned = _pin_arrays(model, pins)
    if not pinned:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    others = [t for t in out.graph.initializer if t.name not in pinned]
    del out.graph.initializer[:]
    out.graph.initializer.extend(others)
    for name, array in pinned.items():
        out.graph.initializer.append(numpy_helper.from_array(array, name))
    return out


def find_switches(model: onnx.ModelProto) -> list[TrainingSwitch]:
    """The main-graph inputs that decide ``If`` conditions, and what each value would do.

    For each switch, each of the two values (False / True, or 0 / 1), with the other switches
    at their defaults: the model is resolved and dry-run through the fold pass (BN folded of
    total), and the reductions over axis 0 and training-mode BNs left are counted (batch
    statistics). Inputs with no initializer are listed with ``default=None``.
    """
    from bnfold.folding.fold_pass import fold  # the fold pass imports this module

    if not isinstance(model, onnx.ModelProto):
        raise BnfoldError(f"find_switches expects an onnx.ModelProto, got {type(model).__name__}")
    controls = _controls(model)
    defaults = _defaults(model, controls)
    switches = []
    for name in sorted(controls):
        dtype, shape = _input_info(model, name)
        if shape is not None and any(d != 1 for d in shape):
            continue  # not a single value: cannot be a condition on its own
        default = _as_python(defaults[name]) if name in defaults else None
        candidates = [False, True] if dtype.kind == "b" else [0, 1]
        if default is not None:
            candidates.sort(key=lambda v: v != default)
        outcomes = []
        for value in candidates:
            resolved, _ = resolve_switches(model, {name: value})
            try:
                _, report = fold(resolved)
                error = None
                folded, total = report.folded + report.decomposed, report.total
            except BnfoldError as exc:
                error, folded, total = str(exc), 0, 0
            reductions, training = _batch_statistics(resolved)
            outcomes.append(SwitchOutcome(value=_as_python(_coerce(name, value, dtype, shape)), bn_folded=folded,
                                          bn_total=total, batch_reductions=reductions, training_bns=training,
                                          error=error))
        switches.append(TrainingSwitch(input=name, dtype=dtype.name, default=default, controls=controls[name],
                                       outcomes=outcomes))
    return switches


def _batch_statistics(model: onnx.ModelProto) -> tuple[int, int]:
    """(reductions over axis 0, BatchNormalization nodes in training mode) in every graph."""
    reductions = training = 0

    def visit(graph: onnx.GraphProto) -> None:
        nonlocal reductions, training
        constants = {t.name: t for t in graph.initializer}
        outputs = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            if node.domain in DEFAULT_DOMAINS and node.op_type in _REDUCTIONS and _reduces_axis0(
                    node, constants, outputs):
                reductions += 1
            if node.domain in DEFAULT_DOMAINS and node.op_type == "BatchNormalization":
                mode = get_attr(node, "training_mode", 0) if not any(a.ref_attr_name for a in node.attribute) else 0
                if int(mode) or any(node.output[1:]):
                    training += 1
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    visit(sub)

    visit(model.graph)
    return reductions, training


def _reduces_axis0(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto],
                   outputs: Mapping[str, onnx.NodeProto]) -> bool:
    """Whether a reduction's axes include 0 (all axes when none are given)."""
    if any(a.ref_attr_name for a in node.attribute):
        return False
    axes = get_attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        source = node.input[1]
        if source in constants:
            axes = tensor_to_array(constants[source]).tolist()
        elif source in outputs and outputs[source].op_type == "Constant":
            array = constant_node_value(outputs[source])
            axes = None if array is None else np.asarray(array).reshape(-1).tolist()
        else:
            return False  # axes computed at run time: unknown
    if axes is None:
        return not int(get_attr(node, "noop_with_empty_axes", 0))
    return 0 in [int(a) for a in np.asarray(axes).reshape(-1)]
