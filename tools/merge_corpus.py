#!/usr/bin/env python
"""Concatenate token files (PREFIX.bin/.idx/.json) into one, in the order given.

    python tools/merge_corpus.py data/zh/all data/zh/part-*          # the shards of a --shard K/N pack
    python tools/merge_corpus.py data/all data/zh/ data/en/corpus     # a folder of token files, then a prefix

Each IN is a prefix, a glob or a folder of token files (each expanded in sorted order). The parts
must be packed alike (same tokenizer fingerprint, token dtype, BOS/EOS and options): the merged
.bin/.idx equal one pack of all their inputs, and the sidecar lists every input. A data_path entry
may name the parts directly (data/zh/part-*) instead: merging is for tools that want one file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.pack.merge import expand_parts, merge_token_files  # noqa: E402
from cpt_ds.token_file import TokenFileError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="merge_corpus.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", metavar="OUT", help="output prefix: writes OUT.bin, OUT.idx and OUT.json")
    parser.add_argument("parts", nargs="+", metavar="IN", help="token-file prefixes, globs or folders, in order")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        parts = expand_parts(args.parts)
        sidecar = merge_token_files(args.output, parts, overwrite=args.overwrite)
    except TokenFileError as error:
        print(f"merge_corpus: error: {error}", file=sys.stderr)
        return 2
    documents = sidecar.get("num_documents")
    tokens = sidecar.get("num_tokens")
    counts = f": {documents:,} documents, {tokens:,} tokens" if sidecar else " (no sidecars)"
    print(f"merged {len(parts)} token files into {args.output}.bin/.idx{'/.json' if sidecar else ''}{counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
