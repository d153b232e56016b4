"""Loading ONNX models: parse, check versions and names, read external data, run the checker.

Rules of `load_model`:
    1. A model must be a regular, non-empty file under 2 GiB that parses as an ONNX
       ``ModelProto`` with a graph.
    2. Its IR version and the opset of the standard domains must be ones the installed ``onnx``
       knows: a newer file is refused with both versions named, rather than misread.
    3. External data is read by `bnfold.io.external` (only inside the model's folder).
    4. With ``check=True`` (the default) every name must be UTF-8 (protobuf hands out other names
       as ``bytes``, which downstream code does not expect) and the model must pass
       ``onnx.checker.check_model`` (not the full check, which also runs shape inference).
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.errors import BnfoldError
from bnfold.io.external import load_external_data, map_external_data
from bnfold.io.foreign import foreign_format_hint
from bnfold.io.files import PROTOBUF_LIMIT, all_tensors, check_input_file, one_line, read_bytes, serialized_size

__all__ = ["load_model", "load_model_mapped", "check_model", "IN_PLACE_MIN_BYTES"]

#: Model files smaller than this are read whole even when ``in_place`` is asked for.
IN_PLACE_MIN_BYTES = 1024**2


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from `path`, validating it (rules 1-4 of the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.onnx`` file. External data, if any, must sit inside the same folder.
    check : bool, default True
        Require UTF-8 names and run ``onnx.checker.check_model`` (not the full check).

    Returns
    -------
    onnx.ModelProto
        The model with all tensor data in memory (no external references left).

    Raises
    ------
    BnfoldError
        If the file is missing, not a model, too new, unsafe, or fails the checker.
    """
    return _load(Path(path), check=check, mapped=False)[0]


def load_model_mapped(path: str | os.PathLike, *, check: bool = True,
                      in_place: str | None = None) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]]:
    """`load_model` that leaves external tensors on disk: the same checks, no tensor data read.

    Returns the model (its external tensors still refer to their files) and the open data files,
    ``{location: (descriptor, size)}`` (see `bnfold.io.mapped.open_model`, which owns them).

    ``in_place``: a location that names no file (`bnfold.io.mapped` makes one up). The large
    initializers of the model file itself are then left in it too: they become references to
    their own bytes in the file under that location (`bnfold.io.wire.lift_initializers`), and
    the file is among the returned sources under that name. Parsing then copies no weight, and
    the checker sees each such tensor through a one-element stand-in (`_check_in_place`).
    """
    return _load(Path(path), check=check, mapped=True, in_place=in_place)


def _load(path: Path, *, check: bool, mapped: bool,
          in_place: str | None = None) -> tuple[onnx.ModelProto, dict[str, tuple[int, int]]]:
    with contextlib.ExitStack() as stack:
        lifted = _lift(path, in_place, stack) if in_place is not None else None
        if lifted is not None:
            model, raw = lifted.model, None
        else:
            try:
                model, raw = _parse(path)
            except BnfoldError:
                hint = foreign_format_hint(path)  # a model of another framework: name the converter
                if hint is None:
                    raise
                raise BnfoldError(hint) from None
        _check_versions(model, path)
        if mapped:
            sources = map_external_data(model, path, skip=in_place)
            external = bool(sources)  # every external tensor's file is opened: no second scan of the tensors
        else:
            sources = {}
            external = any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in all_tensors(model))
            load_external_data(model, path)
        try:
            if check:
                _check_names(model, path)
                if lifted is not None and not external:
                    _check_in_place(model, lifted.spans, lifted.view, path)
                else:
                    # Without external data the file's bytes are the model: the checker parses them
                    # itself, which spares serializing the whole model again (that costs more than
                    # the check). Data left on disk is checked by the checker from the file (it
                    # resolves locations against the model's folder, after bnfold.io.external
                    # validated them).
                    _run_checker(raw if not external else (path if mapped else model), path)
        except BaseException:
            for fd, _ in sources.values():
                os.close(fd)
            raise
        if lifted is not None:
            sources[in_place] = (lifted.keep_fd(), lifted.size)
        return model, sources


def _parse(path: Path) -> tuple[onnx.ModelProto, bytes]:
    check_input_file(path)
    size = path.stat().st_size
    if size > PROTOBUF_LIMIT:
        raise BnfoldError(
            f"{path}: {size} bytes is more than an ONNX protobuf can hold (2 GiB); large models keep"
            " their tensors in external data files"
        )
    model = onnx.ModelProto()
    raw = read_bytes(path)
    try:
        model.ParseFromString(raw)
    except BnfoldError:
        raise
    except Exception as exc:  # google.protobuf DecodeError, RuntimeError for deep nesting, ...
        detail = one_line(exc) or type(exc).__name__
        if "depth" in detail.lower() or "recursion" in detail.lower():
            detail = f"subgraphs nested more deeply than protobuf parses: {detail}"
        raise BnfoldError(f"{path}: not a valid ONNX model (protobuf: {detail})") from None
    if not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no graph; is it another protobuf message?)")
    return model, raw


@dataclass
class _Lifted:
    """A model file mapped for `_load`, its large initializers left in it (`_lift`)."""

    model: onnx.ModelProto
    spans: dict[int, tuple[int, int]]  # initializer position -> (offset, length) in the file
    view: memoryview
    fd: int
    size: int

    def keep_fd(self) -> int:
        """Hand the descriptor over to the caller (the open model); the map itself is closed."""
        fd, self.fd = self.fd, -1
        return fd


def _lift(path: Path, location: str, stack: contextlib.ExitStack) -> _Lifted | None:
    """`load_model_mapped`'s ``in_place``: the model file mapped, its large initializers turned
    into references to ``location`` (`bnfold.io.wire.lift_initializers`); those whose bytes do
    not match their shape and type exactly are read back into the model (what onnx and the fold
    say of them is then what they say of the file). None when the file has nothing to leave in
    place or is not an ordinary model: `_load` then reads it whole and words any error. The map
    and the descriptor (unless kept) are closed by ``stack``."""
    from bnfold.io.external import expected_nbytes
    from bnfold.io.mapped import HOLD_MIN_BYTES
    from bnfold.io.wire import lift_initializers

    try:
        check_input_file(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except (BnfoldError, OSError):
        return None
    opened = _Lifted(onnx.ModelProto(), {}, memoryview(b""), fd, os.fstat(fd).st_size)
    stack.callback(lambda: opened.fd < 0 or os.close(opened.fd))
    if not IN_PLACE_MIN_BYTES <= opened.size <= PROTOBUF_LIMIT:
        return None
    try:
        mapped = stack.enter_context(mmap.mmap(fd, opened.size, access=mmap.ACCESS_READ))
    except (OSError, ValueError):  # a file system that cannot map files: read it whole
        return None
    view = opened.view = stack.enter_context(memoryview(mapped))
    try:
        lifted = lift_initializers(view, HOLD_MIN_BYTES, location)
        if lifted is None:
            return None
        light, opened.spans = lifted
        opened.model.ParseFromString(light)
    except Exception:  # malformed: the full parse of `_load` gives the error
        return None
    if not opened.model.HasField("graph"):
        return None
    initializers = opened.model.graph.initializer
    for position, (offset, length) in list(opened.spans.items()):
        tensor = initializers[position]
        if tensor.data_type != onnx.TensorProto.STRING and expected_nbytes(tensor) == length:
            continue
        tensor.raw_data = view[offset:offset + length].tobytes()
        tensor.ClearField("data_location")
        del tensor.external_data[:]
        del opened.spans[position]
    return opened


def _check_in_place(model: onnx.ModelProto, spans: dict[int, tuple[int, int]], view: memoryview, path: Path) -> None:
    """``onnx.checker`` on ``model`` whose initializers at ``spans`` are left in the file.

    Of a tensor with ``raw_data`` the checker asks only that it is the one value field, of the
    size that the shape and type declare, and not a string (onnx/checker.cc, ``check_tensor``);
    `_lifted` kept in place only tensors that meet all of that. Each is checked as a stand-in
    with the same name, type and fields, one element and that element's bytes, so the checker
    reads no weight. Should that check fail, the file itself is checked and its verdict and
    message are the ones reported.
    """
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(model)
    initializers = stand_in.graph.initializer
    for position, (_, length) in spans.items():
        tensor = initializers[position]
        itemsize = length // math.prod(tensor.dims)
        tensor.ClearField("data_location")
        del tensor.external_data[:]
        del tensor.dims[:]
        tensor.dims.append(1)
        tensor.raw_data = bytes(itemsize)
    try:
        onnx.checker.check_model(stand_in.SerializeToString())
        return
    except Exception:  # the file decides
        pass
    _run_checker(view.tobytes(), path)


def _check_names(model: onnx.ModelProto, source: Path | str) -> None:
    """Refuse names that are not UTF-8 (ONNX requires it; protobuf then hands out bytes, not str).

    Covers what bnfold reads: node, value, initializer, attribute and domain names, in every
    graph and function (about 10 us per node).
    """
    graphs: list = [model.graph, *model.functions]
    names: list = [opset.domain for opset in model.opset_import]
    names += [model.producer_name, model.producer_version, model.domain, model.doc_string]
    for function in model.functions:
        names += [function.name, function.domain, *function.input, *function.output]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            names += node.input
            names += node.output
            names += (node.name, node.op_type, node.domain)
            for attribute in node.attribute:
                names.append(attribute.name)
                if attribute.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attribute.graphs)
        if isinstance(graph, onnx.GraphProto):
            names += [graph.name, graph.doc_string]
            names += [value.name for value in (*graph.input, *graph.output, *graph.value_info)]
            names += [tensor.name for tensor in graph.initializer]
    if not all(type(name) is str for name in names):
        bad = next(name for name in names if type(name) is not str)
        raise BnfoldError(f"{source}: the name {bad!r} is not valid UTF-8 (ONNX names are UTF-8 strings)")


def _known_opsets() -> dict[str, int]:
    known = {"": onnx.defs.onnx_opset_version(), "ai.onnx.ml": onnx.defs.onnx_ml_opset_version()}
    known["ai.onnx"] = known[""]
    return known


def _check_versions(model: onnx.ModelProto, source: Path | str) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise BnfoldError(
            f"{source}: IR version {model.ir_version} is newer than the installed onnx"
            f" {onnx.__version__} supports (IR version {onnx.IR_VERSION})"
        )
    known = _known_opsets()
    for opset in model.opset_import:
        name = opset.domain or "ai.onnx"
        if opset.version < 1:
            raise BnfoldError(f"{source}: opset version {opset.version} of domain '{name}' is invalid")
        newest = known.get(opset.domain)
        if newest is not None and opset.version > newest:
            raise BnfoldError(
                f"{source}: opset {opset.version} of domain '{name}' is newer than the installed"
                f" onnx {onnx.__version__} supports (up to {newest})"
            )


def check_model(model: onnx.ModelProto, source: str | os.PathLike = "<model>") -> None:
    """Run ``onnx.checker.check_model`` (not the full check) and quote its message on failure.

    Parameters
    ----------
    model : onnx.ModelProto
        A model holding its tensor data in memory, as `load_model` returns it (the checker
        resolves external data relative to the current directory, not the model's folder).
    source : str or os.PathLike
        Names the model in messages. For a model over 2 GiB, which protobuf cannot hand to the
        checker in memory, it must be the file the model was loaded from.

    Raises
    ------
    BnfoldError
        If the versions are unknown or the checker fails, quoting the checker's message.
    """
    _check_versions(model, source)
    _run_checker(model, source)


def _run_checker(model: onnx.ModelProto | bytes | Path, source: str | os.PathLike) -> None:
    """``onnx.checker.check_model`` on a model, the serialized bytes of one, or a file."""
    try:
        if isinstance(model, Path):
            onnx.checker.check_model(os.fspath(model))
        elif isinstance(model, onnx.ModelProto) and serialized_size(model) > PROTOBUF_LIMIT:
            onnx.checker.check_model(os.fspath(source))
        else:
            onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, and C++ errors for odd protobufs
        raise BnfoldError(f"{source}: fails onnx.checker: {one_line(exc)}") from None
