"""bnfold.runtime: sessions without graph optimizations, intermediate tensors exposed as outputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.runtime import expose, feed_inputs, random_inputs, run, session


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
