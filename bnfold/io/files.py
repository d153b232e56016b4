"""Functions shared by the `bnfold.io` modules: input-file checks, paths, messages.

This module must not import onnx (nor protobuf) at import time: `bnfold.io.arrays` uses it, and
the trainer loads its ``.npz`` data through that without ever needing onnx. The two helpers that
work on ONNX messages import it when called.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.errors import BnfoldError

if TYPE_CHECKING:
    import onnx

__all__ = [
    "PROTOBUF_LIMIT", "serialized_size", "one_line", "check_input_file", "read_bytes", "resolved", "same_file",
    "all_tensors", "pwrite_all", "pread_into",
]

# Protobuf refuses to parse or serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
_MAX_MESSAGE = 300


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes `model` takes serialized, or ``PROTOBUF_LIMIT + 1`` when it is over the limit.

    Protobuf's ``ByteSize`` raises ``EncodeError`` instead of answering for messages over 2 GiB
    (it costs about as much as serializing: call it only where the answer matters).
    """
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except (EncodeError, ValueError):
        return PROTOBUF_LIMIT + 1


def one_line(text: object) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "..."


def check_input_file(path: Path) -> None:
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


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot be read ({exc.strerror})") from None
    except MemoryError:
        raise BnfoldError(f"{path}: too large to read into memory") from None


def resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return resolved(a) == resolved(b)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors

    yield from _get_all_tensors(model)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` of ``fd`` (``os.pwrite``, or seek + write where the
    platform has no ``pwrite``)."""
    while data:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, data, offset)
        else:  # Windows
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, data)
        data, offset = data[written:], offset + written


def pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Read up to ``len(buffer)`` bytes at ``offset`` of ``fd`` into ``buffer``; return the count."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], offset)
    if hasattr(os, "pread"):  # macOS
        data = os.pread(fd, len(buffer), offset)
    else:  # Windows
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(buffer))
    buffer[: len(data)] = data
    return len(data)

