"""Fold BN in models exported by Keras 3 (``model.export(format="onnx")``, torch backend).

Keras writes each inference-mode BatchNormalization layer as Sub(moving_mean) ->
Mul(gamma / sqrt(moving_variance + epsilon)) -> Add(beta) by constants of shape (1, ..., C),
with no-op Casts around the ops and, after a channels-last Conv2D, a Transpose from NCHW back
to NHWC between the Conv and the affine ops. Each such chain must fold into its Conv / MatMul.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")
pytest.importorskip("keras")

from bnfold.folding import fold  # noqa: E402

CASES = ["keras-dense", "keras-conv", "keras-sequence", "keras-depthwise"]


def tolerance(reference: np.ndarray) -> float:
    """Absolute tolerance for float32 outputs of these tiny networks: see the same function in
    test_torch_models.py (float32 rounding of sums of <= ~60 products is ~3e-7 of the output
    scale; 1e-5 leaves a ~30x margin, a wrong fold changes outputs by O(0.1) of their scale)."""
    return 1e-5 * max(1.0, float(np.max(np.abs(reference))))


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("name", CASES)
def test_export_writes_decomposed_bn(name, keras_export, keras_cases):
    """Guard on what the exporter writes: no BN node, one Sub and one Mul per BN layer."""
    before = ops(keras_export(name).model)
    case = keras_cases[name]
    assert before["BatchNormalization"] == 0
    assert before["Sub"] == before["Mul"] == case.n_bn
    assert before["Cast"] > 0
    # channels-last -> channels-first before each Conv and back after it.
    assert before["Transpose"] == 2 * case.n_conv


@pytest.mark.parametrize("name", CASES)
def test_fold_keras_export(name, keras_export, keras_cases, ort_run):
    exported = keras_export(name)
    original_bytes = exported.model.SerializeToString()
    n_bn = keras_cases[name].n_bn

    folded, report = fold(exported.model)

    assert exported.model.SerializeToString() == original_bytes, "fold modified its input"
    assert report.folded == report.total == n_bn, report.lines()
    after = ops(folded)
    assert after["Sub"] == after["Mul"] == after["Div"] == 0, after
    onnx.checker.check_model(folded, full_check=True)

    (reference,) = ort_run(exported.model, exported.inputs)
    (actual,) = ort_run(folded, exported.inputs)
    (keras_out,) = exported.expected
    assert actual.shape == reference.shape == keras_out.shape
    np.testing.assert_allclose(actual, reference, rtol=0, atol=tolerance(reference))
    np.testing.assert_allclose(actual, keras_out, rtol=0, atol=tolerance(keras_out))


@pytest.mark.parametrize("name", CASES)
def test_fold_keras_export_idempotent(name, keras_export):
    folded, _ = fold(keras_export(name).model)
    again, report = fold(folded)
    assert report.total == 0
    assert again == folded
