"""bnfold.verification: comparison rules, inputs, IR < 4 initializer inputs, limits, bisection.

Models here are tiny hand-built graphs whose outputs are known in closed form (y = x * c), so a
crafted difference in ``c`` gives a known error.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.verification import (
    compare_arrays,
    default_tolerances,
    feed_inputs,
    find_culprits,
    random_inputs,
    verify,
)


def scale_model(c: float, *, dtype: int = TensorProto.FLOAT, outputs: tuple[str, ...] = ("y",),
                ir_version: int | None = None, opset: int = 17, width: int = 3,
                initializer_as_input: bool = False, input_name: str = "x") -> onnx.ModelProto:
    """``out = x * c`` for every name in ``outputs``; ``x`` has shape (N, width)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    const = numpy_helper.from_array(np.full((width,), c, dtype=np_dtype), "c")
    nodes = [helper.make_node("Mul", [input_name, "c"], [name], name=f"mul_{name}") for name in outputs]
    inputs = [helper.make_tensor_value_info(input_name, dtype, ["N", width])]
    if initializer_as_input:
        inputs.append(helper.make_tensor_value_info("c", dtype, [width]))
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(name, dtype, ["N", width]) for name in outputs],
                              initializer=[const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or helper.find_min_ir_version_for(list(model.opset_import))
    return model


def test_default_tolerances_table() -> None:
    assert default_tolerances(np.float64) == (1e-9, 1e-11)
    assert default_tolerances(np.float32) == (1e-4, 1e-6)
    assert default_tolerances(np.float16) == (1e-2, 1e-4)
    assert default_tolerances("bfloat16") == (1e-2, 1e-4)
    assert default_tolerances(np.int64) == (0.0, 0.0)
    assert default_tolerances(np.bool_) == (0.0, 0.0)


def test_verdict_is_scale_aware() -> None:
    a = np.array([1e5, -2e4, 1.0], dtype=np.float32)
    # tol = 1e-6 + 1e-4 * 1e5 = 10.000001: an error of 8 passes, 11 fails.
    assert compare_arrays("y", a, a + np.float32(8)).ok
    assert not compare_arrays("y", a, a + np.float32(11)).ok
    # Elementwise count is information only: the small element exceeds its own bound.
    b = a.copy()
    b[2] += np.float32(1e-3)
    result = compare_arrays("y", a, b)
    assert result.ok and result.n_exceed == 1
    assert result.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert result.scale == 1e5 and result.tol == pytest.approx(1e-6 + 1e-4 * 1e5)


def test_user_tolerances_override() -> None:
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = a + np.float32(1e-3)
    assert not compare_arrays("y", a, b).ok
    assert compare_arrays("y", a, b, rtol=1e-3).ok
    assert compare_arrays("y", a, b, rtol=0.0, atol=2e-3).ok


def test_float64_and_float16_defaults() -> None:
    a = np.array([1.0, 3.0])
    assert compare_arrays("y", a, a * (1 + 5e-10)).ok
    assert not compare_arrays("y", a, a * (1 + 1e-8)).ok
    h = np.array([1.0, 3.0], dtype=np.float16)
    assert compare_arrays("y", h, (h * np.float16(1.002))).ok  # 0.006 <= 1e-4 + 1e-2 * 3
    assert not compare_arrays("y", h, h + np.float16(0.1)).ok


def test_nan_and_inf_rules() -> None:
    a = np.array([np.nan, 1.0, np.inf, -np.inf], dtype=np.float32)
    assert compare_arrays("y", a, a.copy()).ok
    only_one = a.copy()
    only_one[1] = np.nan
    result = compare_arrays("y", a, only_one)
    assert not result.ok and result.nan_mismatch == 1 and result.n_exceed >= 1
    missing = a.copy()
    missing[0] = 0.0
    assert not compare_arrays("y", a, missing).ok
    finite = a.copy()
    finite[2] = 1e30
    result = compare_arrays("y", a, finite)
    # The report must not contradict the verdict: the infinite reference element is the one that
    # exceeds (an elementwise bound rtol * inf would admit anything), with an infinite rel. error.
    assert not result.ok and result.n_exceed == 1 and result.max_rel == np.inf
    sign = a.copy()
    sign[3] = np.inf
    assert compare_arrays("y", a, sign).n_exceed == 1


def test_integer_and_bool_outputs_must_match_exactly() -> None:
    a = np.array([1, 2, 3], dtype=np.int64)
    assert compare_arrays("i", a, a.copy()).ok
    result = compare_arrays("i", a, np.array([1, 2, 4], dtype=np.int64), rtol=1.0, atol=10.0)
    assert not result.ok and result.n_exceed == 1 and result.max_abs == 1.0
    flags = np.array([True, False])
    assert not compare_arrays("b", flags, ~flags).ok


def test_shape_and_dtype_mismatch_fail_with_reason() -> None:
    a = np.zeros((2, 3), dtype=np.float32)
    assert "shape" in compare_arrays("y", a, np.zeros((3, 2), np.float32)).reason
    assert "dtype" in compare_arrays("y", a, np.zeros((2, 3), np.float64)).reason


def test_equivalent_models_pass_and_crafted_mismatch_fails() -> None:
    report = verify(scale_model(2.0), scale_model(2.0 * (1 + 2e-7)), batch=4)
    assert report.ok and report.outputs[0].shape == (4, 3)
    assert report.inputs == {"x": {"dtype": "float32", "shape": [4, 3]}}
    bad = verify(scale_model(2.0), scale_model(2.01), batch=4, seed=3)
    assert not bad.ok
    (out,) = bad.outputs
    # y_ref = 2x, y_cand = 2.01x: |diff| = 0.01 |x| and max|ref| = 2 max|x|, so max_rel = 0.005.
    assert out.max_rel == pytest.approx(0.005, rel=1e-4)
    assert out.max_abs == pytest.approx(0.005 * out.scale, rel=1e-4)
    assert any("NOT equivalent" in line for line in bad.lines())
    assert bad.to_dict()["outputs"][0]["ok"] is False


def test_random_inputs_are_seeded() -> None:
    specs = feed_inputs(scale_model(1.0))
    first = random_inputs(specs, batch=5, rng=np.random.default_rng(7))
    again = random_inputs(specs, batch=5, rng=np.random.default_rng(7))
    other = random_inputs(specs, batch=5, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(first["x"], again["x"])
    assert not np.array_equal(first["x"], other["x"])
    assert first["x"].shape == (5, 3) and first["x"].dtype == np.float32


def test_npz_inputs_are_used_and_validated(tmp_path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3) - 5.0
    path = tmp_path / "inputs.npz"
    np.savez(path, x=x)
    report = verify(scale_model(2.0), scale_model(2.0), path)
    assert report.ok and report.input_source == str(path) and report.inputs["x"]["shape"] == [4, 3]
    # The reference output is 2x: its max magnitude is the scale the verdict used.
    assert report.outputs[0].scale == pytest.approx(2 * np.abs(x).max())
    for arrays, message in (
        ({"z": x}, "not an input"),
        ({}, "no array for model input 'x'"),
        ({"x": x.astype(np.float64)}, "dtype float64"),
        ({"x": x[:, :2]}, r"shape \[4, 2\]"),
        ({"x": x[0]}, r"shape \[3\]"),
    ):
        bad = tmp_path / "bad.npz"
        np.savez(bad, **arrays)
        with pytest.raises(BnfoldError, match=message):
            verify(scale_model(2.0), scale_model(2.0), bad)


def test_ir3_initializer_inputs_are_not_fed() -> None:
    old = scale_model(3.0, ir_version=3, opset=8, initializer_as_input=True)
    new = scale_model(3.0)
    assert [value.name for value in old.graph.input] == ["x", "c"]
    assert [spec.name for spec in feed_inputs(old)] == ["x"]
    report = verify(old, new, batch=2)
    # Had random values been fed to "c", the outputs would differ by far more than tolerance.
    assert report.ok and list(report.inputs) == ["x"]


def test_only_shared_outputs_are_compared() -> None:
    report = verify(scale_model(2.0, outputs=("y", "z")), scale_model(2.0, outputs=("y", "w")))
    assert [item.name for item in report.outputs] == ["y"]
    assert report.only_in_reference == ["z"] and report.only_in_candidate == ["w"]
    with pytest.raises(BnfoldError, match="share no output"):
        verify(scale_model(2.0, outputs=("y",)), scale_model(2.0, outputs=("w",)))


def test_different_inputs_are_refused() -> None:
    with pytest.raises(BnfoldError, match="same inputs"):
        verify(scale_model(2.0), scale_model(2.0, input_name="u"))
    with pytest.raises(BnfoldError, match="float64"):
        verify(scale_model(2.0), scale_model(2.0, dtype=TensorProto.DOUBLE))
    with pytest.raises(BnfoldError, match="shape"):
        verify(scale_model(2.0), scale_model(2.0, width=4))


def test_memory_cap_refuses_before_allocating() -> None:
    # (1e9, 3) float32 inputs are 12 GB: refused from the shapes alone, before any allocation.
    with pytest.raises(BnfoldError, match=r"ref.onnx: .*'x' \[1000000000, 3\].*lower --batch or raise --max-memory"):
        verify(scale_model(2.0), scale_model(2.0), batch=10**9, names=("ref.onnx", "cand.onnx"))
    with pytest.raises(BnfoldError, match="limit 100 B"):
        verify(scale_model(2.0), scale_model(2.0), batch=10, max_bytes=100)
    assert verify(scale_model(2.0), scale_model(2.0), batch=10, max_bytes=10**6).ok


@pytest.mark.parametrize("kwargs", [{"threads": 0}, {"batch": 0}, {"rtol": -1.0}, {"atol": math.nan}])
def test_bad_options(kwargs) -> None:
    with pytest.raises(BnfoldError):
        verify(scale_model(2.0), scale_model(2.0), **kwargs)


def test_model_rejected_by_onnxruntime_names_the_file(tmp_path) -> None:
    broken = scale_model(2.0)
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BnfoldError, match=r"candidate model: onnxruntime cannot load the model: .*NoSuchOp"):
        verify(scale_model(2.0), broken)
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken.SerializeToString())
    with pytest.raises(BnfoldError, match="broken.onnx") as info:
        verify(scale_model(2.0), path)
    assert "\n" not in str(info.value)


def test_paths_are_loaded(tmp_path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(scale_model(2.0), a)
    onnx.save(scale_model(2.0), b)
    report = verify(a, b)
    assert report.ok and report.reference == str(a) and report.candidate == str(b)
    with pytest.raises(BnfoldError, match="no such file|does not exist|not found"):
        verify(a, tmp_path / "missing.onnx")


def test_find_culprits_isolates_independent_failures() -> None:
    items = [f"bn{i}" for i in range(11)]
    bad = {"bn2", "bn9"}
    calls = []

    def fails(subset: frozenset[str]) -> bool:
        calls.append(subset)
        return bool(subset & bad)

    assert find_culprits(items, fails) == ["bn2", "bn9"]
    assert len(calls) < len(items) * 2
    assert find_culprits(items, lambda subset: False) == []


def test_find_culprits_blames_an_interacting_group() -> None:
    items = ["a", "b", "c", "d"]
    # Fails only when both "a" and "d" are applied: neither half fails alone.
    culprits = find_culprits(items, lambda subset: {"a", "d"} <= subset)
    assert {"a", "d"} <= set(culprits)


def test_float16_models_use_float16_tolerances() -> None:
    # float16 carries about 3 decimal digits: a 0.2 % change in c passes rtol 1e-2, 5 % does not.
    reference = scale_model(2.0, dtype=TensorProto.FLOAT16)
    close = verify(reference, scale_model(2.004, dtype=TensorProto.FLOAT16), batch=8)
    assert close.ok and close.outputs[0].dtype == "float16" and close.outputs[0].rtol == 1e-2
    assert not verify(reference, scale_model(2.1, dtype=TensorProto.FLOAT16), batch=8).ok
