"""The tail every command-line tool shares: user errors become one line on stderr and exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UsageError(ValueError):
    """A tool's input is wrong; the message names the file or flag and the fix."""


def run_tool(work: Callable[[], int | None], *errors: type[Exception], name: str | None = None) -> int:
    """Run a tool's ``work``; a :class:`UsageError` or one of ``errors`` is printed as ``[NAME: ]error: ...``
    (one line, no traceback) and gives exit code 2. Anything else is a bug and keeps its traceback."""
    try:
        code = work()
    except (UsageError, *errors) as error:
        print(f"{name + ': ' if name else ''}error: {error}", file=sys.stderr)
        return 2
    return code or 0
