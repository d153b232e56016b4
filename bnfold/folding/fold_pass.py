"""FoldBatchNormPass: fold every foldable BatchNormalization of an ONNX model.

Rules (cited in the code as "rule N"):

1. The input model is never modified: the pass works on one in-memory copy.
2. Every graph is visited: the main graph, If / Loop / Scan bodies (recursively, with outer-scope
   constants visible) and model-local functions. Each body is indexed once (`GraphIndex`); nodes
   are visited once, in order, so the pass is linear in the size of the model.
3. Every BatchNormalization is validated first, folded or not: a negative or non-finite epsilon
   or a constant variance that is negative, non-finite or makes ``var + eps <= 0`` raises
   `BnfoldError` naming the node and channel.
4. A BN is kept, with the reason, when it is excluded by name, in training mode
   (``training_mode=1``; ``is_test=0`` in versions 1 and 6; any running mean / variance output,
   which in versions 7 to 13 also selects training mode), or has ``spatial=0`` (versions 1 to 7)
   with statistics that are not one value per channel.
5. Otherwise the patterns of `PATTERNS` are tried in order (into the producer, into the
   consumer, decomposed Mul/Add); the first `Rewrite` is applied. If none folds, the BN is kept
   with the patterns' reasons.
6. Afterwards initializers that folding left unused are removed (and, if they were also graph
   inputs, removed from the inputs); stale value_info goes with the values it described. A model
   with IR version < 4 that changed is raised to IR 4, the lowest version in which initializers
   need not be graph inputs; the report says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

import numpy as np
import onnx
from google.protobuf.message import Message

from bnfold.errors import BnfoldError
from bnfold.folding import decomposed, into_consumer, into_producer
from bnfold.folding.batchnorm import validate_batchnorm
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.index import GraphIndex
from bnfold.folding.nodes import (
    DEFAULT_DOMAINS,
    AttributeRef,
    attr_graphs,
    get_attr,
    node_label,
)
from bnfold.folding.patterns import ChainSkip, Invalid, Pattern, Rewrite, Skip
from bnfold.folding.report import FoldEntry, FoldReport

__all__ = ["fold", "FoldBatchNormPass", "PATTERNS"]

log = logging.getLogger(__name__)

#: Every pattern, in the order they are tried (rule 5).
PATTERNS: tuple[Pattern, ...] = (*into_producer.PATTERNS, *into_consumer.PATTERNS, *decomposed.PATTERNS)

_BN = "BatchNormalization"


def fold(
    model: onnx.ModelProto,
    *,
    decompose_rest: bool = False,
    keep_initializer_inputs: bool = False,
    exclude: Collection[str] = (),
) -> tuple[onnx.ModelProto, FoldReport]:
    """Fold every BatchNormalization of ``model`` that can be folded exactly.

    Parameters
    ----------
    model : onnx.ModelProto
        Not modified.
    decompose_rest : bool
        Rewrite BNs that have no foldable neighbour as Mul + Add by constants.
    keep_initializer_inputs : bool
        Treat initializers that are also graph inputs as run-time inputs (BNs that need them are
        kept) instead of constants.
    exclude : collection of str
        Names of BN nodes to leave unfolded (reason ``"excluded"``).

    Returns
    -------
    (onnx.ModelProto, FoldReport)
    """
    options = FoldOptions(
        decompose_rest=decompose_rest,
        keep_initializer_inputs=keep_initializer_inputs,
        exclude=frozenset(exclude),
    )
    return FoldBatchNormPass(options).run(model)


class FoldBatchNormPass:
    """The pass object: ``FoldBatchNormPass(options).run(model) -> (model, report)``."""

    def __init__(self, options: FoldOptions | None = None, patterns: list[Pattern] | None = None) -> None:
        self.options = options or FoldOptions()
        self.patterns = list(PATTERNS if patterns is None else patterns)
        self._by_anchor: dict[str, list[Pattern]] = {}
        for pat in self.patterns:
            for anchor in pat.anchors:
                self._by_anchor.setdefault(anchor, []).append(pat)

    def run(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
        if not isinstance(model, onnx.ModelProto):
            raise BnfoldError(f"fold expects an onnx.ModelProto, got {type(model).__name__}")
        start = time.perf_counter()
        out = _copy_without_initializers(model)  # rule 1
        report = FoldReport()
        ctx = ModelContext(out, self.options, report, original=model)
        main = GraphIndex.for_graph(out.graph, ctx, "main", initializers=model.graph.initializer)
        changed = self._visit_graph(main)
        for function in out.functions:
            changed |= self._visit(GraphIndex.for_function(function, ctx))
        dead = _dead_initializers(out, ctx) if changed else set()
        # The main graph's initializers are copied only now, and only those still used: a folded
        # weight is never copied just to be deleted.
        out.graph.initializer.extend(t for t in model.graph.initializer if t.name not in dead)
        if changed:
            removed = [t.name for t in model.graph.initializer if t.name in dead]
            _cleanup(out, ctx, dead, removed)
        unknown = sorted(set(self.options.exclude) - {entry.bn for entry in report.entries})
        if unknown:
            report.notes.append("exclude: no BatchNormalization named " + ", ".join(f"'{n}'" for n in unknown))
        log.info("folded %d of %d BatchNormalization nodes in %.3f s", report.folded, report.total,
                 time.perf_counter() - start)
        return out, report

    def _visit_graph(self, index: GraphIndex) -> bool:
        return self._visit(index)

    def _visit(self, index: GraphIndex) -> bool:
        """Fold one body (rule 2): nested bodies first, then this body's nodes, then commit."""
        changed = False
        for node in index.nodes:
            for attr in node.attribute:
                if attr.type != onnx.AttributeProto.GRAPH and attr.type != onnx.AttributeProto.GRAPHS:
                    continue
                for sub in attr_graphs(attr):
                    path = f"{index.path}/{node_label(node)}.{attr.name}"
                    changed |= self._visit(GraphIndex.for_graph(sub, index.ctx, path, parent=index))
        for node in list(index.nodes):
            if index.is_removed(node):
                continue
            is_bn = node.op_type == _BN and node.domain in DEFAULT_DOMAINS
            candidates = self._by_anchor.get(node.op_type, ())
            if not is_bn and not candidates:
                continue
            if is_bn:
                validate_batchnorm(node, index)  # rule 3
                reason = _blocker(node, index)
                if reason is not None:
                    _record(index, node, None, reason)
                    continue
            rewrite, skips = _try_patterns(node, index, candidates)
            reasons = [skip.reason for skip in skips]
            if rewrite is not None:
                index.apply(rewrite)
                _record(index, rewrite.bn or node, rewrite, None)
            elif is_bn:
                _record(index, node, None, "; ".join(dict.fromkeys(reasons)) or "no foldable neighbour")
            else:
                # A recognised decomposed BN that could not be folded is reported like a kept BN.
                for skip in skips:
                    # A chain through a BN node leaves that BN to be reported when it is visited.
                    if isinstance(skip, ChainSkip) and skip.node is not None and skip.node.op_type != _BN:
                        _record(index, skip.node, None, skip.reason)
                        break
        changed |= index.changed
        index.commit()
        return changed


def _try_patterns(node, index: GraphIndex, candidates) -> tuple[Rewrite | None, list[Skip]]:
    """Rule 5."""
    reasons: list[Skip] = []
    for pat in candidates:
        try:
            result = pat(node, index)
        except AttributeRef as ref:
            result = Skip(f"attribute '{ref}' is given by the calling function")
        if result is None:
            continue
        if isinstance(result, Invalid) and node.op_type == _BN:
            raise BnfoldError(f"BatchNormalization '{node_label(node)}' in {index.path}: {result.reason}")
        if isinstance(result, Skip):
            log.debug("%s on %s: %s", pat.name, node_label(node), result.reason)
            reasons.append(result)
            continue
        return result, reasons
    return None, reasons


def _record(index: GraphIndex, node, rewrite: Rewrite | None, reason: str | None) -> None:
    if rewrite is None:
        entry = FoldEntry(bn=node_label(node), graph=index.path, status="kept", reason=reason)
    else:
        entry = FoldEntry(
            bn=node_label(node), graph=index.path, status=rewrite.status, into=rewrite.into,
            tensor_map={name: list(new) for name, new in rewrite.tensor_map.items()},
        )
    index.report.entries.append(entry)


def _blocker(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """Rule 4: why BN ``node`` must stay as it is, or None."""
    if node.name and node.name in index.options.exclude:
        return "excluded"
    version = index.opset("")
    try:
        if int(get_attr(node, "training_mode", 0)):
            return "training_mode=1 (normalizes with batch statistics)"
        if version < 7 and not int(get_attr(node, "is_test", 0)):
            # BatchNormalization-1/6: is_test defaults to 0, i.e. training mode.
            return f"is_test=0 (training mode in BatchNormalization-{1 if version < 6 else 6})"
        extra = [name for name in node.output[1:] if name]
        if extra:
            used = [name for name in extra if index.users(name) or index.is_graph_output(name)]
            if used:
                return f"running mean/variance outputs are consumed ('{used[0]}'): training mode"
            return "has running mean/variance outputs, which select training mode"
        if version < 9 and not int(get_attr(node, "spatial", 1)):
            return _spatial_zero(node, index)
    except AttributeRef as ref:
        return f"attribute '{ref}' is given by the calling function"
    return None


def _spatial_zero(node: onnx.NodeProto, index: GraphIndex) -> str | None:
    """``spatial=0`` (BatchNormalization-1/6/7) normalizes per element of (C, D1, ..., Dn).

    That is one value per channel, hence foldable, only when the input is (N, C), or when every
    spatial dimension of the input is 1; onnxruntime rejects (C, 1, ..., 1) statistics on larger
    inputs, so those are kept too.
    """
    shape_x = index.shape(node.input[0])
    if shape_x is None:
        return "spatial=0 (per-element statistics) on an input of unknown shape"
    spatial = shape_x[2:]
    if any(d != 1 for d in spatial):
        return f"spatial=0: per-element statistics over spatial dims {tuple(spatial)}, not one value per channel"
    for name in node.input[1:5]:
        value = index.constant(name)
        if value is not None and np.shape(value)[1:] != (1,) * len(spatial):
            return f"spatial=0 with statistics '{name}' of shape {np.shape(value)}"
    return None


def _used_names(graph: onnx.GraphProto, used: set[str]) -> None:
    used.update(v.name for v in graph.output)
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _used_names(sub, used)


def _prune_initializers(graph: onnx.GraphProto, dead: set[str], removed: list[str]) -> None:
    positions = [i for i, t in enumerate(graph.initializer) if t.name in dead]
    # Deleting by position (last first) moves no tensor data, unlike rebuilding the list.
    for i in reversed(positions):
        removed.append(graph.initializer[i].name)
        del graph.initializer[i]
    for node in graph.node:
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _prune_initializers(sub, dead, removed)


def _copy_field(target, name: str, value) -> None:
    if isinstance(value, Message):
        getattr(target, name).CopyFrom(value)
    elif isinstance(value, (str, bytes, int, float)):
        try:
            setattr(target, name, value)
        except (UnicodeDecodeError, ValueError):
            # protobuf parses a string field that is not UTF-8 but hands it out as bytes, which
            # it then refuses to store: such a model is invalid (ONNX strings are UTF-8).
            owner = "graph" if isinstance(target, onnx.GraphProto) else "model"
            raise BnfoldError(f"the {owner}'s {name} {value!r} is not valid UTF-8 (ONNX strings are UTF-8)") from None
    else:  # repeated field
        getattr(target, name).extend(value)


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no initializers yet (rule 1)."""
    out = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _copy_field(out, descriptor.name, value)
    if model.HasField("graph"):
        out.graph.SetInParent()
        for descriptor, value in model.graph.ListFields():
            if descriptor.name != "initializer":
                _copy_field(out.graph, descriptor.name, value)
    return out


def _dead_initializers(model: onnx.ModelProto, ctx: ModelContext) -> set[str]:
    """Initializers that folds released and nothing in the model reads any more."""
    if not ctx.released:
        return set()
    used: set[str] = set()
    _used_names(model.graph, used)
    for function in model.functions:
        for node in function.node:
            used.update(node.input)
    return ctx.released - used


def _cleanup(model: onnx.ModelProto, ctx: ModelContext, dead: set[str], removed: list[str]) -> None:
    """Rule 6. ``removed``: the input model's main-graph initializers not copied (dead)."""
    if dead:
        removed = list(removed)
        _prune_initializers(model.graph, dead, removed)
        gone = set(removed)
        inputs = [v for v in model.graph.input if v.name in gone]
        if inputs:
            kept = [v for v in model.graph.input if v.name not in gone]
            del model.graph.input[:]
            model.graph.input.extend(kept)
            names = ", ".join(f"'{v.name}'" for v in inputs[:5]) + (" ..." if len(inputs) > 5 else "")
            ctx.report.notes.append(
                f"removed {len(inputs)} folded initializer(s) from the graph inputs: {names}"
            )
        stale = [vi for vi in model.graph.value_info if vi.name in gone]
        if stale:
            kept_vi = [vi for vi in model.graph.value_info if vi.name not in gone]
            del model.graph.value_info[:]
            model.graph.value_info.extend(kept_vi)
    if model.ir_version < 4:
        ctx.report.notes.append(
            f"raised IR version {model.ir_version} -> 4 (folded initializers are not graph inputs)"
        )
        model.ir_version = 4
