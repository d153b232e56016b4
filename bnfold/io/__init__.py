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
"""

from __future__ import annotations

from bnfold.io.arrays import load_npz
from bnfold.io.atomic import atomic_path
from bnfold.io.models import check_model, load_model
from bnfold.io.writing import check_output_path, save_model, write_json

__all__ = [
    "load_model", "check_model", "save_model", "atomic_path", "load_npz", "check_output_path", "write_json",
]
