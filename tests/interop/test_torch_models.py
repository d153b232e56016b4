"""Fold BN in models exported by PyTorch 2.13, with every exporter variant users meet.

For each model and exporter: the number of folds, no BN left where one is foldable, the full
ONNX checker, onnxruntime outputs (optimizations disabled) against the unfolded model and
against PyTorch's own eval-mode output, and idempotence.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from bnfold.folding import fold  # noqa: E402

#: (model, exporter) pairs. "dynamo-opt" only where its optimizer leaves BN behind (BN in front
#: of a linear layer, BN after a permute) or as a representative already-folded graph: each
#: dynamo export costs ~1 s.
CASES = [
    (name, exporter)
    for name in (
        "mlp", "cnn", "depthwise-grouped", "convtranspose-groups", "conv1d", "conv3d",
        "residual", "bn-before-linear", "bn-before-conv", "linear-permute-bn",
    )
    for exporter in ("classic", "classic-nofold", "dynamo")
] + [(name, "dynamo-opt") for name in ("mlp", "cnn", "bn-before-linear", "bn-before-conv", "linear-permute-bn")]

#: Exporters that write one BatchNormalization node per BN module.
WRITES_EVERY_BN = {"classic-nofold", "dynamo"}


def tolerance(reference: np.ndarray) -> float:
    """Absolute tolerance for float32 outputs of these tiny networks.

    Folding reorders float32 roundings: each output is a sum of at most ~100 products, so the
    difference is a few units of float32 rounding (2**-24 ~ 6e-8) of the output's magnitude
    (observed: at most ~3e-7 relative). 1e-5 of the output scale leaves a margin of ~30x over
    that, while a wrong fold (wrong axis, group, bias or statistics) changes outputs by O(0.1)
    of their scale.
    """
    return 1e-5 * max(1.0, float(np.max(np.abs(reference))))


def count(model: onnx.ModelProto, op: str) -> int:
    return Counter(node.op_type for node in model.graph.node)[op]


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_fold_torch_export(name, exporter, torch_export, torch_cases, ort_run):
    case = torch_cases[name]
    exported = torch_export(name, exporter)
    original_bytes = exported.model.SerializeToString()
    n_bn = count(exported.model, "BatchNormalization")
    if exporter in WRITES_EVERY_BN:
        assert n_bn == case.n_bn
    assert n_bn >= case.kept

    folded, report = fold(exported.model)

    assert exported.model.SerializeToString() == original_bytes, "fold modified its input"
    assert report.total == n_bn
    assert report.folded == n_bn - case.kept, report.lines()
    kept = [e for e in report.entries if e.status == "kept"]
    assert len(kept) == case.kept, report.lines()
    for entry in kept:
        assert case.kept_reason in entry.reason, entry.reason
    assert count(folded, "BatchNormalization") == case.kept
    onnx.checker.check_model(folded, full_check=True)

    (reference,) = ort_run(exported.model, exported.inputs)
    (actual,) = ort_run(folded, exported.inputs)
    (torch_out,) = exported.expected
    assert actual.shape == reference.shape == torch_out.shape
    np.testing.assert_allclose(actual, reference, rtol=0, atol=tolerance(reference))
    np.testing.assert_allclose(actual, torch_out, rtol=0, atol=tolerance(torch_out))


@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_fold_torch_export_idempotent(name, exporter, torch_export):
    folded, _ = fold(torch_export(name, exporter).model)
    again, report = fold(folded)
    assert report.folded == 0
    assert again == folded


def test_classic_exporter_keeps_bn_after_linear_layers(torch_export):
    """What bnfold adds for the default classic export: PyTorch fuses Conv+BN itself in eval
    mode, but leaves BN after Linear (Gemm / MatMul) and ConvTranspose for bnfold."""
    assert count(torch_export("cnn", "classic").model, "BatchNormalization") == 0
    assert count(torch_export("mlp", "classic").model, "BatchNormalization") == 2
    assert count(torch_export("convtranspose-groups", "classic").model, "BatchNormalization") == 2


def test_dynamo_raw_graph_has_computed_zero_bias(torch_export):
    """The raw dynamo=True graph writes a missing conv bias as Shape -> Expand -> CastLike ->
    Expand; after folding, the computed bias is gone and the Conv reads a constant."""
    model = torch_export("cnn", "dynamo").model
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["CastLike"] >= 1 and ops["Expand"] >= 1
    folded, report = fold(model)
    assert report.folded == 2
    after = Counter(node.op_type for node in folded.graph.node)
    assert after["CastLike"] == 0 and after["BatchNormalization"] == 0
    initializers = {t.name for t in folded.graph.initializer}
    for conv in (n for n in folded.graph.node if n.op_type == "Conv"):
        assert len(conv.input) == 3 and conv.input[2] in initializers


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn-before-conv"])
@pytest.mark.parametrize("decompose_rest", [False, True])
def test_training_mode_export_is_never_folded(name, decompose_rest, torch_export, torch_cases):
    """Exported with TrainingMode.TRAINING, every BN normalizes with batch statistics: nothing
    may be folded or decomposed, and the model comes back unchanged."""
    model = torch_export(name, "classic-train").model
    assert count(model, "BatchNormalization") == torch_cases[name].n_bn
    out, report = fold(model, decompose_rest=decompose_rest)
    assert report.kept == report.total == torch_cases[name].n_bn
    assert all("training_mode=1" in entry.reason for entry in report.entries), report.lines()
    assert out == model


@pytest.mark.parametrize("exporter", ["classic", "dynamo"])
def test_decompose_rest_on_the_bn_before_a_padded_conv(exporter, torch_export, ort_run):
    """The BN that cannot be folded (in front of a padded Conv) becomes Mul + Add; the other
    one is still folded; outputs match PyTorch."""
    exported = torch_export("bn-before-conv", exporter)
    folded, report = fold(exported.model, decompose_rest=True)
    assert (report.folded, report.decomposed, report.kept) == (1, 1, 0), report.lines()
    assert count(folded, "BatchNormalization") == 0
    onnx.checker.check_model(folded, full_check=True)
    (actual,) = ort_run(folded, exported.inputs)
    (torch_out,) = exported.expected
    np.testing.assert_allclose(actual, torch_out, rtol=0, atol=tolerance(torch_out))
