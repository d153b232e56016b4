"""`bnfold.inspect`, the checks that run the model in onnxruntime: ``batch statistics`` (samples
that mix) and ``not deterministic``, on hand-built graphs and on exports of PyTorch and Keras 3
(``tests/fixtures/stats``, made by ``tests/fixtures/make_stat_fixtures.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stats"
F = TensorProto.FLOAT


def model_of(nodes, *, batch="N", inits=(), opset=17, inputs=None) -> onnx.ModelProto:
    inputs = inputs or [helper.make_tensor_value_info("x", F, [batch, 3])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("out", F, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def normalize_over(axis: int) -> onnx.ModelProto:
    """x - mean(x, axis): over axis 0 this is training-mode BN's centering (mixes samples)."""
    return model_of([
        helper.make_node("ReduceMean", ["x"], ["mu"], name="batch_mean", axes=[axis], keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["centered"], name="center"),
        helper.make_node("Relu", ["centered"], ["out"], name="relu"),
    ])


def model_flags(report) -> dict[str, str]:
    return {flag.name: flag.detail for flag in report.flags}


def test_mean_over_the_batch_is_batch_statistics_and_names_the_reduce():
    report = bnfold.inspect(normalize_over(0))
    flags = model_flags(report)
    assert "batch statistics" in flags and not report.ok
    assert "ReduceMean 'batch_mean' -> 'mu'" in flags["batch statistics"]
    assert "not deterministic" not in flags


def test_mean_over_features_is_per_sample():
    report = bnfold.inspect(normalize_over(1))
    assert report.ok and not report.flags, report.lines()
    assert report.checks["batch statistics"].startswith("ran on a batch of 4")


def test_static_batch_of_two_is_enough():
    model = normalize_over(0)
    model.graph.input[0].type.tensor_type.shape.dim[0].ClearField("dim_param")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    assert "batch statistics" in model_flags(bnfold.inspect(model))


def test_static_batch_of_one_is_made_free():
    """PyTorch exports without dynamic_axes fix the batch axis to 1: the check frees it."""
    model = normalize_over(0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    report = bnfold.inspect(model)
    assert "batch statistics" in model_flags(report)
    assert "(the static batch axis of 1 made free)" in report.checks["batch statistics"]
    healthy = normalize_over(1)
    healthy.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    assert bnfold.inspect(healthy).ok


def test_static_batch_of_one_that_cannot_be_freed_says_the_check_cannot_run():
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "shape")
    model = model_of([helper.make_node("Reshape", ["x", "shape"], ["flat"], name="fixed"),
                      helper.make_node("ReduceMean", ["flat"], ["out"], axes=[0], keepdims=1)],
                     batch=1, inits=[shape])
    report = bnfold.inspect(model)
    assert "batch statistics" not in model_flags(report)
    check = report.checks["batch statistics"]
    assert "not run" in check and "first axis of 1" in check and "onnxruntime cannot run" in check


def dropout(training: bool) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
             numpy_helper.from_array(np.array(training), "training")]
    return model_of([
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Dropout", ["h", "ratio", "training"], ["out"], name="drop"),
    ], inits=inits)


def test_dropout_in_training_mode_is_not_deterministic():
    report = bnfold.inspect(dropout(True), batch=8)
    flags = model_flags(report)
    assert "not deterministic" in flags and not report.ok
    assert "first at tensor 'out' (Dropout 'drop')" in flags["not deterministic"]
    # Random tensors are not compared for mixing: Dropout is per element, not across samples.
    assert "batch statistics" not in flags


def test_dropout_in_inference_mode_is_deterministic():
    report = bnfold.inspect(dropout(False), batch=8)
    assert report.ok and not report.flags


def test_random_op_is_not_deterministic():
    model = model_of([helper.make_node("RandomNormalLike", ["x"], ["noise"], name="noise"),
                      helper.make_node("Add", ["x", "noise"], ["out"], name="add")])
    assert "not deterministic" in model_flags(bnfold.inspect(model))


def test_run_false_never_runs():
    report = bnfold.inspect(normalize_over(0), run=False)
    assert report.ok and "not run" in report.checks["batch statistics"]


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.onnx"


def test_pytorch_training_export():
    """``TrainingMode.TRAINING``: BN with training_mode=1 (from the attribute and from the run)
    and Dropout active."""
    report = bnfold.inspect(fixture("torch_training"))
    (bn,) = report.bns
    assert [flag.name for flag in bn.flags] == ["batch statistics"]
    flags = model_flags(report)
    assert "Dropout '/3/Dropout'" in flags["not deterministic"]
    assert "BatchNormalization '/1/BatchNormalization'" in flags["batch statistics"]


def test_keras_training_true_export():
    """Keras 3 ``training=True``: no BN node, a ReduceMean / Sub / Sqrt chain; found by running."""
    report = bnfold.inspect(fixture("keras_training_true"))
    assert report.bns == []
    flags = model_flags(report)
    assert set(flags) == {"batch statistics"}
    assert "ReduceMean '/ReduceMean'" in flags["batch statistics"]


@pytest.mark.parametrize("name", ["torch_eval", "keras_eval"])
def test_healthy_exports(name):
    report = bnfold.inspect(fixture(name))
    assert report.ok and not report.all_flags(), report.lines()
    assert len(report.bns) == 1 and report.bns[0].convert.startswith("folded into")


def test_pytorch_never_updated_export():
    report = bnfold.inspect(fixture("torch_never_updated"))
    assert [name for name in {f.name for _, f in report.all_flags()}] == ["never updated"]


def test_absurd_static_batch_is_not_drawn():
    model = normalize_over(0)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 10**12
    report = bnfold.inspect(model)
    assert "not run: the random inputs would take" in report.checks["batch statistics"]
    assert report.ok  # nothing found, and said why


def test_model_onnxruntime_cannot_run_is_still_inspected():
    model = model_of([helper.make_node("NoSuchOp", ["x"], ["out"], domain="custom.domain", name="mystery")])
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    report = bnfold.inspect(model)
    assert report.checks["batch statistics"].startswith("not run: model: onnxruntime cannot load the model")


def test_keras3_never_updated_export():
    """Keras 3 writes BN as Sub(moving mean) -> Mul -> Add: a mean of exactly 0 everywhere is the
    initial value (the healthy export subtracts its trained mean)."""
    report = bnfold.inspect(fixture("keras_never_updated"))
    (bn,) = report.bns
    assert bn.kind == "decomposed" and [flag.name for flag in bn.flags] == ["never updated"]
    (healthy,) = bnfold.inspect(fixture("keras_eval")).bns
    assert healthy.mean is not None and healthy.mean["min"] != healthy.mean["max"] and not healthy.flags
