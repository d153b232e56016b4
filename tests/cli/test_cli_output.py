"""What the CLI prints: plain `bnfold`, -q/-v, kept BNs grouped by reason, models without BN,
initializer-backed inputs and model-local functions (CLI and API)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.cli import main
from bnfold.folding.report import NO_BATCHNORM
from bnfold.testing import assert_equivalent

F32 = TensorProto.FLOAT


def _bn(prefix: str, x: str, y: str, channels: int, rng: np.random.Generator):
    names = [f"{prefix}.{k}" for k in ("scale", "B", "mean", "var")]
    arrays = [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels), rng.normal(0, 0.5, channels),
              rng.uniform(0.5, 2.0, channels)]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(arrays, names)]
    return helper.make_node("BatchNormalization", [x, *names], [y], name=prefix), inits


def _model(nodes, inits, channels_out, *, inputs=None, functions=(), opsets=()):
    inputs = inputs or [helper.make_tensor_value_info("x", F32, ["N", 4, 5, 5])]
    outputs = [helper.make_tensor_value_info("y", F32, ["N", channels_out, 5, 5])]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), *opsets], functions=list(functions))
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def densenet_like(blocks: int, rng: np.random.Generator) -> onnx.ModelProto:
    """``blocks`` times Concat -> BN -> Relu (nothing linear next to the BN, as in DenseNet), then one
    Conv -> BN that folds."""
    nodes, inits, prev, channels = [], [], "x", 4
    for i in range(blocks):
        nodes.append(helper.make_node("Concat", [prev, prev], [f"cat{i}"], axis=1, name=f"concat{i}"))
        channels *= 2
        bn, bn_inits = _bn(f"bn{i}", f"cat{i}", f"z{i}", channels, rng)
        nodes += [bn, helper.make_node("Relu", [f"z{i}"], [f"r{i}"], name=f"relu{i}")]
        inits += bn_inits
        prev = f"r{i}"
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (3, channels, 1, 1)).astype(np.float32), "w"))
    bn, bn_inits = _bn("bn_conv", "c", "y", 3, rng)
    nodes += [helper.make_node("Conv", [prev, "w"], ["c"], name="conv"), bn]
    return _model(nodes, inits + bn_inits, 3)


def no_bn(rng: np.random.Generator) -> onnx.ModelProto:
    w = numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], [w], 3)


def initializer_inputs(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv -> BN with every initializer also listed as a graph input (keep_initializers_as_inputs=True)."""
    w = numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32), "w")
    bn, bn_inits = _bn("bn", "c", "y", 3, rng)
    inits = [w, *bn_inits]
    inputs = [helper.make_tensor_value_info("x", F32, ["N", 4, 5, 5])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    return _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn], inits, 3, inputs=inputs)


def function_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A call of the model-local function ``local.ConvNorm`` (Conv -> BN) whose weights arrive as
    function inputs, as PyTorch's export_modules_as_functions writes a Conv+BN module."""
    body = [helper.make_node("Conv", ["fx", "fw"], ["fc"], name="conv_in_function"),
            helper.make_node("BatchNormalization", ["fc", "fs", "fb", "fm", "fv"], ["fy"], name="bn_in_function")]
    function = helper.make_function("local", "ConvNorm", ["fx", "fw", "fs", "fb", "fm", "fv"], ["fy"], body,
                                    [helper.make_opsetid("", 17)])
    _, bn_inits = _bn("bn", "c", "unused", 3, rng)
    w = numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32), "w")
    call = helper.make_node("ConvNorm", ["x", "w", *[t.name for t in bn_inits]], ["y"], domain="local", name="call")
    return _model([call], [w, *bn_inits], 3, functions=[function], opsets=[helper.make_opsetid("local", 1)])


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def saved(tmp_path):
    def save(model: onnx.ModelProto, name: str = "in.onnx") -> str:
        path = tmp_path / name
        onnx.save(model, path)
        return str(path)
    return save


# ---- plain `bnfold`, --version -------------------------------------------------------------------
def test_plain_bnfold_prints_multiline_help_exit_0():
    result = subprocess.run([sys.executable, "-m", "bnfold"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage: bnfold")
    assert len(result.stdout.splitlines()) > 10
    assert "Commands:" in result.stdout and "convert" in result.stdout
    assert "bnfold: error" not in result.stdout + result.stderr


def test_unknown_command_is_still_a_one_line_error(capsys):
    code, out, err = run_cli(capsys, "frobnicate")
    assert code == 2 and err.startswith("bnfold: error:") and len(err.strip().splitlines()) == 1


def test_quiet_and_verbose_exclude_each_other(capsys):
    code, _, err = run_cli(capsys, "-q", "-v", "convert", "x.onnx", "-o", "y.onnx")
    assert code == 2 and "exclude each other" in err


# ---- kept BNs grouped by reason ----------------------------------------------------------------
def test_many_bns_kept_for_one_reason_print_one_line(capsys, saved, tmp_path):
    path = saved(densenet_like(6, np.random.default_rng(0)))
    out_path, report_path = str(tmp_path / "out.onnx"), str(tmp_path / "r.json")
    code, out, _ = run_cli(capsys, "convert", path, "-o", out_path, "--json", report_path)
    assert code == 0
    assert "BN folded 1 of 7" in out
    grouped = [line for line in out.splitlines() if line.startswith("kept 6 BatchNormalization:")]
    assert len(grouped) == 1, out
    assert "producer Concat '...' is not a linear node" in grouped[0]
    assert "'bn3'" not in out  # names only with --verbose / --json
    data = json.loads((tmp_path / "r.json").read_text())
    (names,) = data["kept_by_reason"].values()
    assert names == [f"bn{i}" for i in range(6)]

    code, out, _ = run_cli(capsys, "-v", "convert", path, "-o", out_path, "--force")
    assert code == 0
    assert sum("BatchNormalization 'bn" in line and "kept:" in line for line in out.splitlines()) == 6
    assert "BatchNormalization 'bn_conv': folded into 'conv'" in out
    assert not any(line.startswith("kept 6") for line in out.splitlines())


def test_one_bn_kept_keeps_its_own_line(capsys, saved, tmp_path):
    path = saved(densenet_like(1, np.random.default_rng(1)))
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(tmp_path / "out.onnx"))
    assert code == 0
    assert "BatchNormalization 'bn0': kept: producer Concat 'concat0' is not a linear node" in out
    assert "kept 1 " not in out


def test_quiet_prints_only_the_final_line(capsys, saved, tmp_path):
    path = saved(densenet_like(3, np.random.default_rng(2)))
    code, out, err = run_cli(capsys, "-q", "convert", path, "-o", str(tmp_path / "out.onnx"))
    assert code == 0 and err == ""
    (line,) = out.splitlines()
    assert line.startswith(f"{path} -> ") and "BN folded 1 of 4" in line and line.endswith(": equivalent")


def test_quiet_still_prints_errors(capsys, tmp_path):
    code, out, err = run_cli(capsys, "-q", "convert", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"))
    assert code == 2 and out == "" and err.startswith("bnfold: error:")


# ---- no BatchNormalization ---------------------------------------------------------------------
def test_model_without_bn_says_why_that_is_common(capsys, saved, tmp_path):
    path = saved(no_bn(np.random.default_rng(3)))
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(tmp_path / "out.onnx"))
    assert code == 0
    assert NO_BATCHNORM in out.splitlines()
    assert "PyTorch's and tf2onnx's exporters fold Conv+BN themselves by default" in NO_BATCHNORM
    assert "BN folded 0 of 0" not in out


def test_model_without_bn_api(tmp_path):
    model = no_bn(np.random.default_rng(4))
    _, report = bnfold.fold(model)
    assert report.lines()[0] == NO_BATCHNORM
    onnx.save(model, tmp_path / "in.onnx")
    result = bnfold.convert(tmp_path / "in.onnx", tmp_path / "out.onnx")
    assert NO_BATCHNORM in result.lines()
    assert "no BatchNormalization" in result.final_line()


def test_model_with_bn_does_not_say_there_is_none(tmp_path):
    _, report = bnfold.fold(densenet_like(1, np.random.default_rng(5)))
    assert NO_BATCHNORM not in report.lines()


# ---- initializer-backed graph inputs -----------------------------------------------------------
def test_removed_initializer_inputs_are_counted(capsys, saved, tmp_path):
    path = saved(initializer_inputs(np.random.default_rng(6)))
    out_path = tmp_path / "out.onnx"
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(out_path))
    assert code == 0
    assert "BN folded 1 of 1" in out
    # w and the four BN parameters are folded into new tensors: five inputs leave the graph.
    assert "note: removed 5 graph inputs backed by initializers whose values were folded" in out
    assert [v.name for v in onnx.load(out_path).graph.input] == ["x"]


def test_keep_initializer_inputs_keeps_them(capsys, saved, tmp_path):
    path = saved(initializer_inputs(np.random.default_rng(7)))
    out_path = tmp_path / "out.onnx"
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(out_path), "--keep-initializer-inputs")
    assert code == 0
    assert "BN folded 0 of 1" in out and "removed" not in out
    assert len(onnx.load(out_path).graph.input) == 6


def test_initializer_inputs_api():
    model = initializer_inputs(np.random.default_rng(8))
    folded, report = bnfold.fold(model)
    assert report.folded == 1 and any("removed 5 graph inputs" in note for note in report.notes)
    assert len(model.graph.input) == 6  # the input model is untouched
    kept, report = bnfold.fold(model, keep_initializer_inputs=True)
    assert report.folded == 0 and len(kept.graph.input) == 6


# ---- model-local functions ---------------------------------------------------------------------
def test_bn_in_function_points_to_inline_functions(capsys, saved, tmp_path):
    path = saved(function_model(np.random.default_rng(9)))
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(tmp_path / "out.onnx"))
    assert code == 0
    assert "BN folded 0 of 1" in out
    assert "is a function input" in out and "--inline-functions" in out


def test_inline_functions_folds_bn_in_function(capsys, saved, tmp_path):
    path = saved(function_model(np.random.default_rng(10)))
    out_path = tmp_path / "out.onnx"
    code, out, _ = run_cli(capsys, "convert", path, "-o", str(out_path), "--inline-functions")
    assert code == 0, out
    assert "BN folded 1 of 1" in out and "note: inlined 1 model-local function(s): local.ConvNorm" in out
    assert "equivalent" in out
    written = onnx.load(out_path)
    assert not written.functions
    assert [n.op_type for n in written.graph.node] == ["Conv"]


def test_inline_functions_api():
    model = function_model(np.random.default_rng(11))
    before = model.SerializeToString()
    folded, report = bnfold.fold(model, inline_functions=True)
    assert report.folded == 1 and model.SerializeToString() == before
    assert_equivalent(model, folded)
    _, report = bnfold.fold(model)
    assert report.folded == 0 and "inline_functions=True" in report.entries[0].reason


def test_quiet_and_verbose_also_after_the_command(capsys, saved, tmp_path):
    path = saved(densenet_like(2, np.random.default_rng(12)))
    out_path = str(tmp_path / "out.onnx")
    code, out, _ = run_cli(capsys, "convert", path, "-o", out_path, "-q")
    assert code == 0 and len(out.splitlines()) == 1
    code, out, err = run_cli(capsys, "convert", path, "-o", out_path, "--force", "--verbose")
    assert code == 0 and "BatchNormalization 'bn1': kept:" in out
    assert "bnfold.folding.fold_pass: folded 1 of 3" in err  # the log, on stderr
    code, _, err = run_cli(capsys, "-q", "convert", path, "-o", out_path, "--force", "-v")
    assert code == 2 and "exclude each other" in err
