"""Loading ``.npz`` arrays without ever unpickling.

Each member's header is read first: an object dtype (which would need pickle) is refused, and a
declared shape larger than the data the archive holds is refused before memory is allocated.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from bnfold.errors import BnfoldError
from bnfold.io.files import check_input_file, one_line

__all__ = ["load_npz"]


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file; pickled objects are refused, never unpickled.

    Each member's header is read first: an object dtype (which would need pickle) is refused, and
    a declared shape larger than the data the archive holds is refused before allocating it.
    """
    path = Path(path)
    check_input_file(path)
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
        raise BnfoldError(f"{path}: not a valid .npz file ({one_line(exc)})") from None
    except MemoryError:
        raise BnfoldError(f"{path}: arrays too large to load") from None
    except Exception as exc:
        raise BnfoldError(f"{path}: not a valid .npz file ({type(exc).__name__}: {one_line(exc)})") from None


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
