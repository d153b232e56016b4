"""Fixtures for the reliability tests: model builders, CLI runners, and file-system snapshots.

The CLI is exercised through ``bnfold.cli.main`` (the real entry point with its error boundary,
in-process) and, for a few cases, ``python -m bnfold`` in a subprocess.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def builders() -> ModuleType:
    """`tests/reliability/builders.py`: hand-built ONNX models."""
    return _load("reliability_builders", HERE / "builders.py")


@pytest.fixture(scope="session")
def fuzz_tool() -> ModuleType:
    """`tools/fuzz_convert.py`: the mutation fuzzer and its oracle (shared with the long run)."""
    return _load("reliability_fuzz_convert", REPO / "tools" / "fuzz_convert.py")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def assert_one_line_error(self, code: int = 2) -> str:
        """The bnfold error contract: exit `code`, one line ``bnfold: error: ...``, no traceback."""
        assert self.code == code, f"exit {self.code}, expected {code}; stderr: {self.stderr!r}"
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"expected one stderr line, got: {self.stderr!r}"
        assert lines[0].startswith("bnfold: error: "), lines[0]
        return lines[0]


def _run_main(argv: list[str]) -> CliResult:
    from bnfold.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in argv])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli():
    """Run ``bnfold <argv>`` in-process through `bnfold.cli.main` (the real error boundary)."""
    return _run_main


def _run_subprocess(argv: list[str], timeout: float = 120.0) -> CliResult:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def run_subprocess():
    """Run ``python -m bnfold <argv>`` in a subprocess (a real process exit, real streams)."""
    return _run_subprocess


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Snapshot:
    """Hashes of input files and the listing of output folders, to compare before/after a run."""

    inputs: dict[Path, str]
    folders: dict[Path, list[str]]

    @classmethod
    def take(cls, inputs, folders) -> Snapshot:
        return cls(
            {Path(p): file_digest(p) for p in inputs if Path(p).is_file()},
            {Path(f): sorted(os.listdir(f)) for f in folders if Path(f).is_dir()},
        )

    def assert_unchanged(self) -> None:
        after = Snapshot.take(self.inputs, self.folders)
        assert after.inputs == self.inputs, "an input file was modified"
        assert after.folders == self.folders, f"folder contents changed: {self.folders} -> {after.folders}"


@pytest.fixture
def snapshot():
    """``snapshot(inputs, folders)`` -> `Snapshot`; call ``.assert_unchanged()`` after the run."""
    return Snapshot.take


@pytest.fixture
def save(tmp_path):
    """``save(model, name)`` writes a ModelProto's bytes with plain file I/O and returns the path."""

    def _save(model, name: str = "model.onnx", folder: Path | None = None) -> Path:
        path = (folder or tmp_path) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.SerializeToString())
        return path

    return _save


@pytest.fixture(scope="session")
def is_root() -> bool:
    # Root writes through chmod 0o500; permission tests that rely on it are skipped then.
    return hasattr(os, "geteuid") and os.geteuid() == 0
