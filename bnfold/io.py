"""Reading and writing models and arrays safely.

Reading
    1. A model must be a regular, non-empty file that parses as an ONNX ``ModelProto`` with a graph.
    2. Its IR version and the opset of every standard domain must be ones the installed ``onnx``
       knows (a newer file is refused with both versions named, rather than misread).
    3. External tensor data is read only from regular files inside the model's own folder: no
       absolute location, no ``..`` escape, no symbolic link resolving outside (the class of path
       traversal that ONNX loaders have shipped, e.g. GHSA-538c-55jv-c5g9). Offset and length are
       checked against the file size and the tensor's declared shape before anything is read.
    4. With ``check=True`` (the default) every name must be UTF-8 (protobuf hands out other names
       as ``bytes``, which downstream code does not expect) and the model must pass
       ``onnx.checker.check_model`` (not the full check, which also runs shape inference); the
       checker's message is quoted.
    5. ``.npz`` arrays are read without ever unpickling; every member's declared size is checked
       against the archive before memory is allocated for it.

Writing
    Every output goes to a temporary file in the target folder, is flushed to disk, then moved
    into place with ``os.replace``. An error or an interrupt (including ``KeyboardInterrupt``) at
    any point leaves the previous file intact and no temporary file behind. Models too large for a
    single protobuf (2 GiB) are written with their large tensors in a sidecar file whose name
    carries a content hash, so that replacing a model never breaks the previous one's data.

All user-facing failures raise `BnfoldError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import stat
import tempfile
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError

__all__ = [
    "load_model",
    "check_model",
    "save_model",
    "atomic_path",
    "load_npz",
    "check_output_path",
]

log = logging.getLogger(__name__)

# Protobuf refuses to serialize a message of 2 GiB or more.
_PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the sidecar file when a model must use external data.
_EXTERNAL_MIN_BYTES = 1024
# Standard domains whose newest opset the installed onnx knows; other domains are custom ops.
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training")
_MAX_MESSAGE = 300

# Resolved model path -> resolved external data files it was loaded from (see check_output_path).
_EXTERNAL_SOURCES: dict[Path, set[Path]] = {}


def _one_line(text: object) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def _check_input_file(path: Path) -> None:
    try:
        info = path.stat()
    except FileNotFoundError:
        raise BnfoldError(f"{path}: no such file") from None
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise BnfoldError(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise BnfoldError(f"{path}: is not a regular file")
    if info.st_size == 0:
        raise BnfoldError(f"{path}: file is empty")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot be read ({exc.strerror})") from None
    except MemoryError:
        raise BnfoldError(f"{path}: too large to read into memory") from None


# --------------------------------------------------------------------------------------------
# Loading models


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model from `path`, validating it (rules 1-4 of the module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.onnx`` file. External data, if any, must sit inside the same folder.
    check : bool, default True
        Run ``onnx.checker.check_model`` (not the full check) after loading.

    Returns
    -------
    onnx.ModelProto
        The model with all tensor data in memory (no external references left).

    Raises
    ------
    BnfoldError
        If the file is missing, not a model, too new, unsafe, or fails the checker.
    """
    path = Path(path)
    _check_input_file(path)
    size = path.stat().st_size
    if size > _PROTOBUF_LIMIT:
        raise BnfoldError(
            f"{path}: {size} bytes is more than an ONNX protobuf can hold (2 GiB); large models keep"
            " their tensors in external data files"
        )
    data = _read_bytes(path)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # google.protobuf DecodeError, RuntimeError for deep nesting, ...
        detail = _one_line(exc) or type(exc).__name__
        if "depth" in detail.lower() or "recursion" in detail.lower():
            detail = f"subgraphs nested more deeply than protobuf parses: {detail}"
        raise BnfoldError(f"{path}: not a valid ONNX model (protobuf: {detail})") from None
    del data
    if not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no graph; is it another protobuf message?)")
    _check_versions(model, path)
    _load_external_data(model, path)
    if check:
        _check_names(model, path)
        check_model(model, path)
    return model


def _check_names(model: onnx.ModelProto, source: Path | str) -> None:
    """Refuse names that are not UTF-8 (ONNX requires it; protobuf then hands out bytes, not str).

    Covers what bnfold reads: node, value, initializer, attribute and domain names, in every
    graph and function (about 10 us per node).
    """
    graphs: list = [model.graph, *model.functions]
    names: list = [opset.domain for opset in model.opset_import]
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
    try:
        if model.ByteSize() > _PROTOBUF_LIMIT:
            onnx.checker.check_model(os.fspath(source))
        else:
            onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError, and C++ errors for odd protobufs
        raise BnfoldError(f"{source}: fails onnx.checker: {_one_line(exc)}") from None


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.resolve().parent
    sources: set[Path] = set()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = _check_external_location(path, base, tensor.name, location)
        offset = _external_int(path, tensor.name, info, "offset", 0)
        expected = _expected_nbytes(tensor)
        length = _external_int(path, tensor.name, info, "length", None)
        if length is None:
            length = expected
        if expected is not None and length is not None and length != expected:
            raise BnfoldError(
                f"{path}: tensor '{tensor.name}' external data length {length} does not match its"
                f" shape {list(tensor.dims)} ({expected} bytes)"
            )
        tensor.raw_data = _read_external(path, target, location, tensor.name, offset, length)
        tensor.ClearField("data_location")
        del tensor.external_data[:]
        sources.add(target)
    if sources:
        _EXTERNAL_SOURCES[path.resolve()] = sources


def _check_external_location(path: Path, base: Path, tensor_name: str, location: str) -> Path:
    where = f"{path}: tensor '{tensor_name}' external data location '{location}'"
    if not location:
        raise BnfoldError(f"{path}: tensor '{tensor_name}' has external data without a location")
    if "\x00" in location:
        raise BnfoldError(f"{where} contains a NUL byte")
    if os.path.isabs(location) or Path(location).is_absolute() or location.startswith(("\\", "/")):
        raise BnfoldError(f"{where} is an absolute path; only files inside the model's folder are read")
    if ".." in Path(location.replace("\\", "/")).parts:
        raise BnfoldError(f"{where} contains '..'; only files inside the model's folder are read")
    try:
        target = (base / location).resolve(strict=True)
    except FileNotFoundError:
        raise BnfoldError(f"{where}: file is missing") from None
    except (OSError, RuntimeError) as exc:  # symlink loops raise RuntimeError on older Pythons
        raise BnfoldError(f"{where} cannot be resolved ({_one_line(exc)})") from None
    if target != base and base not in target.parents:
        raise BnfoldError(
            f"{where} resolves to {target}, outside the model's folder {base} (symbolic link?)"
        )
    if not target.is_file():
        raise BnfoldError(f"{where} is not a regular file")
    return target


def _external_int(path: Path, name: str, info: dict[str, str], key: str, default: int | None) -> int | None:
    if key not in info:
        return default
    try:
        value = int(info[key])
    except ValueError:
        raise BnfoldError(f"{path}: tensor '{name}' external data {key} '{info[key]}' is not an integer") from None
    if value < 0:
        raise BnfoldError(f"{path}: tensor '{name}' external data {key} {value} is negative")
    return value


def _read_external(path: Path, target: Path, location: str, name: str, offset: int, length: int | None) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(target, flags)
    except OSError as exc:
        raise BnfoldError(f"{path}: tensor '{name}' external data file '{location}' cannot be opened ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        available = size - offset
        if length is None:
            length = max(available, 0)
        if offset > size or length > available:
            raise BnfoldError(
                f"{path}: tensor '{name}' external data file '{location}' is too short: needs"
                f" {length} bytes at offset {offset}, file has {size}"
            )
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise BnfoldError(f"{path}: tensor '{name}' external data file '{location}' changed while being read")
    return data


_SUBBYTE_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    if tensor.data_type in _SUBBYTE_TYPES or tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    count = 1
    for dim in tensor.dims:
        if dim < 0:
            return None
        count *= int(dim)
    return count * itemsize


# --------------------------------------------------------------------------------------------
# Writing


def check_output_path(path: str | os.PathLike, *, overwrite: bool, inputs: Collection = ()) -> Path:
    """Refuse an output that equals an input, exists (unless `overwrite`), or cannot be written.

    An output is "the same as an input" when it is the same file (also through links) or one of
    the external data files the input model was loaded from: writing it would alter the input.
    """
    path = Path(path)
    for other in inputs:
        other = Path(other)
        if _same_file(path, other):
            raise BnfoldError(f"{path}: output is the same file as the input; use --in-place to allow it")
        for data_file in _external_files_of(other) if path.exists() else ():
            if _same_file(path, data_file):
                raise BnfoldError(f"{path}: output is the external data file of the input {other}")
    if path.is_dir():
        raise BnfoldError(f"{path}: output path is a directory")
    if path.exists() and not overwrite:
        raise BnfoldError(f"{path}: already exists; use --force to overwrite")
    parent = _resolved(path).parent
    if not parent.exists():
        raise BnfoldError(f"{path}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise BnfoldError(f"{path}: output folder {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BnfoldError(f"{path}: output folder {parent} is not writable")
    return path


def _external_files_of(model_path: Path) -> set[Path]:
    """External data files of the model at `model_path` (recorded by `load_model`, or parsed)."""
    known = _EXTERNAL_SOURCES.get(_resolved(model_path))
    if known is not None:
        return known
    if model_path.suffix.lower() != ".onnx" or not model_path.is_file():
        return set()
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # not a model: load_model reports that when it reads it
        return set()
    base = _resolved(model_path).parent
    files = set()
    for tensor in _all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                files.add(base / entry.value)
    return files


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _resolved(a) == _resolved(b)


def _default_mode(existing: Path) -> int:
    try:
        return stat.S_IMODE(existing.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds.

    The temporary file is removed on any exception, including ``KeyboardInterrupt``. The new file
    gets the previous file's permissions, or the usual ones for a new file (``0o666 & ~umask``).
    """
    path = Path(path)
    parent = _resolved(path).parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write in {parent} ({exc.strerror or exc})") from None
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        yield tmp_path
        _fsync(tmp_path)
        os.chmod(tmp_path, _default_mode(path))
        os.replace(tmp_path, path)
    except OSError as exc:
        raise BnfoldError(f"{path}: could not be written ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
    _fsync_dir(parent)


def _fsync(path: Path) -> None:
    # Durability: without it a crash right after os.replace can leave an empty file in place.
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None) -> None:
    """Write `model` to `path` atomically (callers check overwrite rules with `check_output_path`).

    Parameters
    ----------
    model : onnx.ModelProto
        A model holding its tensor data in memory; it is not modified.
    path : str or os.PathLike
        Destination file.
    external_data : bool or None, default None
        Store tensors of at least 1 KiB in a sidecar file ``<name>.<hash>.data`` beside `path`.
        ``None`` does so only when the model is too large for one protobuf (2 GiB).
    """
    path = Path(path)
    if external_data is None:
        external_data = model.ByteSize() > _PROTOBUF_LIMIT
    if external_data:
        _save_with_external_data(model, path)
        return
    with atomic_path(path) as tmp:
        try:
            data = model.SerializeToString()
        except ValueError as exc:  # protobuf refuses messages over 2 GB
            raise BnfoldError(f"{path}: model too large to serialize in one file ({exc})") from None
        tmp.write_bytes(data)


def _goes_external(tensor: onnx.TensorProto) -> bool:
    return (
        tensor.data_location != onnx.TensorProto.EXTERNAL
        and tensor.data_type != onnx.TensorProto.STRING
        and tensor.ByteSize() >= _EXTERNAL_MIN_BYTES
    )


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    # ONNX raw_data is little-endian; numpy_helper converts typed fields the same way.
    return tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write the large tensors to ``<name>.<hash>.data``, then the model referring to it.

    The data file is complete and in place before the model is replaced, and its name depends
    on its content: the previous model keeps reading its own data file until the moment it is
    replaced; that file is removed only afterwards. Memory: one copy of the model without its
    large tensors' data, plus one tensor at a time.
    """
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BnfoldError(f"{path}: tensor '{tensor.name}' still refers to external data; load it first")
    originals = [tensor for tensor in _all_tensors(model) if _goes_external(tensor)]
    if not originals:
        save_model(model, path, external_data=False)
        return
    digest = hashlib.sha256()
    spans = []
    offset = 0
    for tensor in originals:
        raw = _raw_bytes(tensor)
        digest.update(raw)
        # ONNX ExternalData.md allows aligned offsets; 64 bytes keeps every dtype aligned.
        offset = -(-offset // 64) * 64
        spans.append((offset, len(raw)))
        offset += len(raw)
    data_name = f"{path.name}.{digest.hexdigest()[:16]}.data"
    data_path = path.with_name(data_name)
    previous = _sidecars_of(path)
    with atomic_path(data_path) as tmp, open(tmp, "wb") as handle:
        for tensor, (start, _) in zip(originals, spans):
            handle.seek(start)
            handle.write(_raw_bytes(tensor))

    light = onnx.ModelProto()
    light.CopyFrom(model)
    lights = [tensor for tensor in _all_tensors(light) if _goes_external(tensor)]
    for tensor, (start, length) in zip(lights, spans):
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", data_name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(light.SerializeToString())
    except BaseException:
        if data_path not in previous:
            with contextlib.suppress(OSError):
                data_path.unlink()
        raise
    for old in previous - {data_path}:
        log.debug("%s: removing the previous data file %s", path, old.name)
        with contextlib.suppress(OSError):
            old.unlink()


def _sidecars_of(path: Path) -> set[Path]:
    """Data files this module wrote for the model now at `path` (to remove once it is replaced)."""
    prefix = f"{path.name}."
    if not path.is_file() or not any(path.parent.glob(f"{glob.escape(prefix)}*.data")):
        return set()  # nothing of ours to clean up: do not parse a possibly large model
    try:
        old = onnx.load_model(str(path), load_external_data=False)
    except Exception:
        return set()
    found = set()
    for tensor in _all_tensors(old):
        for entry in tensor.external_data:
            name = entry.value
            if entry.key == "location" and name.startswith(prefix) and name.endswith(".data") and "/" not in name and "\\" not in name:
                candidate = path.with_name(name)
                if candidate.is_file():
                    found.add(candidate)
    return found


# --------------------------------------------------------------------------------------------
# Arrays


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file; pickled objects are refused, never unpickled.

    Each member's header is read first: an object dtype (which would need pickle) is refused, and
    a declared shape larger than the data the archive holds is refused before allocating it.
    """
    path = Path(path)
    _check_input_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                _check_npz_member(path, archive, member)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except BnfoldError:
        raise
    except zipfile.BadZipFile:
        raise BnfoldError(f"{path}: not a valid .npz file (not a zip archive)") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise BnfoldError(f"{path}: contains pickled objects, which bnfold refuses to load") from None
        raise BnfoldError(f"{path}: not a valid .npz file ({_one_line(exc)})") from None
    except MemoryError:
        raise BnfoldError(f"{path}: arrays too large to load") from None
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid .npz file ({type(exc).__name__}: {_one_line(exc)})") from None


def _check_npz_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    if not member.filename.endswith(".npy"):
        raise BnfoldError(f"{path}: member '{member.filename}' is not a .npy array")
    fmt = np.lib.format
    with archive.open(member) as handle:
        version = fmt.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(handle)
        else:
            shape, _, dtype = fmt._read_array_header(handle, version)
        header_size = handle.tell()
    key = member.filename[: -len(".npy")]
    if dtype.hasobject:
        raise BnfoldError(f"{path}: array '{key}' contains pickled objects, which bnfold refuses to load")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > member.file_size - header_size:
        raise BnfoldError(
            f"{path}: array '{key}' declares shape {tuple(shape)} ({declared} bytes) but the file"
            f" holds {member.file_size - header_size} bytes"
        )
