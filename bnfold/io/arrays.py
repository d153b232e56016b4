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

__all__ = ["load_npz", "npy_header", "DEFAULT_MAX_BYTES"]


# Arrays bnfold reads (checkpoints, verification inputs) are megabytes; this guards against an
# archive that inflates to more memory than the machine has.
DEFAULT_MAX_BYTES = 4 * 1024**3


def load_npz(path: str | os.PathLike, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` file; pickled objects are refused, never unpickled.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` archive (as written by ``numpy.savez``).
    max_bytes : int
        Refuse the archive if its arrays would take more memory than this, in total.

    Returns
    -------
    dict[str, numpy.ndarray]
        One array per member, keyed by the member name without ``.npy``.

    Raises
    ------
    BnfoldError
        If the file is not an ``.npz`` of plain arrays, holds pickled objects, or is too large.
    """
    path = Path(path)
    check_input_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            declared = {member.filename: _check_npz_member(path, archive, member) for member in members}
            total = sum(declared.values())
            if total > max_bytes:
                raise BnfoldError(f"{path}: arrays would take {total} bytes, more than the limit of {max_bytes}")
            arrays = {}
            for member in members:
                with archive.open(member) as handle:
                    arrays[member.filename[: -len(".npy")]] = np.lib.format.read_array(handle, allow_pickle=False)
            return arrays
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
    except Exception as exc:  # zlib.error, EOFError, OSError from a damaged archive
        raise BnfoldError(f"{path}: not a valid .npz file ({type(exc).__name__}: {one_line(exc)})") from None


def _check_npz_member(path: Path, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> int:
    """Check one member's ``.npy`` header without reading its data; return its size in bytes."""
    if not member.filename.endswith(".npy"):
        raise BnfoldError(f"{path}: member '{member.filename}' is not a .npy array")
    with archive.open(member) as handle:
        shape, _, dtype = npy_header(handle)
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
    return declared


def npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``handle``, left at the data's start."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(handle)
    else:  # format 3.0 (utf-8 field names) has no public reader of its own
        shape, fortran, dtype = fmt._read_array_header(handle, version)
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)
