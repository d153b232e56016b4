"""Decomposed BN (per-channel Mul/Add/Sub/Div chains) folded into the producer, and
``decompose_rest`` (BN -> Mul + Add by constants).

Hand-built graphs in the shapes exporters write (Keras 3: Sub / Mul / Add by (1, ..., C)
constants with no-op Casts, and a Transpose after channels-last convolutions). Each folding
case asserts the count, the ops left, the full checker, onnxruntime outputs (optimizations off)
against the unfolded model within conftest.RTOL, and idempotence; each negative case asserts the
model is returned unchanged.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.folding import fold


def ops(model):
    return [n.op_type for n in model.graph.node]


def _keras_bn(fk, rng, x, y, prefix, channels, shape, elem_type=None):
    """Keras 3's export of an inference BN: Cast -> Sub(mean) -> Mul(scale) -> Add(beta)."""
    elem_type = elem_type or fk.F32
    gamma, beta, mean, var = fk.bn_arrays(rng, channels)
    scale = gamma / np.sqrt(var + 1e-3)
    consts = {"mean": mean, "scale": scale, "beta": beta}
    inits = [fk.init(f"{prefix}.{k}", v.reshape(shape), elem_type) for k, v in consts.items()]
    nodes = [
        helper.make_node("Cast", [x], [f"{prefix}_c"], to=elem_type, name=f"{prefix}/Cast"),
        helper.make_node("Sub", [f"{prefix}_c", f"{prefix}.mean"], [f"{prefix}_s"], name=f"{prefix}/Sub"),
        helper.make_node("Mul", [f"{prefix}_s", f"{prefix}.scale"], [f"{prefix}_m"], name=f"{prefix}/Mul"),
        helper.make_node("Add", [f"{prefix}_m", f"{prefix}.beta"], [y], name=f"{prefix}/Add"),
    ]
    return nodes, inits


def _keras_conv_model(fk, rng, *, elem_type=None, bias=True, group=1):
    """NHWC input -> Transpose -> Conv -> Transpose -> Cast -> Add(bias) -> Cast -> Sub/Mul/Add."""
    elem_type = elem_type or fk.F32
    c_in, c_out = 4, 6
    w = fk.init("conv.weight", rng.standard_normal((c_out, c_in // group, 3, 3)) * 0.3, elem_type)
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["x_nchw", "conv.weight"], ["z"], name="conv", pads=[1, 1, 1, 1], group=group),
        helper.make_node("Transpose", ["z"], ["z_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
    ]
    inits = [w]
    head = "z_nhwc"
    if bias:
        inits.append(fk.init("conv.bias", rng.standard_normal((1, 1, 1, c_out)), elem_type))
        nodes += [helper.make_node("Cast", ["z_nhwc"], ["zc"], to=elem_type, name="bias/Cast"),
                  helper.make_node("Add", ["zc", "conv.bias"], ["zb"], name="bias/Add")]
        head = "zb"
    bn_nodes, bn_inits = _keras_bn(fk, rng, head, "y", "bn", c_out, (1, 1, 1, c_out), elem_type)
    return fk.model(nodes + bn_nodes, [fk.vi("x", elem_type, ["N", 7, 7, c_in])], [fk.vi("y", elem_type, 4)],
                    inits + bn_inits)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2])
def test_keras_channels_last_conv(fk, bias, group):
    rng = np.random.default_rng(1 + bias + 2 * group)
    m = _keras_conv_model(fk, rng, bias=bias, group=group)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    (entry,) = report.entries
    assert (entry.bn, entry.status, entry.into) == ("bn/Sub", "folded", "conv")
    assert ops(out) == ["Transpose", "Conv", "Transpose"]
    conv, back = out.graph.node[1], out.graph.node[2]
    assert back.name == "to_nhwc" and back.output[0] == "y" and back.input[0] == conv.output[0]
    assert entry.tensor_map["bn.scale"] == [conv.input[1], conv.input[2]]
    assert entry.tensor_map["bn.beta"] == [conv.input[2]]
    assert entry.tensor_map["conv.weight"] == [conv.input[1]]


def test_keras_channels_last_conv_float16(fk):
    rng = np.random.default_rng(5)
    fk.fold_and_check(_keras_conv_model(fk, rng, elem_type=fk.F16), folded=1, rng=rng)


def _keras_dense_model(fk, rng, *, x_shape=("N", 5), k=5, n=4, bias=True):
    rank = len(x_shape)
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["z"], name="fc"),
             helper.make_node("Cast", ["z"], ["zc"], to=fk.F32, name="fc/Cast")]
    inits = [fk.init("fc.weight", rng.standard_normal((k, n)), fk.F32)]
    head = "zc"
    if bias:
        inits.append(fk.init("fc.bias", rng.standard_normal(n), fk.F32))
        nodes += [helper.make_node("Add", ["zc", "fc.bias"], ["zb"], name="fc/Add"),
                  helper.make_node("Cast", ["zb"], ["zbc"], to=fk.F32, name="fc/Cast_1")]
        head = "zbc"
    bn_nodes, bn_inits = _keras_bn(fk, rng, head, "y", "bn", n, (1,) * (rank - 1) + (n,))
    return fk.model(nodes + bn_nodes, [fk.vi("x", fk.F32, list(x_shape))], [fk.vi("y", fk.F32, rank)],
                    inits + bn_inits)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [("N", 5), ("N", "T", 5)])
def test_keras_dense(fk, bias, x_shape):
    """MatMul (+ Keras' bias Add) -> Sub/Mul/Add along the last axis: exact for any rank of A
    (unlike a BN node, whose axis 1 is not the MatMul's output axis for rank 3)."""
    rng = np.random.default_rng(7 + bias + len(x_shape))
    out, report = fk.fold_and_check(_keras_dense_model(fk, rng, x_shape=x_shape, bias=bias), folded=1, rng=rng)
    assert ops(out) == ["MatMul", "Add"]
    assert report.entries[0].into == "fc" and out.graph.node[1].output[0] == "y"


def test_gemm_mul_add(fk):
    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="fc", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Mul", ["z", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["y"], name="add"),
    ]
    inits = [fk.init("w", rng.standard_normal((3, 5)), fk.F32), fk.init("b", rng.standard_normal(3), fk.F32),
             fk.init("s", rng.standard_normal((1, 3)), fk.F32), fk.init("t", rng.standard_normal(3), fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 5])], [fk.vi("y", fk.F32, 2)], inits)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Gemm"] and report.entries[0].bn == "mul"


def test_conv_transpose_groups_mul_add(fk):
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["z"], name="up", group=2, strides=[2, 2]),
        helper.make_node("Mul", ["s", "z"], ["m"], name="mul"),  # constant first
        helper.make_node("Add", ["t", "m"], ["y"], name="add"),
    ]
    inits = [fk.init("w", rng.standard_normal((4, 3, 3, 3)), fk.F32),
             fk.init("s", rng.standard_normal((6, 1, 1)), fk.F32), fk.init("t", rng.standard_normal((6, 1, 1)), fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 4, 5, 5])], [fk.vi("y", fk.F32, 4)], inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["ConvTranspose"]


def test_div_reversed_sub_scalars_and_constant_nodes(fk):
    """Div by constants, ``c - z`` (negates the scale), scalar constants, Constant/Identity
    nodes as constants, Identity pass-through: one affine map."""
    rng = np.random.default_rng(11)
    div = rng.uniform(0.5, 2.0, (1, 4, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
        helper.make_node("Constant", [], ["d"], value=numpy_helper.from_array(div, "d")),
        helper.make_node("Div", ["z", "d"], ["a"], name="div"),
        helper.make_node("Identity", ["a"], ["a2"], name="id"),
        helper.make_node("Sub", ["c", "a2"], ["b"], name="rsub"),
        helper.make_node("Identity", ["k0"], ["k"]),
        helper.make_node("Mul", ["b", "k"], ["y"], name="mul"),
    ]
    inits = [fk.init("w", rng.standard_normal((4, 3, 3)), fk.F32), fk.init("c", rng.standard_normal((4, 1)), fk.F32),
             fk.init("k0", np.float32(1.7))]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 9])], [fk.vi("y", fk.F32, 3)], inits)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Conv"] and report.entries[0].bn == "div"
    assert len(out.graph.initializer) == 2  # the folded weight and bias; chain constants are gone


def test_transposes_through_the_chain(fk):
    """Conv -> Transpose(NHWC) -> Mul -> Transpose(NCHW) -> Add: the channel axis is tracked
    through both permutations; both Transposes are kept, in order."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
        helper.make_node("Transpose", ["z"], ["t1"], perm=[0, 2, 3, 1], name="t1"),
        helper.make_node("Mul", ["t1", "s"], ["m"], name="mul"),
        helper.make_node("Transpose", ["m"], ["t2"], perm=[0, 3, 1, 2], name="t2"),
        helper.make_node("Add", ["t2", "t"], ["y"], name="add"),
    ]
    inits = [fk.init("w", rng.standard_normal((5, 3, 1, 1)), fk.F32),
             fk.init("s", rng.standard_normal(5), fk.F32), fk.init("t", rng.standard_normal((5, 1, 1)), fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 4, 6])], [fk.vi("y", fk.F32, 4)], inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert [(n.name, n.op_type) for n in out.graph.node] == [("conv", "Conv"), ("t1", "Transpose"), ("t2", "Transpose")]
    assert out.graph.node[2].output[0] == "y"


def test_trailing_casts_stay(fk):
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
        helper.make_node("Mul", ["z", "s"], ["m"], name="mul"),
        helper.make_node("Add", ["m", "t"], ["a"], name="add"),
        helper.make_node("Cast", ["a"], ["ac"], to=fk.F32, name="cast"),
        helper.make_node("Relu", ["ac"], ["y"], name="relu"),
        helper.make_node("Neg", ["a"], ["n"], name="neg"),  # the chain's end may have many readers
    ]
    inits = [fk.init("w", rng.standard_normal((2, 3, 1, 1)), fk.F32),
             fk.init("s", rng.standard_normal((2, 1, 1)), fk.F32), fk.init("t", rng.standard_normal((2, 1, 1)), fk.F32)]
    m = fk.model(nodes, [fk.vi("x", fk.F32, [2, 3, 4, 4])], [fk.vi("y", fk.F32, 4), fk.vi("n", fk.F32, 4)],
                 inits)
    out, _ = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Conv", "Cast", "Relu", "Neg"]
    assert out.graph.node[0].output[0] == "a"


def _conv_chain(fk, rng, *, s_shape=(2, 1, 1), cast_to=None, extra_reader=False, div_zero=False, mul=True):
    """Conv -> [Cast] -> Mul/Div(s) -> Add(t), with knobs that each make the chain unfoldable."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv")]
    head = "z"
    if cast_to is not None:
        nodes.append(helper.make_node("Cast", ["z"], ["zc"], to=cast_to, name="cast"))
        head = "zc"
    elem = cast_to or fk.F32
    s = rng.uniform(0.5, 2.0, s_shape)
    if div_zero:
        s.reshape(-1)[0] = 0.0
    if mul:
        nodes.append(helper.make_node("Div" if div_zero else "Mul", [head, "s"], ["m"], name="mul"))
        head = "m"
    nodes.append(helper.make_node("Add", [head, "t"], ["y"], name="add"))
    inits = [fk.init("w", rng.standard_normal((2, 3, 1, 1)), fk.F32), fk.init("s", s, elem),
             fk.init("t", rng.standard_normal((2, 1, 1)), elem)]
    outputs = [fk.vi("y", elem, 4)]
    if extra_reader:
        outputs.append(fk.vi("z", fk.F32, 4))
    return fk.model(nodes, [fk.vi("x", fk.F32, [2, 3, 4, 5])], outputs, inits)


@pytest.mark.parametrize("knobs", [
    dict(s_shape=(1, 1, 4, 1)),  # varies along H, not channels
    dict(s_shape=(1, 2, 1, 1, 1)),  # more axes than the value: would broadcast it to rank 5
    dict(cast_to=TensorProto.FLOAT16),  # a Cast that changes the type is not a pass-through
    dict(extra_reader=True),  # the producer's output is also a graph output
    dict(div_zero=True),  # division by zero is not a finite affine map
    dict(mul=False),  # a bare bias Add is not a BN-like chain
], ids=["spatial-constant", "rank-growing-constant", "type-changing-cast", "shared-producer-output", "div-by-zero",
        "bias-only"])
def test_unfoldable_chains_are_left_alone(fk, knobs):
    rng = np.random.default_rng(14)
    m = _conv_chain(fk, rng, **knobs)
    out, report = fold(m)
    assert report.total == 0
    assert out == m


def test_chain_ends_at_a_shared_value(fk):
    """Conv -> Mul -> (graph output and Add): the Mul folds, the Add stays (its input is shared)."""
    rng = np.random.default_rng(16)
    m = _conv_chain(fk, rng)
    m.graph.output.append(fk.vi("m", fk.F32, 4))
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Conv", "Add"] and out.graph.node[0].output[0] == "m"
    new_weight, new_bias = out.graph.node[0].input[1:3]
    assert report.entries[0].tensor_map == {"w": [new_weight], "s": [new_weight, new_bias]}


def test_decomposed_chain_with_foldable_bn_after_it(fk):
    """Conv -> Mul -> Add -> BN: the chain folds into the Conv, then the BN into the new Conv."""
    rng = np.random.default_rng(15)
    bn, bn_inits = fk.bn_node("a", "y", "bn", rng, 2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
             helper.make_node("Mul", ["z", "s"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "t"], ["a"], name="add"), bn]
    inits = [fk.init("w", rng.standard_normal((2, 3, 3, 3)), fk.F32),
             fk.init("s", rng.standard_normal((2, 1, 1)), fk.F32),
             fk.init("t", rng.standard_normal((2, 1, 1)), fk.F32), *bn_inits]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 6, 6])], [fk.vi("y", fk.F32, 4)], inits)
    out, report = fk.fold_and_check(m, folded=2, rng=rng)
    assert ops(out) == ["Conv"]
    assert [(e.bn, e.into) for e in report.entries] == [("mul", "conv"), ("bn", "conv")]


# ----------------------------------------------------------------------------- decompose_rest

def _lonely_bn_model(fk, rng, x_shape, elem_type=None):
    """Relu -> BN -> Relu: no linear neighbour to fold into."""
    elem_type = elem_type or fk.F32
    channels = x_shape[1]
    bn, bn_inits = fk.bn_node("r", "b", "bn", rng, channels, elem_type)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"), bn,
             helper.make_node("Relu", ["b"], ["y"], name="relu1")]
    rank = len(x_shape) if x_shape is not None else None
    return fk.model(nodes, [fk.vi("x", elem_type, x_shape)], [fk.vi("y", elem_type, rank)], bn_inits)


@pytest.mark.parametrize("x_shape", [["N", 3], ["N", 3, 5], ["N", 3, 4, 5], ["N", 3, 2, 3, 4]])
def test_decompose_rest(fk, x_shape):
    rng = np.random.default_rng(len(x_shape))
    m = _lonely_bn_model(fk, rng, x_shape)
    _, kept_report = fold(m)
    assert kept_report.kept == 1  # without the option the BN stays

    out, report = fk.fold_and_check(m, folded=0, kept=0, bn_left=0, rng=rng, decompose_rest=True)
    (entry,) = report.entries
    assert (entry.status, report.decomposed) == ("decomposed", 1)
    assert ops(out) == ["Relu", "Mul", "Add", "Relu"]
    assert out.graph.node[2].output[0] == "b"
    stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    scale = stored[out.graph.node[1].input[1]]
    assert scale.shape == (3,) + (1,) * (len(x_shape) - 2) and scale.dtype == np.float32
    # t = beta - mean * s: gamma reaches both constants, mean only the shift.
    assert entry.tensor_map["bn.scale"] == [out.graph.node[1].input[1], out.graph.node[2].input[1]]
    assert entry.tensor_map["bn.mean"] == [out.graph.node[2].input[1]]


def test_decompose_rest_float16(fk):
    rng = np.random.default_rng(20)
    m = _lonely_bn_model(fk, rng, ["N", 3, 4, 4], elem_type=fk.F16)
    out, _ = fk.fold_and_check(m, folded=0, kept=0, bn_left=0, rng=rng, decompose_rest=True)
    assert all(t.data_type == fk.F16 for t in out.graph.initializer)


def test_decompose_rest_only_touches_what_nothing_folds(fk):
    """Conv -> BN folds; the BN after the Relu is decomposed; counts and ops say which is which."""
    rng = np.random.default_rng(21)
    bn1, i1 = fk.bn_node("z", "a", "bn1", rng, 4)
    bn2, i2 = fk.bn_node("r", "y", "bn2", rng, 4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv", pads=[1, 1, 1, 1]), bn1,
             helper.make_node("Relu", ["a"], ["r"], name="relu"), bn2]
    inits = [fk.init("w", rng.standard_normal((4, 3, 3, 3)), fk.F32), *i1, *i2]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 5, 5])], [fk.vi("y", fk.F32, 4)], inits)
    out, report = fk.fold_and_check(m, folded=1, kept=0, bn_left=0, rng=rng, decompose_rest=True)
    assert [(e.bn, e.status) for e in report.entries] == [("bn1", "folded"), ("bn2", "decomposed")]
    assert Counter(ops(out)) == Counter({"Conv": 1, "Relu": 1, "Mul": 1, "Add": 1})


def test_decompose_rest_unknown_rank_is_kept(fk):
    rng = np.random.default_rng(22)
    bn, bn_inits = fk.bn_node("x", "y", "bn", rng, 3)
    m = fk.model([bn], [helper.make_tensor_value_info("x", fk.F32, None)],
                 [helper.make_tensor_value_info("y", fk.F32, None)], bn_inits)
    out, report = fold(m, decompose_rest=True)
    (entry,) = report.entries
    assert entry.status == "kept" and "rank" in entry.reason
    assert out == m


def test_decompose_rest_never_touches_training_mode(fk):
    rng = np.random.default_rng(23)
    m = _lonely_bn_model(fk, rng, ["N", 3, 4])
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    out, report = fold(m, decompose_rest=True)
    assert report.entries[0].status == "kept" and "training_mode" in report.entries[0].reason
    assert out == m


def test_chain_in_if_branch_and_function(fk):
    """A decomposed BN inside an If branch (outer-scope constants) and inside a model-local
    function (Constant nodes) folds like in the main graph."""
    rng = np.random.default_rng(24)
    outer = [fk.init("w", rng.standard_normal((4, 3, 1, 1)), fk.F32),
             fk.init("s", rng.standard_normal((4, 1, 1)), fk.F32),
             fk.init("t", rng.standard_normal((4, 1, 1)), fk.F32)]
    then_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["zt"], name="conv_then"),
                                helper.make_node("Mul", ["zt", "s"], ["mt"], name="mul_then"),
                                helper.make_node("Add", ["mt", "t"], ["yt"], name="add_then")],
                               "then", [], [fk.vi("yt", fk.F32, 4)])
    else_g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["ye"], name="conv_else")],
                               "else", [], [fk.vi("ye", fk.F32, 4)])
    consts = [fk.init("fw", rng.standard_normal((4, 6)), fk.F32), fk.init("fs", rng.standard_normal(6), fk.F32)]
    body = [*(helper.make_node("Constant", [], [t.name], value=t) for t in consts),
            helper.make_node("MatMul", ["u", "fw"], ["p"], name="f_mm"),
            helper.make_node("Mul", ["p", "fs"], ["v_out"], name="f_mul")]
    function = helper.make_function("local", "Head", ["u"], ["v_out"], body, [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("If", ["cond"], ["y0"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Transpose", ["y0"], ["y1"], perm=[0, 2, 3, 1], name="nhwc"),
             helper.make_node("Head", ["y1"], ["y"], domain="local", name="call")]
    m = fk.model(nodes, [fk.vi("cond", TensorProto.BOOL, []), fk.vi("x", fk.F32, [1, 3, 2, 2])],
                 [fk.vi("y", fk.F32, 4)], outer, functions=[function], extra_opsets=[helper.make_opsetid("local", 1)])
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": rng.standard_normal((1, 3, 2, 2)).astype(np.float32)}
        out, report = fk.fold_and_check(m, folded=2, feeds=feeds)
    assert [(e.graph, e.bn, e.into) for e in report.entries] == [
        ("main/if.then_branch", "mul_then", "conv_then"), ("function:local.Head", "f_mul", "f_mm")]
    assert [n.op_type for n in out.functions[0].node] == ["Constant", "Constant", "MatMul", "Add"]


def test_exclude_leaves_a_chain_unfolded(fk):
    """``exclude`` names a chain by its report name (its first Sub / Mul / Div), as bisection of
    failing folds does."""
    rng = np.random.default_rng(25)
    m = _keras_conv_model(fk, rng)
    out, report = fold(m, exclude=["bn/Sub"])
    assert report.folded == 0 and out == m


def test_recognised_chain_that_cannot_fold_is_reported(fk):
    """Conv with a run-time bias -> Mul -> Add: a decomposed BN that cannot fold is reported as
    kept, with the reason, like a kept BatchNormalization (and the model is left as it was)."""
    rng = np.random.default_rng(26)
    m = _conv_chain(fk, rng)
    m.graph.node[0].input.append("runtime_bias")
    m.graph.input.append(fk.vi("runtime_bias", fk.F32, [2]))
    out, report = fold(m)
    assert out == m
    assert report.folded == 0 and report.total == 1
    (entry,) = report.entries
    assert entry.status == "kept" and entry.bn == "mul"
    assert "decomposed BN after Conv 'conv' not folded" in entry.reason and "runtime_bias" in entry.reason


# ---- rule 6: a BatchNormalization node after a Transpose --------------------------------------
def _linear_permute_bn(fk, rng, *, perm=(0, 2, 1), bias=True, **bn_attrs):
    """PyTorch's Linear on (N, L, C) -> transpose(1, 2) -> BatchNorm1d, as the exporter writes it."""
    c = 6
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc")]
    inits = [fk.init("w", rng.standard_normal((4, c)) * 0.5, fk.F32)]
    head = "mm"
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "b"], ["fc_out"], name="fc_bias"))
        inits.append(fk.init("b", rng.standard_normal(c), fk.F32))
        head = "fc_out"
    nodes.append(helper.make_node("Transpose", [head], ["t"], perm=list(perm), name="permute"))
    channels = {(0, 2, 1): c, (0, 1, 2): 5}[tuple(perm)]
    bn, bn_inits = fk.bn_node("t", "y", "bn", rng, channels, **bn_attrs)
    return fk.model([*nodes, bn], [fk.vi("x", fk.F32, ["N", 5, 4])], [fk.vi("y", fk.F32, 3)], inits + bn_inits)


@pytest.mark.parametrize("bias", [True, False])
def test_bn_after_permuted_linear_folds(fk, bias):
    rng = np.random.default_rng(40)
    m = _linear_permute_bn(fk, rng, bias=bias)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    (entry,) = report.entries
    assert entry.bn == "bn" and entry.into == "fc"
    assert ops(out) == ["MatMul", "Add", "Transpose"] and out.graph.node[-1].output[0] == "y"
    assert {"bn.scale", "bn.bias", "bn.mean", "bn.var", "w"} <= set(entry.tensor_map)


def test_bn_whose_axis_is_not_the_linear_output_axis_is_kept(fk):
    """Transpose(0, 1, 2) leaves L on axis 1: the BN normalizes over L, not the MatMul's columns."""
    rng = np.random.default_rng(41)
    m = _linear_permute_bn(fk, rng, perm=(0, 1, 2))
    out, report = fold(m)
    assert report.folded == 0 and report.total == 1 and report.entries[0].status == "kept"
    assert out == m


def test_training_mode_bn_after_permute_is_kept(fk):
    rng = np.random.default_rng(42)
    m = _linear_permute_bn(fk, rng, training_mode=1)
    m.opset_import[0].version = 15
    out, report = fold(m)
    assert report.folded == 0 and report.total == 1 and "training_mode=1" in report.entries[0].reason
    assert out == m


def test_bn_followed_by_a_per_channel_scale_folds_as_one_chain(fk):
    """Conv -> BN -> Mul -> Add (a learned per-channel scale after the BN): all into the Conv,
    reported once, under the BN's name."""
    rng = np.random.default_rng(43)
    bn, bn_inits = fk.bn_node("z", "b", "bn", rng, 2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"), bn,
             helper.make_node("Mul", ["b", "s"], ["m"], name="layer_scale"),
             helper.make_node("Add", ["m", "t"], ["y"], name="shift")]
    inits = [fk.init("w", rng.standard_normal((2, 3, 3, 3)), fk.F32),
             fk.init("s", rng.uniform(0.5, 2.0, (2, 1, 1)), fk.F32),
             fk.init("t", rng.standard_normal((2, 1, 1)), fk.F32), *bn_inits]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 6, 6])], [fk.vi("y", fk.F32, 4)], inits)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Conv"] and out.graph.node[0].output[0] == "y"
    (entry,) = report.entries
    assert (entry.bn, entry.into) == ("bn", "conv")
    assert {"bn.scale", "bn.var", "s", "t"} <= set(entry.tensor_map)


def test_conv_with_separate_bias_add_then_bn_folds(fk):
    """Conv -> Add(per-channel bias) -> BN, as exporters that keep the bias apart write it."""
    rng = np.random.default_rng(44)
    bn, bn_inits = fk.bn_node("a", "y", "bn", rng, 2)
    nodes = [helper.make_node("Conv", ["x", "w"], ["z"], name="conv"),
             helper.make_node("Add", ["z", "b"], ["a"], name="bias_add"), bn]
    inits = [fk.init("w", rng.standard_normal((2, 3, 3, 3)), fk.F32),
             fk.init("b", rng.standard_normal((1, 2, 1, 1)), fk.F32), *bn_inits]
    m = fk.model(nodes, [fk.vi("x", fk.F32, ["N", 3, 6, 6])], [fk.vi("y", fk.F32, 4)], inits)
    out, report = fk.fold_and_check(m, folded=1, rng=rng)
    assert ops(out) == ["Conv"]
    assert [(e.bn, e.into) for e in report.entries] == [("bn", "conv")]
