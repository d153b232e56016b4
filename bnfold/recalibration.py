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
inputs 3 and 4 (mean, var) get the new values, without changing anything else the model computes
(rules in `bnfold.statistics_graph`). Values keep the dtype of the statistics they replace.

Only BNs of the main graph are recalibrated (not inside If / Loop / Scan bodies); BNs in training
mode are refused (they do not use their stored statistics).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.batch_statistics import batch_statistics_model, shard_batch_averages
from bnfold.dataset import DataLike, Dataset, open_dataset
from bnfold.errors import BnfoldError
from bnfold.moments import drift
from bnfold.population import (
    batchnorm_indices,
    input_specs,
    run_shards,
    subgraph_reads,
    submodel,
)
from bnfold.runtime import ModelLike, load, run, session
from bnfold.statistics_graph import stored_statistics, with_statistics

__all__ = ["recalibrate", "recalibrate_file", "Recalibration", "BNChange", "METHODS", "bn_levels", "drift"]

log = logging.getLogger(__name__)

METHODS = ("exact", "batch")


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

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "batch_size": self.batch_size,
                "batches": self.batches, "levels": self.levels, "bn_total": len(self.changes),
                "labels": self.labels, "accuracy_before": self.accuracy_before,
                "accuracy_after": self.accuracy_after, "bns": [change.to_dict() for change in self.changes]}

    def lines(self) -> list[str]:
        """The human-readable report ``bnfold recalibrate`` prints."""
        how = f"{self.levels} level{'s' if self.levels != 1 else ''} x " if self.method == "exact" else ""
        nodes = f"{len(self.changes)} BatchNormalization node{'s' if len(self.changes) != 1 else ''}"
        batches = f"{self.batches} batch{'es' if self.batches != 1 else ''} of {self.batch_size}"
        lines = [f"recalibrated {nodes} over {self.samples} samples ({self.method}: {how}{batches})",
                 "how far the old statistics were: mean shift in data std, variance ratio old/new (worst channel)"]
        width = max(len(change.name) for change in self.changes)
        for change in self.changes:
            d = change.drift
            lines.append(f"  {change.name:<{width}}  level {change.level:>2}  mean shift {d['max_mean_shift']:8.3g}"
                         f" (ch {d['channel_mean_shift']})  variance ratio {d['worst_var_ratio']:8.3g} (ch {d['channel_var_ratio']})")
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
            _check_channels(nodes[position], position, found.channels, stored[position][0].size)
            stats[nodes[position].output[0]] = (found.mean, found.var)
        log.info("level %d: %d BatchNormalization nodes recalibrated", level, len(members))
    return [stats[node.output[0]] for node in nodes]


def _check_channels(node: onnx.NodeProto, position: int, measured: int, stored: int) -> None:
    if measured != stored:
        raise BnfoldError(f"BatchNormalization '{_label(node, position)}': its input has {measured} channels"
                          f" but {stored} statistics")


def _batch(model, nodes, stored, epsilons, dataset, *, batch_size, executor, shards, threads, progress):
    rewritten, triples = batch_statistics_model(model, epsilons)
    names = [name for triple in triples for name in triple]
    averages = run_shards(submodel(rewritten, names), dataset, names, batch_size=batch_size, executor=executor,
                          shards=shards, threads=threads, progress=progress, work=shard_batch_averages)
    for position, (node, average) in enumerate(zip(nodes, averages)):
        _check_channels(node, position, average.mean.size, stored[position][0].size)
    return [(average.mean, average.var) for average in averages]


def accuracy(model: onnx.ModelProto, dataset: Dataset, batch_size: int, threads: int = 1) -> float:
    """Fraction of samples whose argmax over axis 1 of the first output equals the label."""
    output = model.graph.output[0].name
    sess = session(submodel(model, [output]), "model", threads)
    correct = 0
    try:
        for lo, hi in dataset.bounds(batch_size):
            (scores,) = run(sess, [output], dataset.batch(lo, hi), "model")
            if scores.ndim < 2 or any(dim != 1 for dim in scores.shape[2:]):
                raise BnfoldError(f"--labels: the first output '{output}' has shape {scores.shape}; expected (N, classes)")
            predicted = scores.reshape(scores.shape[0], scores.shape[1]).argmax(axis=1)
            correct += int((predicted == dataset.labels(lo, hi)).sum())
    finally:
        dataset.close()
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
        Shards per pass with ``executor`` (default: 4 per worker of a process or thread pool,
        32 for other executors). Shards are whole batches.
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
    _check_options(method, batch_size)
    model, label = load(model, "model")
    return _recalibrate(model, label, data, method=method, batch_size=batch_size, executor=executor, shards=shards,
                        threads=threads, labels=labels, progress=progress)


def _check_options(method: str, batch_size: int) -> None:
    if method not in METHODS:
        raise BnfoldError(f"method must be one of {', '.join(METHODS)}, got '{method}'")
    if batch_size < 1:
        raise BnfoldError(f"batch size must be at least 1, got {batch_size}")


def _recalibrate(model: onnx.ModelProto, label: str, data: DataLike, *, method: str, batch_size: int,
                 executor: Executor | None, shards: int | None, threads: int, labels: str | None,
                 progress: Callable[[int, int], None] | None) -> Recalibration:
    """`recalibrate` of a loaded model (its external data in memory, or memory-mapped by
    `bnfold.io.mapped.open_model`: every session then reads it in place)."""
    _check_options(method, batch_size)
    nodes = [model.graph.node[index] for index in batchnorm_indices(model)]
    if not nodes:
        raise BnfoldError(f"{label}: no BatchNormalization node in the main graph: nothing to recalibrate"
                          " (PyTorch's exporters fold BN into Conv by default: export with"
                          " do_constant_folding=False, or dynamo=True with optimize=False)")
    opset = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 15)
    epsilons = [_check_node(node, position, opset) for position, node in enumerate(nodes)]
    dataset = open_dataset(data, input_specs(model, label), labels=labels)
    stored = stored_statistics(model, nodes)
    levels = bn_levels(model)
    batches = len(dataset.bounds(batch_size))
    total = batches * (max(levels) + 1 if method == "exact" else 1)
    step = None if progress is None else (lambda done: progress(done, total))
    options = {"batch_size": batch_size, "executor": executor, "shards": shards, "threads": threads,
               "progress": step}
    if method == "exact":
        stats = _exact(model, nodes, stored, dataset, levels, **options)
    else:
        stats = _batch(model, nodes, stored, epsilons, dataset, **options)
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

    IN is never modified; its external data is memory-mapped, not loaded, and OUT has external
    data when IN has (the returned model keeps IN's external data as references). With ``fold=True`` the recalibrated model is folded and verified by
    `bnfold.conversion.convert` (OUT is then written only if verification passes). ``options``
    are those of `recalibrate`. Returns the `Recalibration` and the `ConvertResult` (or None).
    """
    from bnfold.io import check_output_path, save_model, write_json
    from bnfold.io.files import same_file

    source, out = Path(input_path), Path(output_path)
    data_paths = [Path(item) for item in (data if isinstance(data, (list, tuple)) else [data])
                  if isinstance(item, (str, os.PathLike))]
    for other in (source, *data_paths):
        if same_file(out, other):  # checked here: check_output_path's advice (--in-place) is convert's
            raise BnfoldError(f"{out}: output is the same file as the input {other}; choose another -o")
    check_output_path(out, overwrite=force, inputs=(source, *data_paths))
    if json_path is not None:
        if Path(json_path).resolve() in (out.resolve(), source.resolve()):
            raise BnfoldError(f"{json_path}: the JSON report path equals the input or the output model")
        check_output_path(json_path, overwrite=True, inputs=(source, *data_paths))
    from bnfold.io.files import all_tensors, resolved
    from bnfold.io.mapped import open_model

    settings = {**_DEFAULTS, **options}
    _check_options(settings["method"], settings["batch_size"])
    # External data stays on disk (memory-mapped): the statistics are read from it, every pass's
    # submodel reads its weights in place (`bnfold.runtime.session`), and OUT's data is copied
    # file to file; OUT has external data when IN has.
    with open_model(source, scratch_dir=resolved(out).parent) as opened:
        external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in all_tensors(opened.model))
        result = _recalibrate(opened.model, str(source), data, **settings)
        converted = None
        if fold:
            from bnfold.conversion import convert

            # Staged beside OUT (its disk), not in the temporary folder: it may be as large as IN.
            with tempfile.TemporaryDirectory(prefix=".bnfold-recalibrate-", dir=resolved(out).parent) as folder:
                staged = Path(folder) / source.name
                save_model(result.model, staged, external_data=external or None)
                converted = convert(staged, out, force=force)
            converted.data["input"] = f"{source} (recalibrated)"
        else:
            save_model(result.model, out, external_data=external or None)
    if json_path is not None:
        write_json(json_path, {"input": str(source), "output": str(out), **result.to_dict(),
                               "fold": converted.data if converted is not None else None})
    return result, converted


_DEFAULTS: dict[str, Any] = {"method": "exact", "batch_size": 256, "executor": None, "shards": None, "threads": 1,
                             "labels": None, "progress": None}
