"""Exception types that the CLI turns into one-line errors.

`BnfoldError` is a user error (bad input, bad option, unsafe path): the CLI prints
``bnfold: error: <message>`` and exits 2. `VerificationError` means folded and original models
disagree: exit 1. Anything else escaping the library is a bug.
"""

from __future__ import annotations

__all__ = ["BnfoldError", "VerificationError"]


class BnfoldError(Exception):
    """A user-facing error whose message names the file, node or tensor and the bad value."""


class VerificationError(Exception):
    """Raised when two models that should be equivalent are not (CLI exit code 1)."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report
