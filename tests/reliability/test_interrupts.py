"""An interrupted or failed ``bnfold convert`` leaves the previous OUT intact and nothing else behind.

Failures are injected where the bytes hit the disk (`bnfold.io`'s temporary file and its
``os.replace``), and at the fold (a wrong folded model, so that verification fails).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper


@pytest.fixture
def existing_out(builders, tmp_path):
    """IN (Gemm + BN) and an existing OUT with known bytes."""
    src = tmp_path / "in.onnx"
    src.write_bytes(builders.gemm_bn().SerializeToString())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    out.write_bytes(b"previous output")
    return src, out


def _interrupt_replace(monkeypatch, exc: BaseException) -> None:
    def failing_replace(src, dst):
        raise exc

    monkeypatch.setattr(os, "replace", failing_replace)


@pytest.mark.parametrize(
    "failure, message",
    [
        (KeyboardInterrupt(), "interrupted"),
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    ],
    ids=["keyboard-interrupt", "disk-full"],
)
def test_failure_while_moving_output_into_place(failure, message, existing_out, run_cli, snapshot, monkeypatch):
    src, out = existing_out
    before = snapshot([src, out], [src.parent, out.parent])
    _interrupt_replace(monkeypatch, failure)
    line = run_cli(["convert", src, "-o", out, "--force"]).assert_one_line_error(2)
    assert message in line, line
    before.assert_unchanged()


@pytest.mark.parametrize(
    "failure", [KeyboardInterrupt(), OSError(errno.EIO, "Input/output error")], ids=["interrupt", "io-error"]
)
def test_failure_mid_write_of_output(failure, existing_out, run_cli, snapshot, monkeypatch):
    src, out = existing_out
    before = snapshot([src, out], [src.parent, out.parent])
    real_write = Path.write_bytes

    def write_half(self, data):
        real_write(self, data[: len(data) // 2])
        raise failure

    monkeypatch.setattr(Path, "write_bytes", write_half)
    run_cli(["convert", src, "-o", out, "--force"]).assert_one_line_error(2)
    before.assert_unchanged()


def test_failed_verification_exits_1_and_writes_nothing(existing_out, run_cli, snapshot, monkeypatch):
    """A fold that changes the function: exit 1, and neither OUT nor any temporary file appears."""
    import bnfold.folding

    real_fold = bnfold.folding.fold

    def wrong_fold(model, **kwargs):
        folded, report = real_fold(model, **kwargs)
        for i, tensor in enumerate(folded.graph.initializer):
            if tensor.dims and len(tensor.dims) == 2:  # the folded Gemm weight
                array = numpy_helper.to_array(tensor) * np.float32(1.01)
                folded.graph.initializer[i].CopyFrom(numpy_helper.from_array(array, tensor.name))
        return folded, report

    monkeypatch.setattr(bnfold.folding, "fold", wrong_fold)
    src, out = existing_out
    before = snapshot([src, out], [src.parent, out.parent])
    result = run_cli(["convert", src, "-o", out, "--force"])
    assert result.code == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("bnfold: error: ")
    before.assert_unchanged()
    fresh = out.parent / "fresh.onnx"
    assert run_cli(["convert", src, "-o", fresh]).code == 1
    assert not fresh.exists()
    before.assert_unchanged()


def test_unwritable_json_report_writes_nothing(existing_out, run_cli, snapshot):
    """A report that cannot be written is found out before OUT is written, not after."""
    src, out = existing_out
    fresh = out.parent / "fresh.onnx"
    before = snapshot([src, out], [src.parent, out.parent])
    result = run_cli(["convert", src, "-o", fresh, "--json", out.parent / "no" / "such" / "r.json"])
    line = result.assert_one_line_error(2)
    assert "r.json" in line
    before.assert_unchanged()


def test_success_replaces_output_atomically(existing_out, run_cli):
    src, out = existing_out
    result = run_cli(["convert", src, "-o", out, "--force"])
    assert result.code == 0, result.stderr
    assert sorted(os.listdir(out.parent)) == ["out.onnx"]
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load_model(str(out)).graph.node)


def test_interrupt_while_replacing_external_data_output_keeps_previous_pair(builders, tmp_path, run_cli, monkeypatch):
    """An OUT written with external data (because IN had it) and its data file stay a matching
    pair: interrupting the replacement of OUT leaves the previous OUT reading its own weights."""
    import bnfold.io

    def external_input(model, folder: Path) -> Path:
        folder.mkdir()
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        path = folder / "in.onnx"
        onnx.save_model(copy, str(path), save_as_external_data=True, location="in.data", size_threshold=0)
        return path

    # 16x16x3x3 float32 weights (9 KiB): over the 1 KiB above which tensors go to the data file.
    first = external_input(builders.conv_bn(c_in=16, c_out=16), tmp_path / "a")
    second = external_input(builders.conv_bn(np.random.default_rng(9), c_in=16, c_out=16), tmp_path / "b")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    assert run_cli(["convert", first, "-o", out]).code == 0
    previous = bnfold.io.load_model(out)
    listing = sorted(os.listdir(out_dir))
    assert len(listing) == 2, listing  # OUT and its data file
    calls = []

    real_replace = os.replace

    def interrupt_on_model(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "out.onnx":
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupt_on_model)
    result = run_cli(["convert", second, "-o", out, "--force"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert result.code == 2 and "Traceback" not in result.stderr
    assert calls[-1] == "out.onnx" and len(calls) >= 2, calls  # the data file was replaced first
    assert bnfold.io.load_model(out).SerializeToString() == previous.SerializeToString()
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp") or name.startswith(".out.onnx")]
