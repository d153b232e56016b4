"""`bnfold.convert`: the one-call Python API behind `bnfold convert`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from bnfold.errors import BnfoldError, VerificationError

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits_mlp.onnx"


def test_convert_folds_verifies_and_writes(tmp_path):
    out, report = tmp_path / "folded.onnx", tmp_path / "report.json"
    before = MODEL.read_bytes()
    result = bnfold.convert(MODEL, out, json_path=report)
    assert result.ok and result.report.folded == result.report.total == 2
    assert result.verification is not None and result.verification.ok
    folded = onnx.load(str(out))
    assert not any(node.op_type == "BatchNormalization" for node in folded.graph.node)
    assert json.loads(report.read_text()) == json.loads(json.dumps(result.data))
    assert result.lines()[1] == "BN folded 2 of 2"
    assert MODEL.read_bytes() == before


def test_convert_without_verification_reports_it_skipped(tmp_path):
    result = bnfold.convert(MODEL, tmp_path / "folded.onnx", verify=False)
    assert result.verification is None and result.data["verification"] is None
    assert "verification skipped (--no-verify)" in result.lines()


def test_convert_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "folded.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(BnfoldError, match="already exists"):
        bnfold.convert(MODEL, out)
    assert out.read_bytes() == b"keep me"
    bnfold.convert(MODEL, out, force=True, verify=False)
    assert onnx.load(str(out)).graph.node


def test_convert_raises_verification_error_and_writes_nothing(tmp_path, monkeypatch):
    """A fold that changes one folded bias: verification must catch it and name the BN."""
    import bnfold.folding

    real_fold = bnfold.folding.fold

    def wrong_fold(model, **kwargs):
        folded, report = real_fold(model, **kwargs)
        excluded = kwargs.get("exclude", ())
        target = next((e for e in report.entries if e.status == "folded" and e.bn not in excluded), None)
        if target is not None:
            bias = next(t for t in folded.graph.initializer if t.name == next(
                node for node in folded.graph.node if node.name == target.into).input[2])
            array = onnx.numpy_helper.to_array(bias) + np.float32(1.0)
            bias.CopyFrom(onnx.numpy_helper.from_array(array, bias.name))
        return folded, report

    monkeypatch.setattr(bnfold.folding, "fold", wrong_fold)
    out = tmp_path / "folded.onnx"
    with pytest.raises(VerificationError) as info:
        bnfold.convert(MODEL, out)
    assert not out.exists()
    assert info.value.report is not None and not info.value.report.ok
    assert "responsible folds" in str(info.value)


def test_convert_needs_an_output_or_in_place():
    with pytest.raises(BnfoldError, match="--in-place"):
        bnfold.convert(MODEL)
