"""`bnfold convert` on a tf.compat.v1 training switch, and `--set NAME=VALUE`.

The model is the tf2onnx export in ``tests/fixtures/tf/tf_v1_switch_conv.onnx``: input
``training:0`` backed by an initializer (False), 4 If nodes each holding a BN per branch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnfold.testing import run_cli as bnfold_cli

TF = Path(__file__).resolve().parents[1] / "fixtures" / "tf"
SWITCH = TF / "tf_v1_switch_conv.onnx"




def run(path: Path, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_convert_resolves_the_default_switch_and_says_so(tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = bnfold_cli("convert", SWITCH, "-o", out, "--json", tmp_path / "r.json")
    assert code == 0, stderr
    assert "BN folded 4 of 4" in stdout
    assert ("note: training switch 'training:0' = False (its default): 4 If nodes replaced by the branch it"
            " selects; input 'training:0' removed") in stdout
    assert [v.name for v in onnx.load(str(out)).graph.input] == ["x:0"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fold"]["switches"][0]["input"] == "training:0" and report["verification"]["ok"]


def test_set_training_true_selects_the_batch_statistics_branch(tmp_path):
    data = np.load(TF / "tf_v1_switch_conv.npz")
    out = tmp_path / "out.onnx"
    code, stdout, stderr = bnfold_cli("convert", SWITCH, "-o", out, "--set", "training:0=1")
    assert code == 0, stderr
    assert "training switch 'training:0' = True (pinned)" in stdout and "BN folded 0 of 4" in stdout
    got = run(out, {"x:0": data["x:0"]})
    # Batch statistics of this very batch, as TensorFlow computed them (tolerance: see
    # tests/folding/test_switches.py, TF_RTOL); the default branch is ~1 away.
    scale = float(np.max(np.abs(data["y_tf_training"])))
    assert float(np.max(np.abs(got - data["y_tf_training"]))) <= 1e-5 * max(scale, 1.0)
    assert float(np.max(np.abs(got - data["y_tf_inference"]))) > 0.1


@pytest.mark.parametrize("args, message", [
    (["--set", "training:0"], "--set expects NAME=VALUE"),
    (["--set", "training=1"], "cannot pin 'training': the model has no input of that name"),
    (["--set", "training:0=maybe"], "cannot pin input 'training:0' to 'maybe': expected a boolean"),
    (["--set", "x:0=1"], "cannot pin input 'x:0': it decides no If condition (inputs that do: 'training:0')"),
    (["--set", "training:0=1", "--set", "training:0=0"], "--set gives input 'training:0' twice"),
])
def test_bad_set_is_a_one_line_error_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out.onnx"
    code, stdout, stderr = bnfold_cli("convert", SWITCH, "-o", out, *args)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: ") and message in lines[0], stderr
    assert not out.exists()


def test_a_flag_without_default_is_kept_and_named_then_fixed_by_set(tmp_path):
    model = TF / "tf_v1_training_input.onnx"
    code, stdout, stderr = bnfold_cli("convert", model, "-o", tmp_path / "kept.onnx")
    assert code == 0, stderr
    assert "BN folded 0 of 8" in stdout and "--set training:0=VALUE fixes it" in stdout
    code, stdout, stderr = bnfold_cli("convert", model, "-o", tmp_path / "fixed.onnx", "--set", "training:0=false")
    assert code == 0, stderr
    assert "BN folded 4 of 4" in stdout and "= False (pinned)" in stdout


def test_verify_set_runs_the_reference_as_convert_pinned_it(tmp_path):
    out = tmp_path / "train.onnx"
    assert bnfold_cli("convert", SWITCH, "-o", out, "--set", "training:0=true")[0] == 0
    code, stdout, _ = bnfold_cli("verify", SWITCH, out, "--batch", "4")
    assert code == 1 and "NOT equivalent" in stdout  # the reference runs its default, False
    code, stdout, stderr = bnfold_cli("verify", SWITCH, out, "--batch", "4", "--set", "training:0=true")
    assert code == 0, stderr
    assert f"against '{SWITCH} (training:0=true)'" in stdout and stdout.strip().splitlines()[-1].startswith("equivalent")
