"""`bnfold recalibrate`: files in and out, the report, --fold, --workers, --json, one-line errors,
and the slow-EMA trap fixed end to end (train -> export -> recalibrate)."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold.cli import main
from bnfold.nn.data import load_digits
from bnfold.runtime import run, session

MODEL = "models/digits_mlp.onnx"


def bnfold(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture()
def files(tmp_path, digits, request):
    root = request.config.rootpath
    train = tmp_path / "train.npz"
    np.savez(train, input=digits.x_train, labels=digits.y_train)
    return root / MODEL, train


def _accuracy(path, x, y) -> float:
    model = onnx.load(str(path))
    (logits,) = run(session(model, "m"), [model.graph.output[0].name], {"input": x}, "m")
    return float((logits.argmax(axis=1) == y).mean())


def _stats(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {f"{n.name}.{k}": initializers[n.input[i]] for n in model.graph.node if n.op_type == "BatchNormalization"
            for k, i in (("mean", 3), ("var", 4))}


def test_writes_out_reports_and_leaves_in_alone(capsys, tmp_path, files):
    model, train = files
    before = model.read_bytes()
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "-o", out, "--labels", "labels",
                                  "--json", report)
    assert code == 0, stderr
    assert stderr == ""  # no progress bar when stderr is not a terminal
    assert model.read_bytes() == before
    assert "recalibrated 2 BatchNormalization nodes over 1347 samples (exact: 2 levels x 6 batches of 256)" in stdout
    assert re.search(r"batchnorm_1 +level +0 +mean shift +[\d.e+-]+ \(ch \d+\) +variance ratio", stdout)
    assert re.search(r"accuracy on the data \(labels 'labels'\): before [\d.]+%, after [\d.]+%", stdout)
    data = json.loads(report.read_text())
    assert data["method"] == "exact" and data["samples"] == 1347 and data["levels"] == 2
    assert [bn["name"] for bn in data["bns"]] == ["batchnorm_1", "batchnorm_4"]
    written = _stats(out)
    for bn in data["bns"]:
        np.testing.assert_array_equal(written[f"{bn['name']}.mean"], np.float32(bn["mean"]))
        np.testing.assert_array_equal(written[f"{bn['name']}.var"], np.float32(bn["var"]))
    # Refuses to overwrite without --force.
    code, _, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "-o", out)
    assert code == 2 and stderr.startswith("bnfold: error: ") and "--force" in stderr


@pytest.mark.parametrize("target", ["model", "data"])
def test_never_writes_over_its_inputs(capsys, tmp_path, files, target):
    model, train = files
    copy = tmp_path / "model.onnx"
    copy.write_bytes(model.read_bytes())
    out = copy if target == "model" else train
    before = out.read_bytes()
    code, _, stderr = bnfold(capsys, "recalibrate", copy, "--data", train, "-o", out, "--force")
    assert code == 2
    assert stderr.strip() == f"bnfold: error: {out}: output is the same file as the input {out}; choose another -o"
    assert out.read_bytes() == before


def test_workers_and_batch_sizes_give_the_same_statistics(capsys, tmp_path, files):
    model, train = files
    results = []
    for name, extra in [("a", ["--batch-size", "1347"]), ("b", ["--workers", "2", "--batch-size", "100"]),
                        ("c", ["--batch-size", "1"])]:
        out = tmp_path / f"{name}.onnx"
        code, _, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "-o", out, *extra)
        assert code == 0, stderr
        results.append(_stats(out))
    for other in results[1:]:
        for key, value in results[0].items():
            # float64 accumulation, different merge trees, stored as float32: equal up to 1 ulp.
            np.testing.assert_allclose(other[key], value, rtol=2e-7, atol=1e-7)


def test_fold_folds_and_verifies(capsys, tmp_path, files, digits):
    model, train = files
    test = tmp_path / "test.npz"
    np.savez(test, input=digits.x_test, labels=digits.y_test)
    plain, folded = tmp_path / "plain.onnx", tmp_path / "folded.onnx"
    assert bnfold(capsys, "recalibrate", model, "--data", train, "--data", test, "-o", plain)[0] == 0
    code, stdout, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "--data", test, "-o", folded, "--fold")
    assert code == 0, stderr
    assert "over 1797 samples" in stdout and "BN folded 2 of 2" in stdout and ": equivalent" in stdout
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(folded)).graph.node)
    x = digits.x_test
    a, b = (run(session(onnx.load(str(p)), "m"), ["logits"], {"input": x}, "m")[0] for p in (plain, folded))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("arrays, extra, message", [
    ({"images": np.zeros((4, 64), np.float32), "other": np.zeros((4, 2))}, [], "no array for model input 'input'"),
    ({"input": np.zeros((4, 64), np.uint8)}, [], "has dtype uint8; model input 'input' takes float32"),
    ({"input": np.zeros((4, 8), np.float32)}, [], r"has shape \(4, 8\)"),
    ({"input": np.zeros((0, 64), np.float32)}, [], "no samples"),
    ({"input": np.zeros((4, 64), np.float32)}, ["--labels", "y"], "no labels array 'y'"),
    ({"input": np.zeros((3, 64), np.float32)}, ["--method", "batch", "--batch-size", "2"], "use a larger batch size"),
])
def test_bad_data_is_a_one_line_error_and_nothing_is_written(capsys, tmp_path, files, arrays, extra, message):
    model, _ = files
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    out = tmp_path / "out.onnx"
    code, _, stderr = bnfold(capsys, "recalibrate", model, "--data", data, "-o", out, *extra)
    assert code == 2
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("bnfold: error: ")
    assert re.search(message, stderr), stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "train.npz"]


def test_help_documents_every_option():
    from bnfold.cli.recalibrate import command

    assert all(param.help for param in command.params if param.param_type_name == "option")
    assert "population variance (denominator N)" in command.help


def test_slow_ema_trap_fixed_end_to_end(capsys, tmp_path, digits):
    """bnfold train --momentum 0.99 --epochs 2 --batch-size 128 leaves moving statistics far from
    the data's; recalibrating the exported model on the training split brings test accuracy within
    one point of the batch-statistics accuracy the trainer reports."""
    checkpoint, model, out = tmp_path / "c.npz", tmp_path / "m.onnx", tmp_path / "r.onnx"
    code, stdout, stderr = bnfold(capsys, "train", "--momentum", "0.99", "--epochs", "2", "--batch-size", "128",
                                  "-o", checkpoint)
    assert code == 0, stderr
    last = [line for line in stdout.splitlines() if line.startswith("epoch")][-1]
    batch, moving = (float(v) for v in re.search(r"batch stats +([\d.]+)% +moving stats +([\d.]+)%", last).groups())
    assert bnfold(capsys, "export", checkpoint, "-o", model)[0] == 0
    train = tmp_path / "train.npz"
    np.savez(train, input=digits.x_train, labels=digits.y_train)
    code, stdout, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "--labels", "labels", "-o", out)
    assert code == 0, stderr
    before, after = (float(v) for v in re.search(r"before ([\d.]+)%, after ([\d.]+)%", stdout).groups())
    assert after > before  # on the training split itself
    moving_onnx = 100 * _accuracy(model, digits.x_test, digits.y_test)
    recalibrated = 100 * _accuracy(out, digits.x_test, digits.y_test)
    assert moving_onnx == pytest.approx(moving, abs=0.3)  # the export carries the trainer's moving statistics
    assert batch - moving >= 4.0  # the trap is there (margins measured in tests/nn/test_train.py)
    assert abs(recalibrated - batch) <= 1.0, (recalibrated, batch, moving)


def test_progress_bar_on_a_terminal_only(capsys, monkeypatch, tmp_path, files):
    model, train = files
    monkeypatch.setattr(__import__("sys").stderr, "isatty", lambda: True)
    code, stdout, stderr = bnfold(capsys, "recalibrate", model, "--data", train, "-o", tmp_path / "o.onnx",
                                  "--batch-size", "500")
    assert code == 0
    assert "recalibrating" in stderr and "100%" in stderr  # 2 levels x 3 batches, drawn on stderr
    assert "recalibrating" not in stdout
