"""Writing models: output-path rules, atomic saves, and external data that stays consistent.

Models too large for a single protobuf (2 GiB) are written with their large tensors in a data
file whose name carries a content hash (``<name>.<hash>.data``), written before the model: the
previous model keeps reading its own data file until the moment it is replaced. Once it is, the
data files the previous model at that path used (``<name>.<hash>.data``, named by this module)
are removed, whether or not the new model has external data, unless another ``.onnx`` file in
the folder still names them.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import mmap
import os
import sys
import tempfile
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import EncodeError

from bnfold.errors import BnfoldError
from bnfold.io.atomic import _default_mode, _fsync, _fsync_dir, atomic_path
from bnfold.io.external import external_files_of
from bnfold.io.files import (
    PROTOBUF_LIMIT,
    all_tensors,
    pread_into,
    pwrite_all,
    resolved,
    same_file,
    serialized_size,
)

__all__ = ["check_output_path", "save_model", "stage_model", "StagedModel", "write_json", "written_size"]

log = logging.getLogger(__name__)

# Tensors at least this large go to the data file when a model must use external data.
_EXTERNAL_MIN_BYTES = 1024


def check_output_path(path: str | os.PathLike, *, overwrite: bool, inputs: Collection = ()) -> Path:
    """Refuse an output that equals an input, exists (unless `overwrite`), or cannot be written.

    An output is "the same as an input" when it is the same file (also through symbolic or hard
    links) or one of the external data files of an input model: writing it would alter the input.

    Parameters
    ----------
    path : str or os.PathLike
        The output file about to be written.
    overwrite : bool
        Allow replacing an existing file (``--force``).
    inputs : collection of paths
        The files the command reads; pass none to allow writing over them (``--in-place``).

    Returns
    -------
    pathlib.Path
        `path`, for chaining.

    Raises
    ------
    BnfoldError
        Naming `path` and the rule it breaks.
    """
    path = Path(path)
    for other in inputs:
        other = Path(other)
        if same_file(path, other):
            raise BnfoldError(f"{path}: output is the same file as the input; use --in-place to allow it")
        for data_file in _data_files_naming(other, path) if path.exists() else ():
            if same_file(path, data_file):
                raise BnfoldError(f"{path}: output is the external data file of the input {other}")
    if path.is_dir():
        raise BnfoldError(f"{path}: output path is a directory")
    if path.exists() and not overwrite:
        raise BnfoldError(f"{path}: already exists; use --force to overwrite")
    parent = resolved(path).parent
    if not parent.exists():
        raise BnfoldError(f"{path}: output folder {parent} does not exist")
    if not parent.is_dir():
        raise BnfoldError(f"{path}: output folder {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BnfoldError(f"{path}: output folder {parent} is not writable")
    return path


def _data_files_naming(model_path: Path, path: Path) -> set[Path]:
    """The external data files of ``model_path``, or none when its bytes do not contain ``path``'s
    name (a location names its file): a search costs far less than parsing a large model. Where
    file names ignore case or Unicode normalization (macOS, Windows) a location may spell the
    name otherwise: there the model is always parsed."""
    if not model_path.is_file():
        return set()
    if sys.platform.startswith("linux") and not _names(model_path, path.name):
        return set()
    return external_files_of(model_path)


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
    if external_data:
        _save_with_external_data(model, path)
        return
    previous = _sidecars_of(path)
    _save_in_one_file(model, path, external_data)
    _remove_unreferenced(previous - _sidecars_of(path), path)


def _save_in_one_file(model: onnx.ModelProto, path: Path, external_data: bool | None) -> None:
    held = _held_initializers(model)
    if held:
        _save_pieces(model, path, held, external_data)
        return
    model = _inlined(model)
    # Serialize first and look at the size afterwards: asking protobuf for the size costs as much
    # as serializing, and most models are far below the limit.
    try:
        data = model.SerializeToString()
    except (ValueError, EncodeError) as exc:  # protobuf refuses messages over 2 GB
        if external_data is None:
            _save_with_external_data(model, path)
            return
        raise BnfoldError(f"{path}: model too large to serialize in one file ({exc})") from None
    if len(data) > PROTOBUF_LIMIT:
        if external_data is None:
            del data
            _save_with_external_data(model, path)
            return
        raise BnfoldError(f"{path}: model too large for one file ({len(data)} bytes); use external data")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def written_size(model: onnx.ModelProto) -> int:
    """About the bytes `model` takes written in one file (``PROTOBUF_LIMIT + 1`` when protobuf
    cannot hold it): its serialized size, plus the bytes of the tensors it holds outside protobuf
    (`bnfold.io.mapped` rules 4 and 5), which its references stand for."""
    held = _held_initializers(model) or {}
    return serialized_size(model) + sum(len(values) for values in held.values())


def _held_initializers(model: onnx.ModelProto) -> dict[int, memoryview] | None:
    """Positions of the main graph's initializers whose bytes lie outside protobuf, in a
    `bnfold.io.mapped.Held` array or the memory-mapped input -> those bytes; None when there
    are none, or when any other tensor refers to data outside protobuf (written through
    `_inlined` then)."""
    from bnfold.io.mapped import Held, active

    store = active()
    if store is None or store.hold_min is None:
        return None
    found: dict[int, memoryview] = {}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            span = store.span(tensor)
            if span is None:
                return None
            source, offset, length = span
            if isinstance(source.deferred, Held):
                found[index] = source.deferred.view()
            elif source.deferred is None and source.fd >= 0:
                found[index] = store.view(source, offset, length)
            else:
                return None
    if not found:
        return None
    initializers = {id(tensor) for tensor in model.graph.initializer}
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and id(tensor) not in initializers:
            return None
    return found


def _save_pieces(model: onnx.ModelProto, path: Path, held: dict[int, memoryview],
                 external_data: bool | None) -> None:
    """Write ``model`` with its held tensors' bytes spliced in (`bnfold.io.wire`), in one file."""
    from bnfold.io.wire import model_pieces, pieces_size, write_pieces

    pieces = model_pieces(model, held)
    size = pieces_size(pieces)
    if size > PROTOBUF_LIMIT:
        del pieces
        if external_data is None:
            _save_with_external_data(model, path)
            return
        raise BnfoldError(f"{path}: model too large for one file ({size} bytes); use external data")
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_pieces(fd, pieces)
        finally:
            os.close(fd)


def _goes_external(tensor: onnx.TensorProto, store=None) -> bool:
    if tensor.data_type == onnx.TensorProto.STRING:
        return False
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor.ByteSize() >= _EXTERNAL_MIN_BYTES
    span = None if store is None else store.span(tensor)
    return span is not None and _loaded_size(tensor, span[2]) >= _EXTERNAL_MIN_BYTES


def _loaded_size(tensor: onnx.TensorProto, length: int) -> int:
    """``ByteSize()`` the tensor would have with its ``length`` bytes in ``raw_data`` (the rule
    for in-memory tensors, so that a mapped model is written like a loaded one)."""
    bare = onnx.TensorProto()
    bare.CopyFrom(tensor)
    bare.ClearField("data_location")
    del bare.external_data[:]
    return bare.ByteSize() + 1 + _varint_size(length) + length  # raw_data: tag, length, bytes


def _varint_size(value: int) -> int:
    return max(1, -(-value.bit_length() // 7))


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    # ONNX raw_data is little-endian; numpy_helper converts typed fields the same way.
    return tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()


# Bytes moved per read / write when copying external data between files.
_COPY_BYTES = 8 * 1024**2
# Chunks at least this large are hashed in a second thread while being written.
_OVERLAP_MIN = 1024**2


class _DataWriter:
    """Writes tensors at 64-byte aligned offsets of an open file, hashing their bytes in order."""

    def __init__(self, fd: int, store) -> None:
        self.fd, self.store = fd, store
        self.digest = hashlib.sha256()
        self.offset = 0
        self._buffer: bytearray | None = None
        self._hasher: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()

    def _emit(self, data: memoryview, at: int) -> None:
        """Hash and write ``data``: a large chunk is hashed in a second thread while it is
        written (both release the GIL), the hash still fed in file order."""
        if len(data) < _OVERLAP_MIN:
            self.digest.update(data)
            self._write(data, at)
            return
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1)
        hashed = self._hasher.submit(self.digest.update, data)
        try:
            self._write(data, at)
        finally:
            hashed.result()

    def add(self, tensor: onnx.TensorProto) -> tuple[int, int]:
        # ONNX ExternalData.md allows aligned offsets; 64 bytes keeps every dtype aligned.
        start = -(-self.offset // 64) * 64
        span = None if self.store is None else self.store.span(tensor)
        if span is None:
            raw = _raw_bytes(tensor)
            self._emit(memoryview(raw), start)
            length = len(raw)
        else:
            length = self._copy(span, start)
        self.offset = start + length
        return start, length

    def _write(self, data: memoryview, at: int) -> None:
        pwrite_all(self.fd, data, at)

    def _copy(self, span, start: int) -> int:
        """Copy a byte range of a data file in large chunks, never through protobuf."""
        source, offset, length = span
        if source.deferred is not None:  # a folded weight computed now, block by block
            done = 0
            for block in source.blocks():
                self._emit(block, start + done)
                done += len(block)
            if done != length:
                raise AssertionError(f"deferred tensor gave {done} bytes, not {length}")
            return length
        if self._buffer is None:
            self._buffer = bytearray(_COPY_BYTES)
        view = memoryview(self._buffer)
        done = 0
        while done < length:
            count = pread_into(source.fd, view[: min(_COPY_BYTES, length - done)], offset + done)
            if count <= 0:
                raise OSError(f"data file ended {length - done} bytes early")
            self._emit(view[:count], start + done)
            done += count
        return length


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Write the large tensors to ``<name>.<hash>.data``, then the model referring to it.

    The data file is complete and in place before the model is replaced, and its name depends
    on its content: the previous model keeps reading its own data file until the moment it is
    replaced; that file is removed only afterwards. Tensors still on disk (a model opened with
    `bnfold.io.mapped.open_model`) are copied file to file in 8 MiB chunks. Memory: one copy of
    the model without its large tensors' data, plus one tensor (or chunk) at a time.
    """
    with stage_model(model, path) as staged:
        staged.commit()


@dataclass
class StagedModel:
    """A model written beside its destination, not yet in place (see `stage_model`).

    Attributes
    ----------
    tmp : pathlib.Path
        The complete model under a temporary name, beside ``path``; its data file is already in
        place under its final (content-hashed) name, so onnxruntime can load ``tmp``.
    path : pathlib.Path
        The destination.
    """

    tmp: Path
    path: Path
    data_path: Path | None
    previous: set[Path]
    committed: bool = False

    def commit(self) -> None:
        """Move the model onto ``path`` (atomically, durably) and remove replaced data files."""
        try:
            _fsync(self.tmp)
            os.chmod(self.tmp, _default_mode(self.path))
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise BnfoldError(f"{self.path}: could not be written ({exc.strerror or exc})") from None
        self.committed = True
        _fsync_dir(resolved(self.path).parent)
        _remove_unreferenced(self.previous - {self.data_path}, self.path)

    def abort(self) -> None:
        """Remove what was staged; ``path`` and its data files stay as they were."""
        if self.committed:
            return
        with contextlib.suppress(OSError):
            self.tmp.unlink()
        if self.data_path is not None and self.data_path not in self.previous:
            with contextlib.suppress(OSError):
                self.data_path.unlink()


@contextlib.contextmanager
def stage_model(model: onnx.ModelProto, path: str | os.PathLike) -> Iterator[StagedModel]:
    """Write ``model`` with external data beside ``path`` without replacing it yet.

    Inside the block the model is complete at ``staged.tmp`` (e.g. for onnxruntime to verify);
    ``staged.commit()`` puts it in place. Leaving the block without committing (or on any
    error) removes everything staged.
    """
    from bnfold.io.mapped import active

    path = Path(path)
    store = active()
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL and (store is None or store.span(tensor) is None):
            raise BnfoldError(f"{path}: tensor '{tensor.name}' still refers to external data; load it first")
    originals = [tensor for tensor in all_tensors(model) if _goes_external(tensor, store)]
    previous = _sidecars_of(path) if originals else set()
    data_path = None
    spans: list[tuple[int, int]] = []
    if originals:
        with atomic_path(path, final_name=lambda: f"{path.name}.{writer.digest.hexdigest()[:16]}.data") as tmp:
            fd = os.open(tmp, os.O_WRONLY)
            writer = _DataWriter(fd, store)
            try:
                spans = [writer.add(tensor) for tensor in originals]
            finally:
                writer.close()
                os.close(fd)
        data_path = path.with_name(f"{path.name}.{writer.digest.hexdigest()[:16]}.data")
    staged = None
    try:
        light = onnx.ModelProto()
        light.CopyFrom(model)
        lights = [tensor for tensor in all_tensors(light) if _goes_external(tensor, store)]
        for tensor, (start, length) in zip(lights, spans):
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(start)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
        _inline_mapped(light, store)  # the small tensors still on disk: into the model, as if loaded
        data = light.SerializeToString()
        del light
        parent = resolved(path).parent
        try:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        except OSError as exc:
            raise BnfoldError(f"{path}: cannot write in {parent} ({exc.strerror or exc})") from None
        os.close(fd)
        staged = StagedModel(tmp=Path(name), path=path, data_path=data_path, previous=previous)
        staged.tmp.write_bytes(data)
        del data
        yield staged
    except OSError as exc:
        raise BnfoldError(f"{path}: could not be written ({exc.strerror or exc})") from None
    finally:
        if staged is not None:
            staged.abort()
        elif data_path is not None and data_path not in previous:
            with contextlib.suppress(OSError):
                data_path.unlink()


def _inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose tensors still on disk (an open model) hold their bytes."""
    from bnfold.io.mapped import active

    store = active()
    if store is None or not any(store.span(tensor) is not None for tensor in all_tensors(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _inline_mapped(copy, store)
    return copy


def _inline_mapped(model: onnx.ModelProto, store) -> None:
    """Read the external tensors of the open model ``store`` into ``model``, in place."""
    if store is None:
        return
    for tensor in all_tensors(model):
        span = store.span(tensor)
        if span is None:
            continue
        source, offset, length = span
        if source.deferred is not None:
            data = b"".join(bytes(block) for block in source.blocks())
        else:
            buffer = bytearray(length)
            count = pread_into(source.fd, memoryview(buffer), offset) if length else 0
            data = bytes(buffer[:count])
        if len(data) != length:
            raise BnfoldError(f"tensor '{tensor.name}': its data file changed while being read")
        tensor.raw_data = data
        tensor.ClearField("data_location")
        del tensor.external_data[:]


def _remove_unreferenced(data_files: set[Path], path: Path) -> None:
    """Remove the previous model's data files, except those another model in the folder names."""
    if not data_files:
        return
    others = [p for p in path.parent.glob("*.onnx") if p.is_file() and not same_file(p, path)]
    for old in sorted(data_files):
        holders = [other for other in others if _names(other, old.name)]
        if holders:
            log.info("%s: keeping %s, still used by %s", path, old.name, holders[0].name)
            continue
        log.debug("%s: removing the previous data file %s", path, old.name)
        with contextlib.suppress(OSError):
            old.unlink()


def _names(model_path: Path, data_name: str) -> bool:
    """Whether the file ``model_path`` contains the string ``data_name`` (a location it may use)."""
    needle = data_name.encode("utf-8")
    try:
        with open(model_path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return view.find(needle) >= 0
    except (OSError, ValueError):
        return True  # unreadable: assume it may need the file rather than break it


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
    for tensor in all_tensors(old):
        for entry in tensor.external_data:
            name = entry.value
            ours = name.startswith(prefix) and name.endswith(".data") and "/" not in name and "\\" not in name
            if entry.key == "location" and ours:
                candidate = path.with_name(name)
                if candidate.is_file():
                    found.add(candidate)
    return found


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically."""
    path = Path(path)
    if path.is_dir():
        raise BnfoldError(f"{path}: report path is a directory")
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
