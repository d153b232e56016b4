"""bnfold.runtime: sessions without graph optimizations, intermediate tensors exposed as outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.runtime import (
    check_deterministic,
    computed_tensors,
    expose,
    feed_inputs,
    first_nondeterministic,
    random_inputs,
    run,
    session,
    within_tolerance,
)


def _model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.array([[2.0, -1.0], [0.5, 3.0]], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_expose_returns_intermediate_tensor_and_leaves_model_alone():
    model = _model()
    before = model.SerializeToString()
    exposed = expose(model, ["h", "y"])
    assert model.SerializeToString() == before
    assert [value.name for value in exposed.graph.output] == ["y", "h"]
    x = np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32)
    y, h = run(session(exposed, "m"), ["y", "h"], {"x": x}, "m")
    expected_h = x @ np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
    np.testing.assert_array_equal(h, expected_h)
    np.testing.assert_array_equal(y, np.maximum(expected_h, 0))


def test_feed_inputs_and_random_inputs_follow_symbolic_batch():
    specs = feed_inputs(_model())
    assert [(spec.name, spec.dims) for spec in specs] == [("x", ("n", 2))]
    arrays = random_inputs(specs, batch=5, rng=np.random.default_rng(0))
    assert arrays["x"].shape == (5, 2) and arrays["x"].dtype == np.float32


def test_run_failure_is_one_line_error():
    sess = session(_model(), "m")
    with pytest.raises(BnfoldError, match="^m: onnxruntime failed to run the model: "):
        run(sess, ["y"], {"x": np.zeros((2, 3), np.float32)}, "m")


def _dropout_model(training: bool) -> onnx.ModelProto:
    """x -> Relu -> Dropout(ratio 0.5, training_mode) -> Mul by 2."""
    ratio = numpy_helper.from_array(np.array(0.5, np.float32), "ratio")
    mode = numpy_helper.from_array(np.array(training), "training_mode")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Dropout", ["r", "ratio", "training_mode"], ["d"]),
            helper.make_node("Mul", ["d", "two"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
        [ratio, mode, two],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_first_nondeterministic_names_the_dropout_output_in_training_mode():
    model = _dropout_model(training=True)
    names = computed_tensors(model)
    assert names == ["r", "d", "y"]
    feeds = {"x": np.abs(np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32) + 0.1}
    sess = session(expose(model, names), "m")
    assert first_nondeterministic(sess, names, feeds, "m") == "d"
    with pytest.raises(BnfoldError, match=r"^m is not deterministic: two runs on the same input differ at 'd' "
                                          r"\(Dropout or random ops in training mode\? export in inference mode\)$"):
        check_deterministic(sess, names, feeds, "m", groups=[["r"], ["d", "y"]])


def test_first_nondeterministic_is_none_in_inference_mode():
    model = _dropout_model(training=False)
    names = computed_tensors(model)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)}
    sess = session(expose(model, names), "m")
    assert first_nondeterministic(sess, names, feeds, "m") is None
    check_deterministic(sess, names, feeds, "m")


def test_computed_tensors_sorts_an_unsorted_graph():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    assert computed_tensors(helper.make_model(graph)) == ["h", "y"]


def test_within_tolerance_uses_the_scale_aware_bound():
    a = np.array([1000.0, 1.0], np.float32)
    assert within_tolerance(a, a + np.float32(0.05))  # 0.05 <= 1e-6 + 1e-4 * 1000
    assert not within_tolerance(a, a + np.float32(0.2))
    assert not within_tolerance(np.array([np.nan, 1.0]), np.array([1.0, 1.0]))
    assert within_tolerance(np.array([np.nan, np.inf]), np.array([np.nan, np.inf]))
    assert not within_tolerance(np.array([3], np.int64), np.array([4], np.int64))
