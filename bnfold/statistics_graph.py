"""Reading and writing the statistics of BatchNormalization nodes in an ONNX graph.

- `stored_statistics`: the mean and variance each BN uses now (initializers, or one onnxruntime
  run for statistics computed by nodes, such as PyTorch's ``Identity`` of a shared tensor).
- `with_statistics`: the graph with new statistics. Rules:

  1. An initializer read by this BN input alone is rewritten in place (same name).
  2. Otherwise (read by another node too, computed by nodes, a graph output) a fresh initializer
     ``<old name>.recalibrated`` is added and the BN input re-pointed: nothing else changes.
  3. What only fed replaced statistics goes: initializers nobody reads any more (and their graph
     input entries, IR < 4), nodes whose outputs nobody reads, and so on upstream.
  4. Values are cast to the dtype and shape of the statistics they replace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.tensors import tensor_to_array
from bnfold.population import input_specs, subgraph_reads, submodel
from bnfold.runtime import run, session

__all__ = ["stored_statistics", "with_statistics", "all_names"]


def stored_statistics(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The mean and var each BN uses now, in their own dtype: initializers, or one run for the rest."""
    initializers = {init.name: init for init in model.graph.initializer}
    wanted = [name for node in nodes for name in node.input[3:5]]
    computed = [name for name in dict.fromkeys(wanted) if name not in initializers]
    # Copies: external data of a model opened from disk is read here (a few values per channel),
    # and must outlive the open files.
    values = {name: np.array(tensor_to_array(initializers[name])) for name in wanted if name in initializers}
    if computed:
        cut = submodel(model, computed)
        if input_specs(cut):
            raise BnfoldError(f"BatchNormalization statistics '{computed[0]}' depend on the model's inputs;"
                              " bnfold recalibrates constant statistics only")
        values.update(zip(computed, run(session(cut, "model"), computed, {}, "model")))
    return [(np.asarray(values[node.input[3]]), np.asarray(values[node.input[4]])) for node in nodes]


def all_names(model: onnx.ModelProto) -> set[str]:
    names = {init.name for init in model.graph.initializer} | {v.name for v in model.graph.input}
    for node in model.graph.node:
        names.update(node.input)
        names.update(node.output)
        names |= subgraph_reads(node)
    return names


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        for name in [*node.input, *subgraph_reads(node)]:
            counts[name] = counts.get(name, 0) + 1
    for value in model.graph.output:
        counts[value.name] = counts.get(value.name, 0) + 1
    return counts


def with_statistics(model: onnx.ModelProto, stats: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    stored: Mapping[str, tuple[np.ndarray, np.ndarray]], *, copy: bool = True) -> onnx.ModelProto:
    """``model`` (a copy, or itself with ``copy=False``) whose BN with output ``y`` reads
    ``stats[y]`` = (mean, var); BNs not in ``stats`` are left alone.

    Rules (module docstring): an initializer read only by this BN input is rewritten in place;
    otherwise a fresh initializer is added and the BN input re-pointed; initializers nobody
    reads any more are removed. Values are cast to the dtype and shape of ``stored[y]``, the
    statistics they replace.
    """
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    uses = _uses(out)
    names = all_names(out)
    initializers = {init.name: init for init in out.graph.initializer}
    released: set[str] = set()
    for node in out.graph.node:
        key = node.output[0] if node.op_type == "BatchNormalization" and node.output else None
        if key not in stats:
            continue
        for slot, value, old in zip((3, 4), stats[key], stored[key]):
            old_name = node.input[slot]
            array = np.asarray(value, dtype=np.float64).astype(old.dtype).reshape(old.shape)
            if old_name in initializers and uses.get(old_name, 0) == 1:
                initializers[old_name].CopyFrom(numpy_helper.from_array(array, old_name))
                continue
            fresh = f"{old_name}.recalibrated"
            suffix = 1
            while fresh in names:
                suffix += 1
                fresh = f"{old_name}.recalibrated.{suffix}"
            names.add(fresh)
            out.graph.initializer.append(numpy_helper.from_array(array, fresh))
            node.input[slot] = fresh
            uses[old_name] = uses.get(old_name, 1) - 1
            released.add(old_name)
    _drop_released(out, released, uses, initializers)
    return out


def _drop_released(model: onnx.ModelProto, released: set[str], uses: dict[str, int],
                   initializers: Mapping[str, onnx.TensorProto]) -> None:
    """Remove what only fed the replaced statistics: initializers nobody reads any more, and nodes
    (PyTorch's exporter writes deduplicated statistics as ``Identity`` of a shared tensor) whose
    outputs nobody reads, then what only those nodes read, and so on."""
    producer = {name: index for index, node in enumerate(model.graph.node) for name in node.output if name}
    dead: set[int] = set()
    pending = [name for name in released if uses.get(name, 0) <= 0]
    dropped: set[str] = set()
    while pending:
        name = pending.pop()
        if name in dropped or uses.get(name, 0) > 0:
            continue
        dropped.add(name)
        index = producer.get(name)
        if index is None or index in dead:
            continue
        node = model.graph.node[index]
        if any(uses.get(out, 0) > 0 for out in node.output if out) or subgraph_reads(node):
            continue
        dead.add(index)
        for source in node.input:
            if source:
                uses[source] = uses.get(source, 1) - 1
                pending.append(source)
    gone = {name for name in dropped if name in initializers and uses.get(name, 0) <= 0}
    if dead:
        kept_nodes = [node for index, node in enumerate(model.graph.node) if index not in dead]
        del model.graph.node[:]
        model.graph.node.extend(kept_nodes)
    if gone:
        kept = [init for init in model.graph.initializer if init.name not in gone]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inputs = [value for value in model.graph.input if value.name not in gone]
        del model.graph.input[:]
        model.graph.input.extend(inputs)
