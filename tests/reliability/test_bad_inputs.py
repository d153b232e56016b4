"""Every kind of bad input gets one clear answer, through the CLI and through the Python API.

For each case the CLI must: exit 2 (1 is only for a failed verification), print exactly one line
``bnfold: error: <what and where>`` on stderr and no traceback, leave the input's bytes unchanged
(SHA-256 before/after), and leave no output or temporary file behind (folder listings before/after).
The Python API must raise `BnfoldError` (never another exception type) from the function that is
responsible: `bnfold.io.load_model` for what is not a valid model file, `bnfold.folding.fold` for a
model whose BatchNormalization parameters are invalid, `bnfold.verification.verify` for what cannot be
run safely.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.errors import BnfoldError


@dataclass(frozen=True)
class Case:
    """A bad input model: `make(folder, builders)` writes it (and any sidecar) into `folder`."""

    id: str
    make: Callable[[Path, object], Path]
    expect: str  # regex that the error line must match: what is wrong, and where
    api: str  # the API function that must raise: "load", "fold" or "verify"


def _write(folder: Path, model: onnx.ModelProto, name: str = "in.onnx") -> Path:
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _bytes(data: bytes) -> Callable[[Path, object], Path]:
    def make(folder: Path, builders) -> Path:
        (folder / "in.onnx").write_bytes(data)
        return folder / "in.onnx"

    return make


def _missing(folder, builders):
    return folder / "in.onnx"


def _directory(folder, builders):
    (folder / "in.onnx").mkdir()
    return folder / "in.onnx"


def _named_pipe(folder, builders):
    os.mkfifo(folder / "in.onnx")  # reading it would block: must be refused from stat alone
    return folder / "in.onnx"


def _non_utf8_name(folder, builders):
    model = builders.gemm_bn()
    model.graph.node[0].name = "gemmXX"
    return _bytes(model.SerializeToString().replace(b"gemmXX", b"gemm\xe7X"))(folder, builders)


def _truncated(folder, builders):
    data = builders.conv_bn().SerializeToString()
    return _bytes(data[: len(data) * 2 // 3])(folder, builders)


def _tensor_proto(folder, builders):
    return _bytes(builders.gemm_bn().graph.initializer[0].SerializeToString())(folder, builders)


def _graph_proto(folder, builders):
    return _bytes(builders.gemm_bn().graph.SerializeToString())(folder, builders)


def _checker_fails(folder, builders):
    model = builders.gemm_bn()
    model.graph.node[0].op_type = "Gem"  # no such ONNX operator
    return _write(folder, model)


def _new_ir(folder, builders):
    model = builders.gemm_bn()
    model.ir_version = onnx.IR_VERSION + 5
    return _write(folder, model)


def _new_opset(folder, builders):
    model = builders.gemm_bn()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 3
    return _write(folder, model)


def _wrong_bn_shape(folder, builders):
    return _write(folder, builders.gemm_bn(param_shapes={"scale": (3,)}))  # 4 channels


def _var(value: float) -> Callable[[Path, object], Path]:
    def make(folder, builders):
        var = np.array([1.0, value, 1.0, 1.0])
        return _write(folder, builders.gemm_bn(var=var))

    return make


def _negative_eps(folder, builders):
    return _write(folder, builders.gemm_bn(eps=-1e-3))


def _missing_initializer(folder, builders):
    model = builders.gemm_bn()
    model.graph.node[1].input[4] = "bn.var.lost"
    return _write(folder, model)


def _cycle(folder, builders):
    return _write(folder, builders.cycle_model())


def _absurd_dims(folder, builders):
    return _write(folder, builders.gemm_bn(batch=10**12))


def _zero_dim(folder, builders):
    model = builders.conv_bn()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0  # onnxruntime fails at run time
    return _write(folder, model)


def _with_external(folder: Path, builders, *, data: bytes | None = None, location: str = "w.bin") -> Path:
    model = builders.gemm_bn()
    weight = next(t for t in model.graph.initializer if t.name == "gemm.W")
    raw = numpy_helper.to_array(weight).tobytes()
    if data is not None:
        (folder / "w.bin").write_bytes(data if data != b"full" else raw)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("length", str(len(raw)))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return _write(folder, model)


def _ext_missing(folder, builders):
    return _with_external(folder, builders, data=None)


def _ext_short(folder, builders):
    return _with_external(folder, builders, data=b"\x00" * 10)


def _ext_dotdot(folder, builders):
    return _with_external(folder, builders, location="../../etc/passwd")


def _ext_absolute(folder, builders):
    return _with_external(folder, builders, location="/etc/passwd")


def _ext_symlink_out(folder, builders):
    outside = folder.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.bin"
    secret.write_bytes(b"\x01" * 48)  # exactly the size of gemm.W: only the location is wrong
    (folder / "w.bin").symlink_to(secret)
    return _with_external(folder, builders, location="w.bin")


CASES = [
    Case("missing-path", _missing, r"no such file|does not exist", "load"),
    Case("directory", _directory, r"directory", "load"),
    Case("empty-file", _bytes(b""), r"empty", "load"),
    Case("named-pipe", _named_pipe, r"not a regular file", "load"),
    Case("random-bytes", _bytes(np.random.default_rng(5).bytes(512)), r"not a valid ONNX model", "load"),
    Case("truncated", _truncated, r"not a valid ONNX model|fails onnx.checker|no graph", "load"),
    Case("tensor-proto", _tensor_proto, r"not (a valid ONNX model|an ONNX model)", "load"),
    Case("graph-proto", _graph_proto, r"not an ONNX model \(no graph", "load"),
    Case("checker-fails", _checker_fails, r"fails onnx.checker.*Gem", "load"),
    Case("non-utf8-name", _non_utf8_name, r"not valid UTF-8", "load"),
    Case("ir-version-too-new", _new_ir, rf"IR version {onnx.IR_VERSION + 5} is newer", "load"),
    Case("opset-too-new", _new_opset, rf"opset {onnx.defs.onnx_opset_version() + 3} .*newer", "load"),
    Case("bn-wrong-param-shape", _wrong_bn_shape, r"\(?'?bn'?\)?.*([Ss]hape|\(3,\)|3 vs 4|between 3 and 4)", "fold"),
    Case("nan-variance", _var(np.nan), r"'bn'.*channel 1|channel 1.*'bn'", "fold"),
    Case("inf-variance", _var(np.inf), r"'bn'.*channel 1|channel 1.*'bn'", "fold"),
    Case("negative-variance", _var(-0.5), r"'bn'.*channel 1|channel 1.*'bn'", "fold"),
    Case("negative-epsilon", _negative_eps, r"'bn'.*(eps|epsilon)|(eps|epsilon).*'bn'", "fold"),
    Case("missing-initializer", _missing_initializer, r"bn\.var\.lost", "load"),
    Case("cycle", _cycle, r"fails onnx.checker.*(sorted|cycle)", "load"),
    Case("absurd-dimensions", _absurd_dims, r"(memory|bytes|GiB|TiB|too large)", "verify"),
    Case("zero-dimension", _zero_dim, r"(conv|Conv).*shape", "verify"),
    Case("external-data-missing", _ext_missing, r"gemm\.W.*missing", "load"),
    Case("external-data-too-short", _ext_short, r"gemm\.W.*too short", "load"),
    Case("external-data-dotdot", _ext_dotdot, r"gemm\.W.*\.\./\.\./etc/passwd", "load"),
    Case("external-data-absolute", _ext_absolute, r"gemm\.W.*/etc/passwd.*absolute", "load"),
    Case("external-data-symlink-out", _ext_symlink_out, r"gemm\.W.*outside the model's folder", "load"),
]
CASE_IDS = [case.id for case in CASES]

SUBPROCESS_CASES = {"missing-path", "random-bytes", "nan-variance", "external-data-dotdot", "zero-dimension"}


@pytest.fixture
def folders(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return src, out


def _inputs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file()]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_convert_refuses_bad_input(case, builders, folders, run_cli, snapshot):
    src_dir, out_dir = folders
    src = case.make(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    result = run_cli(["convert", src, "-o", out_dir / "out.onnx"])
    line = result.assert_one_line_error(2)
    assert re.search(case.expect, line), line
    assert src.name in line or "'bn'" in line or "gemm" in line, f"error does not say where: {line}"
    before.assert_unchanged()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_convert_api_refuses_bad_input(case, builders, folders, snapshot):
    """`bnfold.convert`, the one-call Python API, answers as the command does: one BnfoldError."""
    import bnfold

    src_dir, out_dir = folders
    src = case.make(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    with pytest.raises(BnfoldError) as info:
        bnfold.convert(src, out_dir / "out.onnx")
    message = str(info.value)
    assert re.search(case.expect, message) and "\n" not in message, message
    before.assert_unchanged()


FOLD_CASES = [case for case in CASES if case.api == "fold"]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: c.id)
def test_convert_no_verify_refuses_invalid_bn(case, builders, folders, run_cli, snapshot):
    """Without verification nothing else would notice: the fold itself must refuse the model."""
    src_dir, out_dir = folders
    src = case.make(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    line = run_cli(["convert", src, "-o", out_dir / "out.onnx", "--no-verify"]).assert_one_line_error(2)
    assert re.search(case.expect, line), line
    before.assert_unchanged()


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_CASES], ids=lambda c: c.id)
def test_convert_refuses_bad_input_subprocess(case, builders, folders, run_subprocess, snapshot):
    src_dir, out_dir = folders
    src = case.make(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    result = run_subprocess(["convert", src, "-o", out_dir / "out.onnx"])
    line = result.assert_one_line_error(2)
    assert re.search(case.expect, line), line
    before.assert_unchanged()


LOAD_CASES = [case for case in CASES if case.api == "load"]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[case.id for case in LOAD_CASES])
@pytest.mark.parametrize("position", ["reference", "candidate"])
def test_verify_refuses_bad_model(case, position, builders, folders, run_cli, snapshot):
    src_dir, _ = folders
    bad = case.make(src_dir, builders)
    good = _write(src_dir, builders.gemm_bn(), "good.onnx")
    before = snapshot(_inputs(src_dir), [src_dir])
    args = [bad, good] if position == "reference" else [good, bad]
    line = run_cli(["verify", *args]).assert_one_line_error(2)
    assert re.search(case.expect, line) and "in.onnx" in line, line
    before.assert_unchanged()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_api_refuses_bad_input(case, builders, folders, snapshot):
    """The responsible API function raises BnfoldError; the stages before it accept the input."""
    from bnfold.folding import fold
    from bnfold.io import load_model
    from bnfold.verification import verify

    src_dir, _ = folders
    src = case.make(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir])
    with pytest.raises(BnfoldError) as info:
        model = load_model(src)
        assert case.api != "load", "load_model accepted it"
        folded, _ = fold(model)
        assert case.api != "fold", "fold accepted it"
        started = time.monotonic()
        try:
            verify(model, folded)
        finally:
            # A refusal by the memory cap must be immediate: nothing was allocated or run.
            assert time.monotonic() - started < 10.0
    assert re.search(case.expect, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    before.assert_unchanged()


# ------------------------------------------------------------------------------------------
# Output paths


def _good_model(folder: Path, builders) -> Path:
    return _write(folder, builders.gemm_bn())


@pytest.mark.parametrize("kind", ["missing-folder", "parent-is-file", "read-only-folder"])
def test_convert_refuses_unwritable_output(kind, builders, folders, run_cli, snapshot, is_root):
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    if kind == "missing-folder":
        out = out_dir / "no" / "such" / "out.onnx"
    elif kind == "parent-is-file":
        (out_dir / "file").write_bytes(b"not a folder")
        out = out_dir / "file" / "out.onnx"
    else:
        if is_root:
            pytest.skip("root can write into a read-only folder")
        out_dir.chmod(0o500)
        out = out_dir / "out.onnx"
    try:
        before = snapshot(_inputs(src_dir) + _inputs(out_dir), [src_dir, out_dir])
        line = run_cli(["convert", src, "-o", out]).assert_one_line_error(2)
        assert "out.onnx" in line and re.search(r"not exist|not a folder|not writable|cannot write", line), line
        before.assert_unchanged()
    finally:
        out_dir.chmod(0o700)


@pytest.mark.parametrize("how", ["same-path", "symlink", "hardlink", "dot-path"])
def test_convert_refuses_output_equal_to_input(how, builders, folders, run_cli, snapshot):
    src_dir, _ = folders
    src = _good_model(src_dir, builders)
    out = {
        "same-path": src,
        "symlink": src_dir / "alias.onnx",
        "hardlink": src_dir / "hard.onnx",
        "dot-path": Path(f"{src_dir}/../{src_dir.name}/in.onnx"),
    }[how]
    if how == "symlink":
        out.symlink_to(src)
    elif how == "hardlink":
        os.link(src, out)
    before = snapshot(_inputs(src_dir), [src_dir])
    for extra in ([], ["--force"]):
        line = run_cli(["convert", src, "-o", out, *extra]).assert_one_line_error(2)
        assert "same file as the input" in line and "--in-place" in line, line
    before.assert_unchanged()


def test_convert_refuses_output_over_inputs_external_data(builders, folders, run_cli, snapshot):
    src_dir, _ = folders
    src = _with_external(src_dir, builders, data=b"full")
    before = snapshot(_inputs(src_dir), [src_dir])
    line = run_cli(["convert", src, "-o", src_dir / "w.bin", "--force"]).assert_one_line_error(2)
    assert "w.bin" in line, line
    before.assert_unchanged()


def test_force_over_an_unrelated_output_does_not_parse_the_input(builders, folders, run_cli, monkeypatch):
    """An input whose bytes never name OUT cannot have OUT as its data file: no parse for that."""
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    (out_dir / "out.onnx").write_bytes(b"old output")
    parsed = []
    real = onnx.load_model
    monkeypatch.setattr(onnx, "load_model", lambda path, *args, **kwargs: parsed.append(path) or real(path, *args, **kwargs))
    result = run_cli(["convert", src, "-o", out_dir / "out.onnx", "--force", "--no-verify"])
    assert result.code == 0, result.stderr
    assert Path(src) not in [Path(p) for p in parsed]
    # The same call with an OUT whose name the input does contain is parsed, and refused.
    with_data = _with_external(src_dir, builders, data=b"full")
    run_cli(["convert", with_data, "-o", src_dir / "w.bin", "--force"]).assert_one_line_error(2)
    assert Path(with_data) in [Path(p) for p in parsed]


def test_convert_refuses_existing_output_without_force(builders, folders, run_cli, snapshot):
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    (out_dir / "out.onnx").write_bytes(b"precious")
    before = snapshot(_inputs(src_dir) + _inputs(out_dir), [src_dir, out_dir])
    line = run_cli(["convert", src, "-o", out_dir / "out.onnx"]).assert_one_line_error(2)
    assert "already exists" in line and "--force" in line
    before.assert_unchanged()


def test_convert_same_path_in_place_is_allowed_and_atomic(builders, folders, run_cli):
    src_dir, _ = folders
    src = _good_model(src_dir, builders)
    result = run_cli(["convert", src, "--in-place"])
    assert result.code == 0, result.stderr
    assert [p.name for p in src_dir.iterdir()] == ["in.onnx"]
    ops = [n.op_type for n in onnx.load_model(str(src)).graph.node]
    assert "BatchNormalization" not in ops


# ------------------------------------------------------------------------------------------
# .npz files holding pickled objects: refused, never unpickled


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_npz(path: Path, marker: Path, **arrays: np.ndarray) -> Path:
    payload = np.empty(1, dtype=object)
    payload[0] = _Trap(marker)
    np.savez(path, **arrays, evil=payload)
    return path


def test_verify_refuses_pickled_inputs(builders, folders, run_cli, snapshot):
    src_dir, _ = folders
    model = _good_model(src_dir, builders)
    marker = src_dir.parent / "unpickled"
    evil = _evil_npz(src_dir / "evil.npz", marker, x=np.zeros((2, 3), np.float32))
    before = snapshot(_inputs(src_dir), [src_dir])
    line = run_cli(["verify", model, model, "--inputs", evil]).assert_one_line_error(2)
    assert "evil.npz" in line and "pickle" in line, line
    assert not marker.exists()
    before.assert_unchanged()

    from bnfold.verification import verify

    with pytest.raises(BnfoldError, match="pickle"):
        verify(model, model, inputs=evil)
    assert not marker.exists()


def test_export_refuses_pickled_checkpoint(folders, run_cli, snapshot):
    src_dir, out_dir = folders
    marker = src_dir.parent / "unpickled"
    meta = {"format": "bnfold.checkpoint", "version": 1, "layers": [{"type": "ReLU"}]}
    evil = _evil_npz(src_dir / "ckpt.npz", marker, __meta__=np.array(json.dumps(meta)))
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    line = run_cli(["export", evil, "-o", out_dir / "m.onnx"]).assert_one_line_error(2)
    assert "ckpt.npz" in line and "pickle" in line, line
    assert not marker.exists()
    before.assert_unchanged()

    from bnfold.nn.checkpoint import load_checkpoint

    with pytest.raises(BnfoldError, match="pickle"):
        load_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("missing", r"no such file|does not exist"),
        ("random-bytes", r"not a valid \.npz|not a zip"),
        ("truncated", r"not a valid \.npz|not a zip|truncated"),
        ("no-meta", r"__meta__"),
        ("bad-meta", r"__meta__|JSON|json"),
    ],
)
def test_export_refuses_bad_checkpoint(kind, expect, folders, run_cli, snapshot):
    src_dir, out_dir = folders
    ckpt = src_dir / "ckpt.npz"
    meta = {"format": "bnfold.checkpoint", "version": 1, "layers": [{"type": "Dense", "in_features": 2,
            "out_features": 3, "use_bias": False}]}
    if kind == "random-bytes":
        ckpt.write_bytes(np.random.default_rng(1).bytes(300))
    elif kind == "truncated":
        np.savez(ckpt, __meta__=np.array(json.dumps(meta)), **{"0.weight": np.ones((2, 3), np.float32)})
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif kind == "no-meta":
        np.savez(ckpt, **{"0.weight": np.ones((2, 3), np.float32)})
    elif kind == "bad-meta":
        np.savez(ckpt, __meta__=np.array("{not json"), **{"0.weight": np.ones((2, 3), np.float32)})
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    line = run_cli(["export", ckpt, "-o", out_dir / "m.onnx"]).assert_one_line_error(2)
    assert "ckpt.npz" in line and re.search(expect, line), line
    before.assert_unchanged()


# ------------------------------------------------------------------------------------------
# Not errors: BN in training mode, weights computed at run time


def _entries(report: dict) -> list[dict]:
    """FoldEntry dicts anywhere in a convert JSON report."""
    found = []
    if isinstance(report, dict):
        if "bn" in report and "status" in report:
            found.append(report)
        for value in report.values():
            found += _entries(value)
    elif isinstance(report, list):
        for value in report:
            found += _entries(value)
    return found


@pytest.mark.parametrize("kind", ["training-mode", "runtime-weights"])
def test_unfoldable_bn_is_kept_and_reported(kind, builders, folders, run_cli):
    from bnfold.folding import fold

    src_dir, out_dir = folders
    model = builders.gemm_bn(training_mode=1) if kind == "training-mode" else builders.runtime_weight_conv_bn()
    src = _write(src_dir, model)
    digest = src.read_bytes()
    result = run_cli(["convert", src, "-o", out_dir / "out.onnx", "--json", out_dir / "report.json"])
    assert result.code == 0, result.stderr
    assert src.read_bytes() == digest
    out_ops = [n.op_type for n in onnx.load_model(str(out_dir / "out.onnx")).graph.node]
    assert out_ops.count("BatchNormalization") == 1
    entries = _entries(json.loads((out_dir / "report.json").read_text()))
    assert [(e["bn"], e["status"]) for e in entries] == [("bn", "kept")]
    reason = entries[0]["reason"].lower()
    expected = r"training" if kind == "training-mode" else r"constant|run time|runtime|initializer"
    assert re.search(expected, reason), reason
    assert "kept" in result.stdout and "bn" in result.stdout

    folded, report = fold(model)
    assert [(e.bn, e.status) for e in report.entries] == [("bn", "kept")]
    assert report.folded == 0 and report.total == 1


# ------------------------------------------------------------------------------------------
# Models fold() must not crash or hang on, even without the loader's checks


def _in_thread(func, timeout: float):
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = func()
        except BaseException as exc:  # reported to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"no answer within {timeout} s (hang)"
    return outcome


def test_fold_on_cycle_answers_without_hanging(builders):
    """A cyclic graph (unchecked model): fold terminates with a BnfoldError or a result.

    The loader refuses cycles (onnx.checker, see test_api_refuses_bad_input[cycle]); fold itself
    only has to terminate and raise nothing but BnfoldError: a Gemm -> BN pair inside a cycle is
    still an exact fold.
    """
    from bnfold.folding import fold

    outcome = _in_thread(lambda: fold(builders.cycle_model()), timeout=20.0)
    if "error" in outcome:
        assert isinstance(outcome["error"], BnfoldError), repr(outcome["error"])


def test_fold_on_dangling_bn_input_does_not_crash(builders):
    """A BN parameter that nothing produces (unchecked model): an error or the BN kept, nothing else."""
    from bnfold.folding import fold

    model = builders.gemm_bn()
    model.graph.node[1].input[4] = "bn.var.lost"
    outcome = _in_thread(lambda: fold(model), timeout=20.0)
    if "error" in outcome:
        assert isinstance(outcome["error"], BnfoldError), repr(outcome["error"])
        assert "bn" in str(outcome["error"])
    else:
        _, report = outcome["value"]
        assert [(e.bn, e.status) for e in report.entries] == [("bn", "kept")]


# ------------------------------------------------------------------------------------------
# Limits


def test_verify_memory_cap_refuses_quickly(builders, tmp_path):
    from bnfold.verification import verify

    model = builders.gemm_bn(batch=10**12)
    started = time.monotonic()
    with pytest.raises(BnfoldError, match=r"memory|bytes|GiB"):
        verify(model, model)
    assert time.monotonic() - started < 5.0
    # A modest request under a tiny cap is refused the same way (the cap is the one deciding).
    with pytest.raises(BnfoldError, match=r"memory|bytes|GiB"):
        verify(builders.gemm_bn(), builders.gemm_bn(), batch=1000, max_bytes=1000)
    assert verify(builders.gemm_bn(), builders.gemm_bn(), batch=4).ok


def test_verify_batch_over_cap_via_cli(builders, folders, run_cli, snapshot):
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    result = run_cli(["convert", src, "-o", out_dir / "o.onnx", "--batch", "100000", "--max-memory", "1MiB"])
    line = result.assert_one_line_error(2)
    assert re.search(r"memory|bytes|MiB", line), line
    before.assert_unchanged()


@pytest.mark.parametrize("threads", [0, -1, 100000])
def test_threads_out_of_range_is_usage_error(builders, folders, run_cli, threads):
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    line = run_cli(["convert", src, "-o", out_dir / "o.onnx", "--threads", threads]).assert_one_line_error(2)
    assert "threads" in line
    assert os.listdir(out_dir) == []


def test_threads_bound_onnxruntime_sessions(builders, monkeypatch):
    """`threads` reaches every onnxruntime session as intra- and inter-op thread counts."""
    import onnxruntime

    from bnfold.verification import verify

    seen = []
    real = onnxruntime.InferenceSession

    def spy(model, sess_options=None, *args, **kwargs):
        seen.append((sess_options.intra_op_num_threads, sess_options.inter_op_num_threads))
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    assert verify(builders.gemm_bn(), builders.gemm_bn(), threads=2).ok
    assert seen and all(pair == (2, 2) for pair in seen), seen


# ------------------------------------------------------------------------------------------
# Hostile names and paths


_HOSTILE = "\x1b]0;owned\x07\x1b[2J\rbn\nnext"  # terminal title, clear screen, CR, newline


def _printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text)


def test_error_line_escapes_control_characters_from_the_model(builders, folders, run_cli):
    """Names come from untrusted files: printed raw, escape sequences would drive the terminal."""
    src_dir, out_dir = folders
    model = builders.gemm_bn(var=np.array([1.0, np.nan, 1.0, 1.0]))
    model.graph.node[1].name = _HOSTILE
    src = _write(src_dir, model)
    line = run_cli(["convert", src, "-o", out_dir / "out.onnx"]).assert_one_line_error(2)
    assert _printable(line), repr(line)


def test_summary_escapes_control_characters_from_the_model(builders, folders, run_cli):
    src_dir, out_dir = folders
    model = builders.gemm_bn(training_mode=1)  # kept: its name is printed in the summary
    model.graph.node[1].name = _HOSTILE
    src = _write(src_dir, model)
    result = run_cli(["convert", src, "-o", out_dir / "out.onnx"])
    assert result.code == 0, result.stderr
    assert all(_printable(line) for line in result.stdout.splitlines()), repr(result.stdout)


def test_output_symlink_is_replaced_not_followed(builders, folders, run_cli):
    """--force over an OUT that is a symbolic link replaces the link; its target is untouched."""
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    victim = src_dir.parent / "victim.txt"
    victim.write_bytes(b"do not overwrite")
    out = out_dir / "out.onnx"
    out.symlink_to(victim)
    line = run_cli(["convert", src, "-o", out]).assert_one_line_error(2)
    assert "already exists" in line
    assert run_cli(["convert", src, "-o", out, "--force"]).code == 0
    assert victim.read_bytes() == b"do not overwrite"
    assert not out.is_symlink() and onnx.load_model(str(out)).graph.node


@pytest.mark.parametrize("target", ["input", "output"])
def test_json_report_over_a_model_is_refused(target, builders, folders, run_cli, snapshot):
    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    out = out_dir / "out.onnx"
    json_path = src if target == "input" else out
    before = snapshot(_inputs(src_dir), [src_dir, out_dir])
    line = run_cli(["convert", src, "-o", out, "--json", json_path, "--force"]).assert_one_line_error(2)
    assert json_path.name in line, line
    before.assert_unchanged()


def test_deeply_nested_subgraphs_answer_cleanly(builders, folders, run_cli):
    """If-in-If nesting: within protobuf's depth limit the inner BN folds; beyond it, a one-line
    parse error. Never a RecursionError or a crash."""
    src_dir, out_dir = folders
    # Each level nests graph -> node -> attribute -> graph: 10 levels are within protobuf's
    # default depth limit of 100 messages, 60 levels are not.
    for depth, code in ((10, 0), (60, 2)):
        src = src_dir / f"nested{depth}.onnx"
        src.write_bytes(builders.nested_if_bytes(depth))
        result = run_cli(["convert", src, "-o", out_dir / f"out{depth}.onnx", "--no-verify"])
        assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr
        if code:
            assert "nested more deeply" in result.assert_one_line_error(code)
        else:
            assert result.code == 0, result.stderr
            assert "BN folded 1 of 1" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "opset, outputs, attributes",
    [
        (9, ["rm", "rv", "sm", "sv"], {}),  # BatchNormalization-9: mean/var outputs = training
        (6, [], {"is_test": 0}),  # BatchNormalization-6: is_test=0 = training
        (15, ["rm", "rv"], {"training_mode": 1}),  # BatchNormalization-15: training_mode=1
    ],
    ids=["opset9-outputs", "opset6-is-test-0", "opset15-training-mode"],
)
def test_training_mode_bn_is_kept_in_every_opset(opset, outputs, attributes, builders):
    from bnfold.folding import fold
    from bnfold.io import check_model

    model = builders.gemm_bn(opset=opset)
    model.graph.node[1].output.extend(outputs)
    model.graph.node[1].attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
    check_model(model)  # a valid model: keeping its BN is the answer, not an error
    folded, report = fold(model)
    assert [(e.bn, e.status) for e in report.entries] == [("bn", "kept")]
    assert re.search(r"training|is_test", report.entries[0].reason), report.entries[0].reason
    assert [n.op_type for n in folded.graph.node].count("BatchNormalization") == 1


@pytest.mark.parametrize("command", ["convert", "verify"])
def test_threads_option_reaches_onnxruntime(command, builders, folders, run_cli, monkeypatch):
    import onnxruntime

    src_dir, out_dir = folders
    src = _good_model(src_dir, builders)
    seen = []
    real = onnxruntime.InferenceSession

    def spy(model, sess_options=None, *args, **kwargs):
        seen.append((sess_options.intra_op_num_threads, sess_options.inter_op_num_threads))
        return real(model, sess_options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    args = [src, "-o", out_dir / "o.onnx"] if command == "convert" else [src, src]
    result = run_cli([command, *args, "--threads", "2"])
    assert result.code == 0, result.stderr
    assert len(seen) >= 2 and all(pair == (2, 2) for pair in seen), seen


def _huge_npz(path: Path) -> None:
    import zipfile

    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)}
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(b"\x00" * 64)


@pytest.mark.parametrize(
    "kind, expect",
    [
        ("missing", r"no such file|does not exist"),
        ("garbage", r"not a valid \.npz"),
        ("huge-declared", r"declares shape"),
        ("wrong-name", r"'z'.*not an input|no array for model input 'x'"),
        ("wrong-shape", r"'x'.*shape|shape.*'x'"),
    ],
)
def test_verify_refuses_bad_inputs_file(kind, expect, builders, folders, run_cli, snapshot):
    src_dir, _ = folders
    model = _good_model(src_dir, builders)
    arrays = src_dir / "inputs.npz"
    if kind == "garbage":
        arrays.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "huge-declared":
        _huge_npz(arrays)
    elif kind == "wrong-name":
        np.savez(arrays, z=np.zeros((2, 3), np.float32))
    elif kind == "wrong-shape":
        np.savez(arrays, x=np.zeros((2, 5), np.float32))
    before = snapshot(_inputs(src_dir), [src_dir])
    started = time.monotonic()
    line = run_cli(["verify", model, model, "--inputs", arrays]).assert_one_line_error(2)
    assert time.monotonic() - started < 10.0
    assert "inputs.npz" in line and re.search(expect, line), line
    before.assert_unchanged()
