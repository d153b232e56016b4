"""The CLI boundary: usage errors are one line on stderr with exit code 2, help and version work."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnfold", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ("no-such-command",),
        ("convert",),  # missing IN and -o
        ("convert", "--no-such-option"),
        ("--no-such-option",),
    ],
)
def test_usage_errors_are_one_line_exit_2(args):
    result = run(*args)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnfold: error: "), lines[0]
    assert "Traceback" not in result.stderr


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in ("convert", "export", "train", "verify"):
        assert name in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    import bnfold

    assert bnfold.__version__ in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("conv1 -> bn1", "conv1 -> bn1"),
        ("caf\u00e9 \u03b3", "caf\u00e9 \u03b3"),  # printable non-ASCII is kept as is
        ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # terminal title sequence
        ("a\rb\nc\td", "a\\rb\\nc\\td"),
        ("\u202e", "\\u202e"),  # right-to-left override: not printable, escaped
    ],
)
def test_printable_escapes_what_a_terminal_would_act_on(text, expected):
    from bnfold.cli import printable

    assert printable(text) == expected
    assert printable(text).isprintable()
