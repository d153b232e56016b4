"""Running ONNX models in onnxruntime the way every bnfold check does.

- `session`: graph optimizations DISABLED (onnxruntime's own fusions would rewrite a model into
  something close to its folded form, and its optimizer removes Dropout, hiding a training-mode
  export), sequential execution, a fixed thread count, onnxruntime's log silenced; models over
  protobuf's 2 GB limit are handed over as a file with external data.
- `run`: one call, onnxruntime's failure as one `BnfoldError` line.
- `expose`: a copy of a model whose graph also outputs the given intermediate tensors, so that one
  run returns them (layer-by-layer comparison, statistics of BN inputs, where samples mix).
- `InputSpec` / `feed_inputs` / `random_inputs`: the inputs a model must be fed, and random
  values for them.
- `computed_tensors`: every tensor the main graph computes, in topological order.
- `first_nondeterministic` / `check_deterministic`: run a session twice on the same input and find
  the first tensor whose two values differ (Dropout or random ops left in training mode).
"""

from __future__ import annotations

import heapq
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from bnfold.errors import BnfoldError

__all__ = [
    "InputSpec", "ModelLike", "check_deterministic", "computed_tensors", "concrete_shape", "default_tolerances",
    "expose", "feed_inputs", "first_line", "first_nondeterministic", "load", "np_dtype", "random_inputs", "run",
    "session", "within_tolerance",
]

ModelLike = onnx.ModelProto | str | os.PathLike


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]  # int, symbolic name, or None (unknown)


def np_dtype(elem_type: int, where: str) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        raise BnfoldError(f"{where}: element type {elem_type} is not supported for verification") from None


def feed_inputs(model: onnx.ModelProto, label: str = "model") -> list[InputSpec]:
    """Graph inputs that must be fed: those without an initializer of the same name.

    Models of IR version < 4 list every initializer as an input too; those are constants and are
    not fed (onnxruntime uses the initializer).
    """
    initializers = {init.name for init in model.graph.initializer}
    initializers |= {init.values.name for init in model.graph.sparse_initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        where = f"{label}: input '{value.name}'"
        if value.type.WhichOneof("value") != "tensor_type":
            raise BnfoldError(f"{where} is not a tensor; bnfold verifies tensor inputs only")
        tensor_type = value.type.tensor_type
        dtype = np_dtype(tensor_type.elem_type, where)
        if not tensor_type.HasField("shape"):
            raise BnfoldError(f"{where} has no shape (unknown rank); pass its arrays with --inputs")
        dims = tuple(
            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
            for dim in tensor_type.shape.dim
        )
        specs.append(InputSpec(value.name, dtype, dims))
    return specs



def concrete_shape(spec: InputSpec, batch: int) -> tuple[int, ...]:
    return tuple(dim if isinstance(dim, int) else batch for dim in spec.dims)


def random_inputs(specs: Sequence[InputSpec], *, batch: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random arrays for ``specs``: floats ~ N(0, 1), integers in [0, 4), bools fair coins.

    Small non-negative integers keep index-like inputs (Gather, Slice) in range for most models.
    """
    arrays = {}
    for spec in specs:
        shape = concrete_shape(spec, batch)
        kind = spec.dtype.kind
        # np.asarray: for a scalar input (shape ()) NumPy returns a scalar, which onnxruntime refuses.
        if kind == "f" or spec.dtype.name == "bfloat16":
            arrays[spec.name] = np.asarray(rng.standard_normal(shape).astype(spec.dtype))
        elif kind in "iu":
            arrays[spec.name] = np.asarray(rng.integers(0, 4, size=shape).astype(spec.dtype))
        elif kind == "b":
            arrays[spec.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            raise BnfoldError(
                f"input '{spec.name}' has dtype {spec.dtype.name}, for which bnfold cannot draw random"
                " values; pass its arrays with --inputs"
            )
    return arrays


def load(model: ModelLike, label: str) -> tuple[onnx.ModelProto, str]:
    """``(model, label)``: a ModelProto as given, a path through `bnfold.io.load_model` (label = path)."""
    if isinstance(model, onnx.ModelProto):
        return model, label
    from bnfold.io import load_model

    return load_model(model), str(model)


def load_for_session(model: ModelLike, label: str) -> tuple[onnx.ModelProto, str, Path | None]:
    """`load`, except that a model file with external data is not read into memory: returns
    ``(model, label, path)`` where ``model`` keeps its external references (for its inputs,
    outputs and shapes) and ``path`` is the file to hand `session` (None for other models).

    The file gets every check of `bnfold.io.load_model` (external data inside the model's
    folder, sizes); onnxruntime then reads the data itself, once.
    """
    if isinstance(model, onnx.ModelProto):
        return model, label, None
    from bnfold.io.files import all_tensors
    from bnfold.io.models import load_model_mapped

    loaded, files = load_model_mapped(model)
    for fd, _ in files.values():
        os.close(fd)
    if not any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in all_tensors(loaded)):
        return loaded, str(model), None
    return loaded, str(model), Path(model)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def session(model: onnx.ModelProto, label: str, threads: int = 1, *, path: Path | None = None):
    """An onnxruntime CPU session of ``model``, graph optimizations disabled (module docstring).

    ``path``: the file whose external data ``model`` refers to (`load_for_session`; ``model`` may
    be that file's model with more outputs, see `expose`): onnxruntime reads the data from the
    file's folder, and only the small model proto is serialized.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Errors reach the user as one BnfoldError line; onnxruntime's own log would add more lines.
    options.log_severity_level = 4
    store = None if path is not None else _mapped_store(model)
    on_disk = path if path is not None else None if store is None else store.file_for(model)
    data = None
    try:
        folder = None if on_disk is not None or store is None else store.folder_for(model)
        if folder is not None:
            # A model made from an open input (a submodel, a copy with more outputs) whose data
            # is all still in the input's files: read there, no copy.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        if on_disk is not None:
            # A file holds this model's data (the input, or a staged output): onnxruntime reads it
            # from there, once, no temporary copy. The model itself may have more outputs than the
            # file's (`expose`): the small proto goes from memory, the data is resolved in the
            # file's folder (onnxruntime >= 1.21).
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(on_disk).resolve().parent))
            if store is not None:  # an open model: its tensors point into the file as written there
                proto = onnx.load(str(on_disk), load_external_data=False)
                del proto.graph.output[:]
                proto.graph.output.extend(model.graph.output)
                data = proto.SerializeToString()
            else:
                data = model.SerializeToString()
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        if store is None:
            try:
                data = model.SerializeToString()
            except (ValueError, EncodeError):  # over protobuf's 2 GB limit: a file with external data
                data = None
        if data is not None:
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        from bnfold.io import save_model

        # Beside the output when a model is open from disk (its scratch folder), not in /tmp.
        folder_of = None if store is None else store.scratch_dir
        with tempfile.TemporaryDirectory(prefix=".bnfold-verify-", dir=folder_of) as folder:
            path = Path(folder) / "model.onnx"
            # Not onnx.save_model(save_as_external_data=True): it rewrites the caller's model in
            # place to point at the temporary files.
            save_model(model, path, external_data=True)
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BnfoldError(f"{label}: onnxruntime cannot load the model: {first_line(exc)}") from None


def _mapped_store(model: onnx.ModelProto):
    """The open model (`bnfold.io.mapped`) whose files hold some of ``model``'s tensors, if any."""
    from bnfold.io.files import all_tensors
    from bnfold.io.mapped import active

    store = active()
    if store is None:
        return None
    if store.file_for(model) is not None or any(store.span(tensor) is not None for tensor in all_tensors(model)):
        return store
    return None


def run(sess, names: list[str], feeds: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    """``sess.run(names, feeds)``; onnxruntime's failure becomes one `BnfoldError` line naming ``label``."""
    import onnxruntime as ort

    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    try:
        return sess.run(names, feeds, run_options)
    except Exception as exc:
        raise BnfoldError(f"{label}: onnxruntime failed to run the model: {first_line(exc)}") from None


def expose(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph also outputs the tensors ``names`` (in that order).

    Tensors that are already outputs are not added twice. The element type and shape come from
    the graph's value_info when recorded there; otherwise the output is declared without a type,
    which onnxruntime accepts and fills in at load time.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph = exposed.graph
    present = {value.name for value in graph.output}
    known = {value.name: value for value in [*graph.value_info, *graph.input]}
    for name in names:
        if name in present:
            continue
        present.add(name)
        value = graph.output.add()
        if name in known:
            value.CopyFrom(known[name])
        else:
            value.name = name
    store = _mapped_store(model)
    held_in = None if store is None else store.file_for(model)
    if held_in is not None:  # the same data on disk: `session` reads it from that file
        store.register_file(exposed, held_in)
    return exposed



# dtype name -> default (rtol, atol); atol = rtol / 100 (see bnfold.verification's docstring).
_DEFAULT_TOLERANCES = {
    "float64": (1e-9, 1e-11),
    "float32": (1e-4, 1e-6),
    "float16": (1e-2, 1e-4),
    "bfloat16": (1e-2, 1e-4),
}


def default_tolerances(dtype: np.dtype | str) -> tuple[float, float]:
    """Return the default ``(rtol, atol)`` for tensors of ``dtype`` (exact, ``(0, 0)``, for non-floats)."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return _DEFAULT_TOLERANCES.get(name, (0.0, 0.0))


def within_tolerance(a: np.ndarray, b: np.ndarray, rtol: float | None = None, atol: float | None = None) -> bool:
    """``max|a - b| <= atol + rtol * max|a|`` (dtype defaults), NaN and infinities in the same places.

    The quick form of the verification bound, with no statistics: shapes and dtypes must match,
    integers and bools exactly.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    default_rtol, default_atol = default_tolerances(a.dtype)
    if default_rtol == 0.0:
        return bool(np.array_equal(a, b))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if a.size == 0:
        return True
    if a.dtype.itemsize < 4:  # float16 / bfloat16: compute in float32
        a, b = a.astype(np.float32), b.astype(np.float32)
    # Fast path in the arrays' own dtype (a - b rounds at 2**-24 relative in float32, far below
    # any tolerance); NaN or infinities anywhere take the float64 path below.
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: handled below
        diff = np.subtract(a, b)
    max_abs = float(max(diff.max(), -diff.min()))
    scale = float(max(a.max(), -a.min()))
    if math.isfinite(max_abs) and math.isfinite(scale):
        return max_abs <= atol + rtol * scale
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(a64)
    # Non-finite values (NaN, +-inf) must sit in the same places with the same value.
    if not np.array_equal(np.where(finite, 0.0, a64), np.where(np.isfinite(b64), 0.0, b64), equal_nan=True):
        return False
    if not finite.any():
        return True
    return float(np.max(np.abs(a64[finite] - b64[finite]))) <= atol + rtol * float(np.max(np.abs(a64[finite])))


def computed_tensors(model: onnx.ModelProto) -> list[str]:
    """Names of the tensors the main graph's nodes compute, in topological order.

    ONNX requires nodes to be listed in topological order, but not every file honours it; the
    order here is a stable topological sort (graph order among nodes that are ready). Empty
    (omitted optional) outputs are left out; subgraph tensors are not listed.
    """
    graph = model.graph
    produced_by = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    waiting: dict[int, set[int]] = {}
    users: dict[int, list[int]] = {}
    for index, node in enumerate(graph.node):
        needs = {produced_by[name] for name in node.input if name in produced_by and produced_by[name] != index}
        waiting[index] = needs
        for producer in needs:
            users.setdefault(producer, []).append(index)
    ready = [index for index, needs in waiting.items() if not needs]
    heapq.heapify(ready)
    names: list[str] = []
    seen: set[str] = set()
    while ready:
        index = heapq.heappop(ready)
        for name in graph.node[index].output:
            if name and name not in seen:
                seen.add(name)
                names.append(name)
        for user in users.get(index, []):
            waiting[user].discard(index)
            if not waiting[user]:
                heapq.heappush(ready, user)
    # Nodes in a cycle (an invalid graph onnxruntime will refuse anyway) keep their graph order.
    names += [name for node in graph.node for name in node.output if name and name not in seen]
    return list(dict.fromkeys(names))


def first_nondeterministic(sess, names: Sequence[str], feeds: Mapping[str, np.ndarray], label: str, *,
                           groups: Sequence[Sequence[str]] | None = None) -> str | None:
    """Run ``sess`` twice on the same ``feeds``; the first of ``names`` whose two values differ, or None.

    ``sess`` is a `session` of a model that outputs ``names`` (see `expose` and
    `computed_tensors`). Two values differ when they fail `within_tolerance` with the dtype's
    default tolerances: a deterministic run repeats itself bit for bit, but a run on several
    threads may sum in another order, and such differences are far below the tolerance, while
    Dropout or a random op changes values by their own size. ``groups`` splits ``names`` into
    runs that each request one group (to bound memory); by default one run requests them all.

    Returns
    -------
    str or None
        The first differing tensor in the order of ``names``, None when the two runs agree.
    """
    for group in groups if groups is not None else [list(names)]:
        group = list(group)
        if not group:
            continue
        first = run(sess, group, dict(feeds), label)
        second = run(sess, group, dict(feeds), label)
        for name, a, b in zip(group, first, second):
            if not within_tolerance(a, b):
                return name
    return None


def check_deterministic(sess, names: Sequence[str], feeds: Mapping[str, np.ndarray], label: str, *,
                        groups: Sequence[Sequence[str]] | None = None) -> None:
    """Raise `BnfoldError` when `first_nondeterministic` finds a tensor: the model cannot be a reference.

    The message: ``LABEL is not deterministic: two runs on the same input differ at 'TENSOR'
    (Dropout or random ops in training mode? export in inference mode)``.
    """
    name = first_nondeterministic(sess, names, feeds, label, groups=groups)
    if name is not None:
        raise BnfoldError(
            f"{label} is not deterministic: two runs on the same input differ at '{name}'"
            " (Dropout or random ops in training mode? export in inference mode)"
        )
