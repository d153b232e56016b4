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
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError

from bnfold.errors import BnfoldError

__all__ = [
    "InputSpec", "ModelLike", "concrete_shape", "expose", "feed_inputs", "first_line", "load", "np_dtype",
    "random_inputs", "run", "session",
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
        if kind == "f" or spec.dtype.name == "bfloat16":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif kind in "iu":
            arrays[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        elif kind == "b":
            arrays[spec.name] = rng.random(shape) < 0.5
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

    ``path``: the file holding ``model`` with its data (`load_for_session`): onnxruntime loads it
    from there instead of from a serialized copy.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Errors reach the user as one BnfoldError line; onnxruntime's own log would add more lines.
    options.log_severity_level = 4
    store = _mapped_store(model)
    data = None
    if store is None:
        try:
            data = model.SerializeToString()
        except (ValueError, EncodeError):  # over protobuf's 2 GB limit: hand onnxruntime a file with external data
            data = None
    try:
        on_disk = path if path is not None else None if store is None else store.file_for(model)
        if on_disk is not None:
            # A file holds this very model (the input, or a staged output): onnxruntime reads
            # it and its data from there, one copy, no temporary file.
            return ort.InferenceSession(str(on_disk), options, providers=["CPUExecutionProvider"])
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
    return exposed

