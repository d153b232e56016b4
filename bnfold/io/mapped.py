"""External tensor data read lazily, through memory maps, and large new tensors spilled to disk.

A model opened with `open_model` keeps its external tensors as references: nothing is read
until a fold needs a tensor's values (`external_array`), and then only the pages touched. While
the ``with`` block runs:

1. `external_array` returns a read-only view of a memory-mapped data file; `release` drops the
   pages of a view from this process (``MADV_DONTNEED``: the kernel's page cache keeps them,
   the process's resident memory does not).
2. `spill` writes a large new tensor (a folded weight) to a scratch file beside the output and
   turns its ``TensorProto`` into an external reference to it, so that folded weights do not
   stay in memory either.
3. `bnfold.io.save_model` copies every referenced byte range to the new data file in large
   chunks (never through protobuf), and `bnfold.runtime.session` hands onnxruntime files.
4. With ``hold_new=True`` (a model that is only folded and written: no check or session needs
   it in memory as one protobuf) new tensors of `HOLD_MIN_BYTES` or more stay NumPy arrays
   (`Held`) that the tensor refers to, never copied into protobuf; `bnfold.io.save_model`
   writes their bytes straight from the arrays into the file (`bnfold.io.wire`).
5. With ``hold_new`` the model file's own large initializers are left in it too: they refer to
   their bytes in the file (`bnfold.io.models.load_model_mapped`'s ``in_place``), are read
   through the map like external data, and `bnfold.io.save_model` writes them from the map.
   Parsing the model then copies none of them.

Every location is validated when the model is opened (the rules of `bnfold.io.external`: inside
the model's folder, no symbolic link out, regular file, offset and length within the file and
matching the tensor's shape); the files are opened once, without following links.
"""

from __future__ import annotations

import contextlib
import contextvars
import mmap
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnfold.errors import BnfoldError
from bnfold.io.files import pread_into, pwrite_all

__all__ = [
    "HOLD_MIN_BYTES",
    "SPILL_MIN_BYTES",
    "Held",
    "MappedModel",
    "active",
    "covers",
    "defer",
    "defers",
    "deferred",
    "external_array",
    "open_model",
    "release",
    "spill",
]

#: New tensors at least this large go to the scratch file while a model is open (smaller ones
#: cost less in memory than a file round trip).
SPILL_MIN_BYTES = 16 * 1024**2

#: New tensors at least this large are held as arrays under ``hold_new`` (rule 4): below it a
#: copy into protobuf costs less than the reference that replaces it.
HOLD_MIN_BYTES = 64 * 1024

# Spilled tensors name their data with this prefix: never a valid file name in a model folder,
# so a spilled tensor that escaped `save_model` fails loudly instead of reading a stranger's file.
_SPILL_PREFIX = "<bnfold-scratch "
_DEFERRED_PREFIX = "<bnfold-deferred "
_INPUT_PREFIX = "<bnfold-input "

_ACTIVE: contextvars.ContextVar[MappedModel | None] = contextvars.ContextVar("bnfold_mapped_model", default=None)


@dataclass
class _Source:
    """One open data file: its descriptor and a read-only map of the whole file."""

    fd: int
    size: int
    map: mmap.mmap | None
    address: int = 0
    deferred: Any = None  # a bnfold.folding.chunked.Deferred: bytes computed when read
    own: bool = False  # the model file itself (rule 5): mapped whole at once, its pages kept

    def blocks(self) -> Iterator[memoryview]:
        """The bytes of a deferred tensor, block by block."""
        return self.deferred.blocks()

    def view(self, offset: int, length: int) -> memoryview:
        if self.map is None:  # an empty file maps nothing; lengths were checked against it
            return memoryview(b"")
        return memoryview(self.map)[offset:offset + length]


@dataclass
class Held:
    """A new tensor's values kept as an array (rule 4): what a `_Source` reads instead of a file.

    It answers like `bnfold.folding.chunked.Deferred`: ``materialize`` for a later fold that
    reads the tensor, ``blocks`` for a writer. The array is read-only from now on.
    """

    array: np.ndarray
    flushed: int = 0

    def __post_init__(self) -> None:
        self.array = np.ascontiguousarray(self.array)
        self.array.flags.writeable = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def arrays(self) -> Iterator[tuple[int, np.ndarray]]:
        yield 0, self.array

    def blocks(self) -> Iterator[memoryview]:
        yield self.view()

    def view(self) -> memoryview:
        """The bytes, C order, without a copy."""
        return memoryview(self.array.reshape(-1)).cast("B")

    def materialize(self) -> np.ndarray:
        return self.array


@dataclass
class MappedModel:
    """A model whose external tensors are read on demand (see the module docstring).

    Attributes
    ----------
    model : onnx.ModelProto
        The model; its external tensors keep their ``location`` / ``offset`` / ``length``.
    path : pathlib.Path
        The file it was loaded from.
    scratch_dir : pathlib.Path or None
        Where spilled tensors go (None: nowhere, new tensors stay in memory).
    examine_only : bool
        Folds of this model are examined, never written nor run (`bnfold.inspect`'s dry run):
        folded weights are left deferred even with no scratch folder (`defers`).
    hold_min : int or None
        New tensors of this many bytes or more are `Held` (rule 4); None: none are.
    """

    model: onnx.ModelProto
    path: Path
    scratch_dir: Path | None = None
    examine_only: bool = False
    hold_min: int | None = None
    _sources: dict[str, _Source] = field(default_factory=dict)
    _files: dict[int, tuple[onnx.ModelProto, Path]] = field(default_factory=dict)
    _scratch: tuple[str, Path, int] | None = None  # (location, path, fd)
    _scratch_size: int = 0
    _maps: list[_Source] = field(default_factory=list)  # the sources mapped so far (`release`)
    _token: str = field(default_factory=lambda: secrets.token_hex(8))  # names its deferred tensors
    _deferred: int = 0

    # ---- reading ---------------------------------------------------------------------------
    def span(self, tensor: onnx.TensorProto) -> tuple[_Source, int, int] | None:
        """``(source, offset, length)`` of an external tensor this model can read, else None."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            return None
        info = {entry.key: entry.value for entry in tensor.external_data}
        source = self._sources.get(info.get("location", ""))
        if source is None:
            return None
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else source.size - offset
        return source, offset, length

    def folder_for(self, model: onnx.ModelProto) -> Path | None:
        """The input's folder when every external tensor of ``model`` lies in the input's own data
        files (not spilled, not deferred): onnxruntime can then read them there. None otherwise."""
        from bnfold.io.files import all_tensors

        for tensor in all_tensors(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            if location.startswith((_SPILL_PREFIX, _DEFERRED_PREFIX, _INPUT_PREFIX)) or location not in self._sources:
                return None
        return self.path.resolve().parent

    def file_for(self, model: onnx.ModelProto) -> Path | None:
        """The file on disk that holds ``model`` (this very object) with its data, if any."""
        if model is self.model:
            return self.path
        known = self._files.get(id(model))
        return known[1] if known is not None and known[0] is model else None

    def register_file(self, model: onnx.ModelProto, path: Path) -> None:
        """Record that ``path`` holds ``model`` as it is now (e.g. a staged output)."""
        self._files[id(model)] = (model, path)

    # ---- spilling --------------------------------------------------------------------------
    def spill(self, tensor: onnx.TensorProto, array: np.ndarray) -> bool:
        """Write ``array``'s bytes to the scratch file and make ``tensor`` refer to them."""
        if self.scratch_dir is None:
            return False
        if self._scratch is None:
            fd, name = tempfile.mkstemp(prefix=".bnfold-scratch.", suffix=".tmp", dir=self.scratch_dir)
            self._scratch = (f"{_SPILL_PREFIX}{secrets.token_hex(8)}>", Path(name), fd)
            self._sources[self._scratch[0]] = _Source(fd=fd, size=0, map=None)
        location, _, fd = self._scratch
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        offset = -(-self._scratch_size // 64) * 64
        pwrite_all(fd, data, offset)
        self._scratch_size = offset + len(data)
        source = self._sources[location]
        source.size = self._scratch_size
        source.map = None  # remapped on the next read: the file grew
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return True

    def defer(self, tensor: onnx.TensorProto, deferred: Any) -> None:
        """Make ``tensor`` refer to a folded weight computed only when it is read or written."""
        self._deferred += 1
        location = f"{_DEFERRED_PREFIX}{self._token}-{self._deferred}>"
        self._sources[location] = _Source(fd=-1, size=deferred.nbytes, map=None, deferred=deferred)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", "0"), ("length", str(deferred.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def owns(self, array: np.ndarray) -> bool:
        """Whether ``array``'s bytes lie in one of this model's memory-mapped files."""
        start = array.__array_interface__["data"][0]
        end = start + array.nbytes
        return any(source.map is not None and source.address <= start and end <= source.address + source.size
                   for source in self._sources.values())

    def view(self, source: _Source, offset: int, length: int) -> memoryview:
        """``length`` bytes at ``offset`` of an open data file, through its map (no copy)."""
        try:
            view = self._mapped(source).view(offset, length)
        except (OSError, ValueError):  # the map failed: read the bytes
            buffer = bytearray(length)
            view = memoryview(buffer)[: pread_into(source.fd, memoryview(buffer), offset)]
        if len(view) != length:
            raise BnfoldError(f"{self.path}: a data file is shorter than when it was opened")
        return view

    def _mapped(self, source: _Source) -> _Source:
        if source.map is None and source.size:
            if source.own and hasattr(mmap, "MAP_POPULATE"):
                # The model file (under 2 GiB): its pages are in the page cache, having just been
                # parsed, and the writer reads the unchanged ones again. Mapping them in one call
                # (Linux) costs less than a page fault per page; `release` leaves them mapped.
                flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
                source.map = mmap.mmap(source.fd, source.size, flags=flags, prot=mmap.PROT_READ)
            else:
                source.map = mmap.mmap(source.fd, source.size, access=mmap.ACCESS_READ)
            source.address = np.frombuffer(source.map, dtype=np.uint8, count=1).__array_interface__["data"][0]
            if not source.own and not any(known is source for known in self._maps):
                self._maps.append(source)
        return source

    # ---- life cycle ------------------------------------------------------------------------
    def close(self) -> None:
        for source in self._sources.values():
            if source.map is not None:
                with contextlib.suppress(BufferError):  # a view still alive: freed with it
                    source.map.close()
            if source.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(source.fd)
        self._sources.clear()
        self._maps.clear()
        self._files.clear()
        if self._scratch is not None:
            with contextlib.suppress(OSError):
                self._scratch[1].unlink()
            self._scratch = None


def active() -> MappedModel | None:
    """The model opened by the innermost `open_model` block, if any."""
    return _ACTIVE.get()


def covers(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` is external data that the open model can read."""
    store = _ACTIVE.get()
    return store is not None and store.span(tensor) is not None


def external_array(tensor: onnx.TensorProto, dtype: np.dtype) -> np.ndarray:
    """A read-only view of an external tensor's values, memory-mapped (no byte read yet)."""
    store = _ACTIVE.get()
    span = None if store is None else store.span(tensor)
    if span is None:
        raise BnfoldError(f"tensor '{tensor.name}' is stored as external data that was not loaded")
    source, offset, length = span
    if source.deferred is not None:  # a folded weight read again by a later fold: compute it now
        values = source.deferred.materialize()
        values.flags.writeable = False
        return values
    count = length // dtype.itemsize
    try:
        view = store._mapped(source).view(offset, length)
    except (OSError, ValueError):  # a file system that cannot map files: read the bytes instead
        buffer = bytearray(length)
        if pread_into(source.fd, memoryview(buffer), offset) != length:
            raise BnfoldError(f"tensor '{tensor.name}': its data file changed while being read") from None
        view = memoryview(bytes(buffer))
    return np.frombuffer(view, dtype=dtype, count=count).reshape(tuple(tensor.dims))


def release(array: np.ndarray) -> None:
    """Drop the memory-mapped pages under ``array`` from this process (a no-op for other arrays).

    Whole pages strictly inside the array's bytes only: a neighbouring tensor's page stays.
    """
    store = _ACTIVE.get()
    if store is None or not store._maps or not hasattr(mmap, "MADV_DONTNEED") or not array.flags.c_contiguous:
        return  # (no mapped file: nothing to release, and the address lookup costs microseconds)
    start = array.__array_interface__["data"][0]
    end = start + array.nbytes
    for source in store._maps:
        if source.map is None:
            continue
        base = source.address
        if base <= start and end <= base + source.size:
            first = -(-(start - base) // mmap.PAGESIZE) * mmap.PAGESIZE
            last = ((end - base) // mmap.PAGESIZE) * mmap.PAGESIZE
            if last > first:
                source.map.madvise(mmap.MADV_DONTNEED, first, last - first)
            return


def defers(array: np.ndarray) -> bool:
    """Whether a fold may leave its result computed from ``array`` to the writer (`Deferred`):
    ``array`` is a large, C-contiguous view of the open model's files, and the model writes new
    tensors to disk (it has a scratch folder) or its folds are only examined (``examine_only``)."""
    store = _ACTIVE.get()
    return (store is not None and (store.scratch_dir is not None or store.examine_only)
            and array.nbytes >= SPILL_MIN_BYTES and array.flags.c_contiguous and store.owns(array))


def deferred(tensor: onnx.TensorProto) -> Any:
    """The `bnfold.folding.chunked.Deferred` that ``tensor`` refers to in the open model, else None."""
    store = _ACTIVE.get()
    span = None if store is None else store.span(tensor)
    return None if span is None else span[0].deferred


def defer(tensor: onnx.TensorProto, deferred: Any) -> None:
    """Make ``tensor`` refer to ``deferred`` (a `bnfold.folding.chunked.Deferred`) in the open model."""
    store = _ACTIVE.get()
    if store is None:
        raise AssertionError("a deferred tensor outlived the model it reads")
    store.defer(tensor, deferred)


def spill(tensor: onnx.TensorProto, array: np.ndarray) -> bool:
    """Move a new tensor's values out of protobuf if a model is open and ``array`` is large: to the
    scratch file (a model whose data stays on disk) or, under ``hold_new``, into a `Held`."""
    store = _ACTIVE.get()
    if store is None:
        return False
    if store.hold_min is not None and array.nbytes >= store.hold_min:
        store.defer(tensor, Held(array))
        return True
    if array.nbytes < SPILL_MIN_BYTES:
        return False
    return store.spill(tensor, array)


@contextlib.contextmanager
def open_model(path: str | os.PathLike, *, scratch_dir: str | os.PathLike | None = None,
               check: bool = True, examine_only: bool = False,
               hold_new: bool = False) -> Iterator[MappedModel]:
    """Load the model at ``path`` with its external data mapped, not read (module docstring).

    Parameters
    ----------
    path : str or os.PathLike
        The ``.onnx`` file; its external data files must sit inside its folder.
    scratch_dir : path, optional
        Folder for the scratch file of spilled tensors (on the output's disk); None spills nothing.
    check : bool
        As `bnfold.io.load_model`.
    examine_only : bool
        Folds of the model are examined, never written (`MappedModel.examine_only`).
    hold_new : bool
        Keep large new tensors as arrays until the model is written (rule 4), for a model with
        no external data (one with some spills them to ``scratch_dir`` instead), and leave the
        file's own large initializers in the file (rule 5). Only for a model that is folded and
        written: a session or checker given it in memory would need every tensor copied back
        into protobuf.

    Yields
    ------
    MappedModel
        Valid inside the block only: the files are closed and the scratch file removed after it.
    """
    from bnfold.io.models import load_model_mapped

    path = Path(path)
    # Under hold_new the model file's own large initializers stay in it as well (rule 5).
    own = f"{_INPUT_PREFIX}{secrets.token_hex(8)}>" if hold_new else None
    model, sources = load_model_mapped(path, check=check, in_place=own)
    external = [location for location in sources if location != own]
    # Spilling only helps a model whose data stays on disk; any other is written from memory.
    spill_to = Path(scratch_dir) if scratch_dir is not None and external else None
    store = MappedModel(model=model, path=path, scratch_dir=spill_to, examine_only=examine_only,
                        hold_min=HOLD_MIN_BYTES if hold_new and not external else None)
    token = _ACTIVE.set(store)
    try:
        for location, (fd, size) in sources.items():
            store._sources[location] = _Source(fd=fd, size=size, map=None, own=location == own)
        yield store
    finally:
        _ACTIVE.reset(token)
        store.close()
