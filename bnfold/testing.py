"""Helpers for users' own test suites (pytest or unittest).

Example::

    from bnfold.testing import assert_equivalent, run_cli

    def test_folded_model_matches():
        assert_equivalent("model.onnx", "model.folded.onnx", batch=8)

    def test_statistics_are_healthy():
        code, stdout, stderr = run_cli("inspect", "model.onnx")
        assert code == 0, stdout + stderr
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from bnfold.verification import VerifyReport, verify

__all__ = ["assert_equivalent", "run_cli"]


def assert_equivalent(reference: onnx.ModelProto | str | os.PathLike,
                      candidate: onnx.ModelProto | str | os.PathLike,
                      inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                      **options: Any) -> VerifyReport:
    """Assert that ``candidate`` computes the same tensors as ``reference`` in onnxruntime.

    Runs `bnfold.verification.verify` (same keyword options: ``rtol``, ``atol``, ``batch``, ``seed``,
    ``threads``, ``max_bytes``, ``outputs_only``) and returns its report when every tensor both
    models compute under the same name (layer by layer; the outputs alone with
    ``outputs_only=True``) is within tolerance.

    Raises
    ------
    AssertionError
        With the report's lines (outputs, the first tensor that exceeds, the verdict) when the
        models differ.
    bnfold.BnfoldError
        When the models cannot be compared (unreadable, different inputs, no shared output, or a
        model whose two runs on the same input differ).
    """
    report = verify(reference, candidate, inputs, **options)
    if not report.ok:
        raise AssertionError("\n".join(report.lines()))
    return report


def run_cli(*args: Any) -> tuple[int, str, str]:
    """Run ``bnfold ARGS`` in this process through the real entry point (`bnfold.cli.main`).

    Returns ``(exit code, stdout, stderr)``: the code is 0, 1 (a check failed) or 2 (bad input),
    exactly as the console script would exit. Arguments are converted with ``str``.
    """
    from click.testing import CliRunner

    from bnfold.cli import main

    with CliRunner().isolation() as streams:
        try:
            main([str(arg) for arg in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        return code, streams[0].getvalue().decode(), streams[1].getvalue().decode()
