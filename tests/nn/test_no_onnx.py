"""The training side never imports onnx or protobuf: loading data, training and checkpoints need NumPy only."""

from __future__ import annotations

import subprocess
import sys

import pytest

_TRAIN_AND_SAVE = """
import sys
from pathlib import Path
import numpy as np
import bnfold
from bnfold.io import atomic_path, load_npz
from bnfold.nn import load_checkpoint, load_digits, save_checkpoint
from bnfold.nn.model import build_mlp
from bnfold.nn.optim import SGD
from bnfold.nn.training import train_epoch

folder = Path(sys.argv[1])
digits = load_digits()
rng = np.random.default_rng(0)
model = build_mlp((8,), rng=rng)
train_epoch(model, digits.x_train[:64], digits.y_train[:64], optimizer=SGD(model, lr=0.1), batch_size=16, rng=rng)
path = save_checkpoint(model, folder / "m.npz")
load_checkpoint(path)
np.savez(folder / "a.npz", x=np.arange(3))
assert load_npz(folder / "a.npz")["x"].tolist() == [0, 1, 2]
"""


def _modules_after(script: str, folder) -> set[str]:
    code = script + "\nprint(' '.join(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_training_and_checkpoints_import_no_onnx(tmp_path):
    modules = _modules_after(_TRAIN_AND_SAVE, tmp_path)
    assert "bnfold.nn.checkpoint" in modules and "bnfold.io.arrays" in modules  # the paths under test ran
    assert "onnx" not in modules
    assert not any(name == "google.protobuf" or name.startswith("google.protobuf.") for name in modules)


@pytest.mark.parametrize("name", ["load_model", "save_model", "check_output_path"])
def test_model_io_still_imports_onnx(tmp_path, name):
    # The healthy counterpart: the check above would see onnx if the io side pulled it in.
    modules = _modules_after(f"import sys\nfrom bnfold.io import {name}\n", tmp_path)
    assert "onnx" in modules
