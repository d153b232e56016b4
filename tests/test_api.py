"""The public names of `bnfold` work after ``import bnfold`` in any import order, any number of times.

Each case runs in a fresh interpreter: the failure this guards against (a submodule import
replacing a public function of the same name) depends on what was imported before.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import bnfold

SUBMODULES = ["bnfold.folding", "bnfold.verification", "bnfold.conversion", "bnfold.testing",
              "bnfold.export", "bnfold.nn.training", "bnfold.nn.checkpoint", "bnfold.cli", "bnfold.diagnosis",
              "bnfold.cli.inspect", "bnfold.recalibration", "bnfold.cli.recalibrate"]

CHECK = """
import bnfold, types
for name in ("fold", "verify", "convert", "inspect", "recalibrate", "export_onnx", "BatchNorm"):
    value = getattr(bnfold, name)
    assert callable(value) and not isinstance(value, types.ModuleType), (name, value)
assert isinstance(bnfold.nn, types.ModuleType)
for name in ("train", "recompute_statistics", "load_checkpoint", "save_checkpoint", "load_digits"):
    value = getattr(bnfold.nn, name)
    assert callable(value) and not isinstance(value, types.ModuleType), (name, value)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("first", SUBMODULES)
def test_public_names_survive_any_submodule_import(first):
    result = _run(f"import {first}\n{CHECK}\n{CHECK}\nimport bnfold.folding, bnfold.verification\n{CHECK}")
    assert result.returncode == 0, result.stderr


def test_testing_import_keeps_verify_callable():
    result = _run(f"from bnfold.testing import assert_equivalent\n{CHECK}")
    assert result.returncode == 0, result.stderr


def test_nn_names_without_importing_nn_first():
    result = _run("import bnfold\nassert callable(bnfold.nn.load_checkpoint)\nassert callable(bnfold.nn.train)")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", ["bnfold.fold", "bnfold.verify", "bnfold.inspect", "bnfold.nn.train", "bnfold.recalibrate"])
def test_no_module_is_named_like_a_public_function(module):
    result = _run(f"import {module}")
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr


def test_import_bnfold_stays_light():
    result = _run("import bnfold, sys\nassert 'onnxruntime' not in sys.modules and 'onnx' not in sys.modules")
    assert result.returncode == 0, result.stderr


def test_every_public_name_is_listed_and_resolves():
    for name in bnfold.__all__:
        assert getattr(bnfold, name) is not None
    assert set(bnfold.__all__) <= set(dir(bnfold))
    with pytest.raises(AttributeError):
        bnfold.no_such_name  # noqa: B018
