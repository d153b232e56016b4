"""`bnfold export CHECKPOINT -o OUT`: unfolded and folded exports, opsets, overwrite, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.export import export_onnx, max_opset
from bnfold.nn.batchnorm import BatchNorm
from bnfold.nn.checkpoint import save_checkpoint
from bnfold.nn.layers import Dense, ReLU
from bnfold.nn.model import Sequential
from bnfold.testing import run_cli as bnfold_cli


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    return lines[0]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    bn = BatchNorm(8)
    bn.moving_mean = rng.normal(size=8)
    bn.moving_var = rng.uniform(0.5, 2.0, 8)
    path = tmp_path / "model.npz"
    save_checkpoint(Sequential([Dense(6, 8, use_bias=False, rng=rng), bn, ReLU(), Dense(8, 3, rng=rng)]), path)
    return path


def test_export_unfolded_matches_python_api(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    code, stdout, stderr = bnfold_cli("export", checkpoint, "-o", out)
    assert code == 0, stderr
    assert "opset 17" in stdout
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert model.SerializeToString() == export_onnx(checkpoint).SerializeToString()
    assert [node.op_type for node in model.graph.node] == ["MatMul", "BatchNormalization", "Relu", "Gemm"]


def test_export_folded_and_opsets(checkpoint: Path, tmp_path: Path) -> None:
    for opset in (9, max_opset()):
        out = tmp_path / f"f{opset}.onnx"
        code, _, stderr = bnfold_cli("export", checkpoint, "-o", out, "--fold", "--opset", opset)
        assert code == 0, stderr
        model = onnx.load(out)
        assert model.opset_import[0].version == opset
        assert [node.op_type for node in model.graph.node] == ["Gemm", "Relu", "Gemm"]


def test_overwrite_needs_force(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert bnfold_cli("export", checkpoint, "-o", out)[0] == 0
    code, _, stderr = bnfold_cli("export", checkpoint, "-o", out)
    assert code == 2 and "already exists" in one_line_error(stderr)
    assert bnfold_cli("export", checkpoint, "-o", out, "--force")[0] == 0


@pytest.mark.parametrize("case", ["missing", "opset", "same_file", "not_checkpoint"])
def test_bad_input_exit_2(checkpoint: Path, tmp_path: Path, case: str) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    args = {
        "missing": ("export", tmp_path / "none.npz", "-o", tmp_path / "m.onnx"),
        "opset": ("export", checkpoint, "-o", tmp_path / "m.onnx", "--opset", "8"),
        "same_file": ("export", checkpoint, "-o", checkpoint, "--force"),
        "not_checkpoint": ("export", junk, "-o", tmp_path / "m.onnx"),
    }[case]
    before = checkpoint.read_bytes()
    code, _, stderr = bnfold_cli(*args)
    assert code == 2
    one_line_error(stderr)
    assert checkpoint.read_bytes() == before
    assert not (tmp_path / "m.onnx").exists()
