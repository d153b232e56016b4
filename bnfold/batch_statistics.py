"""``--method batch``: each BN normalizes with its batch's statistics, whose means and unbiased
variances are averaged over batches, every batch alike (PyTorch's ``update_bn``).

`batch_statistics_model` rewrites every BN of a model into its training-mode equations with
the batch statistics as extra outputs; `shard_batch_averages` is the pure per-shard work (like
`bnfold.population.shard_moments`) whose `bnfold.moments.BatchAverage` results merge by sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.dataset import Dataset
from bnfold.errors import BnfoldError
from bnfold.moments import BatchAverage
from bnfold.population import Progress, batchnorm_indices, shard_session
from bnfold.runtime import run
from bnfold.statistics_graph import all_names

__all__ = ["batch_statistics_model", "shard_batch_averages"]


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
    names = all_names(model)
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
    sess = shard_session(model_bytes, threads)
    names = list(names)
    totals: list[BatchAverage | None] = [None] * (len(names) // 3)
    try:
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
    finally:
        shard.close()
    return totals
