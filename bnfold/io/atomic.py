"""Atomic file replacement: write beside the target, flush, ``os.replace``.

An error or an interrupt (including ``KeyboardInterrupt``) at any point leaves the previous file
intact and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from bnfold.errors import BnfoldError
from bnfold.io.files import resolved

__all__ = ["atomic_path"]


def _default_mode(existing: Path) -> int:
    try:
        return stat.S_IMODE(existing.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, final_name: Callable[[], str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it onto `path` only if the block succeeds.

    Write the complete content to the yielded path inside the ``with`` block. On success it is
    flushed to disk (``fsync``) and renamed onto `path` in one step (``os.replace``; a symbolic
    link at `path` is replaced, never followed). On any exception, including
    ``KeyboardInterrupt``, the temporary file is removed and `path` keeps its previous content.
    The new file gets the previous file's permissions, or ``0o666 & ~umask`` like a new file.

    ``final_name``: called after the block, it names the file to create in `path`'s folder
    instead of `path` (for a name that depends on what was written, e.g. a content hash).

    Raises
    ------
    BnfoldError
        If the folder cannot hold a new file or the rename fails (``OSError``, named).
    """
    path = Path(path)
    parent = resolved(path).parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise BnfoldError(f"{path}: cannot write in {parent} ({exc.strerror or exc})") from None
    tmp_path = Path(tmp)
    try:
        os.close(fd)
        yield tmp_path
        if final_name is not None:
            path = path.with_name(final_name())
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
