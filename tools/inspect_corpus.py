#!/usr/bin/env python
"""Show what a token file (PREFIX.bin/.idx/.json) holds, decode a document, or verify it in full.

    python tools/inspect_corpus.py PREFIX                 # summary: documents, tokens, dtype, tokenizer, lengths
    python tools/inspect_corpus.py PREFIX --decode 17     # document 17 as text (needs the tokenizer)
    python tools/inspect_corpus.py PREFIX --verify        # .bin checksum and every id < vocab size
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from cpt_ds.cli import add_debug_flag, run_tool  # noqa: E402
from cpt_ds.token_file import IndexedTokenFile, TokenFileError  # noqa: E402
from cpt_ds.tokenizer import TokenizerError, decode, load_tokenizer, tokenizer_fingerprint  # noqa: E402

PERCENTILES = (0, 10, 50, 90, 99, 100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="inspect_corpus.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("prefix", metavar="PREFIX", help="token file prefix (PREFIX.bin, PREFIX.idx, PREFIX.json)")
    parser.add_argument("--decode", type=int, metavar="N", help="print document N (0-based) as text")
    parser.add_argument("--verify", action="store_true", help="check the .bin checksum and that every id < vocab")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer folder for --decode (default: the one recorded in PREFIX.json)")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size for --verify of a file without PREFIX.json")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.vocab_size <= 0:
        parser.error(f"--vocab-size must be positive, got {args.vocab_size}")
    return args


def summary(token_file: IndexedTokenFile) -> str:
    lengths = token_file.document_lengths
    meta = token_file.meta or {}
    tokenizer = meta.get("tokenizer", {})
    lines = [
        f"token file    {token_file.prefix}.bin/.idx" + ("/.json" if token_file.meta else " (no sidecar)"),
        f"documents     {token_file.num_documents:,}",
        f"tokens        {token_file.num_tokens:,}",
        f"dtype         {token_file.dtype.name} ({token_file.dtype.itemsize} bytes/token)",
    ]
    if lengths.size:
        values = np.percentile(lengths, PERCENTILES, method="nearest")
        table = ", ".join(f"p{p} {int(v):,}" for p, v in zip(PERCENTILES, values, strict=True))
        lines.append(f"doc lengths   {table}; mean {lengths.mean():,.1f}")
    if meta:
        lines += [
            f"tokenizer     {tokenizer.get('path')} (sha256 {str(tokenizer.get('fingerprint'))[:16]}..., "
            f"{tokenizer.get('class')})",
            f"vocab size    {meta.get('vocab_size'):,}; BOS {meta.get('bos_id')} "
            f"({'added' if meta.get('add_bos') else 'not added'}), EOS {meta.get('eos_id')} (appended)",
            f"encoder       {meta.get('encoder')}; options {meta.get('options')}",
            f"inputs        {len(meta.get('inputs', []))} files, {sum(i['bytes'] for i in meta.get('inputs', [])):,} "
            f"bytes; {meta.get('num_empty_documents_skipped', 0):,} empty documents skipped",
            f"written by    {meta.get('tool')} {meta.get('tool_version')}",
        ]
    return "\n".join(lines)


def decode_document(token_file: IndexedTokenFile, index: int, tokenizer_dir: str | None) -> str:
    meta = token_file.meta or {}
    packed_with = meta.get("tokenizer", {})
    folder = tokenizer_dir or packed_with.get("path")
    if folder is None:
        raise TokenizerError(f"{token_file.json_path}: no sidecar names the tokenizer; pass --tokenizer DIR")
    if packed_with.get("fingerprint") and tokenizer_fingerprint(folder) != packed_with["fingerprint"]:
        raise TokenizerError(f"tokenizer {folder} is not the one {token_file.prefix} was packed with "
                             "(fingerprints differ); pass --tokenizer with the packing tokenizer")
    if not -token_file.num_documents <= index < token_file.num_documents:
        raise TokenFileError(f"{token_file.idx_path}: document {index} does not exist "
                             f"({token_file.num_documents} documents); pass --decode 0..{token_file.num_documents - 1}")
    ids = token_file.document(index)
    # Show the boundary tokens apart from the text: a document may contain their literal strings.
    bos = ids[0] if ids.size and meta.get("add_bos") and ids[0] == meta.get("bos_id") else None
    eos = ids[-1] if ids.size and ids[-1] == meta.get("eos_id") else None
    inner = ids[(bos is not None) : ids.size - (eos is not None)]
    print(f"document {index}: {ids.size} tokens; BOS {bos if bos is not None else 'none'}, "
          f"EOS {eos if eos is not None else 'none'}", file=sys.stderr)
    return decode(load_tokenizer(folder), inner)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: inspect(args), TokenFileError, TokenizerError, name="inspect_corpus", debug=args.debug)


def inspect(args: argparse.Namespace) -> None:
    token_file = IndexedTokenFile(args.prefix)
    if args.decode is not None:
        print(decode_document(token_file, args.decode, args.tokenizer))
        return
    print(summary(token_file))
    if args.verify:
        from tqdm import tqdm

        with tqdm(total=token_file.num_tokens * token_file.dtype.itemsize, unit="B", unit_scale=True,
                  desc="verifying", leave=False,
                  disable=None) as bar:  # no bar unless stderr is a terminal: errors stay one line
            token_file.verify(args.vocab_size, progress=bar.update)
        vocab = args.vocab_size or token_file.vocab_size
        checksum = "checksum matches the sidecar, " if token_file.meta else ""
        print(f"verify        OK: {checksum}all {token_file.num_tokens:,} ids < {vocab:,}")


if __name__ == "__main__":
    sys.exit(main())
