"""Linear producer -> BatchNormalization folds, checked against onnxruntime (optimizations off).

Each case asserts: how many BNs were folded, that none is left, that the full ONNX checker
passes, that outputs match the unfolded model within the float32 rounding bound documented in
conftest.RTOL, and that folding again changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper


def _conv_model(fk, rng, *, op="Conv", dims=2, c_in=4, c_out=6, group=1, bias=True, kernel=3, strides=1,
                pads=1, dilations=1, elem_type=None, opset=17, output_padding=0):
    elem_type = elem_type or fk.F32
    spatial = [7, 6, 5][:dims]
    if op == "Conv":
        w_shape = (c_out, c_in // group, *[kernel] * dims)
    else:  # ConvTranspose: (C_in, C_out/group, k...)
        w_shape = (c_in, c_out // group, *[kernel] * dims)
    inits = [fk.init("conv.weight", rng.standard_normal(w_shape) * 0.3, elem_type)]
    inputs = ["x", "conv.weight"]
    if bias:
        inits.append(fk.init("conv.bias", rng.standard_normal(c_out), elem_type))
        inputs.append("conv.bias")
    attrs = dict(group=group, kernel_shape=[kernel] * dims, strides=[strides] * dims,
                 pads=[pads] * (2 * dims), dilations=[dilations] * dims)
    if op == "ConvTranspose" and output_padding:
        attrs["output_padding"] = [output_padding] * dims
    conv = helper.make_node(op, inputs, ["z"], name="conv", **attrs)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, c_out, elem_type)
    return fk.model([conv, bn], [fk.vi("x", elem_type, ["N", c_in, *spatial])], [fk.vi("y", elem_type, dims + 2)],
                    inits + bn_inits, opset=opset)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_conv_bn(fk, dims, bias, group):
    rng = np.random.default_rng(dims * 10 + group)
    m = _conv_model(fk, rng, dims=dims, bias=bias, group=group, strides=2 if dims == 2 else 1,
                    dilations=2 if dims == 1 else 1)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    (entry,) = report.entries
    assert (entry.status, entry.into) == ("folded", "conv")
    conv = out.graph.node[0]
    assert conv.name == "conv" and conv.op_type == "Conv" and conv.output[0] == "y" and len(conv.input) == 3
    # Each original maps to every new tensor computed from it: var scales the weight and the bias.
    assert entry.tensor_map["conv.weight"] == [conv.input[1]]
    assert entry.tensor_map["bn.mean"] == [conv.input[2]]
    assert entry.tensor_map["bn.var"] == [conv.input[1], conv.input[2]]
    # The original weight is unused and removed, no dangling initializers.
    assert {t.name for t in out.graph.initializer} == {conv.input[1], conv.input[2]}


def test_depthwise_conv_bn(fk):
    rng = np.random.default_rng(1)
    m = _conv_model(fk, rng, c_in=6, c_out=6, group=6)
    fk.fold_and_check(m, folded=1, rng=rng)


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_transpose_bn(fk, group, dims):
    rng = np.random.default_rng(group + 7 * dims)
    m = _conv_model(fk, rng, op="ConvTranspose", c_in=6, c_out=9 if group == 3 else 6, group=group,
                    dims=dims, strides=2, output_padding=1, bias=group != 2)
    fk.fold_and_check(m, folded=1, rng=rng)


def test_conv_transpose_group_channel_layout(fk):
    """Output channel o = g*(C_out/group) + j reads weight[g*(C_in/group):(g+1)*(C_in/group), j]:
    with one BN scale per output channel, each weight block must be scaled by its own channel's
    scale, checked here element by element against that closed form."""
    from onnx import numpy_helper

    from bnfold.folding import fold

    rng = np.random.default_rng(3)
    group, c_in, c_out = 2, 4, 6
    m = _conv_model(fk, rng, op="ConvTranspose", c_in=c_in, c_out=c_out, group=group, bias=False)
    out, _ = fold(m)
    w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "conv.weight")).astype(np.float64)
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    s = p["bn.scale"] / np.sqrt(p["bn.var"] + 1e-5)
    w_new = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1]))
    per_group_in, per_group_out = c_in // group, c_out // group
    for o in range(c_out):
        g, j = divmod(o, per_group_out)
        rows = slice(g * per_group_in, (g + 1) * per_group_in)
        np.testing.assert_allclose(w_new[rows, j], (w[rows, j] * s[o]).astype(np.float32), rtol=0, atol=0)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.25)])
@pytest.mark.parametrize("c_shape", [None, (), (1,), (5,), (1, 5), (3, 1), (3, 5)])
def test_gemm_bn(fk, trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(11)
    k, n, m_rows = 4, 5, 3
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    inits = [fk.init("fc.weight", w, fk.F32)]
    inputs = ["x", "fc.weight"]
    if c_shape is not None:
        inits.append(fk.init("fc.bias", rng.standard_normal(c_shape), fk.F32))
        inputs.append("fc.bias")
    gemm = helper.make_node("Gemm", inputs, ["z"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, n)
    # (M, N) and (M, 1) biases fix the batch size M.
    batch = m_rows if c_shape is not None and len(c_shape) == 2 else "N"
    m = fk.model([gemm, bn], [fk.vi("x", fk.F32, [batch, k])], [fk.vi("y", fk.F32, 2)], inits + bn_inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng, batch=m_rows)
    (new,) = out.graph.node
    assert new.op_type == "Gemm" and new.name == "fc"
    assert {a.name for a in new.attribute} <= {"transA", "transB"}  # alpha = beta = 1 (defaults)


def test_gemm_trans_a(fk):
    rng = np.random.default_rng(12)
    inits = [fk.init("w", rng.standard_normal((4, 5)), fk.F32)]
    gemm = helper.make_node("Gemm", ["x", "w"], ["z"], name="fc", transA=1, alpha=0.7)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 5)
    m = fk.model([gemm, bn], [fk.vi("x", fk.F32, [4, 3])], [fk.vi("y", fk.F32, 2)], inits + bn_inits)
    fk.fold_and_check(m, folded=1, rng=rng)


@pytest.mark.parametrize("bias_shape,bias_first", [
    (None, False), ((5,), False), ((1, 5), False), ((), False), ((5,), True), ((1, 5), True),
])
def test_matmul_add_bn(fk, bias_shape, bias_first):
    rng = np.random.default_rng(13)
    inits = [fk.init("dense.kernel", rng.standard_normal((4, 5)), fk.F32)]
    nodes = [helper.make_node("MatMul", ["x", "dense.kernel"], ["mm"], name="dense")]
    bn_in = "mm"
    if bias_shape is not None:
        inits.append(fk.init("dense.bias", rng.standard_normal(bias_shape), fk.F32))
        add_in = ["dense.bias", "mm"] if bias_first else ["mm", "dense.bias"]
        nodes.append(helper.make_node("Add", add_in, ["biased"], name="dense_add"))
        bn_in = "biased"
    bn, bn_inits = fk.bn_node(bn_in, "y", "bn", rng, 5)
    m = fk.model([*nodes, bn], [fk.vi("x", fk.F32, ["N", 4])], [fk.vi("y", fk.F32, ["N", 5])], inits + bn_inits)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    (node,) = out.graph.node
    assert (node.op_type, node.name, list(node.output)) == ("Gemm", "dense", ["y"])
    if bias_shape is not None:
        assert report.entries[0].tensor_map["dense.bias"] == [node.input[2]]


def test_matmul_rank3_is_kept(fk):
    """(N, T, C) MatMul output: BN normalizes axis 1 (T), not the weight's columns."""
    rng = np.random.default_rng(14)
    inits = [fk.init("w", rng.standard_normal((4, 3)), fk.F32)]
    mm = helper.make_node("MatMul", ["x", "w"], ["z"], name="mm")
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 5)  # T = 5 channels on axis 1
    m = fk.model([mm, bn], [fk.vi("x", fk.F32, ["N", 5, 4])], [fk.vi("y", fk.F32, 3)], inits + bn_inits)
    out, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert "rank 3" in report.entries[0].reason
    assert fk.count_ops(out, "Gemm") == 0


def test_matmul_unknown_rank_is_kept(fk):
    rng = np.random.default_rng(15)
    inits = [fk.init("w", rng.standard_normal((4, 5)), fk.F32)]
    mm = helper.make_node("MatMul", ["x", "w"], ["z"], name="mm")
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 5)
    m = fk.model([mm, bn], [fk.vi("x", fk.F32, None)], [fk.vi("y", fk.F32, None)], inits + bn_inits)
    from bnfold.folding import fold

    out, report = fold(m)
    assert report.folded == 0 and "unknown" in report.entries[0].reason
    assert out.SerializeToString() == m.SerializeToString()


def test_matmul_rank_from_shape_inference(fk):
    """No value_info for the MatMul output: its rank comes from ONNX shape inference."""
    rng = np.random.default_rng(16)
    inits = [fk.init("w1", rng.standard_normal((4, 6)), fk.F32), fk.init("w2", rng.standard_normal((6, 5)), fk.F32)]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["z"], name="mm2")]
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 5)
    m = fk.model([*nodes, bn], [fk.vi("x", fk.F32, ["N", 4])], [fk.vi("y", fk.F32, 2)], inits + bn_inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "Gemm"]


def test_chain_and_mlp(fk):
    """Several folds in one graph, including a BN whose input comes from a folded BN."""
    rng = np.random.default_rng(17)
    inits = [fk.init("w1", rng.standard_normal((8, 4, 3, 3)) * 0.3, fk.F32),
             fk.init("w2", rng.standard_normal((8, 8, 1, 1)) * 0.3, fk.F32)]
    bn1, i1 = fk.bn_node("c1", "b1", "bn1", rng, 8)
    bn1b, i1b = fk.bn_node("b1", "b1b", "bn1b", rng, 8)
    bn2, i2 = fk.bn_node("c2", "y", "bn2", rng, 8)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]), bn1, bn1b,
             helper.make_node("Relu", ["b1b"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"), bn2]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 4, 6, 6])], [fk.vi("y", fk.F32, 4)], inits + i1 + i1b + i2)
    out, report = fk.fold_and_check(m, folded=3, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv"]
    assert len(out.graph.initializer) == 4
