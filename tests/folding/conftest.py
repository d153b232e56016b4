"""Shared graph builders and runners for the fold tests.

Test modules get this module through the session fixture ``fk`` (pytest runs with
``--import-mode=importlib``, so conftest modules cannot be imported by name)::

    def test_x(fk):
        model = fk.model([...nodes...], inputs=[fk.vi("x", fk.F32, ["N", 3])], ...)
        folded, report = fk.fold_and_check(model, folded=1)

Reference outputs come from onnxruntime with graph optimizations DISABLED (its own fusions
would otherwise hide what the file contains). onnxruntime's CPU provider has no float64 Conv /
ConvTranspose and no bfloat16 kernels: float64 models then run in ``onnx.reference`` (an
independent pure-Python implementation), bfloat16 models are upcast exactly to float32 first.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
F64 = TensorProto.DOUBLE
F16 = TensorProto.FLOAT16
BF16 = TensorProto.BFLOAT16

#: Relative tolerance (of the output's scale) for folded vs unfolded outputs, by dtype.
#: Folding multiplies each weight by ``s`` once and rounds to the dtype: a relative change of at
#: most half an ulp per weight (float32 6e-8, float16 4.9e-4, bfloat16 3.9e-3, float64 1.1e-16).
#: An output sums K <= ~300 such products with random signs, so its error is about
#: sqrt(K) * half-ulp of the output scale (float32 ~1e-6); the unfolded model's own BN adds a few
#: ulp. The tolerances below leave a margin of ~5-10x over that estimate and are far below what a
#: wrong fold produces (errors of order 1, since the BN changes every value by O(1)).
RTOL = {F32: 1e-5, F64: 1e-12, F16: 1e-2, BF16: 6e-2}


def vi(name, elem_type, shape):
    """A value info; an int ``shape`` means that rank with symbolic dims (``name_d0``, ...)."""
    if isinstance(shape, int):
        shape = [f"{name}_d{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, elem_type, shape)


def np_of(elem_type):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def init(name, array, elem_type=None):
    """An initializer from ``array`` (cast to ``elem_type`` if given)."""
    array = np.asarray(array)
    if elem_type is not None:
        array = array.astype(np_of(elem_type))
    return numpy_helper.from_array(array, name)


def model(nodes, inputs, outputs, initializers=(), *, opset=17, ir_version=None, value_info=(), functions=(),
          extra_opsets=()):
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    if ir_version is not None:
        m.ir_version = ir_version
    elif opset <= 21:
        # helper.make_model writes the newest IR version; keep one that onnxruntime accepts.
        m.ir_version = min(m.ir_version, 10)
    return m


def bn_arrays(rng, channels, *, var_scale=1.0):
    """gamma, beta, mean, var with non-trivial values (var in [0.25, 2) * var_scale)."""
    gamma = rng.uniform(0.5, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    beta = rng.standard_normal(channels)
    mean = rng.standard_normal(channels)
    var = rng.uniform(0.25, 2.0, channels) * var_scale
    return gamma, beta, mean, var


def bn_node(x, y, prefix, rng, channels, elem_type=F32, *, eps=1e-5, name=None, var_scale=1.0, **attrs):
    """A BatchNormalization node and its four initializers ``<prefix>.{scale,bias,mean,var}``."""
    gamma, beta, mean, var = bn_arrays(rng, channels, var_scale=var_scale)
    names = [f"{prefix}.{r}" for r in ("scale", "bias", "mean", "var")]
    inits = [init(n, a, elem_type) for n, a in zip(names, (gamma, beta, mean, var))]
    node = helper.make_node("BatchNormalization", [x, *names], [y], name=name or prefix, epsilon=eps, **attrs)
    return node, inits


def random_feeds(m, rng, batch=2):
    """Random inputs for the graph inputs that have no initializer (symbolic dims = ``batch``)."""
    init_names = {t.name for t in m.graph.initializer}
    feeds = {}
    for inp in m.graph.input:
        if inp.name in init_names:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        feeds[inp.name] = rng.standard_normal(shape).astype(np_of(tt.elem_type))
    return feeds


def _has_bf16(m):
    return any(t.data_type == BF16 for t in m.graph.initializer) or any(
        v.type.tensor_type.elem_type == BF16 for v in (*m.graph.input, *m.graph.output)
    )


def upcast_bf16(m):
    """An exact float32 copy of a bfloat16 model (every bf16 value is a float32 value)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.data_type == BF16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in (*out.graph.input, *out.graph.output, *out.graph.value_info):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = F32
    for node in out.graph.node:
        for a in node.attribute:
            if a.name == "to" and a.i == BF16:
                a.i = F32
    return out


def _inference_batchnorm():
    """BatchNormalization in inference mode, closed form, channels on axis 1.

    Replaces onnx.reference's BatchNormalization-9, which uses batch statistics whenever the
    ``momentum`` attribute has its default value (it then is not an inference reference).
    """
    from onnx.reference.op_run import OpRun

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None,
                 is_test=None, spatial=None, consumed_inputs=None):
            shape = (1, -1) + (1,) * (x.ndim - 2)
            eps = 1e-5 if epsilon is None else epsilon  # ONNX default

            def per_channel(a):
                return np.asarray(a).reshape(-1).reshape(shape)

            y = per_channel(scale) * (x - per_channel(mean)) / np.sqrt(per_channel(var) + eps) + per_channel(bias)
            return (y.astype(x.dtype),)

    return BatchNormalization


def run(m, feeds):
    """Outputs of ``m`` on ``feeds``: onnxruntime (optimizations off), see the module docstring."""
    import onnxruntime as ort

    if _has_bf16(m):
        m = upcast_bf16(m)
        feeds = {k: np.asarray(v, dtype=np.float32) for k, v in feeds.items()}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        if "NOT_IMPLEMENTED" not in str(exc):
            raise
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(m, new_ops=[_inference_batchnorm()])
        return [np.asarray(o) for o in evaluator.run(None, feeds)]
    return session.run(None, feeds)


def output_dtype(m):
    return m.graph.output[0].type.tensor_type.elem_type


def assert_close(ref, got, elem_type, what=""):
    rtol = RTOL[elem_type]
    ref64 = np.asarray(ref, dtype=np.float64)
    got64 = np.asarray(got, dtype=np.float64)
    assert ref64.shape == got64.shape, (what, ref64.shape, got64.shape)
    scale = max(float(np.max(np.abs(ref64))) if ref64.size else 0.0, 1.0)
    err = float(np.max(np.abs(ref64 - got64))) if ref64.size else 0.0
    assert err <= rtol * scale, f"{what}: max|diff| {err:.3g} > {rtol:g} * scale {scale:.3g}"
    return err


def count_ops(m, op_type):
    total = 0
    graphs = [m.graph]
    while graphs:
        g = graphs.pop()
        for node in g.node:
            total += node.op_type == op_type
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)
    for f in m.functions:
        total += sum(n.op_type == op_type for n in f.node)
    return total


def fold_and_check(m, *, folded, kept=0, rng=None, feeds=None, batch=2, bn_left=None, **fold_kwargs):
    """Fold ``m``; assert the counts, the checker, the input is untouched, outputs match,
    and that folding again changes nothing. Returns ``(folded_model, report)``."""
    from bnfold.folding import fold

    before = m.SerializeToString()
    out, report = fold(m, **fold_kwargs)
    assert m.SerializeToString() == before, "fold modified its input"
    assert report.folded == folded, report.lines()
    assert report.kept == kept, report.lines()
    expected_left = kept if bn_left is None else bn_left
    assert count_ops(out, "BatchNormalization") == expected_left, report.lines()
    onnx.checker.check_model(out, full_check=True)
    assert [v.name for v in out.graph.output] == [v.name for v in m.graph.output]
    init_names = {t.name for t in out.graph.initializer}
    real_inputs = [v for v in m.graph.input if v.name not in {t.name for t in m.graph.initializer}]
    for v in real_inputs:
        assert v.name in {i.name for i in out.graph.input}
    if feeds is None:
        feeds = random_feeds(m, rng or np.random.default_rng(0), batch=batch)
    ref = run(m, feeds)
    got = run(out, {k: v for k, v in feeds.items() if k not in init_names or k in {i.name for i in out.graph.input}})
    for o, a, b in zip(m.graph.output, ref, got):
        assert_close(a, b, o.type.tensor_type.elem_type, o.name)
    again, report2 = fold(out, **fold_kwargs)
    assert again.SerializeToString() == out.SerializeToString(), "folding a folded model changed it"
    assert report2.folded == 0
    return out, report


@pytest.fixture(scope="session")
def fk():
    """The builders and runners of this module."""
    return types.SimpleNamespace(**{k: v for k, v in globals().items() if not k.startswith("_")})
