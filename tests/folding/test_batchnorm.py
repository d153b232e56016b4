"""`bnfold.folding.batchnorm`: BN parameters read as (C,) arrays, invalid ones refused."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding.batchnorm import read_batchnorm, validate_batchnorm
from bnfold.folding.context import FoldOptions, ModelContext
from bnfold.folding.index import GraphIndex
from bnfold.folding.patterns import Skip
from bnfold.folding.report import FoldReport


def _bn(var=(1.0, 2.0), eps=1e-3, gamma=(1.0, -2.0), runtime_var=False, x_channels=2):
    names = ["g", "b", "m", "v"]
    values = [np.asarray(gamma, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32),
              np.asarray(var, np.float32)]
    inits = [numpy_helper.from_array(v, n) for n, v in zip(names, values) if not (runtime_var and n == "v")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", x_channels])]
    if runtime_var:
        inputs.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [2]))
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"], name="bn", epsilon=eps)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return node, GraphIndex.for_graph(model.graph, ModelContext(model, FoldOptions(), FoldReport()))


def test_read_gives_the_affine_map():
    node, index = _bn()
    params = read_batchnorm(node, index)
    assert params.channels == 2 and params.eps == pytest.approx(1e-3)
    assert params.names == {"scale": "g", "bias": "b", "mean": "m", "var": "v"}
    scale, shift = params.affine()
    # Closed form: s = gamma / sqrt(var + eps), t = beta - mean * s, in float64.
    expected = np.array([1.0, -2.0]) / np.sqrt(np.array([1.0, 2.0]) + np.float64(np.float32(1e-3)))
    np.testing.assert_allclose(scale, expected, rtol=1e-15)
    np.testing.assert_allclose(shift, -expected, rtol=1e-15)


def test_runtime_parameters_are_a_skip_not_an_error():
    node, index = _bn(runtime_var=True)
    validate_batchnorm(node, index)  # unknown until run time: nothing to refuse
    skip = read_batchnorm(node, index)
    assert isinstance(skip, Skip)
    assert skip.reason == "BN var is not constant: 'v' is a graph input (computed at run time)"


@pytest.mark.parametrize(("kwargs", "phrase"), [
    ({"var": (1.0, -1.0)}, "variance 'v' channel 1 is -1.0"),
    ({"var": (1.0, np.inf)}, "channel 1 is inf"),
    ({"var": (0.0, 1.0), "eps": 0.0}, "channel 0 is 0.0"),
    ({"eps": -1.0}, "epsilon is -1, must be >= 0"),
    ({"x_channels": 3}, "2 values for the 3 channels of input 'x'"),
])
def test_invalid_parameters_are_refused(kwargs, phrase):
    node, index = _bn(**kwargs)
    with pytest.raises(BnfoldError, match="BatchNormalization 'bn' in main") as raised:
        validate_batchnorm(node, index)
    assert phrase in str(raised.value)


def test_valid_parameters_pass():
    node, index = _bn(var=(0.0, 1.0), eps=1e-5)  # zero variance is fine with eps > 0
    validate_batchnorm(node, index)
