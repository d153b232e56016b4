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
from collections.abc import Collection
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import EncodeError

from bnfold.errors import BnfoldError
from bnfold.io.atomic import atomic_path
from bnfold.io.external import external_files_of
from bnfold.io.files import PROTOBUF_LIMIT, all_tensors, resolved, same_file

__all__ = ["check_output_path", "save_model", "write_json"]

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
        for data_file in external_files_of(other) if path.exists() else ():
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
    for tensor in all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise BnfoldError(f"{path}: tensor '{tensor.name}' still refers to external data; load it first")
    originals = [tensor for tensor in all_tensors(model) if _goes_external(tensor)]
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
    lights = [tensor for tensor in all_tensors(light) if _goes_external(tensor)]
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
    _remove_unreferenced(previous - {data_path}, path)


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
