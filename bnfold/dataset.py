"""Data for a model, read from ``.npz`` / ``.npy`` files or arrays, streamed in batches.

A `Dataset` is one or several sources seen as ONE data set: the rows of every source one after
the other, each source holding one array per model input (keyed by the input's name; a model
with a single input also accepts a source holding a single array, or a single array besides the
labels). Batches may span two sources.

Memory is bounded by one batch: nothing is read before it is needed.

- ``.npy`` files are memory-mapped (``np.load(mmap_mode="r")``).
- ``.npz`` members stored uncompressed (``numpy.savez``) are memory-mapped at their offset in
  the archive; compressed members (``numpy.savez_compressed``) are decompressed as a stream,
  row range by row range (a pass reads forward, so each byte is inflated once per pass).
- Members are never unpickled: an object dtype is refused from the header, before any data is
  read. A Fortran-ordered array cannot be read by rows; it is loaded whole (logged).

Checks, each a one-line `BnfoldError` naming the file and the key: missing key, rows that
disagree between the arrays of one source, a shape or dtype that the model input cannot take
(floating data is cast to the model's floating dtype; any other dtype change is refused), no
samples at all.

A Dataset pickles small (paths and row ranges; in-memory arrays only as the rows it covers), so
`Dataset.subset` makes the shards sent to other processes or machines.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.arrays import npy_header

__all__ = ["Dataset", "DataLike", "ArraySpec", "open_dataset"]

log = logging.getLogger(__name__)

DataLike = Union[str, os.PathLike, np.ndarray, Mapping[str, Any], Sequence[Any], "Dataset"]


@dataclass(frozen=True)
class ArraySpec:
    """What one model input takes: its name, dtype, and dims (int, or str/None for free)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


@dataclass
class _Array:
    """One array of one source, read by row ranges without loading the rest."""

    where: str  # "file.npz: array 'x'", for messages
    shape: tuple[int, ...]
    dtype: np.dtype
    path: str | None = None
    member: str | None = None  # npz member name; None for a .npy file
    offset: int | None = None  # byte offset of the data in `path` when it can be memory-mapped
    header: int = 0  # bytes of .npy header before the data inside a compressed member
    fortran: bool = False
    memory: np.ndarray | None = None
    _cache: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # memory maps and open archives stay in the process that opened them
        return state

    def close(self) -> None:
        """Close a compressed member's stream (memory maps close with their last reference)."""
        if isinstance(self._cache, tuple):
            for item in reversed(self._cache):
                item.close()
            self._cache = None

    def rows(self, start: int, stop: int) -> np.ndarray:
        if self.memory is not None:
            return self.memory[start:stop]
        try:
            return self._rows(start, stop)
        except BnfoldError:
            raise
        except Exception as exc:
            raise BnfoldError(f"{self.where}: cannot be read ({type(exc).__name__}: {_first(exc)})") from None

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if self.fortran:
            if self._cache is None:
                log.warning("%s is stored in Fortran order: loaded whole", self.where)
                self._cache = _load_member(self)
            return self._cache[start:stop]
        if self.offset is not None:
            if self._cache is None:
                self._cache = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
            return np.array(self._cache[start:stop])
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        position = self.header + start * row_bytes
        if self._cache is None or self._cache[1].tell() > position:  # a new pass: reopen, not seek back
            self.close()
            archive = zipfile.ZipFile(self.path)
            self._cache = (archive, archive.open(self.member))
        handle = self._cache[1]
        handle.seek(position)
        count = (stop - start) * row_bytes
        buffer = handle.read(count)
        if len(buffer) != count:
            raise BnfoldError(f"{self.where}: file is truncated")
        return np.frombuffer(buffer, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))


def _first(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def _load_member(array: _Array) -> np.ndarray:
    with zipfile.ZipFile(array.path) as archive, archive.open(array.member) as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


def _read_header(handle, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    shape, fortran, dtype = npy_header(handle)
    if dtype.hasobject:
        raise BnfoldError(f"{where} contains pickled objects, which bnfold refuses to load")
    return shape, fortran, dtype


def _local_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the archive: after its local header (PKZIP APPNOTE 4.3.7)."""
    with open(path, "rb") as raw:
        raw.seek(info.header_offset)
        local = raw.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise BnfoldError(f"{path}: damaged .npz (bad local header for '{info.filename}')")
    name_length = int.from_bytes(local[26:28], "little")
    extra_length = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _check_size(array: _Array, available: int) -> None:
    declared = int(np.prod(array.shape, dtype=object)) * array.dtype.itemsize
    if declared > available:
        raise BnfoldError(
            f"{array.where} declares shape {array.shape} ({declared} bytes) but the file holds {available} bytes"
        )


def _open_npz(path: Path) -> dict[str, _Array]:
    arrays: dict[str, _Array] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise BnfoldError(f"{path}: member '{info.filename}' is not a .npy array")
                key = info.filename[: -len(".npy")]
                where = f"{path}: array '{key}'"
                with archive.open(info) as handle:
                    shape, fortran, dtype = _read_header(handle, where)
                    header = handle.tell()
                array = _Array(where, shape, dtype, path=str(path), member=info.filename, header=header, fortran=fortran)
                _check_size(array, info.file_size - header)
                if info.compress_type == zipfile.ZIP_STORED and not fortran:
                    array.offset = _local_data_offset(str(path), info) + header
                arrays[key] = array
    except BnfoldError:
        raise
    except zipfile.BadZipFile:
        raise BnfoldError(f"{path}: not a valid .npz file (not a zip archive)") from None
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid .npz file ({type(exc).__name__}: {_first(exc)})") from None
    return arrays


def _open_npy(path: Path) -> _Array:
    where = f"{path}"
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype = _read_header(handle, where)
            header = handle.tell()
    except BnfoldError:
        raise
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid .npy file ({type(exc).__name__}: {_first(exc)})") from None
    array = _Array(where, shape, dtype, path=str(path), fortran=fortran)
    _check_size(array, path.stat().st_size - header)
    if fortran:
        array.memory = np.load(path, allow_pickle=False)
    else:
        array.offset = header
    return array


def _open_path(path: Path) -> tuple[str, dict[str, _Array]]:
    from bnfold.io.files import check_input_file

    check_input_file(path)
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic == b"\x93NUMPY":
        return str(path), {"": _open_npy(path)}
    return str(path), _open_npz(path)


def _memory_source(data: Any, index: int) -> tuple[str, dict[str, _Array]]:
    label = f"data[{index}]" if index >= 0 else "data"
    items = data.items() if isinstance(data, Mapping) else [("", data)]
    arrays = {}
    for key, value in items:
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise BnfoldError(f"{label}: array '{key}' has dtype object; pass numeric arrays")
        where = f"{label}: array '{key}'" if key else label
        arrays[str(key)] = _Array(where, array.shape, array.dtype, memory=array)
    return label, arrays


@dataclass
class _Source:
    """Rows ``first : first + rows`` of one file's (or one mapping's) arrays."""

    label: str
    arrays: dict[str, _Array]  # model input name (and labels key) -> array
    rows: int
    first: int = 0

    def cut(self, start: int, stop: int) -> _Source:
        """Rows ``start:stop`` of this source; in-memory arrays are sliced, so a pickled shard is small."""
        lo, hi = self.first + start, self.first + stop
        if all(array.memory is not None for array in self.arrays.values()):
            arrays = {key: replace(array, memory=array.memory[lo:hi], shape=array.memory[lo:hi].shape)
                      for key, array in self.arrays.items()}
            return _Source(self.label, arrays, stop - start, 0)
        return _Source(self.label, self.arrays, stop - start, lo)

    def read(self, key: str, start: int, stop: int) -> np.ndarray:
        return self.arrays[key].rows(self.first + start, self.first + stop)


class Dataset:
    """Rows of one or several sources, each holding one array per model input (module docstring).

    Use `open_dataset` to build one from user data and the model's input specs.
    """

    def __init__(self, sources: list[_Source], specs: Sequence[ArraySpec], labels: str | None) -> None:
        self._sources = [source for source in sources if source.rows > 0]
        self.specs = tuple(specs)
        self.labels_key = labels
        self._rows = sum(source.rows for source in self._sources)

    def __len__(self) -> int:
        return self._rows

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.specs)

    def subset(self, start: int, stop: int) -> Dataset:
        """Rows ``start:stop`` of this data set (a shard), carrying only the rows it needs."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"subset({start}, {stop}) of {len(self)} rows")
        sources, offset = [], 0
        for source in self._sources:
            lo, hi = max(start - offset, 0), min(stop - offset, source.rows)
            if lo < hi:
                sources.append(source.cut(lo, hi))
            offset += source.rows
        return Dataset(sources, self.specs, self.labels_key)

    def _read(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``key``, concatenated across sources."""
        pieces, offset = [], 0
        for source in self._sources:
            lo, hi = max(start - offset, 0), min(stop - offset, source.rows)
            if lo < hi:
                pieces.append(source.read(key, lo, hi))
            offset += source.rows
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Model feeds for rows ``start:stop``, cast to the model's dtypes."""
        return {spec.name: np.ascontiguousarray(self._read(spec.name, start, stop), dtype=spec.dtype)
                for spec in self.specs}

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Integer labels for rows ``start:stop`` (requires a labels key)."""
        if self.labels_key is None:
            raise BnfoldError("no labels key was given")
        stop = len(self) if stop is None else stop
        return np.asarray(self._read(self.labels_key, start, stop)).astype(np.int64)

    def bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """``(start, stop)`` of each batch, in order; the last one may be smaller."""
        if batch_size < 1:
            raise BnfoldError(f"batch size must be at least 1, got {batch_size}")
        return [(lo, min(lo + batch_size, len(self))) for lo in range(0, len(self), batch_size)]

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Model feeds, ``batch_size`` rows at a time, in order; open streams closed at the end."""
        try:
            for lo, hi in self.bounds(batch_size):
                yield self.batch(lo, hi)
        finally:
            self.close()

    def close(self) -> None:
        """Close the streams of compressed members (reopened if read again)."""
        for source in self._sources:
            for array in source.arrays.values():
                array.close()

    def shards(self, count: int, batch_size: int) -> list[Dataset]:
        """At most ``count`` contiguous shards, each a whole number of batches (the last may be short).

        Aligned on batches so that a shard's batches are exactly the batches of one pass over
        the whole data set: results that depend on batch composition do not depend on ``count``.
        """
        batches = len(self.bounds(batch_size))
        per = -(-batches // max(count, 1))
        return [self.subset(first * batch_size, min((first + per) * batch_size, len(self)))
                for first in range(0, batches, per)]


def _match(label: str, arrays: dict[str, _Array], specs: Sequence[ArraySpec], labels: str | None) -> _Source:
    """Map a source's arrays to the model inputs, check them, and count its rows."""
    keys = [key for key in arrays if key != labels]
    matched: dict[str, _Array] = {}
    for spec in specs:
        if spec.name in arrays:
            matched[spec.name] = arrays[spec.name]
        elif len(specs) == 1 and len(keys) == 1:
            matched[spec.name] = arrays[keys[0]]  # a single array for a single input
        else:
            available = ", ".join(repr(k) for k in arrays) or "none"
            raise BnfoldError(f"{label}: no array for model input '{spec.name}' (arrays: {available});"
                              f" save the samples under the input's name: np.savez(path, **{{{spec.name!r}: x}})")
    if labels is not None:
        if labels not in arrays:
            available = ", ".join(repr(k) for k in arrays) or "none"
            raise BnfoldError(f"{label}: no labels array '{labels}' (arrays: {available})")
        matched[labels] = arrays[labels]
    rows = None
    for key, array in matched.items():
        if len(array.shape) == 0:
            raise BnfoldError(f"{array.where} is a scalar; expected one row per sample")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise BnfoldError(f"{label}: arrays have different numbers of rows ({rows} and {array.shape[0]} in '{key}')")
    for spec in specs:
        _check_spec(matched[spec.name], spec)
    if labels is not None:
        _check_labels(matched[labels])
    return _Source(label, matched, rows or 0)


def _check_spec(array: _Array, spec: ArraySpec) -> None:
    # The sample axis is free whatever the model declares (`bnfold.population.submodel` frees it).
    expected = "(" + ", ".join(["N", *(str(d) if isinstance(d, int) else "?" for d in spec.dims[1:])]) + ")"
    if len(array.shape) != len(spec.dims) or any(
        isinstance(want, int) and want != got for want, got in zip(spec.dims[1:], array.shape[1:])
    ):
        raise BnfoldError(
            f"{array.where} has shape {array.shape}; model input '{spec.name}' takes {expected}"
            " (the first axis is the sample axis)"
        )
    if array.dtype != spec.dtype and not (array.dtype.kind == "f" and spec.dtype.kind == "f"):
        raise BnfoldError(
            f"{array.where} has dtype {array.dtype.name}; model input '{spec.name}' takes {spec.dtype.name}"
            " (convert the data yourself: bnfold casts only between floating types)"
        )


def _check_labels(array: _Array) -> None:
    if len(array.shape) != 1 or array.dtype.kind not in "iub":
        raise BnfoldError(
            f"{array.where}: labels must be a 1-D integer array, got shape {array.shape} dtype {array.dtype.name}"
        )


def open_dataset(data: DataLike, specs: Sequence[ArraySpec], *, labels: str | None = None) -> Dataset:
    """One `Dataset` from user data, checked against the model inputs ``specs``.

    Parameters
    ----------
    data : path, array, mapping, sequence of those, or Dataset
        A ``.npz`` / ``.npy`` path; an array (single-input models); a mapping input name ->
        array; or a list of any of these, read one after the other as one data set.
    specs : sequence of ArraySpec
        The model inputs to feed (`bnfold.runtime.feed_inputs` gives them).
    labels : str, optional
        Key of a 1-D integer array of labels in every source.

    Raises
    ------
    BnfoldError
        Missing key, disagreeing rows, wrong shape or dtype, no samples (one line each).
    """
    if isinstance(data, Dataset):
        return data
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise BnfoldError("no data given")
    sources = []
    for index, item in enumerate(items):
        position = index if len(items) > 1 else -1
        if isinstance(item, (str, os.PathLike)):
            label, arrays = _open_path(Path(item))
        else:
            label, arrays = _memory_source(item, position)
        sources.append(_match(label, arrays, specs, labels))
    dataset = Dataset(sources, specs, labels)
    if len(dataset) == 0:
        names = ", ".join(source.label for source in sources)
        raise BnfoldError(f"{names}: no samples (0 rows)")
    return dataset
