"""The tail every command-line tool shares: user errors become one line on stderr and exit 2.

``--debug`` (every tool and train.py) or ``CPT_DS_DEBUG=1`` prints the traceback above that line, for
a user error too; the exit code stays 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

DEBUG_ENV = "CPT_DS_DEBUG"
DEBUG_HELP = f"on a user error also print its traceback (or set {DEBUG_ENV}=1); the exit code stays 2"


class UsageError(ValueError):
    """A tool's input is wrong; the message names the file or flag and the fix."""


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``CPT_DS_DEBUG=1`` in the environment."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def debug_in_argv(argv: Sequence[str] | None) -> bool:
    """Whether ``--debug`` is among ``argv`` (default ``sys.argv``): for train.py, which must know it even
    when parsing the rest of its command line fails."""
    return debug_requested("--debug" in (sys.argv[1:] if argv is None else argv))


def report_user_error(error: BaseException, prefix: str, *, debug: bool) -> None:
    """``prefix``error on one line; with ``debug`` the traceback first (the one line stays last)."""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prefix}{error}", file=sys.stderr, flush=True)


def run_tool(work: Callable[[], int | None], *errors: type[Exception], name: str | None = None,
             debug: bool = False) -> int:
    """Run a tool's ``work``; a :class:`UsageError` or one of ``errors`` is printed as ``[NAME: ]error: ...``
    (one line, no traceback unless ``debug`` or CPT_DS_DEBUG=1) and gives exit code 2. Anything else is a
    bug and keeps its traceback."""
    try:
        code = work()
    except (UsageError, *errors) as error:
        report_user_error(error, f"{name + ': ' if name else ''}error: ", debug=debug_requested(debug))
        return 2
    return code or 0
