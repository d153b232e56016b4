"""Exact statistics of what each BatchNormalization sees, over a data set, in one streamed pass.

`bn_input_moments(model, data)` runs the model AS IT IS (every BN with its stored statistics) in
onnxruntime over the data, batch by batch, and returns for each BN of the main graph the
per-channel `Moments` (count, mean, M2 in float64, merged with Chan's formula) of its input ``X``
over every sample and every position along N, D1, D2, ... (ONNX BatchNormalization's channel axis
is 1). The run stops at the tensors it needs: nodes that only feed later tensors are cut away
(`submodel`).

The per-shard work, `shard_moments(model_bytes, shard, names, batch_size)`, is a pure function
whose results merge exactly, so any `concurrent.futures.Executor` (a process pool, a Dask
client's executor) can run the shards; the merge is done here in shard order, so the result does
not depend on how many workers ran it beyond float64 rounding.

BNs inside control-flow bodies (If, Loop, Scan) are not covered: only main-graph nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import onnx

from bnfold.dataset import ArraySpec, DataLike, Dataset, open_dataset
from bnfold.errors import BnfoldError
from bnfold.io.files import all_tensors
from bnfold.moments import Moments, merge_all
from bnfold.runtime import ModelLike, feed_inputs, load, run, session

__all__ = [
    "bn_input_moments", "batchnorm_nodes", "batchnorm_indices", "subgraph_reads", "input_specs", "submodel", "shard_moments", "run_shards",
    "Progress", "model_of", "shard_session",
]

log = logging.getLogger(__name__)

Progress = Callable[[int], None]  # called with the number of batches just finished


def batchnorm_indices(model: onnx.ModelProto) -> list[int]:
    """Positions in ``model.graph.node`` of the main graph's BatchNormalization nodes."""
    return [index for index, node in enumerate(model.graph.node)
            if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")]


def batchnorm_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The BatchNormalization nodes of the main graph, in graph order."""
    return [model.graph.node[index] for index in batchnorm_indices(model)]


def input_specs(model: onnx.ModelProto, label: str = "model") -> list[ArraySpec]:
    """The inputs that data must provide (graph inputs without an initializer)."""
    return [ArraySpec(spec.name, spec.dtype, spec.dims) for spec in feed_inputs(model, label)]


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Every name read inside ``node``'s graph attributes: outer-scope values they may capture."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names |= subgraph_reads(inner)
    return names


def submodel(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs``: nodes they do not depend on are cut away.

    The batch axis (axis 0) of every fed input is made free, so that any batch size runs even
    when the export fixed it (value_info shapes, which would contradict, are dropped; onnxruntime
    infers them again). Unused initializers and inputs are dropped.
    """
    graph = model.graph
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    needed_nodes: set[int] = set()
    wanted = list(outputs)
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in seen:
            continue
        seen.add(name)
        index = producer.get(name)
        if index is None or index in needed_nodes:
            continue
        needed_nodes.add(index)
        node = graph.node[index]
        wanted.extend(n for n in node.input if n)
        wanted.extend(subgraph_reads(node))
    # Built field by field: copying the whole model first would copy every weight once per pass.
    cut = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(cut, field, getattr(model, field))
    cut.opset_import.extend(model.opset_import)
    cut.functions.extend(model.functions)
    new = cut.graph
    new.name = graph.name
    new.node.extend(node for index, node in enumerate(graph.node) if index in needed_nodes)
    used = seen
    initializers = [init for init in graph.initializer if init.name in used]
    new.initializer.extend(initializers)
    sparse = [init for init in graph.sparse_initializer if init.values.name in used]
    new.sparse_initializer.extend(sparse)
    new.input.extend(value for value in graph.input if value.name in used)
    constant = {init.name for init in initializers} | {init.values.name for init in sparse}
    for value in new.input:
        if value.name not in constant and value.type.tensor_type.shape.dim:
            first = value.type.tensor_type.shape.dim[0]
            first.Clear()
            first.dim_param = "bnfold_batch"
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.value_info, *graph.output, *graph.input]
             if value.type.HasField("tensor_type")}
    for name in outputs:
        value = new.output.add()
        value.name = name
        if types.get(name):
            value.type.tensor_type.elem_type = types[name]
    return cut


#: What a shard's work gets as its model: the ModelProto (this process), its bytes, or its bytes
#: and the folder holding its external data files (a model opened from disk: `_payload`).
ModelPayload = bytes | onnx.ModelProto | tuple[bytes, str]


def model_of(model: ModelPayload) -> onnx.ModelProto:
    if isinstance(model, tuple):
        model = model[0]
    return onnx.load_from_string(model) if isinstance(model, bytes) else model


def shard_session(model: ModelPayload, threads: int = 1):
    """The onnxruntime session of a shard's model (`bnfold.runtime.session`); a model sent with
    its data folder reads its external data there, in place."""
    if isinstance(model, tuple):
        data, folder = model
        # `session` takes the folder of a file holding the model's data; the file name is unused.
        return session(onnx.load_from_string(data), "model", threads, path=Path(folder) / "model.onnx")
    return session(model_of(model), "model", threads)


def shard_moments(model_bytes: bytes | onnx.ModelProto, shard: Dataset, names: Sequence[str], batch_size: int,
                  threads: int = 1, progress: Progress | None = None) -> list[Moments]:
    """The `Moments` (channel axis 1) of the tensors ``names`` over ``shard``: one session, streamed.

    Pure: everything it needs travels in its arguments (the model serialized, for other processes
    or machines; in this process the ModelProto itself), so it runs anywhere.
    """
    sess = shard_session(model_bytes, threads)
    names = list(names)
    totals: list[Moments | None] = [None] * len(names)
    for feeds in shard.batches(batch_size):
        values = run(sess, names, feeds, "model")
        for position, value in enumerate(values):
            if value.ndim < 2:
                raise BnfoldError(f"tensor '{names[position]}' has rank {value.ndim}; BatchNormalization needs (N, C, ...)")
            piece = Moments.from_batch(value, axis=1)
            totals[position] = piece if totals[position] is None else totals[position].merge(piece)
        if progress is not None:
            progress(1)
    return [total if total is not None else Moments.empty(0) for total in totals]


def _merge_shards(results: Iterable[list]) -> list:
    results = list(results)
    return [merge_all(column) for column in zip(*results)]


def _serialize(model: onnx.ModelProto) -> bytes:
    try:
        return model.SerializeToString()
    except Exception:
        raise BnfoldError("model is over protobuf's 2 GB limit: recalibration needs it in one piece") from None


def _payload(model: onnx.ModelProto) -> ModelPayload:
    """What `run_shards` sends each task: the model's bytes, and for a model made from an input
    opened from disk (`bnfold.io.mapped.open_model`) whose external data all lies in the input's
    files, the folder of those files too, so that workers read the data there instead of
    receiving it (they must see the same files, as they see the data's)."""
    from bnfold.io.mapped import active

    store = active()
    folder = None if store is None else store.folder_for(model)
    if folder is not None and any(store.span(tensor) is not None for tensor in all_tensors(model)):
        return _serialize(model), str(folder)
    return _serialize(model)


def run_shards(model: onnx.ModelProto, dataset: Dataset, names: Sequence[str], *, batch_size: int,
               executor: Executor | None = None, shards: int | None = None, threads: int = 1,
               progress: Progress | None = None, work: Callable = shard_moments) -> list:
    """``work`` (default `shard_moments`) over ``dataset`` split in shards, here or on ``executor``.

    ``work(model, shard, names, batch_size, threads)`` (``model`` serialized to bytes when it
    goes to ``executor``, the ModelProto itself here) must be a module-level function
    returning a list of mergeable pieces (one per name); they are merged in shard order.
    Shards are whole batches (`Dataset.shards`), so the batches are the same for any shard count.
    """
    if executor is None:
        return work(model, dataset, names, batch_size, threads, progress)
    model_bytes = _payload(model)
    count = shards or max(1, 4 * int(getattr(executor, "_max_workers", 8) or 8))
    pieces = dataset.shards(count, batch_size)
    futures = [executor.submit(work, model_bytes, piece, list(names), batch_size, threads) for piece in pieces]
    results = []
    for piece, future in zip(pieces, futures):
        results.append(future.result())
        if progress is not None:
            progress(len(piece.bounds(batch_size)))
    return _merge_shards(results)


def bn_input_moments(model: ModelLike, data: DataLike, *, batch_size: int = 256, executor: Executor | None = None,
                     shards: int | None = None, threads: int = 1,
                     progress: Progress | None = None) -> dict[str, Moments]:
    """Exact per-channel statistics of every BatchNormalization input, the model as it is.

    Parameters
    ----------
    model : onnx.ModelProto or path
        Not modified.
    data : path, list of paths, array or mapping (see `bnfold.dataset.open_dataset`), or Dataset
        Samples keyed by the model's input names; several sources are one data set.
    batch_size : int
        Samples per onnxruntime run (memory, not results: the statistics are exact for any size).
    executor : concurrent.futures.Executor, optional
        Runs the shards (`shard_moments`) elsewhere; None runs them here.
    shards, threads :
        Shard count for ``executor`` (default 4 per worker) and onnxruntime threads per session.
    progress : callable, optional
        Called with the number of batches finished, as they finish.

    Returns
    -------
    dict[str, Moments]
        BN input tensor name -> Moments over the data (``.mean``, ``.var`` population variance,
        ``.std``), one entry per distinct input tensor of the main graph's BNs, in graph order.
    """
    model, label = load(model, "model")
    nodes = batchnorm_nodes(model)
    if not nodes:
        return {}
    dataset = data if isinstance(data, Dataset) else open_dataset(data, input_specs(model, label))
    names = list(dict.fromkeys(node.input[0] for node in nodes))
    moments = run_shards(submodel(model, names), dataset, names, batch_size=batch_size, executor=executor,
                         shards=shards, threads=threads, progress=progress)
    return dict(zip(names, moments))
