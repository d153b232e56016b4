"""`bnfold inspect`: the table and exit codes, --json, --data (the trainer's slow-EMA trap end to
end), --plot, bad input; and `bnfold convert`'s statistics warnings and --strict.

Commands run in-process through `bnfold.cli.main` inside click's `CliRunner` isolation, plus
subprocesses where the process state matters (which modules were imported).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnfold.nn.data import load_digits
from bnfold.testing import run_cli as bnfold_cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "digits_mlp.onnx"
STATS = ROOT / "tests" / "fixtures" / "stats"




def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    return lines[0]


def test_healthy_model_table_and_exit_0():
    code, out, err = bnfold_cli("inspect", SHIPPED)
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0]
    for column in ("BN", "channels", "eps", "moving mean", "moving var", "convert", "flags"):
        assert column in header
    rows = [line for line in lines[1:3]]
    # Aligned: every column starts at the same offset in the header and the rows.
    offset = header.index("convert")
    assert all(row[offset:].startswith("folded into") for row in rows), out
    assert lines[-1] == "2 BN, 2 would fold; no wrong statistics found"


def test_wrong_flag_exits_1_and_json_matches(tmp_path):
    report_path = tmp_path / "report.json"
    code, out, err = bnfold_cli("inspect", STATS / "torch_never_updated.onnx", "--json", report_path)
    assert code == 1 and err == ""
    assert "never updated" in out and out.splitlines()[-1].endswith("WRONG: never updated")
    data = json.loads(report_path.read_text())
    assert data["ok"] is False and data["wrong"] == ["never updated"]
    (bn,) = data["bns"]
    assert bn["name"] in out and [f["name"] for f in bn["flags"]] == ["never updated"]
    assert bn["flags"][0]["detail"] in out


def test_every_wrong_flag_name_is_printed_as_named():
    names = set()
    for fixture in ("torch_training", "keras_training_true", "torch_never_updated"):
        code, out, _ = bnfold_cli("inspect", STATS / f"{fixture}.onnx")
        assert code == 1
        names |= {name for name in ("never updated", "batch statistics", "not deterministic") if f": {name}: " in out}
    assert names == {"never updated", "batch statistics", "not deterministic"}


# ---------------------------------------------------------------- the trainer's trap, end to end

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The slow-EMA trap and the default training, each trained and exported by the CLI, and the
    training split as .npz keyed by the model's input name."""
    folder = tmp_path_factory.mktemp("trap")
    paths = {}
    for name, args in (("trap", ["--momentum", "0.99", "--epochs", "2", "--batch-size", "128"]), ("default", [])):
        code, _, err = bnfold_cli("train", *args, "-o", folder / f"{name}.npz")
        assert code == 0, err
        code, _, err = bnfold_cli("export", folder / f"{name}.npz", "-o", folder / f"{name}.onnx")
        assert code == 0, err
        paths[name] = folder / f"{name}.onnx"
    (input_name,) = [value.name for value in onnx.load(paths["trap"]).graph.input]
    paths["data"] = folder / "train.npz"
    np.savez(paths["data"], **{input_name: load_digits().x_train.astype(np.float32)})
    return paths


def test_trap_is_stale_on_the_training_split(trained, tmp_path):
    report_path = tmp_path / "trap.json"
    code, out, err = bnfold_cli("inspect", trained["trap"], "--data", trained["data"], "--json", report_path)
    assert code == 1, err
    data = json.loads(report_path.read_text())
    assert data["wrong"] == ["stale"]
    for bn in data["bns"]:
        assert "stale" in [flag["name"] for flag in bn["flags"]]
        # Measured 2026-12-01: shifts ~3 std and variances 8-13x the data's after 22 EMA steps at 0.99.
        assert bn["drift"]["max_mean_shift"] >= 1.0
    assert "mean shift" in out.splitlines()[0]


def test_default_training_is_not_stale(trained):
    code, out, err = bnfold_cli("inspect", trained["default"], "--data", trained["data"])
    assert code == 0, out + err
    assert "stale" not in out.replace("check stale", "")


def test_stale_drift_against_float64_numpy(trained):
    """The reported shift and ratio, recomputed from the checkpoint network's own activations in
    float64 NumPy (an independent reference for the statistics of the first BN's input)."""
    from onnx import numpy_helper

    import bnfold

    model = onnx.load(trained["trap"])
    report = bnfold.inspect(model, str(trained["data"]), run=False)
    first = report.bns[0]
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    matmul = next(node for node in model.graph.node if node.op_type == "MatMul")
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    z = load_digits().x_train.astype(np.float32).astype(np.float64) @ inits[matmul.input[1]]
    eps = first.epsilon
    shift = np.abs(inits[bn.input[3]] - z.mean(0)) / np.sqrt(z.var(0) + eps)
    ratio = (inits[bn.input[4]] + eps) / (z.var(0) + eps)
    # onnxruntime computes z in float32 (relative error ~1e-6 of |z| over 64-term sums), the
    # statistics are accumulated in float64: 1e-4 relative leaves a wide margin.
    np.testing.assert_allclose(first.drift["mean_shift"], shift, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.drift["var_ratio"], ratio, rtol=1e-4)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(trained, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "drift.png"
    code, _, err = bnfold_cli("inspect", trained["trap"], "--data", trained["data"], "--plot", plot)
    assert code == 1, err  # stale: the plot is written all the same
    width, height = png_size(plot)
    assert 400 <= width <= 4000 and 300 <= height <= 2000
    assert plot.stat().st_size > 10_000  # two panels with 192 points, not an empty canvas
    import matplotlib.image

    pixels = matplotlib.image.imread(plot)
    assert pixels.shape[:2] == (height, width) and float(pixels[..., :3].std()) > 0.05


def test_plot_without_matplotlib_names_the_extra(trained, tmp_path):
    script = (
        "import sys\n"
        "sys.modules['matplotlib'] = None\n"  # import matplotlib now raises ImportError
        "from bnfold.cli import main\n"
        f"main(['inspect', {str(trained['trap'])!r}, '--data', {str(trained['data'])!r},"
        f" '--plot', {str(tmp_path / 'p.png')!r}])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert "pip install 'bnfold[plot]'" in one_line_error(result.stderr)
    assert result.stdout == "" and not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------- bad input

def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    model = trained["trap"]
    np.savez(tmp_path / "keys.npz", pixels=np.zeros((5, 64), np.float32), more=np.zeros((5, 64), np.float32))
    (input_name,) = [value.name for value in onnx.load(model).graph.input]
    np.savez(tmp_path / "shape.npz", **{input_name: np.zeros((5, 63), np.float32)})
    cases = {
        "missing model": (["inspect", tmp_path / "none.onnx"], "none.onnx"),
        "missing data": (["inspect", model, "--data", tmp_path / "none.npz"], "none.npz"),
        "missing key": (["inspect", model, "--data", tmp_path / "keys.npz"], f"'{input_name}'"),
        "wrong shape": (["inspect", model, "--data", tmp_path / "shape.npz"], "(5, 63)"),
        "plot without data": (["inspect", model, "--plot", tmp_path / "p.png"], "--plot needs --data"),
        "json over the model": (["inspect", model, "--json", model], "overwrite an input"),
        "batch of one": (["inspect", model, "--batch", "1"], "--batch"),
    }
    for name, (args, expected) in cases.items():
        code, out, err = bnfold_cli(*args)
        assert code == 2, (name, out, err)
        assert expected in one_line_error(err), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.npz", "shape.npz"]


# ---------------------------------------------------------------- convert

def test_convert_warns_before_folding_and_keeps_exit_0(tmp_path):
    out = tmp_path / "folded.onnx"
    code, stdout, err = bnfold_cli("convert", STATS / "torch_never_updated.onnx", "-o", out)
    assert code == 0, err
    # Warnings go to stderr (with -q they are all that is printed besides the final line).
    assert err.splitlines()[0].startswith("warning: /1/BatchNormalization: never updated")
    assert any(line.startswith("BN folded 1 of 1") for line in stdout.splitlines()) and out.exists()


def test_convert_strict_refuses_wrong_statistics(tmp_path):
    out = tmp_path / "folded.onnx"
    code, stdout, err = bnfold_cli("convert", STATS / "torch_never_updated.onnx", "-o", out, "--strict")
    assert code == 1 and not out.exists()
    warnings, error = err.splitlines()[:-1], err.splitlines()[-1:]
    assert "--strict" in one_line_error(error[0] if error else "")
    assert warnings and all(line.startswith("warning: ") for line in warnings)
    assert "warning: /1/BatchNormalization: never updated" in warnings[0]


def test_convert_strict_on_runtime_flags(tmp_path):
    """Keras training=True has no BN node: only the run finds the batch statistics."""
    out = tmp_path / "folded.onnx"
    code, stdout, err = bnfold_cli("convert", STATS / "keras_training_true.onnx", "-o", out, "--strict")
    assert code == 1 and not out.exists() and "batch statistics" in err


def test_convert_strict_passes_healthy_models(tmp_path):
    for name in ("torch_eval", "keras_eval"):
        out = tmp_path / f"{name}.onnx"
        code, stdout, err = bnfold_cli("convert", STATS / f"{name}.onnx", "-o", out, "--strict")
        assert code == 0 and out.exists() and "warning" not in err, stdout + err


def test_convert_no_verify_strict_checks_without_onnxruntime(tmp_path):
    script = (
        "import sys\n"
        "from bnfold.cli import main\n"
        "try:\n"
        f"    main(['convert', {str(STATS / 'torch_training.onnx')!r}, '-o', {str(tmp_path / 'f.onnx')!r},"
        " '--no-verify', '--strict'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = result.stdout.strip().splitlines()
    assert lines[-2:] == ["exit 1", "False"], result.stdout + result.stderr
    # The attribute finds training_mode=1; the run-only flag (Dropout) is not looked for.
    assert "batch statistics" in result.stderr and "not deterministic" not in result.stderr
    assert not (tmp_path / "f.onnx").exists()


def test_convert_checks_the_model_as_pinned(tmp_path):
    """``--set training:0=1`` selects the batch-statistics branches: convert warns about what the
    pinned model does (and --strict refuses it); with the default, no warning."""
    switch = ROOT / "tests" / "fixtures" / "tf" / "tf_v1_switch_conv.onnx"
    out = tmp_path / "pinned.onnx"
    code, stdout, err = bnfold_cli("convert", switch, "-o", out, "--set", "training:0=1", "--strict")
    assert code == 1 and not out.exists() and "batch statistics" in err, stdout + err
    code, stdout, err = bnfold_cli("convert", switch, "-o", out, "--strict")
    assert code == 0 and out.exists() and "warning" not in err, stdout + err
