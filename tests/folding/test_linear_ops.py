"""`bnfold.folding.linear_ops`: the table's axes agree with what onnxruntime computes.

For each op, scaling the weight's output channel ``k`` (through `WeightLayout.output_view`) must
change output channel ``k`` of the node's output and nothing else; scaling input channel ``k``
must act like scaling channel ``k`` of the data. onnxruntime runs the nodes: the reference is the
runtime's reading of the ONNX spec, not bnfold's.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding.linear_ops import LINEAR_OPS, linear_op
from bnfold.runtime import run, session

F32 = TensorProto.FLOAT

# op, attributes, data shape, weight shape
CASES = {
    "conv": ("Conv", {}, (2, 4, 5, 5), (6, 4, 3, 3)),
    "conv-group": ("Conv", {"group": 2}, (2, 4, 5, 5), (6, 2, 3, 3)),
    "convtranspose": ("ConvTranspose", {}, (2, 4, 3), (4, 6, 2)),
    "convtranspose-group": ("ConvTranspose", {"group": 2}, (2, 4, 3, 3), (4, 3, 2, 2)),
    "gemm": ("Gemm", {}, (3, 4), (4, 5)),
    "gemm-transB": ("Gemm", {"transB": 1, "alpha": 0.5}, (3, 4), (5, 4)),
    "matmul": ("MatMul", {}, (3, 4), (4, 5)),
}


def _run(op_type, attrs, x, w):
    node = helper.make_node(op_type, ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", F32, x.shape)],
                              [helper.make_tensor_value_info("y", F32, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (y,) = run(session(model, op_type), ["y"], {"x": x}, op_type)
    return y, node


def _channel(y, axis, k):
    return np.take(y, k, axis=axis)


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_channel_axis(case):
    op_type, attrs, x_shape, w_shape = CASES[case]
    rng = np.random.default_rng(len(case))
    x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    y, node = _run(op_type, attrs, x, w)
    op = LINEAR_OPS[op_type]
    layout = op.layout(node)
    view, axis, restore = layout.output_view(w)
    channels = layout.output_channels(w.shape)
    assert view.shape[axis] == channels == y.shape[op.output_axis]
    k = channels - 1
    factor = np.ones(channels, np.float32)
    factor[k] = 2.0  # exact in float32: the scaled channel doubles bit for bit
    shape = [1] * view.ndim
    shape[axis] = -1
    y2, _ = _run(op_type, attrs, x, np.ascontiguousarray(restore(view * factor.reshape(shape))))
    out_axis = op.output_axis % y.ndim
    np.testing.assert_array_equal(_channel(y2, out_axis, k), 2 * _channel(y, out_axis, k))
    others = [i for i in range(channels) if i != k]
    np.testing.assert_array_equal(np.take(y2, others, axis=out_axis), np.take(y, others, axis=out_axis))


@pytest.mark.parametrize("case", ["conv", "conv-group", "gemm", "gemm-transB", "matmul"])
def test_input_channel_axis(case):
    op_type, attrs, x_shape, w_shape = CASES[case]
    rng = np.random.default_rng(7 + len(case))
    x, w = rng.standard_normal(x_shape).astype(np.float32), rng.standard_normal(w_shape).astype(np.float32)
    layout = LINEAR_OPS[op_type].layout(_run(op_type, attrs, x, w)[1])
    assert layout.input_channels(w.shape) == x_shape[1]
    # Doubling the weight's input channel 0 equals doubling channel 0 of the data. With groups,
    # the weight's input channel 0 is the first channel of every group: only group 0's output
    # channels read data channel 0.
    w2 = w.copy()
    select = [slice(None)] * w.ndim
    select[layout.in_axis] = 0
    if layout.grouped == "in":
        select[layout.out_axis] = slice(0, w.shape[layout.out_axis] // layout.groups)
    w2[tuple(select)] *= 2
    x2 = x.copy()
    x2[:, 0] *= 2
    np.testing.assert_array_equal(_run(op_type, attrs, x, w2)[0], _run(op_type, attrs, x2, w)[0])


def test_rebuild():
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="c", group=2)
    new = LINEAR_OPS["Conv"].rebuild(conv, data="x2", weight="w2", bias="b2", outputs=["z"])
    assert (list(new.input), list(new.output), new.name) == (["x2", "w2", "b2"], ["z"], "c")
    assert [a.name for a in new.attribute] == ["group"] and list(conv.input) == ["x", "w", "b"]
    gemm = helper.make_node("Gemm", ["x", "w", "c"], ["y"], alpha=2.0, beta=3.0, transB=1)
    new = LINEAR_OPS["Gemm"].rebuild(gemm, data="x", weight="w2", bias="c2", outputs=["y"], absorbed=("alpha", "beta"))
    assert [a.name for a in new.attribute] == ["transB"]
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm", doc_string="dense")
    new = LINEAR_OPS["MatMul"].rebuild(matmul, data="x", weight="w2", bias="b2", outputs=["z"])
    assert (new.op_type, new.name, new.doc_string, list(new.input)) == ("Gemm", "mm", "dense", ["x", "w2", "b2"])


def test_only_default_domain_ops_are_linear():
    assert linear_op(helper.make_node("Conv", ["x", "w"], ["y"])) is LINEAR_OPS["Conv"]
    assert linear_op(helper.make_node("Conv", ["x", "w"], ["y"], domain="com.example")) is None
    assert linear_op(helper.make_node("Relu", ["x"], ["y"])) is None
