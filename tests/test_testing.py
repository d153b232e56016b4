"""bnfold.testing.assert_equivalent: passes silently on equivalent models, fails with the report."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.testing import assert_equivalent


def affine(c: float, d: float) -> onnx.ModelProto:
    """``y = x * c + d`` on x of shape (N, 4), float32."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "c"], ["t"]), helper.make_node("Add", ["t", "d"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(np.full(4, c, np.float32), "c"),
                     numpy_helper.from_array(np.full(4, d, np.float32), "d")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_equivalent_models_return_the_report() -> None:
    report = assert_equivalent(affine(2.0, 1.0), affine(2.0, 1.0), batch=3)
    assert report.ok and report.outputs[0].max_abs == 0.0


def test_different_models_raise_assertion_with_report_lines() -> None:
    with pytest.raises(AssertionError) as info:
        assert_equivalent(affine(2.0, 1.0), affine(2.0, 1.5))
    text = str(info.value)
    assert "output 'y'" in text and "FAILED" in text and "NOT equivalent" in text


def test_options_pass_through() -> None:
    x = {"x": np.ones((2, 4), np.float32)}
    # |diff| = 0.01 and max|ref| = 3: within rtol 1e-2 (tol 0.03), not within the default 1e-4.
    assert_equivalent(affine(2.0, 1.0), affine(2.0, 1.01), x, rtol=1e-2)
    with pytest.raises(AssertionError):
        assert_equivalent(affine(2.0, 1.0), affine(2.0, 1.01), x)


def test_incomparable_models_raise_bnfold_error() -> None:
    other = affine(2.0, 1.0)
    other.graph.output[0].name = "z"
    other.graph.node[1].output[0] = "z"
    with pytest.raises(BnfoldError, match="share no output"):
        assert_equivalent(affine(2.0, 1.0), other)


def test_run_cli_returns_exit_code_and_both_streams(tmp_path):
    from bnfold import __version__
    from bnfold.testing import run_cli

    code, stdout, stderr = run_cli("--version")
    assert code == 0 and __version__ in stdout and stderr == ""
    code, stdout, stderr = run_cli("convert", tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx")
    assert code == 2 and stdout == "" and stderr.startswith("bnfold: error: ")
