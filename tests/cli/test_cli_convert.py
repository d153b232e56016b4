"""`bnfold convert`: success, overwrite rules, in-place, --json, verification failure, bad input.

Commands run in-process through `bnfold.cli.main` inside click's `CliRunner` isolation (so the
exit codes and one-line errors of the real entry point are tested, and the fold pass can be
wrapped to craft a wrong fold), plus a few subprocesses where the process state matters.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bnfold.folding
from bnfold.export import export_onnx
from bnfold.folding.tensors import tensor_to_array
from bnfold.nn.batchnorm import BatchNorm
from bnfold.nn.layers import Dense, ReLU
from bnfold.nn.model import Sequential
from bnfold.testing import run_cli as bnfold_cli

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "digits_mlp.onnx"




def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_model(seed: int = 0, hidden: tuple[int, int] = (16, 8)) -> Sequential:
    rng = np.random.default_rng(seed)
    layers = []
    width = 12
    for index, out in enumerate(hidden):
        bn = BatchNorm(out, convention="torch" if index else "keras")
        bn.gamma = rng.uniform(0.5, 2.0, out)
        bn.beta = rng.normal(size=out)
        bn.moving_mean = rng.normal(size=out)
        bn.moving_var = rng.uniform(0.1, 3.0, out)
        layers += [Dense(width, out, use_bias=False, rng=rng), bn, ReLU()]
        width = out
    return Sequential([*layers, Dense(width, 5, rng=rng)])


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(export_onnx(make_model()), path)
    return path


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_success_prints_summary_and_writes_a_folded_equivalent_model(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    code, stdout, stderr = bnfold_cli("convert", model_path, "-o", out)
    assert code == 0, stderr
    assert "BN folded 2 of 2" in stdout
    assert "nodes 7 -> 5" in stdout
    assert "max abs error" in stdout and "equivalent" in stdout and "time" in stdout
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert "BatchNormalization" not in {node.op_type for node in folded.graph.node}
    # Independent of the command's own verification: both files in onnxruntime on fresh inputs.
    # Three float32 layers of fan-in <= 16 round at the 1e-6 level; 1e-5 relative to the
    # output scale leaves margin while a wrong fold (errors of order 1) would fail.
    x = np.random.default_rng(5).standard_normal((64, 12)).astype(np.float32)
    reference = run_ort(model_path, x)
    assert np.abs(run_ort(out, x) - reference).max() <= 1e-5 * np.abs(reference).max()


def test_existing_output_is_refused_without_force_and_rerun_works(model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded.onnx"
    assert bnfold_cli("convert", model_path, "-o", out)[0] == 0
    before = digest(out)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", out)
    assert code == 2 and "already exists" in one_line_error(stderr) and "--force" in stderr
    assert digest(out) == before
    assert bnfold_cli("convert", model_path, "-o", out, "--force")[0] == 0
    assert bnfold_cli("convert", model_path, "-o", out, "--force")[0] == 0


def test_output_equal_to_input_needs_in_place(model_path: Path) -> None:
    before = digest(model_path)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", model_path)
    assert code == 2 and "--in-place" in one_line_error(stderr)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", model_path, "--force")
    assert code == 2 and "--in-place" in one_line_error(stderr)
    assert digest(model_path) == before
    code, stdout, stderr = bnfold_cli("convert", model_path, "--in-place")
    assert code == 0, stderr
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(model_path).graph.node}
    code, stdout, _ = bnfold_cli("convert", model_path, "--in-place")
    assert code == 0 and "no BatchNormalization: nothing to fold" in stdout


def test_missing_output_option(model_path: Path) -> None:
    code, _, stderr = bnfold_cli("convert", model_path)
    assert code == 2 and "-o" in one_line_error(stderr)


def test_json_report(model_path: Path, tmp_path: Path) -> None:
    out, report_path = tmp_path / "folded.onnx", tmp_path / "report.json"
    code, _, stderr = bnfold_cli("convert", model_path, "-o", out, "--json", report_path, "--batch", 4, "--seed", 9)
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["ok"] is True and report["bn_folded"] == report["bn_total"] == 2
    assert report["nodes"] == {"before": 7, "after": 5}
    assert report["size_bytes"]["before"] == model_path.stat().st_size
    assert report["size_bytes"]["after"] == out.stat().st_size
    entries = report["fold"]["entries"]
    assert [(e["bn"], e["status"], e["into"]) for e in entries] == [
        ("batchnorm_1", "folded", "dense_0"), ("batchnorm_4", "folded", "dense_3")]
    assert {"1.gamma", "1.moving_var", "0.weight", "4.beta"} <= set(report["tensor_map"])
    initializers = {init.name for init in onnx.load(out).graph.initializer}
    assert {new for news in report["tensor_map"].values() for new in news} <= initializers
    verification = report["verification"]
    assert verification["ok"] and verification["seed"] == 9 and verification["batch"] == 4
    (output,) = verification["outputs"]
    assert output["name"] == "logits" and output["shape"] == [4, 5]
    assert output["max_abs"] == report["max_abs_error"] <= output["tol"]
    assert set(report["timing_s"]) == {"load", "fold", "verify", "save", "total"}


def corrupt_fold(monkeypatch: pytest.MonkeyPatch, bn_name: str) -> None:
    """Wrap the fold pass so that folding ``bn_name`` scales the absorbing weight by 1.5."""
    real = bnfold.folding.fold

    def wrong(model, **kwargs):
        folded, report = real(model, **kwargs)
        entry = next((e for e in report.entries if e.bn == bn_name and e.status == "folded"), None)
        if entry is not None:
            node = next(n for n in folded.graph.node if n.name == entry.into)
            init = next(i for i in folded.graph.initializer if i.name == node.input[1])
            init.CopyFrom(onnx.numpy_helper.from_array(tensor_to_array(init) * 1.5, init.name))
        return folded, report

    monkeypatch.setattr(bnfold.folding, "fold", wrong)


def test_verification_failure_exits_1_names_the_fold_and_writes_nothing(
        model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt_fold(monkeypatch, "batchnorm_4")
    out, report_path = tmp_path / "folded.onnx", tmp_path / "report.json"
    code, stdout, stderr = bnfold_cli("convert", model_path, "-o", out, "--json", report_path)
    assert code == 1
    line = one_line_error(stderr)
    assert "verification failed" in line and "'batchnorm_4'" in line and "'batchnorm_1'" not in line
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".folded")]  # no temporary left
    report = json.loads(report_path.read_text())
    assert report["ok"] is False and report["culprits"] == ["batchnorm_4"]
    assert "NOT equivalent" in stdout
    # An existing OUT is left untouched even with --force.
    out.write_bytes(b"previous")
    assert bnfold_cli("convert", model_path, "-o", out, "--force")[0] == 1
    assert out.read_bytes() == b"previous"


def test_keep_failing_unfolded_writes_verified_partial_fold(
        model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt_fold(monkeypatch, "batchnorm_4")
    out, report_path = tmp_path / "folded.onnx", tmp_path / "report.json"
    code, stdout, stderr = bnfold_cli("convert", model_path, "-o", out, "--keep-failing-unfolded",
                                      "--json", report_path)
    assert code == 0, stderr
    assert "kept unfolded after failed verification: batchnorm_4" in stdout
    bns = [node.name for node in onnx.load(out).graph.node if node.op_type == "BatchNormalization"]
    assert bns == ["batchnorm_4"]
    report = json.loads(report_path.read_text())
    assert report["kept_unfolded"] == ["batchnorm_4"] and report["verification"]["ok"]


def test_no_verify_skips_verification(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corrupt_fold(monkeypatch, "batchnorm_1")
    out = tmp_path / "folded.onnx"
    code, stdout, _ = bnfold_cli("convert", model_path, "-o", out, "--no-verify")
    assert code == 0 and "verification skipped" in stdout and out.exists()


def test_no_verify_does_not_import_onnxruntime(model_path: Path, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from bnfold.cli import main\n"
        "try:\n"
        f"    main(['convert', {str(model_path)!r}, '-o', {str(tmp_path / 'f.onnx')!r}, '--no-verify', '--check'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "f.onnx").exists()


def test_bad_inputs_are_one_line_errors(tmp_path: Path, model_path: Path) -> None:
    code, _, stderr = bnfold_cli("convert", tmp_path / "missing.onnx", "-o", tmp_path / "out.onnx")
    assert code == 2 and "missing.onnx" in one_line_error(stderr)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a model at all")
    code, _, stderr = bnfold_cli("convert", junk, "-o", tmp_path / "out.onnx")
    assert code == 2 and "junk.onnx" in one_line_error(stderr)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", tmp_path / "out.onnx", "--inputs", tmp_path / "none.npz")
    assert code == 2 and "none.npz" in one_line_error(stderr)
    assert not (tmp_path / "out.onnx").exists()


def test_error_in_a_subprocess_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "bnfold", "convert", str(tmp_path / "nope.onnx"), "-o",
                             str(tmp_path / "out.onnx")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2
    assert one_line_error(result.stderr) and "Traceback" not in result.stderr


def test_memory_cap_option(model_path: Path, tmp_path: Path) -> None:
    code, _, stderr = bnfold_cli("convert", model_path, "-o", tmp_path / "o.onnx", "--batch", 100000,
                                 "--max-memory", "1MiB")
    assert code == 2 and "--max-memory" in one_line_error(stderr)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", tmp_path / "o.onnx", "--max-memory", "lots")
    assert code == 2 and one_line_error(stderr)


def test_external_data_input_is_written_with_external_data(tmp_path: Path) -> None:
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    source = source_dir / "big.onnx"
    # Hidden widths 64 and 32 make weights of 3 KiB and 8 KiB: over the 1 KiB sidecar threshold.
    onnx.save_model(export_onnx(make_model(1, hidden=(64, 32))), str(source), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.weights", size_threshold=256)
    out = tmp_path / "folded.onnx"
    code, stdout, stderr = bnfold_cli("convert", source, "-o", out, "--check")
    assert code == 0, stderr
    sidecars = [path for path in tmp_path.iterdir() if path.name.startswith("folded.onnx.") and path.suffix == ".data"]
    assert len(sidecars) == 1
    proto = onnx.load(str(out), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "large folded weights should live in the sidecar"
    x = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
    reference = run_ort(source, x)
    assert np.abs(run_ort(out, x) - reference).max() <= 1e-5 * np.abs(reference).max()


@pytest.mark.skipif(not SHIPPED.exists(), reason="models/digits_mlp.onnx is produced from the trained checkpoint")
def test_readme_command_twice(tmp_path: Path) -> None:
    # Speed is measured in benchmarks/bench_convert.py, not asserted here.
    command = [sys.executable, "-m", "bnfold", "convert", str(SHIPPED), "-o", "digits_mlp.folded.onnx", "--force"]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "BN folded 2 of 2" in result.stdout


def test_fold_options_pass_through(model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bnfold.folding.fold
    seen = []

    def recording(model, **kwargs):
        seen.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(bnfold.folding, "fold", recording)
    code, _, stderr = bnfold_cli("convert", model_path, "-o", tmp_path / "o.onnx", "--decompose-rest",
                                 "--keep-initializer-inputs", "--inline-functions", "--check")
    assert code == 0, stderr
    assert seen == [{"exclude": frozenset(), "decompose_rest": True, "keep_initializer_inputs": True,
                     "inline_functions": True}]
