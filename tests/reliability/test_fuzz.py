"""Bounded fuzzing: mutated model bytes end in a BnfoldError or a verified result, never a crash.

The oracle is `tools/fuzz_convert.py:run_case` (the same one the long run uses): load with
`bnfold.io.load_model`, fold with `bnfold.folding.fold`, verify with `bnfold.verification.verify`. Any other
exception type, a folded model that does not verify, a modified input or a case over its time
limit raises `Finding`. The long run (10,000+ cases) is ``python tools/fuzz_convert.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_TOOL_PATH = Path(__file__).resolve().parents[2] / "tools" / "fuzz_convert.py"


def _load_tool():
    name = "reliability_fuzz_convert"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _TOOL_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


tool = _load_tool()
SEEDS = tool.seed_models()
DONORS = list(SEEDS.values())

byte_ops = st.lists(
    st.tuples(st.sampled_from(tool.BYTE_OPS), st.floats(0.0, 1.0, exclude_max=True), st.binary(min_size=1, max_size=8)),
    min_size=1,
    max_size=5,
)
proto_ops = st.lists(
    st.tuples(st.sampled_from(tool.PROTO_OPS), st.tuples(*[st.integers(0, 999)] * 3)),
    min_size=1,
    max_size=3,
)
# Deterministic (derandomize) so that CI runs the same cases every time; ~5 ms per case.
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _run(data: bytes) -> str:
    with tempfile.TemporaryDirectory() as folder:
        outcome = tool.run_case(data, Path(folder))  # raises tool.Finding on a bug
        assert sorted(p.name for p in Path(folder).iterdir()) == ["case.onnx", tool.DATA_FILE]
    return outcome.status


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), ops=byte_ops)
def test_byte_mutations_end_in_error_or_verified_result(seed, ops):
    _run(tool.apply_byte_ops(SEEDS[seed], ops, DONORS))


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), ops=proto_ops, more=st.one_of(st.just([]), byte_ops))
def test_structural_mutations_end_in_error_or_verified_result(seed, ops, more):
    _run(tool.apply_byte_ops(tool.apply_proto_ops(SEEDS[seed], ops), more, DONORS))


def test_fuzzer_reaches_every_stage():
    """The oracle is not vacuous: random cases get refused at each stage and also fully verified."""
    rng = np.random.default_rng(2024)
    seen = Counter(_run(tool.random_case(rng, SEEDS)[1]) for _ in range(300))
    assert seen["verified"] > 0 and seen["refused:load"] > 0, seen
    assert seen["refused:fold"] + seen["refused:verify"] > 0, seen


def test_oracle_flags_a_non_bnfold_exception(monkeypatch):
    """run_case reports a crash as a Finding (checks the check)."""
    import bnfold.folding

    def crash(model, **kwargs):
        raise IndexError("boom")

    monkeypatch.setattr(bnfold.folding, "fold", crash)
    with pytest.raises(tool.Finding, match="IndexError: boom"):
        _run(SEEDS["gemm_bn"])


# ------------------------------------------------------------------------------------------
# The same through the real command line (a handful of cases: each is a process)


def _cli_cases(count: int) -> list[tuple[str, bytes]]:
    """Mutated models covering each outcome, taken round-robin by status from a fixed stream."""
    rng = np.random.default_rng(77)
    picked: dict[str, list[bytes]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(400):
            _, data, _ = tool.random_case(rng, SEEDS)
            status = tool.run_case(data, Path(folder)).status
            picked.setdefault(status, []).append(data)
    rounds = [[(status, items[i]) for status, items in sorted(picked.items()) if len(items) > i] for i in range(count)]
    return [case for round_ in rounds for case in round_][:count]


def test_cli_on_mutated_models(tmp_path):
    """``python -m bnfold convert`` answers as the API did (`run_cli_case`): exit 0 with OUT,
    exit 2 (1 for a failed verification) with one error line and nothing written; no traceback."""
    cases = _cli_cases(6)
    statuses = {status for status, _ in cases}
    assert "verified" in statuses and any(s.startswith("refused") for s in statuses), statuses
    for status, data in cases:
        tool.run_cli_case(data, tmp_path, status)  # raises tool.Finding on any deviation


def test_oracle_flags_a_fold_that_changes_the_function(monkeypatch):
    """run_case reports a folded model that does not verify as a Finding (checks the check)."""
    import bnfold.folding
    from onnx import numpy_helper

    real_fold = bnfold.folding.fold

    def wrong_fold(model, **kwargs):
        folded, report = real_fold(model, **kwargs)
        first = folded.graph.initializer[0]
        array = numpy_helper.to_array(first) + np.float32(0.5)
        folded.graph.initializer[0].CopyFrom(numpy_helper.from_array(array, first.name))
        return folded, report

    monkeypatch.setattr(bnfold.folding, "fold", wrong_fold)
    with pytest.raises(tool.Finding, match="does not verify"):
        _run(SEEDS["gemm_bn"])


def test_cli_oracle_flags_a_wrong_exit_code(tmp_path):
    """run_cli_case compares with the API's answer (checks the check): garbage is refused with
    exit 2, so claiming the API verified it must be reported."""
    garbage = np.random.default_rng(0).bytes(100)
    tool.run_cli_case(garbage, tmp_path, "refused:load")
    with pytest.raises(tool.Finding, match="unexpected answer: exit 2"):
        tool.run_cli_case(garbage, tmp_path, "verified")
