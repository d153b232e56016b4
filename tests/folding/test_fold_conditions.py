"""When a BN may be folded, when it must be kept (with the reason), and what the output keeps."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.errors import BnfoldError
from bnfold.folding import fold


def _conv_bn(fk, rng, *, elem_type=None, c=4, opset=17, var_scale=1.0, extra_nodes=(), outputs=None, **bn_attrs):
    elem_type = elem_type or fk.F32
    inits = [fk.init("w", rng.standard_normal((c, 3, 3, 3)) * 0.3, elem_type)]
    conv = helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1])
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, c, elem_type, var_scale=var_scale, **bn_attrs)
    outs = outputs or [fk.vi("y", elem_type, ["N", c, 5, 5])]
    return fk.model([conv, bn, *extra_nodes], [fk.vi("x", elem_type, ["N", 3, 5, 5])], outs, inits + bn_inits,
                    opset=opset)


def _assert_unchanged(m, reason_part, **kwargs):
    out, report = fold(m, **kwargs)
    assert report.folded == 0 and report.kept >= 1
    assert any(reason_part in (e.reason or "") for e in report.entries), report.lines()
    assert out.SerializeToString() == m.SerializeToString()
    return report


# ---- sharing, consumers, outputs -------------------------------------------------------------
def test_shared_weight_is_copied(fk):
    """conv1 -> BN and conv2 (no BN) read the same weight: conv2 must still see the original."""
    rng = np.random.default_rng(0)
    inits = [fk.init("w", rng.standard_normal((4, 3, 3, 3)), fk.F32)]
    bn, bn_inits = fk.bn_node("z1", "y1", "bn", rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z1"], name="conv1"), bn,
             helper.make_node("Conv", ["x", "w"], ["y2"], name="conv2")]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 5, 5])],
                 [fk.vi("y1", fk.F32, 4), fk.vi("y2", fk.F32, 4)], inits + bn_inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    conv1, conv2 = out.graph.node
    assert conv2.input[1] == "w" and conv1.input[1] != "w"
    w_out = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "w"))
    np.testing.assert_array_equal(w_out, numpy_helper.to_array(inits[0]))


def test_shared_weight_two_folds(fk):
    rng = np.random.default_rng(1)
    inits = [fk.init("w", rng.standard_normal((4, 3, 3, 3)), fk.F32)]
    bn1, i1 = fk.bn_node("z1", "y1", "bn1", rng, 4)
    bn2, i2 = fk.bn_node("z2", "y2", "bn2", rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z1"], name="conv1"), bn1,
             helper.make_node("Conv", ["x", "w"], ["z2"], name="conv2"), bn2]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 5, 5])],
                 [fk.vi("y1", fk.F32, 4), fk.vi("y2", fk.F32, 4)], inits + i1 + i2)
    out, _ = fk.fold_and_check(m, folded=2, rng=rng)
    assert out.graph.node[0].input[1] != out.graph.node[1].input[1]
    assert "w" not in {t.name for t in out.graph.initializer}


def test_producer_with_two_consumers_is_kept(fk):
    rng = np.random.default_rng(2)
    relu = helper.make_node("Relu", ["z"], ["r"], name="relu")
    m = _conv_bn(fk, rng, extra_nodes=[relu], outputs=[fk.vi("y", fk.F32, 4), fk.vi("r", fk.F32, 4)])
    _assert_unchanged(m, "also read by Relu 'relu'")


def test_producer_output_is_graph_output(fk):
    rng = np.random.default_rng(3)
    m = _conv_bn(fk, rng, outputs=[fk.vi("y", fk.F32, 4), fk.vi("z", fk.F32, 4)])
    _assert_unchanged(m, "'z' is a graph output")


def test_bias_add_with_two_consumers_is_kept(fk):
    rng = np.random.default_rng(4)
    inits = [fk.init("k", rng.standard_normal((3, 4)), fk.F32), fk.init("b", rng.standard_normal(4), fk.F32)]
    bn, bn_inits = fk.bn_node("a", "y", "bn", rng, 4)
    nodes = [helper.make_node("MatMul", ["x", "k"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["a"]), bn]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3])], [fk.vi("y", fk.F32, 2), fk.vi("a", fk.F32, 2)],
                 inits + bn_inits)
    _assert_unchanged(m, "'a' is a graph output")


def test_bn_output_may_be_graph_output(fk):
    """The folded Conv produces the BN's output name, so graph outputs keep their names."""
    rng = np.random.default_rng(5)
    out, _ = fk.fold_and_check(_conv_bn(fk, rng), folded=1, rng=rng)
    assert out.graph.node[0].output[0] == "y"


# ---- BN modes -------------------------------------------------------------------------------
def test_training_mode_is_kept(fk):
    rng = np.random.default_rng(6)
    _assert_unchanged(_conv_bn(fk, rng, training_mode=1), "training_mode=1")


def test_consumed_running_stats_are_kept(fk):
    rng = np.random.default_rng(7)
    m = _conv_bn(fk, rng, opset=9, outputs=[fk.vi("y", fk.F32, 4), fk.vi("rm", fk.F32, 1)])
    bn = m.graph.node[1]
    bn.output.extend(["rm", "rv"])
    _assert_unchanged(m, "consumed ('rm')")


def test_unused_running_stats_outputs_select_training_mode(fk):
    rng = np.random.default_rng(8)
    m = _conv_bn(fk, rng, opset=9)
    m.graph.node[1].output.extend(["rm", "rv"])
    _assert_unchanged(m, "training mode")


@pytest.mark.parametrize("is_test,folded", [(1, 1), (0, 0)])
def test_bn6_is_test(fk, is_test, folded):
    """BatchNormalization-6: is_test defaults to 0 (training); only is_test=1 folds. onnxruntime has
    no BN-6 kernel, so the comparison runs in onnx.reference (see conftest.run)."""
    rng = np.random.default_rng(9)
    m = _conv_bn(fk, rng, opset=6, is_test=is_test)
    if folded:
        fk.fold_and_check(m, folded=1, rng=rng)
    else:
        _assert_unchanged(m, "is_test=0")


def test_spatial0_rank2_is_folded(fk):
    """BN-7 spatial=0 on a (N, C) Gemm output: per-element statistics are per channel."""
    rng = np.random.default_rng(10)
    inits = [fk.init("w", rng.standard_normal((3, 4)), fk.F32), fk.init("c", rng.standard_normal(4), fk.F32)]
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 4, spatial=0)
    m = fk.model([helper.make_node("Gemm", ["x", "w", "c"], ["z"], name="fc"), bn],
                 [fk.vi("x", fk.F32, ["N", 3])], [fk.vi("y", fk.F32, ["N", 4])], inits + bn_inits, opset=7)
    fk.fold_and_check(m, folded=1, rng=rng)


def test_spatial0_per_element_is_kept(fk):
    rng = np.random.default_rng(11)
    c = 4
    inits = [fk.init("w", rng.standard_normal((c, 3, 3, 3)), fk.F32)]
    params = [fk.init(f"bn.{r}", rng.uniform(0.5, 1.5, (c, 5, 5)), fk.F32) for r in ("scale", "bias", "mean", "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["z", *[p.name for p in params]], ["y"], name="bn", spatial=0)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, [1, 3, 5, 5])], [fk.vi("y", fk.F32, [1, c, 5, 5])], inits + params,
                 opset=7, value_info=[fk.vi("z", fk.F32, [1, c, 5, 5])])
    _assert_unchanged(m, "spatial=0")


# ---- dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("elem_type", ["F16", "BF16", "F64"])
@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_low_and_double_precision(fk, elem_type, op):
    elem_type = getattr(fk, elem_type)
    rng = np.random.default_rng(12)
    if op == "Conv":
        # Conv accepts bfloat16 from opset 22 on.
        m = _conv_bn(fk, rng, elem_type=elem_type, opset=22 if elem_type == fk.BF16 else 17)
    else:
        inits = [fk.init("w", rng.standard_normal((6, 4)) * 0.5, elem_type)]
        bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 4, elem_type)
        m = fk.model([helper.make_node("Gemm", ["x", "w"], ["z"], name="fc"), bn],
                     [fk.vi("x", elem_type, ["N", 6])], [fk.vi("y", elem_type, 2)], inits + bn_inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert {t.data_type for t in out.graph.initializer} == {elem_type}


def test_folded_weights_are_float64_rounded_once(fk):
    """float16: W' must be the float64 product rounded once, not a product of float16 roundings."""
    rng = np.random.default_rng(13)
    m = _conv_bn(fk, rng, elem_type=fk.F16)
    out, _ = fold(m)
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    s = p["bn.scale"] / np.sqrt(p["bn.var"] + 1e-5)
    expected = (p["w"] * s[:, None, None, None]).astype(np.float16)
    got = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1]))
    np.testing.assert_array_equal(got, expected)


def test_float16_overflow_is_kept(fk):
    """var = 0, eps = 1e-7, gamma = 100: scale = 100 / sqrt(1e-7) ~ 3.2e5 > 65504 (float16 max)."""
    rng = np.random.default_rng(14)
    m = _conv_bn(fk, rng, elem_type=fk.F16, eps=1e-7, var_scale=0.0)
    for t in m.graph.initializer:
        if t.name == "bn.var":
            t.CopyFrom(fk.init("bn.var", np.zeros(4), fk.F16))
        if t.name == "bn.scale":
            t.CopyFrom(fk.init("bn.scale", np.full(4, 100.0), fk.F16))
        if t.name == "w":
            t.CopyFrom(fk.init("w", np.ones((4, 3, 3, 3)), fk.F16))
    _assert_unchanged(m, "overflows float16")


def test_bfloat16_overflow_is_kept(fk):
    """bfloat16 keeps float32's exponent range (max ~3.39e38): gamma = 1e38 over sqrt(var) = 0.5
    times w = 4 gives 8e38, finite in float64 but not in bfloat16."""
    rng = np.random.default_rng(33)
    m = _conv_bn(fk, rng, elem_type=fk.BF16)
    values = {"bn.var": np.full(4, 0.25), "bn.scale": np.full(4, 1e38), "w": np.full((4, 3, 3, 3), 4.0)}
    for name, value in values.items():
        index = next(i for i, t in enumerate(m.graph.initializer) if t.name == name)
        m.graph.initializer[index].CopyFrom(fk.init(name, value, fk.BF16))
    _assert_unchanged(m, "overflows bfloat16")


def test_subnormal_results_are_flushed(fk):
    """A dead channel (gamma ~ 1e-38) gives weights below float32's smallest normal 1.18e-38."""
    rng = np.random.default_rng(15)
    m = _conv_bn(fk, rng)
    gamma = np.array([1e-38, 1.0, 1.0, 1.0], dtype=np.float32)
    for t in m.graph.initializer:
        if t.name == "bn.scale":
            t.CopyFrom(fk.init("bn.scale", gamma))
    p = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    s = p["bn.scale"] / np.sqrt(p["bn.var"] + 1e-5)
    w64 = p["w"] * s[:, None, None, None]
    b64 = p["bn.bias"] - p["bn.mean"] * s
    tiny = np.finfo(np.float32).tiny
    expected = sum(int(np.count_nonzero((np.abs(a.astype(np.float32)) > 0) & (np.abs(a.astype(np.float32)) < tiny)))
                   for a in (w64, b64))
    assert expected > 0
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert report.subnormals_flushed == expected
    w_new = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1]))
    assert not np.any((w_new != 0) & (np.abs(w_new) < tiny))


# ---- subgraphs and functions -----------------------------------------------------------------
def test_if_branches_fold_with_outer_constants(fk):
    rng = np.random.default_rng(16)
    c = 4
    outer = [fk.init("w", rng.standard_normal((c, 3, 3, 3)) * 0.3, fk.F32)]
    bn_t, it = fk.bn_node("zt", "yt", "bn_then", rng, c)
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["zt"], name="conv_then", pads=[1, 1, 1, 1]), bn_t],
                               "then", [], [fk.vi("yt", fk.F32, 4)])
    bn_e, ie = fk.bn_node("ze", "ye", "bn_else", rng, c)
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["ze"], name="conv_else"), bn_e],
                               "else", [], [fk.vi("ye", fk.F32, 4)])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)
    m = fk.model([node], [fk.vi("cond", onnx.TensorProto.BOOL, []), fk.vi("x", fk.F32, [1, 3, 5, 5])],
                 [fk.vi("y", fk.F32, 4)], outer + it + ie)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rng.standard_normal((1, 3, 5, 5)).astype(np.float32)}
        out, report = fk.fold_and_check(m, folded=2, feeds=feeds)
    assert {e.graph for e in report.entries} == {"main/if.then_branch", "main/if.else_branch"}
    assert "w" not in {t.name for t in out.graph.initializer}  # both uses folded


def test_loop_body_folds(fk):
    rng = np.random.default_rng(17)
    c = 3
    inits = [fk.init("w", rng.standard_normal((c, c)), fk.F32)]
    bn, bn_inits = fk.bn_node("z", "h_out", "bn_body", rng, c)
    body = helper.make_graph(
        [helper.make_node("Gemm", ["h", "w"], ["z"], name="fc_body"), bn,
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [fk.vi("i", onnx.TensorProto.INT64, []), fk.vi("cond_in", onnx.TensorProto.BOOL, []),
                 fk.vi("h", fk.F32, [2, c])],
        [fk.vi("cond_out", onnx.TensorProto.BOOL, []), fk.vi("h_out", fk.F32, [2, c])],
    )
    loop = helper.make_node("Loop", ["trip", "", "x"], ["y"], name="loop", body=body)
    m = fk.model([loop], [fk.vi("x", fk.F32, [2, c])], [fk.vi("y", fk.F32, [2, c])],
                 inits + bn_inits + [fk.init("trip", np.array(3, dtype=np.int64))])
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert report.entries[0].graph == "main/loop.body"


def test_scan_body_folds(fk):
    """Scan-9+: the body sees one (2, c) slice of the (T, 2, c) scan input per step and carries a
    running sum as its state; the Gemm -> BN inside folds, with the weight from the outer scope."""
    rng = np.random.default_rng(29)
    c = 3
    inits = [fk.init("w", rng.standard_normal((c, c)), fk.F32)]
    bn, bn_inits = fk.bn_node("z", "z_bn", "bn_body", rng, c)
    body = helper.make_graph(
        [helper.make_node("Gemm", ["x_t", "w"], ["z"], name="fc_body"), bn,
         helper.make_node("Add", ["acc_in", "z_bn"], ["acc_out"], name="accumulate"),
         helper.make_node("Identity", ["z_bn"], ["y_t"], name="emit")],
        "body", [fk.vi("acc_in", fk.F32, [2, c]), fk.vi("x_t", fk.F32, [2, c])],
        [fk.vi("acc_out", fk.F32, [2, c]), fk.vi("y_t", fk.F32, [2, c])],
    )
    scan = helper.make_node("Scan", ["acc0", "xs"], ["acc", "ys"], name="scan", body=body, num_scan_inputs=1)
    m = fk.model([scan], [fk.vi("acc0", fk.F32, [2, c]), fk.vi("xs", fk.F32, [4, 2, c])],
                 [fk.vi("acc", fk.F32, [2, c]), fk.vi("ys", fk.F32, [4, 2, c])], inits + bn_inits)
    _, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert report.entries[0].graph == "main/scan.body"
    assert report.entries[0].into == "fc_body"


def test_model_local_function_folds(fk):
    rng = np.random.default_rng(18)
    c = 4
    w = fk.init("w", rng.standard_normal((c, 3, 1, 1)), fk.F32)
    params = [fk.init(r, a, fk.F32) for r, a in zip(("g", "b", "m", "v"), fk.bn_arrays(rng, c))]
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in [w, *params]]
    body = [*consts, helper.make_node("Conv", ["x", "w"], ["z"], name="f_conv"),
            helper.make_node("BatchNormalization", ["z", "g", "b", "m", "v"], ["y"], name="f_bn")]
    function = helper.make_function("local", "ConvBn", ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    m = fk.model([helper.make_node("ConvBn", ["x"], ["y"], domain="local", name="call")],
                 [fk.vi("x", fk.F32, ["N", 3, 4, 4])], [fk.vi("y", fk.F32, 4)], functions=[function],
                 extra_opsets=[helper.make_opsetid("local", 1)])
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert report.entries[0].graph == "function:local.ConvBn"
    ops = [n.op_type for n in out.functions[0].node]
    assert ops.count("Constant") == 2 and "BatchNormalization" not in ops  # new W', b'; old constants gone


# ---- IR < 4: initializers listed as graph inputs ------------------------------------------------
def _ir3_model(fk, rng):
    m = _conv_bn(fk, rng, opset=8)
    m.ir_version = 3
    m.graph.input.extend([helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in m.graph.initializer])
    return m


def test_ir3_initializer_inputs_are_constants(fk):
    rng = np.random.default_rng(19)
    m = _ir3_model(fk, rng)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert out.ir_version == 4
    assert [v.name for v in out.graph.input] == ["x"]
    assert any("IR version 3 -> 4" in n for n in report.notes)
    assert any("graph inputs" in n for n in report.notes)


def test_ir3_keep_initializer_inputs(fk):
    rng = np.random.default_rng(20)
    _assert_unchanged(_ir3_model(fk, rng), "keep_initializer_inputs", keep_initializer_inputs=True)


# ---- constant subgraphs ------------------------------------------------------------------------
def test_constant_subgraphs_are_evaluated(fk):
    """Weights from a Constant node, BN params through Identity / Cast / Unsqueeze+Squeeze /
    Reshape, a ConstantOfShape zero bias."""
    rng = np.random.default_rng(21)
    c = 4
    gamma, beta, mean, var = fk.bn_arrays(rng, c)
    w = fk.init("w_const", rng.standard_normal((c, 3, 3, 3)) * 0.3, fk.F32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=w),
        helper.make_node("Constant", [], ["c_shape"], value_ints=[c]),
        helper.make_node("ConstantOfShape", ["c_shape"], ["zero_bias"]),
        helper.make_node("Conv", ["x", "w", "zero_bias"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["gamma_init"], ["gamma"]),
        helper.make_node("Cast", ["beta64"], ["beta"], to=fk.F32),
        helper.make_node("Unsqueeze", ["mean_init", "ax0"], ["mean_u"]),
        helper.make_node("Squeeze", ["mean_u", "ax0"], ["mean"]),
        helper.make_node("Reshape", ["var_2d", "flat"], ["var"]),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
    ]
    inits = [fk.init("gamma_init", gamma, fk.F32), fk.init("beta64", beta, fk.F64),
             fk.init("mean_init", mean, fk.F32), fk.init("ax0", np.array([0], dtype=np.int64)),
             fk.init("var_2d", var.reshape(2, 2), fk.F32), fk.init("flat", np.array([-1], dtype=np.int64))]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 5, 5])], [fk.vi("y", fk.F32, 4)], inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert len(out.graph.initializer) == 2


@pytest.mark.parametrize(("axis_index", "folds"), [(1, True), (-3, True), (0, False)])
def test_static_dimension_of_a_runtime_shape_is_constant(fk, axis_index, folds):
    """Keras 3's depthwise convolution bias: reshaped to (1, C, 1, 1) where C = Gather(Shape(x), 1)
    is read from x's declared shape, then a decomposed BN (Mul, Add). Constant when that dimension
    is static (C), not when it is symbolic (the batch N)."""
    rng = np.random.default_rng(31)
    c = 3
    gamma, beta, mean, var = fk.bn_arrays(rng, c)
    scale = gamma / np.sqrt(var + 1e-3)
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Gather", ["x_shape", "idx"], ["dim"], axis=0),
        helper.make_node("Unsqueeze", ["dim", "ax0"], ["dim1"]),
        helper.make_node("Concat", ["one", "dim1", "one", "one"], ["target"], axis=0),
        helper.make_node("Reshape", ["b", "target"], ["b4"]),
        helper.make_node("Conv", ["x", "w"], ["conv_out"], name="conv", group=c),
        helper.make_node("Add", ["conv_out", "b4"], ["z"], name="bias_add"),
        helper.make_node("Mul", ["z", "bn_scale"], ["scaled"], name="bn_mul"),
        helper.make_node("Add", ["scaled", "bn_shift"], ["y"], name="bn_add"),
    ]
    inits = [fk.init("w", rng.standard_normal((c, 1, 3, 3)), fk.F32), fk.init("b", rng.standard_normal(c), fk.F32),
             fk.init("idx", np.array(axis_index, dtype=np.int64)), fk.init("ax0", np.array([0], dtype=np.int64)),
             fk.init("one", np.array([1], dtype=np.int64)),
             fk.init("bn_scale", scale.reshape(1, c, 1, 1), fk.F32),
             fk.init("bn_shift", (beta - mean * scale).reshape(1, c, 1, 1), fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", c, 5, 5])], [fk.vi("y", fk.F32, ["N", c, 3, 3])], inits)
    out, report = fold(m)
    if folds:
        assert report.folded == 1, report.lines()
        assert [n.op_type for n in out.graph.node] == ["Conv"]
        feeds = fk.random_feeds(m, rng)
        fk.assert_close(fk.run(m, feeds), fk.run(out, feeds), fk.F32)
    else:
        assert report.folded == 0 and out.SerializeToString() == m.SerializeToString()


def test_transposed_linear_weight_and_concat(fk):
    """torch.onnx.export without constant folding writes Linear(bias=False) as
    MatMul(x, Transpose(W)); a BN statistic assembled by Concat is constant too."""
    rng = np.random.default_rng(30)
    gamma, beta, mean, var = fk.bn_arrays(rng, 5)
    nodes = [
        helper.make_node("Transpose", ["fc.weight"], ["wt"], name="t"),
        helper.make_node("MatMul", ["x", "wt"], ["z"], name="fc"),
        helper.make_node("Concat", ["mean_a", "mean_b"], ["mean"], axis=0),
        helper.make_node("BatchNormalization", ["z", "g", "b", "mean", "v"], ["y"], name="bn"),
    ]
    inits = [fk.init("fc.weight", rng.standard_normal((5, 4)), fk.F32), fk.init("g", gamma, fk.F32),
             fk.init("b", beta, fk.F32), fk.init("mean_a", mean[:2], fk.F32), fk.init("mean_b", mean[2:], fk.F32),
             fk.init("v", var, fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 4])], [fk.vi("y", fk.F32, ["N", 5])], inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["Gemm"] and len(out.graph.initializer) == 2


def _zero_bias_nodes(layout, c):
    if layout == "torch":
        # As torch 2.13 writes it (dynamo=True, optimize=False): the bias shape is Shape(W)[0:1]
        # expanded by [1], the zero is a scalar CastLike'd to the run-time input x.
        return [
            helper.make_node("Shape", ["conv.weight"], ["val_0"], start=0, end=1),
            helper.make_node("Constant", [], ["val_1"], value_ints=[1]),
            helper.make_node("Expand", ["val_0", "val_1"], ["val_2"]),
            helper.make_node("Constant", [], ["val_3"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
            helper.make_node("CastLike", ["val_3", "x"], ["val_4"]),
            helper.make_node("Expand", ["val_4", "val_2"], ["conv_bias"]),
        ]
    # Shape of a run-time tensor whose shape is static (C_in == C_out here), a float64 zero.
    return [
        helper.make_node("Shape", ["x"], ["shp"], start=1, end=2),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float64))),
        helper.make_node("Expand", ["zero", "shp"], ["e1"]),
        helper.make_node("CastLike", ["e1", "x"], ["cl"]),
        helper.make_node("Expand", ["cl", "shp"], ["conv_bias"]),
    ]


@pytest.mark.parametrize("layout", ["torch", "static_input"])
def test_dynamo_zero_bias_pattern(fk, layout):
    """torch.onnx.export(dynamo=True) style: BN params through Identity, and a conv bias computed
    as Shape -> Expand -> CastLike(run-time tensor, read for its dtype only) -> Expand."""
    rng = np.random.default_rng(22)
    c = 3
    inits = [fk.init("conv.weight", rng.standard_normal((c, c, 3, 3)) * 0.3, fk.F32)]
    params = [fk.init(f"bn.{r}", a, fk.F32) for r, a in zip(("weight", "bias", "running_mean", "running_var"),
                                                             fk.bn_arrays(rng, c))]
    nodes = [
        *_zero_bias_nodes(layout, c),
        helper.make_node("Conv", ["x", "conv.weight", "conv_bias"], ["z"], name="node_Conv_0"),
        *[helper.make_node("Identity", [p.name], [f"id_{i}"]) for i, p in enumerate(params)],
        helper.make_node("BatchNormalization", ["z", "id_0", "id_1", "id_2", "id_3"], ["y"], name="node_bn"),
    ]
    m = fk.model(nodes, [fk.vi("x", fk.F32, [1, c, 6, 6])], [fk.vi("y", fk.F32, [1, c, 4, 4])],
                 inits + params, opset=18)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert len(out.graph.initializer) == 2


def test_nonconstant_weight_is_kept(fk):
    rng = np.random.default_rng(23)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 4)
    m = fk.model([helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn],
                 [fk.vi("x", fk.F32, ["N", 3, 5, 5]), fk.vi("w", fk.F32, [4, 3, 3, 3])], [fk.vi("y", fk.F32, 4)],
                 bn_inits)
    _assert_unchanged(m, "weight is not constant: 'w' is a graph input")


# ---- invalid parameters ------------------------------------------------------------------------
@pytest.mark.parametrize("bad,message", [
    ({"var": -1.0}, "channel 2 is -1.0"),
    ({"var": np.nan}, "channel 2 is nan"),
    ({"var": np.inf}, "channel 2 is inf"),
    ({"var": 0.0, "eps": 0.0}, "channel 2 is 0.0"),
    ({"eps": -1e-5}, "epsilon is -1e-05"),
])
@pytest.mark.parametrize("foldable", [True, False])
def test_invalid_bn_raises(fk, bad, message, foldable):
    rng = np.random.default_rng(24)
    extra = [] if foldable else [helper.make_node("Relu", ["z"], ["r"])]
    outputs = [fk.vi("y", fk.F32, 4)] + ([] if foldable else [fk.vi("r", fk.F32, 4)])
    m = _conv_bn(fk, rng, eps=bad.get("eps", 1e-5), extra_nodes=extra, outputs=outputs)
    if "var" in bad:
        var = np.ones(4)
        var[2] = bad["var"]
        m.graph.initializer[-1].CopyFrom(fk.init("bn.var", var, fk.F32))
    with pytest.raises(BnfoldError, match="BatchNormalization 'bn'") as info:
        fold(m)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_zero_variance_with_positive_eps_is_valid(fk):
    """var = 0 is a dead channel, not an error: 1 / sqrt(0 + eps) is finite."""
    rng = np.random.default_rng(25)
    m = _conv_bn(fk, rng)
    m.graph.initializer[-1].CopyFrom(fk.init("bn.var", np.array([0.0, 1.0, 1.0, 1.0]), fk.F32))
    fk.fold_and_check(m, folded=1, rng=rng)


def test_nonconstant_variance_is_not_validated(fk):
    rng = np.random.default_rng(26)
    m = _conv_bn(fk, rng)
    m.graph.initializer.pop()  # bn.var becomes a graph input
    m.graph.input.append(fk.vi("bn.var", fk.F32, [4]))
    report = _assert_unchanged(m, "BN var is not constant")
    assert report.kept == 1


# ---- options, report, what the output keeps ------------------------------------------------------
def test_exclude(fk):
    rng = np.random.default_rng(27)
    inits = [fk.init("w1", rng.standard_normal((4, 3, 1, 1)), fk.F32), fk.init("w2", rng.standard_normal((4, 4, 1, 1)), fk.F32)]
    bn1, i1 = fk.bn_node("z1", "y1", "bn1", rng, 4)
    bn2, i2 = fk.bn_node("z2", "y", "bn2", rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["z1"], name="conv1"), bn1,
             helper.make_node("Conv", ["y1", "w2"], ["z2"], name="conv2"), bn2]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 4, 4])], [fk.vi("y", fk.F32, 4)], inits + i1 + i2)
    out, report = fk.fold_and_check(m, folded=1, kept=1, rng=rng, exclude={"bn1"})
    assert [(e.bn, e.status, e.reason) for e in report.entries] == [("bn1", "kept", "excluded"),
                                                                      ("bn2", "folded", None)]
    assert not report.notes
    _, report = fold(m, exclude={"bn1", "bn9"})
    assert report.notes == ["exclude: no BatchNormalization named 'bn9'"]


def test_output_keeps_model_metadata(fk):
    rng = np.random.default_rng(28)
    m = _conv_bn(fk, rng)
    m.doc_string = "model doc"
    m.graph.doc_string = "graph doc"
    m.producer_name, m.producer_version, m.model_version, m.domain = "maker", "1.2", 7, "org.example"
    helper.set_model_props(m, {"bn_convention": "pytorch"})
    m.graph.node[0].doc_string = "conv doc"
    m.graph.value_info.extend([fk.vi("z", fk.F32, ["N", 4, 5, 5]), fk.vi("y", fk.F32, ["N", 4, 5, 5])])
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    for field in ("doc_string", "producer_name", "producer_version", "model_version", "domain", "ir_version"):
        assert getattr(out, field) == getattr(m, field)
    assert out.opset_import == m.opset_import and out.metadata_props == m.metadata_props
    assert out.graph.doc_string == "graph doc" and out.graph.node[0].doc_string == "conv doc"
    assert [v.name for v in out.graph.value_info] == ["y"]  # 'z' no longer exists
    assert out.graph.input == m.graph.input and out.graph.output == m.graph.output
    json.dumps(report.to_dict())
    assert report.lines()[:2] == ["BatchNormalization folded: 1 of 1", "BatchNormalization 'bn': folded into 'conv'"]


def test_model_without_bn_is_returned_unchanged(fk):
    m = fk.model([helper.make_node("Relu", ["x"], ["y"])], [fk.vi("x", fk.F32, [2])], [fk.vi("y", fk.F32, [2])])
    out, report = fold(m)
    assert out is not m and out.SerializeToString() == m.SerializeToString()
    assert report.total == 0 and report.lines() == [
        "no BatchNormalization: nothing to fold (PyTorch's and tf2onnx's exporters fold Conv+BN themselves by default)"]


def test_not_a_model():
    with pytest.raises(BnfoldError, match="ModelProto"):
        fold(b"not a model")  # type: ignore[arg-type]


# ---- invalid parameter shapes: refused, never kept or folded ------------------------------------
def _reshape_param(fk, m, role, array):
    name = f"bn.{role}"
    index = next(i for i, t in enumerate(m.graph.initializer) if t.name == name)
    m.graph.initializer[index].CopyFrom(fk.init(name, array, fk.F32))


@pytest.mark.parametrize(
    ("role", "shape", "message"),
    [
        ("scale", (4, 1), "scale 'bn.scale' has shape (4, 1), must be (C,)"),
        ("var", (), "var 'bn.var' has shape (), must be (C,)"),
        ("mean", (3,), "mean 'bn.mean' has shape (3,) but scale 'bn.scale' has shape (4,)"),
    ],
)
def test_wrong_parameter_shape_is_refused(fk, role, shape, message):
    """ONNX gives BN parameters the shape (C,); onnxruntime refuses to load anything else."""
    rng = np.random.default_rng(26)
    m = _conv_bn(fk, rng)
    _reshape_param(fk, m, role, np.ones(shape))
    with pytest.raises(BnfoldError, match="BatchNormalization 'bn'") as info:
        fold(m)
    assert message in str(info.value)


@pytest.mark.parametrize("declared", [True, False], ids=["value-info", "inferred"])
def test_parameters_agreeing_with_each_other_but_not_with_the_input_are_refused(fk, declared):
    """3 values everywhere, but the Conv makes 4 channels (declared, or inferred from its weight)."""
    rng = np.random.default_rng(27)
    m = _conv_bn(fk, rng)
    for role in ("scale", "bias", "mean", "var"):
        _reshape_param(fk, m, role, np.ones(3))
    if declared:
        m.graph.value_info.append(fk.vi("z", fk.F32, ["N", 4, 5, 5]))
    expected = "3 values for the 4 channels of input 'z'" if declared else "4 output channels but the BN parameters have 3"
    with pytest.raises(BnfoldError, match=f"BatchNormalization 'bn' in main: .*{expected}"):
        fold(m)


def test_gemm_columns_disagreeing_with_bn_parameters_are_refused(fk):
    rng = np.random.default_rng(28)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 3)
    m = fk.model([helper.make_node("Gemm", ["x", "w"], ["z"], name="fc"), bn], [fk.vi("x", fk.F32, ["N", 5])],
                 [fk.vi("y", fk.F32, ["N", 3])], [fk.init("w", rng.standard_normal((5, 4)), fk.F32), *bn_inits])
    with pytest.raises(BnfoldError, match="Gemm 'fc' has 4 output columns but the BN parameters have 3 values"):
        fold(m)


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_columns_disagreeing_with_bn_parameters_are_refused(fk, bias):
    """(N, 5) @ (5, 4) is (N, 4): BN's channel axis 1 holds 4 values, its parameters 3."""
    rng = np.random.default_rng(30)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc")]
    inits = [fk.init("w", rng.standard_normal((5, 4)), fk.F32)]
    head = "mm"
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["z"], name="fc_bias"))
        inits.append(fk.init("b", rng.standard_normal(4), fk.F32))
        head = "z"
    bn, bn_inits = fk.bn_node(head, "y", "bn", rng, 3)
    m = fk.model([*nodes, bn], [fk.vi("x", fk.F32, ["N", 5])], [fk.vi("y", fk.F32, ["N", 3])], inits + bn_inits)
    with pytest.raises(BnfoldError, match="MatMul 'fc' has 4 output columns but the BN parameters have 3 values"):
        fold(m)


def test_matmul_single_column_broadcast_by_bias_is_kept_not_refused(fk):
    """(N, 5) @ (5, 1) + b(3,) broadcasts to (N, 3): a valid model, 3 BN channels; not foldable."""
    rng = np.random.default_rng(31)
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, 3)
    m = fk.model([helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"),
                  helper.make_node("Add", ["mm", "b"], ["z"], name="fc_bias"), bn],
                 [fk.vi("x", fk.F32, ["N", 5])], [fk.vi("y", fk.F32, ["N", 3])],
                 [fk.init("w", rng.standard_normal((5, 1)), fk.F32), fk.init("b", rng.standard_normal(3), fk.F32),
                  *bn_inits])
    _, report = fk.fold_and_check(m, folded=0, kept=1, rng=rng)
    assert "broadcasts the single column" in report.entries[0].reason


@pytest.mark.parametrize(("op", "weight_shape", "message"), [
    ("Conv", (2, 4, 1, 1), "Conv 'lin' reads 4 input channels (group 1) but the BN parameters have 3 values"),
    ("Gemm", (4, 2), "Gemm 'lin' contracts 4 columns but the BN parameters have 3 values"),
    ("MatMul", (4, 2), "MatMul 'lin' contracts 4 rows but the BN parameters have 3 values"),
])
def test_consumer_disagreeing_with_bn_parameters_is_refused(fk, op, weight_shape, message):
    """BN (3 values, input channels undeclared) -> a linear layer that reads 4 channels."""
    rng = np.random.default_rng(32)
    bn, bn_inits = fk.bn_node("x", "z", "bn", rng, 3)
    x_shape = ["N", None, 5, 5] if op == "Conv" else [2, None]
    m = fk.model([bn, helper.make_node(op, ["z", "w"], ["y"], name="lin")], [fk.vi("x", fk.F32, x_shape)],
                 [fk.vi("y", fk.F32, len(x_shape))], [fk.init("w", rng.standard_normal(weight_shape), fk.F32),
                                                      *bn_inits])
    with pytest.raises(BnfoldError, match=f"BatchNormalization 'bn' in main: {re.escape(message)}"):
        fold(m)


def test_report_to_dict_entries_are_what_asdict_gives():
    # FoldEntry.to_dict is written out by hand (asdict's generic deep copy is slow on deep
    # models); it must stay what asdict gives, field for field, including for new fields.
    from dataclasses import asdict

    from bnfold.folding.report import FoldEntry

    entries = [FoldEntry("bn", "main", "folded", into="conv", tensor_map={"w": ["w_f"], "var": ["w_f", "b_f"]}),
               FoldEntry("bn2", "main/If.then_branch", "kept", reason="why")]
    for entry in entries:
        data = entry.to_dict()
        assert data == asdict(entry)
        data["tensor_map"].setdefault("w", []).append("changed")  # a copy, as asdict's
        assert entry.tensor_map.get("w") != data["tensor_map"]["w"]
