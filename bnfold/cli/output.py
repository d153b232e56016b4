"""What the commands print, by verbosity: ``-q/--quiet``, default, ``-v/--verbose``.

- `final`: the one line a command ends with (its result); printed at every verbosity.
- `echo`: the usual progress and summary lines; not with ``--quiet``.
- `detail`: names and per-item lines; only with ``--verbose``.
- `warn`: ``warning: ...`` on stderr; printed at every verbosity.

The verbosity is set once by the root group (`bnfold.cli.cli`) in the click context's ``meta``,
so commands need no option of their own. Names from models are escaped with `printable`.
"""

from __future__ import annotations

import click

__all__ = ["QUIET", "NORMAL", "VERBOSE", "verbosity", "set_verbosity", "echo", "detail", "final", "warn"]

QUIET, NORMAL, VERBOSE = -1, 0, 1
_KEY = "bnfold.verbosity"


def set_verbosity(ctx: click.Context, level: int) -> None:
    ctx.meta[_KEY] = level


def verbosity() -> int:
    """The verbosity of the running command (`NORMAL` outside a click context, e.g. in tests)."""
    ctx = click.get_current_context(silent=True)
    return NORMAL if ctx is None else ctx.meta.get(_KEY, NORMAL)


def _printable(text: str) -> str:
    from bnfold.cli import printable

    return printable(text)


def echo(text: str) -> None:
    if verbosity() >= NORMAL:
        click.echo(_printable(text))


def detail(text: str) -> None:
    if verbosity() >= VERBOSE:
        click.echo(_printable(text))


def final(text: str) -> None:
    click.echo(_printable(text))


def warn(text: str) -> None:
    click.echo(_printable(f"warning: {text}"), err=True)
