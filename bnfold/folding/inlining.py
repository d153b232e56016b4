"""Inlining the branch an If selects, and removing what only fed the others.

`Resolver` walks a model's graphs in order (`bnfold.folding.switches`, rules 3, 4 and 7): an
``If`` whose condition is known is replaced by its selected branch, renamed where its local
names exist elsewhere; constants a resolution produced are computed. `prune` then removes the
nodes and initializers that only fed removed nodes (rule 5). Names are tracked across scopes:
a nested body reads the values of every enclosing graph unless it defines the name itself.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.folding.conditions import (
    ARITHMETIC,
    DEFAULT_DOMAINS,
    Scope,
    branch_of,
    condition_of,
    is_if,
    small_enough,
)
from bnfold.folding.nodes import attr_graphs, node_label

__all__ = ["Resolver", "has_if", "node_reads", "prune"]

def _definitions(graph: onnx.GraphProto, counts: collections.Counter) -> None:
    """Count every place a value name is defined, in ``graph`` and all nested bodies."""
    counts.update(v.name for v in graph.input)
    counts.update(t.name for t in graph.initializer)
    counts.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        counts.update(name for name in node.output if name)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _definitions(sub, counts)


def _local_definitions(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(name for name in node.output if name)
    return names


def _captured(graph: onnx.GraphProto) -> set[str]:
    """Names a body reads from enclosing scopes."""
    defined = _local_definitions(graph)
    used: set[str] = {v.name for v in graph.output}
    for node in graph.node:
        used.update(name for name in node.input if name)
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                used |= _captured(sub)
    return used - defined


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every value a node reads: its inputs and what its bodies capture."""
    names = [name for name in node.input if name]
    for attr in node.attribute:
        for sub in attr_graphs(attr):
            names.extend(sorted(_captured(sub)))
    return names


def _rename_refs(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename references to outer values in a nested body; a local definition shadows (rule 3)."""
    mapping = {old: new for old, new in mapping.items() if old not in _local_definitions(graph)}
    if not mapping:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                _rename_refs(sub, mapping)
    for value in graph.output:
        if value.name in mapping:
            value.name = mapping[value.name]


class _Names:
    """Fresh value and node names for inlined branches (rule 3)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.counts: collections.Counter = collections.Counter()
        _definitions(model.graph, self.counts)
        self.taken = set(self.counts)
        self._graph_names(model.graph)

    def _graph_names(self, graph: onnx.GraphProto) -> None:
        self.taken.update(v.name for v in graph.output)
        self.taken.update(v.name for v in graph.value_info)
        for node in graph.node:
            self.taken.update(node.input)
            if node.name:
                self.taken.add(node.name)
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    self._graph_names(sub)

    def fresh(self, hint: str) -> str:
        candidate, counter = hint or "value", 0
        while candidate in self.taken:
            counter += 1
            candidate = f"{hint}__{counter}"
        self.taken.add(candidate)
        return candidate


# ---------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------
class Resolver:
    def __init__(self, model: onnx.ModelProto, known_inputs: Mapping[str, np.ndarray]) -> None:
        self.model = model
        self.known_inputs = known_inputs
        self.names = _Names(model)
        #: values whose readers were removed: the roots of the dead-code search (rule 5)
        self.released: set[str] = set()
        #: input name (or None for constants) -> If labels resolved
        self.resolved: dict[str | None, list[str]] = collections.defaultdict(list)
        #: outputs of resolved If nodes, and values computed from them (rule 7)
        self.replaced: set[str] = set()

    def run(self) -> None:
        self._graph(self.model.graph, Scope(self.model.graph, None, self.known_inputs), "main")

    def _graph(self, graph: onnx.GraphProto, scope: Scope, path: str) -> None:
        """Rule 4: one body, nodes in order; inlined branch nodes are visited like the others."""
        queue = collections.deque(graph.node)
        kept: list[onnx.NodeProto] = []
        while queue:
            node = queue.popleft()
            if is_if(node):
                condition = condition_of(scope, node)
                branch = None if condition.array is None else branch_of(node, bool(condition.array.reshape(-1)[0]))
                if branch is not None:
                    label = f"{path}/{node_label(node)}"
                    for name in condition.deps or (None,):
                        self.resolved[name].append(label)
                    self.replaced.update(name for name in node.output if name)
                    queue.extendleft(reversed(self._inline(node, branch, graph)))
                    continue
            if self._compute(node, graph, scope):
                continue
            for attr in node.attribute:
                for sub in attr_graphs(attr):
                    self._graph(sub, Scope(sub, scope, self.known_inputs), f"{path}/{node_label(node)}.{attr.name}")
            scope.define(node)
            kept.append(node)
        del graph.node[:]
        graph.node.extend(kept)

    def _compute(self, node: onnx.NodeProto, graph: onnx.GraphProto, scope: Scope) -> bool:
        """Rule 7: replace ``node`` by an initializer if it computes on constants from a resolution."""
        function = ARITHMETIC.get(node.op_type)
        if function is None or node.domain not in DEFAULT_DOMAINS or len(node.output) != 1:
            return False
        if node.output[0] not in self.replaced and not any(name in self.replaced for name in node.input):
            return False
        args = [scope.constant(name) for name in node.input]
        if not args or any(arg is None for arg in args):
            return False
        try:
            with np.errstate(all="ignore"):
                result = function(node, [np.asarray(arg) for arg in args])
        except (TypeError, ValueError):
            return False
        if result is None or not small_enough(np.shape(result)):
            return False
        result = np.asarray(result)
        if node.op_type not in ("Cast",) and result.dtype != np.asarray(args[0]).dtype:
            return False  # NumPy promoted mixed dtypes; ONNX would have refused the model
        tensor = numpy_helper.from_array(result, node.output[0])
        graph.initializer.append(tensor)
        scope.initializers[tensor.name] = tensor
        self.replaced.add(tensor.name)
        self.released.update(name for name in node.input if name)
        return True

    def _inline(self, node: onnx.NodeProto, branch: onnx.GraphProto, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
        """Rule 3: the nodes that replace ``node``; initializers and value_info move to ``graph``."""
        self.released.update(node_reads(node))
        local = _local_definitions(branch)
        produced = {name for n in branch.node for name in n.output if name}
        rename: dict[str, str] = {}
        bridges: list[tuple[str, str]] = []  # (branch value, If output) needing an Identity
        for if_out, value in zip(node.output, branch.output):
            if not if_out:
                continue
            if value.name in produced and value.name not in rename:
                rename[value.name] = if_out
            else:
                bridges.append((value.name, if_out))
        branch_counts: collections.Counter = collections.Counter()
        _definitions(branch, branch_counts)
        for name in sorted(local - set(rename)):
            # Defined elsewhere in the model too (the other branch, an outer scope): rename.
            if self.names.counts[name] > branch_counts[name]:
                rename[name] = self.names.fresh(name)
        nodes = []
        for original in branch.node:
            new = onnx.NodeProto()
            new.CopyFrom(original)
            for i, name in enumerate(new.input):
                if name in rename:
                    new.input[i] = rename[name]
            for i, name in enumerate(new.output):
                if name in rename:
                    new.output[i] = rename[name]
            for attr in new.attribute:
                for sub in attr_graphs(attr):
                    _rename_refs(sub, rename)
            nodes.append(new)
        for value, if_out in bridges:
            nodes.append(helper.make_node("Identity", [rename.get(value, value)], [if_out],
                                          name=self.names.fresh(f"{node.name or 'If'}/output")))
        for tensor in branch.initializer:
            moved = graph.initializer.add()
            moved.CopyFrom(tensor)
            moved.name = rename.get(tensor.name, tensor.name)
        for sparse in branch.sparse_initializer:
            moved = graph.sparse_initializer.add()
            moved.CopyFrom(sparse)
            moved.values.name = rename.get(sparse.values.name, sparse.values.name)
        present = {v.name for v in graph.value_info}
        for info in branch.value_info:
            name = rename.get(info.name, info.name)
            if name not in present:
                moved = graph.value_info.add()
                moved.CopyFrom(info)
                moved.name = name
        return nodes


def prune(graph: onnx.GraphProto, released: set[str], protected: set[str]) -> None:
    """Rule 5: remove nodes and initializers that only fed removed nodes (children first)."""
    for node in graph.node:
        for attr in node.attribute:
            for sub in attr_graphs(attr):
                prune(sub, released, set())
    users: collections.Counter = collections.Counter()
    for node in graph.node:
        users.update(node_reads(node))
    users.update(v.name for v in graph.output)
    users.update(protected)
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    removed: set[int] = set()
    work = [name for name in released if name in producer]
    while work:
        name = work.pop()
        i = producer.get(name)
        if i is None or i in removed:
            continue
        node = graph.node[i]
        if any(users[out] for out in node.output if out):
            continue
        removed.add(i)
        for read in node_reads(node):
            users[read] -= 1
            released.add(read)
            work.append(read)
    if removed:
        kept = [node for i, node in enumerate(graph.node) if i not in removed]
        del graph.node[:]
        graph.node.extend(kept)
    inputs = {v.name for v in graph.input}
    dead = {t.name for t in graph.initializer if t.name in released and not users[t.name] and t.name not in inputs}
    if dead:
        kept_init = [t for t in graph.initializer if t.name not in dead]
        del graph.initializer[:]
        graph.initializer.extend(kept_init)
    defined = _local_definitions(graph) | {v.name for v in graph.output}
    stale = [v for v in graph.value_info if v.name not in defined]
    if stale:
        kept_vi = [v for v in graph.value_info if v.name in defined]
        del graph.value_info[:]
        graph.value_info.extend(kept_vi)



# Standard operators that hold bodies; other standard nodes are not looked into (the fold pass
# calls `has_if` on every model: it must cost nothing on the common model without If).
_BODY_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def has_if(graph: onnx.GraphProto) -> bool:
    for node in graph.node:
        if node.domain in DEFAULT_DOMAINS:
            if node.op_type == "If":
                return True
            if node.op_type not in _BODY_OPS:
                continue
        for attr in node.attribute:
            if any(has_if(sub) for sub in attr_graphs(attr)):
                return True
    return False
