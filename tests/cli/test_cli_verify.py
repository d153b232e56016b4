"""`bnfold verify A B`: exit 0 when equivalent, 1 when not, 2 on errors; per-output lines; --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.testing import run_cli as bnfold_cli


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    return lines[0]


def save_scale(path: Path, c: float, output: str = "y") -> Path:
    """``output = x * c`` for x of shape (N, 3), float32."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], [output])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(np.full(3, c, np.float32), "c")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": save_scale(tmp_path / "a.onnx", 2.0),
        "same": save_scale(tmp_path / "same.onnx", 2.0),
        "off": save_scale(tmp_path / "off.onnx", 2.5),
        "other_output": save_scale(tmp_path / "z.onnx", 2.0, output="z"),
    }


def test_equivalent_exit_0_with_per_output_lines(models) -> None:
    code, stdout, stderr = bnfold_cli("verify", models["a"], models["same"], "--batch", 3)
    assert code == 0, stderr
    assert "output 'y' (float32, 3x3): max abs error 0 <= tol" in stdout
    assert stdout.strip().splitlines()[-1].startswith("equivalent: 1 tensor within tolerance")


def test_different_exit_1(models) -> None:
    code, stdout, stderr = bnfold_cli("verify", models["a"], models["off"])
    assert code == 1
    assert "FAILED" in stdout and "NOT equivalent" in stdout
    assert "not equivalent" in one_line_error(stderr)


def test_tolerance_options(models) -> None:
    # y differs by 0.5 x, i.e. 20 % of max|ref| = 2 max|x|: within rtol 0.3, not within 0.1.
    assert bnfold_cli("verify", models["a"], models["off"], "--rtol", "0.3")[0] == 0
    assert bnfold_cli("verify", models["a"], models["off"], "--rtol", "0.1")[0] == 1


def test_json_report(models, tmp_path: Path) -> None:
    report_path = tmp_path / "r.json"
    code, _, _ = bnfold_cli("verify", models["a"], models["off"], "--json", report_path, "--seed", 4)
    assert code == 1
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["seed"] == 4
    assert report["graph_optimizations"] == "disabled"
    (output,) = report["outputs"]
    assert output["name"] == "y" and output["ok"] is False and output["max_abs"] > output["tol"]


def test_npz_inputs(models, tmp_path: Path) -> None:
    data = tmp_path / "in.npz"
    np.savez(data, x=np.ones((5, 3), np.float32))
    code, stdout, stderr = bnfold_cli("verify", models["a"], models["same"], "--inputs", data)
    assert code == 0, stderr
    assert "5x3" in stdout
    np.savez(data, x=np.ones((5, 3), np.float64))
    code, _, stderr = bnfold_cli("verify", models["a"], models["same"], "--inputs", data)
    assert code == 2 and "float64" in one_line_error(stderr)


@pytest.mark.parametrize("case", ["missing", "no_shared_output", "bad_threads", "memory", "json_folder"])
def test_errors_exit_2(models, tmp_path: Path, case: str) -> None:
    args = {
        "missing": ("verify", models["a"], tmp_path / "missing.onnx"),
        "no_shared_output": ("verify", models["a"], models["other_output"]),
        "bad_threads": ("verify", models["a"], models["same"], "--threads", "0"),
        "memory": ("verify", models["a"], models["same"], "--batch", "1000000", "--max-memory", "1KiB"),
        "json_folder": ("verify", models["a"], models["same"], "--json", tmp_path / "no" / "r.json"),
    }[case]
    code, _, stderr = bnfold_cli(*args)
    assert code == 2
    one_line_error(stderr)


def test_subprocess_exit_codes(models) -> None:
    def run(*args):
        return subprocess.run([sys.executable, "-m", "bnfold", "verify", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    assert run(models["a"], models["same"]).returncode == 0
    failed = run(models["a"], models["off"])
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    broken = run(models["a"], Path(models["a"]).with_name("nothing.onnx"))
    assert broken.returncode == 2 and one_line_error(broken.stderr)
