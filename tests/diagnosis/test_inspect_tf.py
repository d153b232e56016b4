"""`bnfold.inspect` on models exported by TensorFlow 2.21 / tf_keras through tf2onnx 1.17
(``tests/fixtures/tf``, made by ``tests/fixtures/tf/make_tf_fixtures.py``; each ``NAME.npz`` holds
TF's own moving statistics and outputs, the references used here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bnfold

TF = Path(__file__).resolve().parents[1] / "fixtures" / "tf"


def flag_names(report) -> set[str]:
    return {flag.name for _, flag in report.all_flags()}


def test_never_updated_tf_keras():
    """A custom loop without ``training=True``: TF's moving statistics are still 0 and 1."""
    reference = np.load(TF / "keras_never_updated.npz")
    report = bnfold.inspect(TF / "keras_never_updated.onnx")
    assert len(report.bns) == 2 and not report.ok
    for bn in report.bns:
        assert [flag.name for flag in bn.flags] == ["never updated"]
    means = [reference[key] for key in reference.files if key.startswith("moving_mean/")]
    assert len(means) == 2 and all(np.all(mean == 0) for mean in means)  # the reference agrees


def test_healthy_tf_keras_reports_tf_statistics():
    reference = np.load(TF / "keras_healthy.npz")
    report = bnfold.inspect(TF / "keras_healthy.onnx", TF / "keras_data.npz")
    assert report.ok and not report.all_flags(), report.lines()
    tf_means = sorted((float(reference[k].min()), float(reference[k].max()))
                      for k in reference.files if k.startswith("moving_mean/"))
    ours = sorted((bn.mean["min"], bn.mean["max"]) for bn in report.bns)
    # The ONNX file stores TF's float32 values: equal up to float32 rounding.
    np.testing.assert_allclose(ours, tf_means, rtol=1e-6)
    assert all(bn.drift is not None for bn in report.bns)


def test_stale_tf_keras_needs_data():
    """momentum 0.99 and 16 steps: TF's own accuracy with moving statistics is far below that with
    batch statistics (manifest); inspect says `stale` with data, nothing without."""
    assert bnfold.inspect(TF / "keras_stale.onnx").ok
    report = bnfold.inspect(TF / "keras_stale.onnx", TF / "keras_data.npz")
    assert flag_names(report) == {"stale"}
    assert all("stale" in [flag.name for flag in bn.flags] for bn in report.bns)


@pytest.mark.parametrize("name, start", [
    ("keras_training_true", "ReduceMean 'model_3/bn1/moments/mean'"),
    ("tf_v1_training_true", "ReduceMean"),
])
def test_training_true_exports(name, start):
    """The references confirm the export normalizes with batch statistics: onnxruntime reproduces
    TF's training-mode output, not its inference output (checked when the fixtures were made)."""
    report = bnfold.inspect(TF / f"{name}.onnx")
    assert flag_names(report) == {"batch statistics"}
    (flag,) = report.flags
    assert f"samples first mix at {start}" in flag.detail


def test_training_switch_is_reported_with_each_value():
    """``placeholder_with_default(False)``: a warning (exit 0) naming the input, its default and
    what each value does; with the default nothing mixes; the BNs of the selected branch are the
    ones convert folds, those of the other branch are removed with it."""
    report = bnfold.inspect(TF / "tf_v1_switch_conv.onnx")
    assert report.ok and flag_names(report) == {"training switch"}
    (switch,) = report.switches
    assert switch["input"] == "training:0" and switch["default"] is False
    assert [outcome["batch_statistics"] for outcome in switch["outcomes"]] == [False, True]
    (flag,) = report.flags
    assert flag.level == "warning" and "'training:0'" in flag.detail and "default False" in flag.detail
    assert len(report.bns) == 8
    taken = [bn for bn in report.bns if bn.graph.endswith(".else_branch")]
    other = [bn for bn in report.bns if bn.graph.endswith(".then_branch")]
    assert len(taken) == len(other) == 4
    assert all(bn.convert.startswith("folded into 'net/conv") for bn in taken), [bn.convert for bn in taken]
    assert all(bn.convert.startswith("removed: 'training:0' = False") for bn in other)


def test_switch_over_decomposed_bns():
    report = bnfold.inspect(TF / "tf_v1_switch_dense.onnx")
    assert flag_names(report) == {"training switch"}
    assert [bn.convert for bn in report.bns] == ["folded into 'net/dense0/MatMul'", "folded into 'net/dense1/MatMul'"]


def test_a_model_without_if_has_no_switch():
    report = bnfold.inspect(TF / "keras_healthy.onnx")
    assert report.switches == [] and "training switch" not in flag_names(report)


def test_training_flag_without_default_names_its_value():
    """``placeholder(tf.bool)``: a real input that the run draws at random. Whatever the seed, the
    model is flagged exactly when the flag was drawn True, and the flag says so. It is a switch
    with no default (a warning either way)."""
    seen = set()
    for seed in range(6):
        report = bnfold.inspect(TF / "tf_v1_training_input.onnx", seed=seed)
        training = "training:0=True" in report.checks["batch statistics"]
        assert training or "training:0=False" in report.checks["batch statistics"]
        flags = {flag.name: flag.detail for flag in report.flags}
        assert ("batch statistics" in flags) == training, (seed, report.lines())
        if training:
            assert "training:0=True" in flags["batch statistics"]
        seen.add(training)
        (switch,) = report.switches
        assert switch["default"] is None and "training switch" in flag_names(report)
    assert seen == {True, False}  # both values were drawn in 6 seeds (fixed: the test is deterministic)
