"""Reading and writing models and arrays safely.

- `load_model` / `check_model` (`bnfold.io.models`): validated loading; never a model that is
  too new, malformed, or whose names are not UTF-8; the ``onnx.checker`` message quoted.
- External tensor data (`bnfold.io.external`): read only from regular files inside the model's
  folder (no absolute path, no ``..``, no symbolic link leading out), sizes checked first.
- `atomic_path` (`bnfold.io.atomic`): every output goes to a temporary file beside the target
  and is moved into place with ``os.replace``; nothing is left behind on any error or interrupt.
- `check_output_path` / `save_model` (`bnfold.io.writing`): no output over an input (or its
  external data), no surprise overwrite; large models keep a consistent data file;
  `write_json` writes reports the same atomic way.
- `load_npz` (`bnfold.io.arrays`): arrays without ever unpickling.

Every user-facing failure is a `BnfoldError` with a one-line message naming the file.

The names resolve on first use: the training side (`bnfold.nn`) loads its ``.npz`` files and writes
its checkpoints through `load_npz` and `atomic_path`, and must not pull in onnx and protobuf for
that. Only `bnfold.io.models` and `bnfold.io.writing` (and `bnfold.io.external`) import onnx.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bnfold.io.arrays import load_npz
    from bnfold.io.atomic import atomic_path
    from bnfold.io.models import check_model, load_model
    from bnfold.io.writing import check_output_path, save_model, write_json

__all__ = [
    "load_model", "check_model", "save_model", "atomic_path", "load_npz", "check_output_path", "write_json",
]

# Public name -> the module defining it; none of these modules is named like a function.
_LAZY = {
    "load_npz": "bnfold.io.arrays",
    "atomic_path": "bnfold.io.atomic",
    "load_model": "bnfold.io.models",
    "check_model": "bnfold.io.models",
    "save_model": "bnfold.io.writing",
    "check_output_path": "bnfold.io.writing",
    "write_json": "bnfold.io.writing",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.io' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
