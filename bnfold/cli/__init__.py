"""The `bnfold` command line: a thin click group whose subcommands live one per module.

Errors are converted once, here: a `BnfoldError` or a click usage error becomes one line
``bnfold: error: ...`` on stderr and exit code 2; a `VerificationError` exits 1.
"""

from __future__ import annotations

import importlib
import sys

import click

from bnfold import __version__
from bnfold.errors import BnfoldError, VerificationError

__all__ = ["main", "cli", "printable"]

# Subcommand name -> module under bnfold.cli exposing a click command called `command`.
# Imported lazily so that e.g. `convert --no-verify` never imports onnxruntime.
_COMMANDS = {
    "train": "train",
    "export": "export",
    "convert": "convert",
    "verify": "verify",
    "recalibrate": "recalibrate",
}


class _Interrupted(Exception):
    """Ctrl-C inside a command; raised past click, which would print a blank line first."""


class _LazyGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted() from None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is None:
            return None
        return importlib.import_module(f"bnfold.cli.{module}").command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="bnfold")
def cli() -> None:
    """Batch normalization done right, and exact BN folding for ONNX models."""


def printable(text: str) -> str:
    """Escape the characters of `text` that a terminal would act on rather than show.

    Node and tensor names come from untrusted files: printed raw, ESC, BEL or CR sequences could
    retitle or clear the user's terminal, or forge lines of output. Each non-printable character
    becomes its Python escape (``\\x1b``, ``\\n``); printable text, non-ASCII included, is kept.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _fail(message: str, code: int) -> None:
    first = printable(" ".join(str(message).split())) or "unknown error"
    click.echo(f"bnfold: error: {first}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI with one-line errors and bnfold's exit codes."""
    try:
        code = cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 2)
    except click.ClickException as exc:
        _fail(exc.format_message(), 2)
    except VerificationError as exc:
        _fail(str(exc), 1)
    except BnfoldError as exc:
        _fail(str(exc), 2)
    except (KeyboardInterrupt, _Interrupted):
        _fail("interrupted", 2)
    except MemoryError:
        _fail("out of memory", 2)
    sys.exit(code if isinstance(code, int) else 0)
