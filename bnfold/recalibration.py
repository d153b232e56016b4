"""Recompute the statistics of every BatchNormalization of an ONNX model from data (`bnfold recalibrate`).

Two methods:

``exact`` (default)
    Each BN gets the mean and the *population* variance (denominator N) of its input over all
    the data, computed while every BN in front of it already uses its new statistics: the
    statistics the inference network actually sees. BNs are grouped in topological levels (a
    BN's level is one more than the highest level of the BNs it depends on); each level is one
    streamed onnxruntime pass over the data through a submodel cut at that level's BN inputs
    (`bnfold.population.submodel`), accumulated per batch in float64 and merged with Chan's
    formula (`bnfold.moments`). The result does not depend on the batch size or on how the data
    is split among workers, beyond float64 rounding. Cost: one pass per level, each through the
    part of the network in front of that level only.
``batch``
    One pass in which each BN normalizes with the statistics of the current batch, as during
    training, and each BN's batch means and unbiased batch variances are averaged, every batch
    weighing the same: what PyTorch's ``torch.optim.swa_utils.update_bn`` computes. Faster (one
    pass), approximate, and dependent on the batch size. Every batch needs at least 2 values per
    channel.

The output is the same graph: every BatchNormalization node is kept with its name, and its
inputs 3 and 4 (mean, var) get the new values. An initializer read by that BN alone is
rewritten in place; otherwise (shared with another node, computed by nodes, a graph output) a new
initializer is added for this BN, so nothing else in the model changes. Values keep the dtype
of the statistics they replace.

Only BNs of the main graph are recalibrated (not inside If / Loop / Scan bodies); BNs in training
mode are refused (they do not use their stored statistics).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.dataset import DataLike, Dataset, open_dataset
from bnfold.errors import BnfoldError
from bnfold.moments import BatchAverage
from bnfold.population import (Progress, batchnorm_indices, input_specs, model_of, run_shards, submodel,
                               subgraph_reads)
from bnfold.runtime import ModelLike, load, run, session

__all__ = ["recalibrate", "recalibrate_file", "Recalibration", "BNChange", "METHODS", "bn_levels", "drift", "with_statistics"]

log = logging.getLogger(__name__)

METHODS = ("exact", "batch")


def drift(old_mean: np.ndarray, old_var: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float) -> dict[str, Any]:
    """How far stored statistics are from the data's, per channel, in `bnfold inspect`'s units.

    Mean shift ``|old_mean - mean| / sqrt(var + eps)`` (data standard deviations, as the BN
    divides by them); variance ratio ``max(a, b) / min(a, b)`` with ``a = old_var + eps``,
    ``b = var + eps`` (a factor of 2 either way reads 2). Statistics equal to the data's give 0 and 1.
    """
    old_mean, mean = np.asarray(old_mean, np.float64), np.asarray(mean, np.float64)
    old_var, var = np.asarray(old_var, np.float64) + eps, np.asarray(var, np.float64) + eps
    shift = np.abs(old_mean - mean) / np.sqrt(var)
    ratio = np.maximum(old_var, var) / np.minimum(old_var, var)
    return {
        "max_mean_shift": float(shift.max()), "channel_mean_shift": int(np.argmax(shift)),
        "max_var_ratio": float(ratio.max()), "channel_var_ratio": int(np.argmax(ratio)),
        "mean_shift": shift.tolist(), "var_ratio": ratio.tolist(),
    }


@dataclass
class BNChange:
    """One BN's statistics before and after (float64 copies; written in the model's dtype)."""

    name: str
    input: str
    level: int
    eps: float
    old_mean: np.ndarray
    old_var: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @property
    def drift(self) -> dict[str, Any]:
        return drift(self.old_mean, self.old_var, self.mean, self.var, self.eps)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input": self.input, "level": self.level, "epsilon": self.eps,
                "channels": int(self.mean.shape[0]), **self.drift,
                "old_mean": self.old_mean.tolist(), "old_var": self.old_var.tolist(),
                "mean": self.mean.tolist(), "var": self.var.tolist()}


@dataclass
class Recalibration:
    """What `recalibrate` did: the new model, BN by BN changes, and accuracies with ``labels``."""

    model: onnx.ModelProto
    method: str
    changes: list[BNChange]
    levels: int
    samples: int
    batch_size: int
    batches: int
    labels: str | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "batch_size": self.batch_size,
                "batches": self.batches, "levels": self.levels, "bn_total": len(self.changes),
                "labels": self.labels, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "bns": [change.to_dict() for change in self.changes],
                **self.extra}

    def lines(self) -> list[str]:
        """The human-readable report ``bnfold recalibrate`` prints."""
        how = f"{self.levels} level{'s' if self.levels != 1 else ''} x " if self.method == "exact" else ""
        lines = [f"recalibrated {len(self.changes)} BatchNormalization node{'s' if len(self.changes) != 1 else ''}"
                 f" over {self.samples} samples ({self.method}: {how}{self.batches} batch{'es' if self.batches != 1 else ''}"
                 f" of {self.batch_size})",
                 "how far the old statistics were: mean shift in data std, variance ratio (max over channels)"]
        width = max(len(change.name) for change in self.changes)
        for change in self.changes:
            d = change.drift
            lines.append(f"  {change.name:<{width}}  level {change.level:>2}  mean shift {d['max_mean_shift']:8.3g}"
                         f" (ch {d['channel_mean_shift']})  variance ratio {d['max_var_ratio']:8.3g} (ch {d['channel_var_ratio']})")
        if self.accuracy_before is not None:
            lines.append(f"accuracy on the data (labels '{self.labels}'): before {100 * self.accuracy_before:.2f}%,"
                         f" after {100 * self.accuracy_after:.2f}%")
        return lines


def _label(node: onnx.NodeProto, position: int) -> str:
    return node.name or f"BatchNormalization #{position} (-> {node.output[0]})"


def _check_node(node: onnx.NodeProto, position: int, opset: int) -> float:
    """Epsilon of a BN this module can recalibrate; `BnfoldError` otherwise."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    label = _label(node, position)
    if len(node.input) < 5 or not all(node.input[:5]):
        raise BnfoldError(f"BatchNormalization '{label}' has fewer than 5 inputs")
    if attributes.get("training_mode", 0):
        raise BnfoldError(f"BatchNormalization '{label}' is in training mode (training_mode=1): it normalizes with"
                          " batch statistics and never reads its stored ones; export the model in inference mode")
    if opset < 9 and not attributes.get("spatial", 1):
        raise BnfoldError(f"BatchNormalization '{label}' has spatial=0 (statistics per position): not supported")
    return float(attributes.get("epsilon", 1e-5))  # ONNX BatchNormalization default


def bn_levels(model: onnx.ModelProto) -> list[int]:
    """Topological level of each main-graph BN (graph order): 0 if no BN is upstream, else 1 + the
    highest level among the BNs its input depends on. BNs of one level can be measured in one pass."""
    positions = {index: position for position, index in enumerate(batchnorm_indices(model))}
    depth: dict[str, int] = {}  # tensor -> highest BN level it depends on (-1: none)
    levels = [0] * len(positions)
    for index, node in enumerate(model.graph.node):
        reads = [*node.input, *subgraph_reads(node)]
        upstream = max((depth.get(name, -1) for name in reads if name), default=-1)
        if index in positions:
            upstream = depth.get(node.input[0], -1) + 1
            levels[positions[index]] = upstream
        for name in node.output:
            if name:
                depth[name] = upstream
    return levels


def _stored_statistics(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The mean and var each BN uses now, in their own dtype: initializers, or one run for the rest."""
    initializers = {init.name: init for init in model.graph.initializer}
    wanted = [name for node in nodes for name in node.input[3:5]]
    computed = [name for name in dict.fromkeys(wanted) if name not in initializers]
    values = {name: numpy_helper.to_array(initializers[name]) for name in wanted if name in initializers}
    if computed:
        cut = submodel(model, computed)
        if input_specs(cut):
            raise BnfoldError(f"BatchNormalization statistics '{computed[0]}' depend on the model's inputs;"
                              " bnfold recalibrates constant statistics only")
        values.update(zip(computed, run(session(cut, "model"), computed, {}, "model")))
    return [(np.asarray(values[node.input[3]]), np.asarray(values[node.input[4]])) for node in nodes]


def _all_names(model: onnx.ModelProto) -> set[str]:
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
    names = _all_names(out)
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


def _exact(model, nodes, stored, dataset, levels, *, batch_size, executor, shards, threads, progress):
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # BN output name -> new (mean, var)
    previous = {node.output[0]: values for node, values in zip(nodes, stored)}
    for level in range(max(levels) + 1):
        members = [position for position, value in enumerate(levels) if value == level]
        names = list(dict.fromkeys(nodes[position].input[0] for position in members))
        # Cut first, then set the earlier levels' statistics in the (smaller, fresh) submodel.
        cut = with_statistics(submodel(model, names), stats, previous, copy=False)
        moments = dict(zip(names, run_shards(cut, dataset, names, batch_size=batch_size, executor=executor,
                                             shards=shards, threads=threads, progress=progress)))
        for position in members:
            found = moments[nodes[position].input[0]]
            if found.channels != stored[position][0].size:
                raise BnfoldError(f"BatchNormalization '{_label(nodes[position], position)}': its input has"
                                  f" {found.channels} channels but {stored[position][0].size} statistics")
            stats[nodes[position].output[0]] = (found.mean, found.var)
        log.info("level %d: %d BatchNormalization nodes recalibrated", level, len(members))
    return [stats[node.output[0]] for node in nodes]


def _reduce(op: str, source: str, target: str, axes: list[int], opset: int, nodes: list, extra: list) -> None:
    """``op`` (ReduceMean, ReduceSumSquare) over ``axes``, keepdims: axes an input from opset 18 on."""
    if opset >= 18:
        axes_name = f"{target}.axes"
        extra.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        nodes.append(onnx.helper.make_node(op, [source, axes_name], [target], keepdims=1))
    else:
        nodes.append(onnx.helper.make_node(op, [source], [target], axes=axes, keepdims=1))


def batch_statistics_model(model: onnx.ModelProto, epsilons: Sequence[float]) -> tuple[onnx.ModelProto, list[tuple[str, str, str]]]:
    """A copy of ``model`` where every BN normalizes with its batch's statistics (training mode)
    and outputs them: ``(mean, biased var, shape of X reshaped to (N, C, -1))`` names per BN.

    Each BN becomes (the ONNX BatchNormalization training-mode equations, with per-channel
    factors computed on (1, C, 1) tensors so that only five operations touch the whole batch)::

        Xr = Reshape(X, [0, 0, -1])            m = ReduceMean(Xr, [0, 2])       d = Xr - m
        v = ReduceSumSquare(d, [0, 2]) / (N * D)      k = scale / Sqrt(v + eps)
        Y = Reshape(d * k + B, Shape(X))
    """
    helper = onnx.helper
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 15)
    names = _all_names(model)
    counter = [0]

    def fresh(hint: str) -> str:
        while True:
            counter[0] += 1
            name = f"bnfold.batch.{hint}.{counter[0]}"
            if name not in names:
                names.add(name)
                return name

    extra: list[onnx.TensorProto] = []
    constants = {"flat": [0, 0, -1], "column": [1, -1, 1], "vector": [-1], "reduced": [0, 2]}
    const = {key: fresh(key) for key in constants}
    extra += [numpy_helper.from_array(np.array(value, np.int64), const[key]) for key, value in constants.items()]
    positions = {index: position for position, index in enumerate(batchnorm_indices(model))}
    new_nodes: list[onnx.NodeProto] = []
    outputs: list[tuple[str, str, str]] = []
    for index, node in enumerate(out.graph.node):
        position = positions.get(index)
        if position is None:
            new_nodes.append(node)
            continue
        x, scale, bias = node.input[0], node.input[1], node.input[2]
        t = {h: fresh(h) for h in ("xr", "mean", "d", "sumsq", "shape", "dims", "count", "count_f", "var", "eps",
                                   "var_eps", "std", "scale", "bias", "factor", "scaled", "y", "shape_x",
                                   "mean_out", "var_out")}
        extra.append(numpy_helper.from_array(np.array(epsilons[position], np.float32), t["eps"]))
        eps_typed, count_typed = t["eps"], t["count_f"]
        new_nodes += [helper.make_node("Reshape", [x, const["flat"]], [t["xr"]]),
                      helper.make_node("Shape", [t["xr"]], [t["shape"]])]
        _reduce("ReduceMean", t["xr"], t["mean"], [0, 2], opset, new_nodes, extra)
        new_nodes.append(helper.make_node("Sub", [t["xr"], t["mean"]], [t["d"]]))
        _reduce("ReduceSumSquare", t["d"], t["sumsq"], [0, 2], opset, new_nodes, extra)
        new_nodes += [
            helper.make_node("Gather", [t["shape"], const["reduced"]], [t["dims"]]),
            helper.make_node("ReduceProd", [t["dims"]], [t["count"]], keepdims=0),
        ]
        if opset >= 15:  # CastLike: the dtype of X, whatever it is
            eps_typed = fresh("eps_typed")
            new_nodes += [helper.make_node("CastLike", [t["eps"], x], [eps_typed]),
                          helper.make_node("CastLike", [t["count"], x], [count_typed])]
        else:
            new_nodes.append(helper.make_node("Cast", [t["count"]], [count_typed], to=onnx.TensorProto.FLOAT))
        new_nodes += [
            helper.make_node("Div", [t["sumsq"], count_typed], [t["var"]]),
            helper.make_node("Add", [t["var"], eps_typed], [t["var_eps"]]),
            helper.make_node("Sqrt", [t["var_eps"]], [t["std"]]),
            helper.make_node("Reshape", [scale, const["column"]], [t["scale"]]),
            helper.make_node("Reshape", [bias, const["column"]], [t["bias"]]),
            helper.make_node("Div", [t["scale"], t["std"]], [t["factor"]]),
            helper.make_node("Mul", [t["d"], t["factor"]], [t["scaled"]]),
            helper.make_node("Add", [t["scaled"], t["bias"]], [t["y"]]),
            helper.make_node("Shape", [x], [t["shape_x"]]),
            helper.make_node("Reshape", [t["y"], t["shape_x"]], [node.output[0]]),
            helper.make_node("Reshape", [t["mean"], const["vector"]], [t["mean_out"]]),
            helper.make_node("Reshape", [t["var"], const["vector"]], [t["var_out"]]),
        ]
        outputs.append((t["mean_out"], t["var_out"], t["shape"]))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    out.graph.initializer.extend(extra)
    return out, outputs


def shard_batch_averages(model_bytes: bytes | onnx.ModelProto, shard: Dataset, names: Sequence[str], batch_size: int,
                         threads: int = 1, progress: Progress | None = None) -> list[BatchAverage]:
    """Per BN, the sums of batch means and unbiased batch variances over ``shard`` (pure, like
    `bnfold.population.shard_moments`); ``names`` are (mean, var, shape) triples, flattened."""
    sess = session(model_of(model_bytes), "model", threads)
    names = list(names)
    totals: list[BatchAverage | None] = [None] * (len(names) // 3)
    for lo, hi in shard.bounds(batch_size):
        values = run(sess, names, shard.batch(lo, hi), "model")
        for position in range(len(totals)):
            mean, var, shape = values[3 * position: 3 * position + 3]
            count = int(shape[0]) * int(shape[2])
            if count < 2:
                raise BnfoldError(f"--method batch: a batch of {hi - lo} gives {count} value per channel at"
                                  f" '{names[3 * position]}'; an unbiased batch variance needs 2: use a larger"
                                  " batch size (or --method exact)")
            piece = BatchAverage.from_stats(mean, var, count)
            totals[position] = piece if totals[position] is None else totals[position].merge(piece)
        if progress is not None:
            progress(1)
    return totals


def _batch(model, nodes, epsilons, dataset, *, batch_size, executor, shards, threads, progress):
    rewritten, triples = batch_statistics_model(model, epsilons)
    names = [name for triple in triples for name in triple]
    averages = run_shards(submodel(rewritten, names), dataset, names, batch_size=batch_size, executor=executor,
                          shards=shards, threads=threads, progress=progress, work=shard_batch_averages)
    return [(average.mean, average.var) for average in averages]


def accuracy(model: onnx.ModelProto, dataset: Dataset, batch_size: int, threads: int = 1) -> float:
    """Fraction of samples whose argmax over axis 1 of the first output equals the label."""
    output = model.graph.output[0].name
    sess = session(submodel(model, [output]), "model", threads)
    correct = 0
    for lo, hi in dataset.bounds(batch_size):
        (scores,) = run(sess, [output], dataset.batch(lo, hi), "model")
        if scores.ndim < 2 or any(dim != 1 for dim in scores.shape[2:]):
            raise BnfoldError(f"--labels: the first output '{output}' has shape {scores.shape}; expected (N, classes)")
        predicted = scores.reshape(scores.shape[0], scores.shape[1]).argmax(axis=1)
        correct += int((predicted == dataset.labels(lo, hi)).sum())
    return correct / len(dataset)


def recalibrate(model: ModelLike, data: DataLike, *, method: str = "exact", batch_size: int = 256,
                executor: Executor | None = None, shards: int | None = None, threads: int = 1,
                labels: str | None = None, progress: Callable[[int, int], None] | None = None) -> Recalibration:
    """Recompute every main-graph BatchNormalization's mean and variance from ``data``.

    Parameters
    ----------
    model : onnx.ModelProto or path
        Not modified.
    data : path, list of paths, array, mapping or Dataset
        ``.npz`` files keyed by the model's input names (a single array for a single input), read
        one after the other as one data set (`bnfold.dataset.open_dataset`).
    method : {"exact", "batch"}
        Module docstring.
    batch_size : int
        Samples per onnxruntime run. ``exact`` gives the same statistics for any batch size;
        ``batch`` averages statistics of batches of this size.
    executor : concurrent.futures.Executor, optional
        Runs the per-shard work (a `ProcessPoolExecutor`, ``distributed.Client(...).get_executor()``);
        each task gets the model bytes and a shard of the data (file paths and row ranges, or the
        rows of in-memory arrays), so workers must see the same files.
    shards : int, optional
        Shards per pass with ``executor`` (default: 4 per worker).
    threads : int
        onnxruntime threads per session.
    labels : str, optional
        Key of integer labels in the data: accuracy (argmax of the first output) before and after.
    progress : callable, optional
        ``progress(done, total)``: called with the number of batches just finished and the total
        (levels x batches for ``exact``, batches for ``batch``).

    Returns
    -------
    Recalibration
        ``.model`` (the new model), ``.changes`` (per BN: old and new statistics, `drift`),
        accuracies.

    Raises
    ------
    BnfoldError
        No BN, a BN in training mode, bad data, a batch too small for ``batch``.
    """
    if method not in METHODS:
        raise BnfoldError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if batch_size < 1:
        raise BnfoldError(f"batch size must be at least 1, got {batch_size}")
    model, label = load(model, "model")
    nodes = [model.graph.node[index] for index in batchnorm_indices(model)]
    if not nodes:
        raise BnfoldError(f"{label}: no BatchNormalization node in the main graph: nothing to recalibrate"
                          " (PyTorch's exporters fold BN into Conv by default: export with"
                          " do_constant_folding=False, or dynamo=True with optimize=False)")
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 15)
    epsilons = [_check_node(node, position, opset) for position, node in enumerate(nodes)]
    dataset = open_dataset(data, input_specs(model, label), labels=labels)
    stored = _stored_statistics(model, nodes)
    levels = bn_levels(model)
    batches = len(dataset.bounds(batch_size))
    total = batches * (max(levels) + 1 if method == "exact" else 1)
    step = None if progress is None else (lambda done: progress(done, total))
    options = {"batch_size": batch_size, "executor": executor, "shards": shards, "threads": threads,
               "progress": step}
    if method == "exact":
        stats = _exact(model, nodes, stored, dataset, levels, **options)
    else:
        stats = _batch(model, nodes, epsilons, dataset, **options)
    new_model = with_statistics(model, {node.output[0]: values for node, values in zip(nodes, stats)},
                                {node.output[0]: values for node, values in zip(nodes, stored)})
    changes = [BNChange(_label(node, position), node.input[0], levels[position],
                        epsilons[position], stored[position][0].astype(np.float64).reshape(-1),
                        stored[position][1].astype(np.float64).reshape(-1), *stats[position])
               for position, node in enumerate(nodes)]
    result = Recalibration(new_model, method, changes, levels=max(levels) + 1 if method == "exact" else 1,
                           samples=len(dataset), batch_size=batch_size, batches=batches,
                           labels=labels)
    if labels is not None:
        result.accuracy_before = accuracy(model, dataset, batch_size, threads)
        result.accuracy_after = accuracy(new_model, dataset, batch_size, threads)
    return result


def recalibrate_file(input_path: str | os.PathLike, output_path: str | os.PathLike, data: DataLike, *,
                     fold: bool = False, force: bool = False, json_path: str | os.PathLike | None = None,
                     **options: Any) -> tuple[Recalibration, Any]:
    """`recalibrate` the model file IN and write OUT atomically (``bnfold recalibrate``).

    IN is never modified. With ``fold=True`` the recalibrated model is folded and verified by
    `bnfold.conversion.convert` (OUT is then written only if verification passes). ``options``
    are those of `recalibrate`. Returns the `Recalibration` and the `ConvertResult` (or None).
    """
    from bnfold.io import check_output_path, save_model, write_json

    source, out = Path(input_path), Path(output_path)
    data_paths = [Path(item) for item in (data if isinstance(data, (list, tuple)) else [data])
                  if isinstance(item, (str, os.PathLike))]
    check_output_path(out, overwrite=force, inputs=(source, *data_paths))
    if json_path is not None:
        if Path(json_path).resolve() in (out.resolve(), source.resolve()):
            raise BnfoldError(f"{json_path}: the JSON report path equals the input or the output model")
        check_output_path(json_path, overwrite=True, inputs=(source, *data_paths))
    result = recalibrate(source, data, **options)
    converted = None
    if fold:
        from bnfold.conversion import convert

        with tempfile.TemporaryDirectory(prefix="bnfold-recalibrate-") as folder:
            staged = Path(folder) / source.name
            save_model(result.model, staged)
            converted = convert(staged, out, force=force)
        converted.data["input"] = f"{source} (recalibrated)"
    else:
        save_model(result.model, out)
    if json_path is not None:
        write_json(json_path, {"input": str(source), "output": str(out), **result.to_dict(),
                               "fold": converted.data if converted is not None else None})
    return result, converted
