"""Stress case for exactness: tiny variances (1e-8, eps 1e-5) make the BN scale ~300 x gamma.

For Conv+BN and Gemm+BN in float32, the error of each folded model against a float64 evaluation
of the original model is compared between bnfold and the peers that fold the case:
onnxoptimizer ``fuse_bn_into_conv``, onnxscript (``optimizer.optimize`` and its batchnorm rewrite
rules), and onnxruntime's own graph optimizer (ORT_ENABLE_EXTENDED, saved with
``optimized_model_filepath``, then run with optimizations off like every other model).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.folding import fold

log = logging.getLogger(__name__)


def _stress_model(fk, op, rng):
    c = 16
    var = np.full(c, 1e-8) * rng.uniform(0.5, 2.0, c)
    gamma = rng.uniform(0.5, 2.0, c)
    beta, mean = rng.standard_normal(c), rng.standard_normal(c) * 0.1
    params = [fk.init(f"bn.{r}", a, fk.F32) for r, a in zip(("scale", "bias", "mean", "var"), (gamma, beta, mean, var))]
    bn = helper.make_node("BatchNormalization", ["z", *[p.name for p in params]], ["y"], name="bn", epsilon=1e-5)
    if op == "Conv":
        inits = [fk.init("w", rng.standard_normal((c, 8, 3, 3)) * 0.2, fk.F32), fk.init("b", rng.standard_normal(c) * 0.1, fk.F32)]
        lin = helper.make_node("Conv", ["x", "w", "b"], ["z"], name="conv", pads=[1, 1, 1, 1])
        x_shape, y_rank = [2, 8, 6, 6], 4
    else:
        inits = [fk.init("w", rng.standard_normal((c, 32)) * 0.2, fk.F32), fk.init("b", rng.standard_normal(c) * 0.1, fk.F32)]
        lin = helper.make_node("Gemm", ["x", "w", "b"], ["z"], name="fc", transB=1)
        x_shape, y_rank = [8, 32], 2
    return fk.model([lin, bn], [fk.vi("x", fk.F32, x_shape)], [fk.vi("y", fk.F32, y_rank)], inits + params)


def _to_float64(m):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in (*out.graph.input, *out.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return out


def _bn_count(m):
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def _peer_onnxoptimizer(m, tmp_path):
    onnxoptimizer = pytest.importorskip("onnxoptimizer")
    return onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])


def _peer_onnxscript_optimize(m, tmp_path):
    optimizer = pytest.importorskip("onnxscript.optimizer")

    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    return optimizer.optimize(copy)


def _peer_onnxscript_rules(m, tmp_path):
    pytest.importorskip("onnxscript")
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    return rewriter.rewrite(copy, pattern_rewrite_rules=[fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_gemm_rule])


def _peer_onnxruntime(m, tmp_path):
    import onnxruntime as ort

    path = tmp_path / "ort_optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


PEERS = {
    "onnxoptimizer": _peer_onnxoptimizer,
    "onnxscript.optimize": _peer_onnxscript_optimize,
    "onnxscript.rules": _peer_onnxscript_rules,
    "onnxruntime": _peer_onnxruntime,
}


def _effective_linear(candidate, op, x32):
    """The folded linear node and the float32 weight / bias it actually uses at run time.

    Constants are read directly; a peer that computes them at run time (onnxoptimizer inserts
    Add/Sqrt/Div/Mul nodes that scale the weights at every inference) is run in onnxruntime with
    those values added as graph outputs.
    """
    (lin,) = [n for n in candidate.graph.node if n.op_type == op]
    inits = {t.name: t for t in candidate.graph.initializer}
    names = [name for name in lin.input[1:3] if name]
    computed = [name for name in names if name not in inits]
    values = {name: numpy_helper.to_array(inits[name]) for name in names if name in inits}
    if computed:
        probe = onnx.ModelProto()
        probe.CopyFrom(candidate)
        probe.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in computed)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        values.update(zip(computed, session.run(computed, x32)))
    return lin, [values[name] for name in names]


def _run_linear_float64(fk, lin, params, x):
    """``lin`` with the given float32 parameters, evaluated in float64 (no run-time rounding)."""
    names = [f"p{i}" for i in range(len(params))]
    node = helper.make_node(lin.op_type, ["x", *names], ["y"])
    node.attribute.extend(lin.attribute)
    inits = [numpy_helper.from_array(np.asarray(p, dtype=np.float64), n) for n, p in zip(names, params)]
    m = fk.model([node], [fk.vi("x", fk.F64, list(x.shape))], [fk.vi("y", fk.F64, x.ndim)], inits)
    return fk.run(m, {"x": x})[0]


@pytest.mark.parametrize("op", ["Conv", "Gemm"])
def test_tiny_variance_stress(fk, op, tmp_path):
    rng = np.random.default_rng(2026)
    m = _stress_model(fk, op, rng)
    x = rng.standard_normal([d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim])
    # float64 reference: the same parameters (float32 values, exact in float64), evaluated in float64.
    reference = fk.run(_to_float64(m), {"x": x})[0]
    scale = float(np.max(np.abs(reference)))
    x32 = {"x": x.astype(np.float32)}

    def runtime_error(candidate):
        return float(np.max(np.abs(fk.run(candidate, x32)[0].astype(np.float64) - reference)))

    def fold_error(candidate):
        lin, params = _effective_linear(candidate, op, x32)
        return float(np.max(np.abs(_run_linear_float64(fk, lin, params, x) - reference)))

    folded, report = fold(m)
    assert report.folded == 1 and _bn_count(folded) == 0
    # float32 run time: bounded by float32 rounding. The folded weights are the exact products
    # rounded once (half an ulp, 6e-8 relative); an output sums K = 72 (Conv) or 32 (Gemm)
    # products, each rounded in the accumulation too: at most ~K * 2^-24 of the output scale.
    runtime = {"unfolded float32": runtime_error(m), "bnfold": runtime_error(folded)}
    assert runtime["bnfold"] <= 72 * 2**-24 * scale
    # Error of the folded parameters alone (each model's effective weight and bias, evaluated in
    # float64): bnfold's are the float64 fold rounded once to float32, so no float32 fold can have
    # a smaller error except by a cancellation of luck.
    ours = fold_error(folded)
    errors = {"bnfold": ours}
    for name, peer in PEERS.items():
        try:
            candidate = peer(m, tmp_path)
        except pytest.skip.Exception:
            raise
        except Exception as exc:  # noqa: BLE001 - a peer failing is reported, not our failure
            log.warning("%s failed on the %s stress case: %s", name, op, exc)
            continue
        if _bn_count(candidate) != 0:
            continue  # this peer does not fold the case
        runtime[name] = runtime_error(candidate)
        errors[name] = fold_error(candidate)
    print(f"\n{op} tiny-variance stress (output scale {scale:.3g}), max |error| vs float64:"
          f"\n  folded parameters: " + ", ".join(f"{k} {v:.3g}" for k, v in errors.items())
          + "\n  float32 run time:  " + ", ".join(f"{k} {v:.3g}" for k, v in runtime.items()))
    assert ours <= 4 * 2**-24 * scale  # a few half-ulps of the output scale
    for name, err in errors.items():
        assert ours <= err, (name, errors)
