"""`bnfold.inspect`, the checks that need no run: each flag on a model that has the fault, and the
same model without it unflagged.

Models are built by hand (MatMul -> BatchNormalization -> Relu, parameters as initializers), so
that each fault is exactly one changed value.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.diagnosis.records import FLOAT16_MAX, HUGE_SCALE

C = 4


def healthy_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "gamma": rng.uniform(0.5, 1.5, C), "beta": rng.normal(size=C),
        "mean": rng.normal(size=C), "var": rng.uniform(0.5, 2.0, C),
    }


def bn_model(*, eps: float = 1e-5, training_mode: int | None = None, weight: np.ndarray | None = None,
             dtype=np.float32, opset: int = 17, **params: np.ndarray) -> onnx.ModelProto:
    values = {**healthy_params(), **params}
    weight = np.random.default_rng(1).normal(size=(3, C)) if weight is None else weight
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    attrs = {"epsilon": eps}
    if training_mode is not None:
        attrs["training_mode"] = training_mode
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
        helper.make_node("BatchNormalization", ["z", "gamma", "beta", "mean", "var"], ["y"], name="bn", **attrs),
        helper.make_node("Relu", ["y"], ["out"], name="relu"),
    ]
    inits = [numpy_helper.from_array(np.asarray(weight, dtype=dtype), "w")]
    inits += [numpy_helper.from_array(np.asarray(values[k], dtype=dtype), k) for k in ("gamma", "beta", "mean", "var")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 3])],
                              [helper.make_tensor_value_info("out", elem, ["N", C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def flags_of(report, name: str = "bn") -> list[str]:
    (bn,) = [bn for bn in report.bns if bn.name == name]
    return [flag.name for flag in bn.flags]


def detail(report, flag_name: str) -> str:
    return next(flag.detail for _, flag in report.all_flags() if flag.name == flag_name)


def test_healthy_model_has_no_flag():
    report = bnfold.inspect(bn_model(), run=False)
    assert report.ok and not report.all_flags(), report.lines()
    (bn,) = report.bns
    params = healthy_params()
    assert bn.channels == C and bn.epsilon == pytest.approx(1e-5)
    # float32 round trip of the stored statistics: 1 ulp.
    assert bn.mean["min"] == pytest.approx(params["mean"].min(), rel=1e-6)
    assert bn.var["max"] == pytest.approx(params["var"].max(), rel=1e-6)
    assert bn.convert == "folded into 'dense'"


def test_never_updated():
    report = bnfold.inspect(bn_model(mean=np.zeros(C), var=np.ones(C)), run=False)
    assert flags_of(report) == ["never updated"] and not report.ok


@pytest.mark.parametrize("mean, var", [(np.zeros(C), np.array([1, 1, 1, 1.001])),
                                       (np.array([0, 0, 1e-6, 0]), np.ones(C))])
def test_almost_initial_statistics_are_not_never_updated(mean, var):
    assert "never updated" not in flags_of(bnfold.inspect(bn_model(mean=mean, var=var), run=False))


@pytest.mark.parametrize("change, channel_text", [
    ({"var": np.array([1.0, -0.5, 1.0, 1.0])}, "channel 1"),
    ({"var": np.array([1.0, 1.0, np.nan, 1.0])}, "channel 2"),
    ({"var": np.array([np.inf, 1.0, 1.0, 1.0])}, "channel 0"),
    ({"mean": np.array([0.0, 0.0, 0.0, np.nan])}, "channel 3"),
    ({"eps": 0.0}, "epsilon is 0"),
    ({"eps": -1e-3}, "epsilon"),
])
def test_invalid(change, channel_text):
    report = bnfold.inspect(bn_model(**change), run=False)
    assert "invalid" in flags_of(report) and not report.ok
    assert channel_text in detail(report, "invalid")


def test_invalid_model_is_reported_not_raised():
    """convert refuses such a model (exit 2); inspect says so and still reports the BN."""
    report = bnfold.inspect(bn_model(var=np.array([1.0, -0.5, 1.0, 1.0])), run=False)
    assert report.fold_error is not None and "channel 1" in report.fold_error
    assert report.bns[0].convert.startswith("refused")


@pytest.mark.parametrize("opset, attrs, outputs", [
    (17, {"training_mode": 1}, 1),
    (9, {}, 5),  # BatchNormalization-9: running mean/var outputs exist only in training mode
])
def test_training_mode_is_batch_statistics(opset, attrs, outputs):
    model = bn_model(opset=opset)
    bn = model.graph.node[1]
    bn.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    bn.output.extend([f"extra{i}" for i in range(1, outputs)])
    report = bnfold.inspect(model, run=False)
    assert "batch statistics" in flags_of(report) and not report.ok
    assert report.bns[0].convert.startswith("kept")


def test_training_mode_zero_is_not_flagged():
    assert flags_of(bnfold.inspect(bn_model(training_mode=0), run=False)) == []


def test_huge_fold_scale_warning():
    tiny = np.array([1.0, 1.0, 1e-9, 1.0])
    report = bnfold.inspect(bn_model(var=tiny, eps=1e-9), run=False)
    assert flags_of(report) == ["huge fold scale"] and report.ok  # a warning: exit 0
    # gamma / sqrt(2e-9) for channel 2: > 1e4, far above the threshold.
    assert "channel 2" in detail(report, "huge fold scale")
    assert report.bns[0].scale["max"] >= HUGE_SCALE


def test_scale_just_below_threshold_is_not_huge():
    gamma = np.ones(C)
    var = np.full(C, (1 / (0.9 * HUGE_SCALE)) ** 2)  # scale 0.9 * threshold with eps 0
    report = bnfold.inspect(bn_model(gamma=gamma, var=var, eps=1e-12), run=False)
    assert "huge fold scale" not in flags_of(report)


def test_float16_overflow_warning():
    # Folded weight w * gamma / sqrt(var + eps) = 1 * 300 / sqrt(1e-8) = 3e6 > 65504.
    report = bnfold.inspect(bn_model(gamma=np.full(C, 300.0), var=np.full(C, 1e-8), eps=1e-8), run=False)
    assert "float16" in flags_of(report) and report.ok
    assert f"{FLOAT16_MAX:g}" in detail(report, "float16")


def test_float16_subnormal_bias_warning():
    # shift = beta - mean * scale = 1e-6 in every channel: subnormal in float16 (< 6.1e-5).
    report = bnfold.inspect(bn_model(beta=np.full(C, 1e-6), mean=np.zeros(C)), run=False)
    assert "float16" in flags_of(report) and "subnormal" in detail(report, "float16")


def test_float16_healthy_counterpart():
    assert "float16" not in flags_of(bnfold.inspect(bn_model(beta=np.full(C, 0.5)), run=False))


def test_dead_channels_warning():
    gamma = healthy_params()["gamma"]
    gamma[3] = 0.0
    report = bnfold.inspect(bn_model(gamma=gamma), run=False)
    assert "dead channels" in flags_of(report) and report.ok
    assert "channel 3" in detail(report, "dead channels")


def test_bn_in_subgraph_and_function_are_inspected():
    body_nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="inner_bn")]
    zeros, ones = np.zeros(C, np.float32), np.ones(C, np.float32)
    then = helper.make_graph(body_nodes, "then", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(a, n) for a, n in ((ones, "g"), (zeros, "b"), (zeros, "m"),
                                                                          (ones, "v"))])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], name="branch", then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", C])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    report = bnfold.inspect(model, run=False)
    (bn,) = report.bns
    assert bn.graph == "main/branch.then_branch" and flags_of(report, "inner_bn") == ["never updated"]


def test_decomposed_bn_is_reported():
    """A per-channel Mul / Add chain after a MatMul (Keras 3's export of BN) gets its own row."""
    scale = np.array([1.0, 2.0, 3.0, 2e4], np.float32)  # huge last channel
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
        helper.make_node("Mul", ["z", "s"], ["zs"], name="bn_mul"),
        helper.make_node("Add", ["zs", "t"], ["y"], name="bn_add"),
    ]
    inits = [numpy_helper.from_array(np.ones((3, C), np.float32), "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.full(C, 0.5, np.float32), "t")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])], inits)
    report = bnfold.inspect(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), run=False)
    (bn,) = report.bns
    assert (bn.name, bn.kind, bn.channels) == ("bn_mul", "decomposed", C)
    assert bn.convert == "folded into 'dense'" and bn.scale["max"] == pytest.approx(2e4)
    assert [flag.name for flag in bn.flags] == ["huge fold scale"]


def test_inspect_never_modifies_the_model():
    model = bn_model(mean=np.zeros(C), var=np.ones(C))
    before = model.SerializeToString()
    bnfold.inspect(model)
    assert model.SerializeToString() == before


def test_json_has_the_table_content():
    report = bnfold.inspect(bn_model(mean=np.zeros(C), var=np.ones(C)), run=False)
    data = report.to_dict()
    assert data["ok"] is False and data["wrong"] == ["never updated"]
    (bn,) = data["bns"]
    assert bn["name"] == "bn" and bn["channels"] == C and bn["flags"][0]["name"] == "never updated"
    assert bn["convert"] == "folded into 'dense'"
