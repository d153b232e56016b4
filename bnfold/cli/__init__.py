"""The `bnfold` command line: a thin click group whose subcommands live one per module.

Errors are converted once, here: a `BnfoldError` or a click usage error becomes one line
``bnfold: error: ...`` on stderr and exit code 2; a `VerificationError` exits 1.
"""

from __future__ import annotations

import importlib
import logging
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
    "inspect": "inspect",
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
        command = importlib.import_module(f"bnfold.cli.{module}").command
        _add_verbosity_options(command)
        return command


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    from bnfold.cli.output import NORMAL, QUIET, VERBOSE, set_verbosity, verbosity

    if not value:
        return
    wanted = QUIET if param.name == "quiet" else VERBOSE
    if verbosity() == wanted:  # given before the command name already
        return
    if verbosity() != NORMAL:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    set_verbosity(ctx, wanted)
    if wanted == VERBOSE:
        _log_to_stderr(ctx)


def _add_verbosity_options(command: click.Command) -> None:
    """Accept -q/-v after the command name too (`bnfold convert IN -o OUT -v`), as before it."""
    if any(param.name in ("quiet", "verbose") for param in command.params):
        return
    for name, flags, text in (("quiet", ("-q", "--quiet"), "Print only warnings, errors and the final line."),
                              ("verbose", ("-v", "--verbose"), "Also print details (every BN by name, log messages).")):
        command.params.append(click.Option([*flags, name], is_flag=True, expose_value=False, is_eager=True,
                                           callback=_set_verbosity, help=text))


def _log_to_stderr(ctx: click.Context) -> None:
    """Show bnfold's INFO log messages on stderr for the rest of this invocation."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("bnfold")
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def restore() -> None:  # main() may run several times in one process (tests, embedding)
        logger.removeHandler(handler)
        logger.setLevel(previous_level)

    ctx.call_on_close(restore)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="bnfold")
@click.option("-q", "--quiet", is_flag=True, help="Print only warnings, errors and each command's final line.")
@click.option("-v", "--verbose", is_flag=True, help="Also print details: every BN by name, log messages.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Batch normalization done right, and exact BN folding for ONNX models.

    Run `bnfold COMMAND --help` for the options of a command.
    """
    from bnfold.cli.output import NORMAL, QUIET, VERBOSE, set_verbosity

    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose exclude each other")
    set_verbosity(ctx, QUIET if quiet else VERBOSE if verbose else NORMAL)
    if verbose:
        _log_to_stderr(ctx)


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
    except click.exceptions.NoArgsIsHelpError as exc:
        # Plain `bnfold`: the usual multi-line help on stdout, exit 0 (nothing went wrong).
        click.echo(exc.ctx.get_help())
        sys.exit(0)
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
