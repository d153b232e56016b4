"""Reading external tensor data, only from regular files inside the model's own folder.

Rules (each refusal is a `BnfoldError` naming the model, the tensor and the location):
    1. A location must be relative, without ``..`` and without NUL bytes: absolute paths and
       traversal (``../../etc/passwd``) are the class of vulnerability ONNX loaders have shipped
       (e.g. GHSA-538c-55jv-c5g9).
    2. The location, resolved through symbolic links, must stay inside the model's folder and be a
       regular file; it is opened with ``O_NOFOLLOW`` on the resolved path.
    3. ``offset`` and ``length`` must be non-negative integers, the length must match the tensor's
       declared shape and dtype, and the file must hold that many bytes: checked before reading.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import onnx

from bnfold.errors import BnfoldError
from bnfold.io.files import all_tensors, one_line, resolved

__all__ = ["load_external_data", "map_external_data", "external_files_of", "expected_nbytes"]

# Resolved model path -> (its size and modification time when loaded, the resolved external data
# files it was loaded from; empty for none), for check_output_path and convert's size accounting.
_EXTERNAL_SOURCES: dict[Path, tuple[tuple[int, int], frozenset[Path]]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _external_entries(model: onnx.ModelProto, path: Path, base: Path, skip: str | None = None):
    """``(tensor, location, target, offset, length)`` of every external tensor, rules 1 and 3
    checked (the file's size is checked where it is opened); ``length`` None: to the end.
    Tensors whose location is ``skip`` (the model file's own bytes, `bnfold.io.models`) are left out."""
    for tensor in all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        if skip is not None and info.get("location") == skip:
            continue
        if not all(type(item) is str for pair in info.items() for item in pair):
            # Not UTF-8: protobuf hands out bytes. Such a location cannot name a file safely.
            raise BnfoldError(
                f"{path}: tensor {tensor.name!r} has external data entries that are not valid UTF-8: {info!r}"
            )
        location = info.get("location", "")
        target = _check_external_location(path, base, tensor.name, location)
        offset = _external_int(path, tensor.name, info, "offset", 0)
        expected = expected_nbytes(tensor)
        length = _external_int(path, tensor.name, info, "length", None)
        if length is None:
            length = expected
        if expected is not None and length is not None and length != expected:
            raise BnfoldError(
                f"{path}: tensor '{tensor.name}' external data length {length} does not match its"
                f" shape {list(tensor.dims)} ({expected} bytes)"
            )
        yield tensor, location, target, offset, length


def load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read every external tensor of `model` (loaded from `path`) into memory, in place.

    Applies rules 1-3 of the module docstring; afterwards no tensor refers to a file, and the
    files read are recorded so that `check_output_path` can refuse to write over them.
    """
    base = path.resolve().parent
    sources: set[Path] = set()
    for tensor, location, target, offset, length in _external_entries(model, path, base):
        tensor.raw_data = _read_external(path, base, target, location, tensor.name, offset, length)
        tensor.ClearField("data_location")
        del tensor.external_data[:]
        sources.add(target)
    _EXTERNAL_SOURCES[path.resolve()] = (_stamp(path), frozenset(sources))


def map_external_data(model: onnx.ModelProto, path: Path, *, skip: str | None = None) -> dict[str, tuple[int, int]]:
    """Check every external tensor of `model` like `load_external_data`, read nothing.

    Each data file is opened once (rule 2, no link followed) and its size checked against every
    tensor's offset and length (rule 3). Returns ``{location: (open descriptor, file size)}``;
    the caller closes the descriptors (`bnfold.io.mapped` maps them). ``skip``: a location that
    names no file but the model file itself (`bnfold.io.models.load_model_mapped`'s ``in_place``).
    """
    base = path.resolve().parent
    opened: dict[str, tuple[int, int]] = {}
    sources: set[Path] = set()
    try:
        for tensor, location, target, offset, length in _external_entries(model, path, base, skip):
            where = f"{path}: tensor '{tensor.name}' external data file '{location}'"
            if location not in opened:
                opened[location] = _open_regular(base, target, where)
            size = opened[location][1]
            _check_span(where, offset, length, size)
            sources.add(target)
    except BaseException:
        for fd, _ in opened.values():
            os.close(fd)
        raise
    _EXTERNAL_SOURCES[path.resolve()] = (_stamp(path), frozenset(sources))
    return opened


def _open_regular(base: Path, target: Path, where: str) -> tuple[int, int]:
    try:
        fd = _open_inside(base, target)
    except OSError as exc:
        raise BnfoldError(f"{where} cannot be opened ({exc.strerror or exc})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise BnfoldError(f"{where} is not a regular file")
    return fd, info.st_size


def _check_span(where: str, offset: int, length: int | None, size: int) -> int:
    available = size - offset
    if length is None:
        length = max(available, 0)
    if offset > size or length > available:
        raise BnfoldError(f"{where} is too short: needs {length} bytes at offset {offset}, file has {size}")
    return length


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
        raise BnfoldError(f"{where} cannot be resolved ({one_line(exc)})") from None
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


def _open_inside(base: Path, target: Path) -> int:
    """Open `target` (resolved, inside `base`) one path component at a time, following no link.

    A folder or file swapped for a symbolic link after `_check_external_location` resolved the
    path makes the open fail instead of leading outside. ``O_NONBLOCK`` keeps a named pipe from
    blocking the open; the caller checks that it got a regular file.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_RDONLY | nofollow | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if os.open not in os.supports_dir_fd or not nofollow:
        return os.open(target, flags)
    folder = os.open(base, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        *parents, name = target.relative_to(base).parts
        for part in parents:
            inner = os.open(part, os.O_RDONLY | nofollow | getattr(os, "O_DIRECTORY", 0), dir_fd=folder)
            os.close(folder)
            folder = inner
        return os.open(name, flags, dir_fd=folder)
    finally:
        os.close(folder)


def _read_external(path: Path, base: Path, target: Path, location: str, name: str, offset: int,
                   length: int | None) -> bytes:
    where = f"{path}: tensor '{name}' external data file '{location}'"
    fd, size = _open_regular(base, target, where)
    with os.fdopen(fd, "rb") as handle:
        length = _check_span(where, offset, length, size)
        handle.seek(offset)
        data = handle.read(length)
    if len(data) != length:
        raise BnfoldError(f"{where} changed while being read")
    return data


_SUBBYTE_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(onnx.TensorProto, name)
}


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's values take (dims x item size), or None (strings, sub-byte types, types
    onnx does not know, negative dimensions)."""
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


def external_files_of(model_path: Path) -> set[Path]:
    """External data files of the model at `model_path` (recorded by `load_model`, or parsed).

    The record is used only while the file has the size and modification time it had when it was
    loaded; a file replaced since is parsed again.
    """
    known = _EXTERNAL_SOURCES.get(resolved(model_path))
    if known is not None:
        try:
            if _stamp(model_path) == known[0]:
                return set(known[1])
        except OSError:
            pass
    if model_path.suffix.lower() != ".onnx" or not model_path.is_file():
        return set()
    try:
        proto = onnx.load_model(str(model_path), load_external_data=False)
    except Exception:  # not a model: load_model reports that when it reads it
        return set()
    base = resolved(model_path).parent
    files = set()
    for tensor in all_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                files.add(base / entry.value)
    return files
