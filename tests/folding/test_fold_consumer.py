"""BatchNormalization -> linear consumer folds (BN in front of Conv / Gemm / MatMul).

Each folding case asserts the number of folds, that no BN is left, the full ONNX checker, that
outputs match the unfolded model in onnxruntime (optimizations off) within conftest.RTOL (the
float32 rounding bound documented there), and that folding again changes nothing. Each skip
case asserts the reason and that the model is left valid and equivalent.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

PAD_REASON = "Conv pads are non-zero: padded zeros would not be normalized"


def _bn_conv_model(fk, rng, *, dims=2, c_in=4, c_out=6, group=1, bias=True, kernel=3, strides=1, pads=0,
                   dilations=1, auto_pad=None, op="Conv", elem_type=None):
    elem_type = elem_type or fk.F32
    spatial = [8, 7, 6][:dims]
    if op == "Conv":
        w_shape = (c_out, c_in // group, *[kernel] * dims)
    else:
        w_shape = (c_in, c_out // group, *[kernel] * dims)
    inits = [fk.init("conv.weight", rng.standard_normal(w_shape) * 0.3, elem_type)]
    inputs = ["z", "conv.weight"]
    if bias:
        inits.append(fk.init("conv.bias", rng.standard_normal(c_out), elem_type))
        inputs.append("conv.bias")
    attrs = dict(group=group, kernel_shape=[kernel] * dims, strides=[strides] * dims, dilations=[dilations] * dims)
    if auto_pad is None:
        attrs["pads"] = [pads] * (2 * dims)
    else:
        attrs["auto_pad"] = auto_pad
    bn, bn_inits = fk.bn_node("x", "z", "bn", rng, c_in, elem_type)
    conv = helper.make_node(op, inputs, ["y"], name="conv", **attrs)
    return fk.model([bn, conv], [fk.vi("x", elem_type, ["N", c_in, *spatial])], [fk.vi("y", elem_type, dims + 2)],
                    inits + bn_inits)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_conv(fk, dims, group, bias):
    rng = np.random.default_rng(dims * 10 + group + 100 * bias)
    m = _bn_conv_model(fk, rng, dims=dims, group=group, bias=bias, strides=2 if dims == 2 else 1,
                       dilations=2 if dims == 1 else 1)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    (entry,) = report.entries
    assert (entry.bn, entry.status, entry.into) == ("bn", "folded", "conv")
    (conv,) = out.graph.node
    assert conv.name == "conv" and conv.input[0] == "x" and conv.output[0] == "y"
    # b' = b + W t: the consumer's weight reaches the new bias too.
    assert entry.tensor_map["conv.weight"] == [conv.input[1], conv.input[2]]
    assert entry.tensor_map["bn.mean"] == [conv.input[2]]
    assert entry.tensor_map["bn.scale"] == [conv.input[1], conv.input[2]]
    assert {t.name for t in out.graph.initializer} == {conv.input[1], conv.input[2]}


def test_bn_depthwise_conv(fk):
    rng = np.random.default_rng(1)
    fk.fold_and_check(_bn_conv_model(fk, rng, c_in=6, c_out=6, group=6), folded=1, rng=rng)


def test_bn_conv_float16(fk):
    rng = np.random.default_rng(2)
    fk.fold_and_check(_bn_conv_model(fk, rng, elem_type=fk.F16, group=2), folded=1, rng=rng)


@pytest.mark.parametrize("auto_pad,kernel", [("VALID", 3), ("SAME_UPPER", 1), ("SAME_LOWER", 1)])
def test_bn_conv_auto_pad_without_padding(fk, auto_pad, kernel):
    rng = np.random.default_rng(3)
    m = _bn_conv_model(fk, rng, auto_pad=auto_pad, kernel=kernel, strides=2)
    fk.fold_and_check(m, folded=1, rng=rng)


@pytest.mark.parametrize("auto_pad,pads,reason", [
    (None, 1, PAD_REASON),
    ("SAME_UPPER", 0, "Conv auto_pad is SAME_UPPER: padded zeros would not be normalized"),
    ("SAME_LOWER", 0, "Conv auto_pad is SAME_LOWER: padded zeros would not be normalized"),
])
def test_bn_padded_conv_is_kept(fk, auto_pad, pads, reason):
    rng = np.random.default_rng(4)
    m = _bn_conv_model(fk, rng, auto_pad=auto_pad, pads=pads)
    out, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    (entry,) = report.entries
    assert entry.status == "kept" and reason in entry.reason
    assert out == m


def test_bn_conv_asymmetric_single_pad_is_kept(fk):
    rng = np.random.default_rng(5)
    m = _bn_conv_model(fk, rng)
    next(a for a in m.graph.node[1].attribute if a.name == "pads").ints[:] = [0, 0, 1, 0]
    _, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert PAD_REASON in report.entries[0].reason


def test_bn_conv_transpose_is_kept(fk):
    rng = np.random.default_rng(6)
    m = _bn_conv_model(fk, rng, op="ConvTranspose", strides=2)
    _, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert "ConvTranspose after BN" in report.entries[0].reason


def _bn_gemm_model(fk, rng, *, trans_b=0, trans_a=0, alpha=1.0, beta=1.0, c_shape=(3,), k=5, m=3, batch=4,
                   elem_type=None):
    elem_type = elem_type or fk.F32
    w_shape = (m, k) if trans_b else (k, m)
    inits = [fk.init("fc.weight", rng.standard_normal(w_shape), elem_type)]
    inputs = ["z", "fc.weight"]
    if c_shape is not None:
        inits.append(fk.init("fc.bias", rng.standard_normal(c_shape), elem_type))
        inputs.append("fc.bias")
    # BN normalizes axis 1 of A: the contraction axis K, or the row axis M with transA.
    bn, bn_inits = fk.bn_node("x", "z", "bn", rng, batch if trans_a else k, elem_type)
    gemm = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, transA=trans_a, alpha=alpha, beta=beta)
    x_shape = [k, batch] if trans_a else [batch, k]
    return fk.model([bn, gemm], [fk.vi("x", elem_type, x_shape)], [fk.vi("y", elem_type, 2)], inits + bn_inits)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (-1.5, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (), (3,), (1, 3), (4, 1), (4, 3)])
def test_bn_gemm(fk, trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(7)
    model = _bn_gemm_model(fk, rng, trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    out, report = fk.fold_and_check(model, folded=1, rng=rng)
    (gemm,) = out.graph.node
    assert gemm.op_type == "Gemm" and gemm.name == "fc" and report.entries[0].into == "fc"
    # alpha stays on the weight product, beta is folded into C (ONNX default beta = 1).
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert "beta" not in attrs and attrs["alpha"] == pytest.approx(alpha)


def test_bn_gemm_float16(fk):
    rng = np.random.default_rng(8)
    fk.fold_and_check(_bn_gemm_model(fk, rng, elem_type=fk.F16, trans_b=1, alpha=0.5), folded=1, rng=rng)


def test_bn_gemm_trans_a_is_kept(fk):
    rng = np.random.default_rng(9)
    model = _bn_gemm_model(fk, rng, trans_a=1)
    _, report = fk.fold_and_check(model, folded=0, kept=1, rng=rng)
    assert "transA=1" in report.entries[0].reason


def _bn_matmul_model(fk, rng, x_shape, *, k=5, n=3):
    bn, bn_inits = fk.bn_node("x", "z", "bn", rng, k if len(x_shape) == 2 else x_shape[1])
    mm = helper.make_node("MatMul", ["z", "fc.weight"], ["y"], name="fc")
    inits = [fk.init("fc.weight", rng.standard_normal((k, n)), fk.F32), *bn_inits]
    return fk.model([bn, mm], [fk.vi("x", fk.F32, x_shape)], [fk.vi("y", fk.F32, len(x_shape))], inits)


def test_bn_matmul_becomes_gemm(fk):
    rng = np.random.default_rng(10)
    out, report = fk.fold_and_check(_bn_matmul_model(fk, rng, ["N", 5]), folded=1, rng=rng)
    (gemm,) = out.graph.node
    assert (gemm.op_type, gemm.name, list(gemm.input[:1]), list(gemm.output)) == ("Gemm", "fc", ["x"], ["y"])


def test_bn_matmul_rank3_is_kept(fk):
    rng = np.random.default_rng(11)
    # (N, C=4, T=5) @ (5, 3): BN normalizes axis 1 (4 channels), the MatMul contracts axis 2.
    _, report = fk.fold_and_check(_bn_matmul_model(fk, rng, ["N", 4, 5]), folded=0, kept=1, rng=rng)
    assert "rank 3" in report.entries[0].reason


def test_bn_output_read_twice_is_kept(fk):
    rng = np.random.default_rng(12)
    m = _bn_conv_model(fk, rng)
    m.graph.node.append(helper.make_node("Relu", ["z"], ["r"], name="relu"))
    m.graph.output.append(fk.vi("r", fk.F32, 4))
    _, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert "read by 2 nodes" in report.entries[0].reason


def test_bn_output_that_is_a_graph_output_is_kept(fk):
    rng = np.random.default_rng(13)
    m = _bn_conv_model(fk, rng)
    m.graph.output.append(fk.vi("z", fk.F32, 4))
    _, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert "graph output" in report.entries[0].reason


def test_producer_has_priority(fk):
    """Conv -> BN -> Conv(unpadded): the BN goes into the Conv before it (rule 5 of the pass)."""
    rng = np.random.default_rng(14)
    w0 = fk.init("conv0.weight", rng.standard_normal((4, 3, 1, 1)), fk.F32)
    w1 = fk.init("conv1.weight", rng.standard_normal((5, 4, 3, 3)), fk.F32)
    bn, bn_inits = fk.bn_node("a", "b", "bn", rng, 4)
    nodes = [helper.make_node("Conv", ["x", "conv0.weight"], ["a"], name="conv0"), bn,
             helper.make_node("Conv", ["b", "conv1.weight"], ["y"], name="conv1")]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 6, 6])], [fk.vi("y", fk.F32, 4)], [w0, w1, *bn_inits])
    _, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert report.entries[0].into == "conv0"


def test_pre_activation_chain(fk):
    """Conv0 -> Relu -> BN1 -> Conv1 -> BN2: BN1 folds into Conv1 (its consumer), then BN2 into
    the already rewritten Conv1 (its producer)."""
    rng = np.random.default_rng(15)
    w0 = fk.init("conv0.weight", rng.standard_normal((4, 3, 3, 3)), fk.F32)
    w1 = fk.init("conv1.weight", rng.standard_normal((6, 2, 1, 1)), fk.F32)
    bn1, i1 = fk.bn_node("r", "b", "bn1", rng, 4)
    bn2, i2 = fk.bn_node("c", "y", "bn2", rng, 6)
    nodes = [helper.make_node("Conv", ["x", "conv0.weight"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"), bn1,
             helper.make_node("Conv", ["b", "conv1.weight"], ["c"], name="conv1", group=2), bn2]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 6, 6])], [fk.vi("y", fk.F32, 4)], [w0, w1, *i1, *i2])
    out, report = fk.fold_and_check(m, folded=2, rng=rng)
    assert [(e.bn, e.into) for e in report.entries] == [("bn1", "conv1"), ("bn2", "conv1")]
    assert [n.op_type for n in out.graph.node] == ["Conv", "Relu", "Conv"]


def test_shared_weight_is_copied(fk):
    """BN -> Conv(W) while another Conv reads the same W: the other Conv keeps the original."""
    rng = np.random.default_rng(16)
    w = rng.standard_normal((4, 4, 1, 1))
    bn, bn_inits = fk.bn_node("x", "b", "bn", rng, 4)
    nodes = [bn, helper.make_node("Conv", ["b", "w"], ["y"], name="conv_a"),
             helper.make_node("Conv", ["x", "w"], ["y2"], name="conv_b")]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 4, 5, 5])], [fk.vi("y", fk.F32, 4), fk.vi("y2", fk.F32, 4)],
                 [fk.init("w", w, fk.F32), *bn_inits])
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    conv_b = next(n for n in out.graph.node if n.name == "conv_b")
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert conv_b.input[1] == "w"
    np.testing.assert_array_equal(stored["w"], w.astype(np.float32))


def test_dynamo_computed_zero_bias_reading_bn_output(fk):
    """PyTorch's dynamo=True exporter writes a missing Conv bias as Expand(CastLike(0, z), ...)
    where z is the BN output, read for its dtype only: that is not a second reader of z."""
    rng = np.random.default_rng(17)
    bn, bn_inits = fk.bn_node("x", "z", "bn", rng, 4)
    w = fk.init("conv.weight", rng.standard_normal((6, 4, 3, 3)), fk.F32)
    nodes = [
        bn,
        helper.make_node("Shape", ["conv.weight"], ["wshape"], start=0, end=1),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("CastLike", ["zero", "z"], ["zero_like"]),
        helper.make_node("Expand", ["zero_like", "wshape"], ["bias"]),
        helper.make_node("Conv", ["z", "conv.weight", "bias"], ["y"], name="conv"),
    ]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 4, 6, 6])], [fk.vi("y", fk.F32, 4)], [w, *bn_inits])
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["Conv"]


def test_bn_conv_in_if_branch_and_function(fk):
    """BN -> Conv inside an If branch (outer-scope weight) and inside a model-local function
    (parameters as Constant nodes) fold like in the main graph."""
    rng = np.random.default_rng(18)
    w = fk.init("w", rng.standard_normal((5, 4, 1, 1)), fk.F32)
    bn_t, it = fk.bn_node("x", "bt", "bn_then", rng, 4)
    then_g = helper.make_graph([bn_t, helper.make_node("Conv", ["bt", "w"], ["yt"], name="conv_then")],
                               "then", [], [fk.vi("yt", fk.F32, 4)])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["ye"], name="conv_else")],
                               "else", [], [fk.vi("ye", fk.F32, 4)])
    params = [fk.init(r, a, fk.F32) for r, a in zip(("g", "b", "m", "v"), fk.bn_arrays(rng, 5))]
    fw = fk.init("fw", rng.standard_normal((3, 5, 1, 1)), fk.F32)
    body = [*(helper.make_node("Constant", [], [t.name], value=t) for t in [*params, fw]),
            helper.make_node("BatchNormalization", ["u", "g", "b", "m", "v"], ["ub"], name="f_bn"),
            helper.make_node("Conv", ["ub", "fw"], ["v_out"], name="f_conv")]
    function = helper.make_function("local", "BnConv", ["u"], ["v_out"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("If", ["cond"], ["y0"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("BnConv", ["y0"], ["y"], domain="local", name="call")]
    m = fk.model(nodes, [fk.vi("cond", TensorProto.BOOL, []),
                         fk.vi("x", fk.F32, [1, 4, 3, 3])],
                 [fk.vi("y", fk.F32, 4)], [w, *it], functions=[function],
                 extra_opsets=[helper.make_opsetid("local", 1)])
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rng.standard_normal((1, 4, 3, 3)).astype(np.float32)}
        out, report = fk.fold_and_check(m, folded=2, feeds=feeds)
    assert [(e.graph, e.into) for e in report.entries] == [
        ("main/if.then_branch", "conv_then"), ("function:local.BnConv", "f_conv")]
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Constant", "Conv"]
