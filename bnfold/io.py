"""Reading and writing models and arrays safely.

- Loading never executes code (`numpy.load(..., allow_pickle=False)`) and reads external tensor
  data only from files inside the model's own folder.
- Writing goes to a temporary file in the target folder, then `os.replace` moves it into place:
  an interrupted run leaves the previous file intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BnfoldError

__all__ = ["load_model", "save_model", "atomic_path", "load_npz", "check_output_path"]

log = logging.getLogger(__name__)


def _check_input_file(path: Path) -> None:
    if not path.exists():
        raise BnfoldError(f"{path}: no such file")
    if path.is_dir():
        raise BnfoldError(f"{path}: is a directory, expected a file")
    if path.stat().st_size == 0:
        raise BnfoldError(f"{path}: file is empty")


def _external_locations(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            yield tensor, info.get("location", "")


def _check_external_location(model_path: Path, tensor_name: str, location: str) -> Path:
    base = model_path.resolve().parent
    if not location:
        raise BnfoldError(f"{model_path}: tensor '{tensor_name}' has external data without a location")
    if os.path.isabs(location) or Path(location).is_absolute():
        raise BnfoldError(
            f"{model_path}: tensor '{tensor_name}' external data location '{location}' is an absolute"
            " path; only files inside the model's folder are read"
        )
    target = (base / location).resolve()
    if base != target and base not in target.parents:
        raise BnfoldError(
            f"{model_path}: tensor '{tensor_name}' external data location '{location}' points outside"
            f" the model's folder {base}"
        )
    if not target.is_file():
        raise BnfoldError(f"{model_path}: tensor '{tensor_name}' external data file '{location}' is missing")
    return target


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model, with external data read only from inside the model's folder."""
    path = Path(path)
    _check_input_file(path)
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise BnfoldError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    if not isinstance(model, onnx.ModelProto) or not model.HasField("graph"):
        raise BnfoldError(f"{path}: not an ONNX model (no graph)")
    externals = list(_external_locations(model))
    if externals:
        from onnx.external_data_helper import load_external_data_for_tensor

        base = str(path.resolve().parent)
        for tensor, location in externals:
            target = _check_external_location(path, tensor.name, location)
            try:
                load_external_data_for_tensor(tensor, base)
            except Exception as exc:
                raise BnfoldError(
                    f"{path}: tensor '{tensor.name}' external data from '{location}' could not be read"
                    f" ({type(exc).__name__}: {exc})"
                ) from None
            expected = _expected_nbytes(tensor)
            if expected is not None and len(tensor.raw_data) != expected:
                raise BnfoldError(
                    f"{path}: tensor '{tensor.name}' external data in '{target.name}' has"
                    f" {len(tensor.raw_data)} bytes, expected {expected} (file too short?)"
                )
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    return count * itemsize


def check_output_path(path: str | os.PathLike, *, overwrite: bool, inputs: tuple = ()) -> Path:
    """Refuse an output that exists (unless `overwrite`), equals an input, or cannot be written."""
    path = Path(path)
    for other in inputs:
        if Path(other).exists() and path.exists() and os.path.samefile(path, other):
            raise BnfoldError(f"{path}: output is the same file as the input; use --in-place to allow it")
    if path.is_dir():
        raise BnfoldError(f"{path}: output path is a directory")
    if path.exists() and not overwrite:
        raise BnfoldError(f"{path}: already exists; use --force to overwrite")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise BnfoldError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BnfoldError(f"{path}: output folder {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds."""
    path = Path(path)
    parent = path.resolve().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write in {parent} ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise BnfoldError(f"{path}: could not be written ({exc.strerror})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` atomically (callers check overwrite rules with `check_output_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            data = model.SerializeToString()
        except ValueError as exc:  # protobuf refuses messages over 2 GB
            raise BnfoldError(f"{path}: model too large to serialize in one file ({exc})") from None
        tmp.write_bytes(data)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file; pickled objects are refused, never unpickled."""
    path = Path(path)
    _check_input_file(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise BnfoldError(f"{path}: contains pickled objects, which bnfold refuses to load") from None
        raise BnfoldError(f"{path}: not a valid .npz file ({exc})") from None
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid .npz file ({type(exc).__name__}: {exc})") from None
