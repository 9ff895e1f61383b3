"""What the corpus tools (``tools/pack_corpus.py``, ``tools/extend_vocab.py``) share on the command line:
the options that say how the input text is read, and how a tool reports its result, errors and Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Protocol

from cpt_ds.cli import add_debug_flag, run_tool
from cpt_ds.pack.sources import ENCODING_ERRORS, TXT_UNITS
from cpt_ds.pack.workers import default_workers


class Formattable(Protocol):
    def format(self) -> str: ...


def add_input_options(parser: argparse.ArgumentParser) -> None:
    """``--input``, ``--workers``, ``--txt-unit``, ``--json-key``, ``--encoding-errors`` and ``--no-progress``."""
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, folders (searched recursively) or globs; .txt, .jsonl or .parquet, each "
                             "optionally .gz or .zst, .arrow files and datasets save_to_disk folders; all files "
                             "are taken in sorted path order")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes that read and tokenize the text (default: all cores); the output does not "
                             "depend on it")
    parser.add_argument("--txt-unit", choices=TXT_UNITS, default="line",
                        help="what one document is in a .txt file: a line, a blank-line separated paragraph, "
                             "or the whole file")
    parser.add_argument("--json-key", default="text",
                        help="text field of .jsonl records / text column of .parquet and .arrow files")
    parser.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                        help="invalid UTF-8: strict = stop with file and byte offset; replace = U+FFFD")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(parser)


def run_corpus_tool(name: str, work: Callable[[], Formattable], errors: tuple[type[Exception], ...], *,
                    interrupted: str, debug: bool = False) -> int:
    """Run ``work`` with INFO logging to stderr and print its result's ``format()``; the exit status.

    An error of the types ``errors`` (the user's to fix: their messages name the file and the fix) is
    printed without a traceback (status 2, through ``cpt_ds.cli.run_tool``); Ctrl-C prints
    ``interrupted`` (status 130).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    def work_and_report() -> int:
        try:
            result = work()
        except KeyboardInterrupt:
            print(f"{name}: interrupted; {interrupted}", file=sys.stderr)
            return 130
        print(result.format())
        return 0

    return run_tool(work_and_report, *errors, name=name, debug=debug)
