"""Property: every randomly built foldable producer -> BN graph folds, stays equivalent, and a second
fold changes nothing (onnxruntime with optimizations off is the reference, see conftest)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

#: Opsets covering every BatchNormalization version from 9 on (9, 14, 15) and Gemm 9/11/13.
OPSETS = [9, 11, 13, 14, 15, 17, 18, 21]


@st.composite
def foldable_models(draw, fk):
    op = draw(st.sampled_from(["Conv", "ConvTranspose", "Gemm", "MatMul"]))
    elem_type = draw(st.sampled_from([fk.F32, fk.F64, fk.F16]))
    opset = draw(st.sampled_from(OPSETS))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    nodes, inits = [], []
    if op in ("Conv", "ConvTranspose"):
        dims = draw(st.integers(1, 3))
        # onnxruntime has no float64 ConvTranspose and onnx.reference's fails with groups.
        group = 1 if (op, elem_type) == ("ConvTranspose", fk.F64) else draw(st.sampled_from([1, 2, 3]))
        c_in = group * draw(st.integers(1, 3))
        c_out = group * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 2))
        pad = draw(st.integers(0, kernel - 1))
        spatial = [draw(st.integers(kernel, 6)) for _ in range(dims)]
        w_shape = (c_out, c_in // group) if op == "Conv" else (c_in, c_out // group)
        inits.append(fk.init("w", rng.standard_normal((*w_shape, *[kernel] * dims)) * 0.5, elem_type))
        inputs = ["x", "w"]
        if draw(st.booleans()):
            inits.append(fk.init("b", rng.standard_normal(c_out), elem_type))
            inputs.append("b")
        nodes.append(helper.make_node(op, inputs, ["z"], name="lin", group=group, kernel_shape=[kernel] * dims,
                                      strides=[stride] * dims, pads=[pad] * (2 * dims)))
        x_shape, channels, out_rank = ["N", c_in, *spatial], c_out, dims + 2
    else:
        k, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        trans_b = draw(st.integers(0, 1)) if op == "Gemm" else 0
        inits.append(fk.init("w", rng.standard_normal((n, k) if trans_b else (k, n)), elem_type))
        if op == "Gemm":
            inputs = ["x", "w"]
            # C is required before Gemm-11.
            if opset < 11 or draw(st.booleans()):
                inits.append(fk.init("c", rng.standard_normal(draw(st.sampled_from([(n,), (1, n), ()]))), elem_type))
                inputs.append("c")
            attrs = {"transB": trans_b, "alpha": draw(st.sampled_from([1.0, 0.5, 2.0])),
                     "beta": draw(st.sampled_from([1.0, -1.0, 3.0]))}
            nodes.append(helper.make_node("Gemm", inputs, ["z"], name="lin", **attrs))
        else:
            nodes.append(helper.make_node("MatMul", ["x", "w"], ["mm"], name="lin"))
            if draw(st.booleans()):
                inits.append(fk.init("c", rng.standard_normal(n), elem_type))
                nodes.append(helper.make_node("Add", ["mm", "c"], ["z"], name="bias_add"))
            else:
                nodes[-1].output[0] = "z"
        x_shape, channels, out_rank = ["N", k], n, 2
    bn, bn_inits = fk.bn_node("z", "y", "bn", rng, channels, elem_type, eps=eps)
    m = fk.model([*nodes, bn], [fk.vi("x", elem_type, x_shape)], [fk.vi("y", elem_type, out_rank)],
                 inits + bn_inits, opset=opset)
    return m, rng


@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_random_foldable_graphs(fk, data):
    m, rng = data.draw(foldable_models(fk))
    out, report = fk.fold_and_check(m, folded=1, rng=rng)  # also checks idempotence
    assert report.entries[0].into == "lin"
    assert out.opset_import == m.opset_import and out.ir_version == m.ir_version
