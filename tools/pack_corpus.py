#!/usr/bin/env python
"""Pack text corpora into one Megatron MMIDIDX token file: PREFIX.bin + PREFIX.idx + PREFIX.json.

    python tools/pack_corpus.py --input data/zh/ data/en/*.jsonl.zst --tokenizer TOKENIZER_DIR \\
        --output data/packed/corpus [--workers N] [--txt-unit line|paragraph|file] [--json-key text]
        [--shard K/N] [--no-resume]

A killed or failed pack is continued by running the same command again (the partial state lives in
PREFIX.partial/). See docs/packing.md for formats, defaults, the BOS/EOS policy and the sidecar, and
docs/packing_at_scale.md for resume, shards, merging and Hugging Face datasets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.pack.cli import add_input_options, run_corpus_tool  # noqa: E402
from cpt_ds.pack.packing import (  # noqa: E402
    BOS_POLICIES,
    DEFAULT_CHECKPOINT_SECONDS,
    DEFAULT_CHUNK_BYTES,
    ENCODER_CHOICES,
    PackError,
    PackOptions,
    PackSummary,
    pack_corpus,
)
from cpt_ds.pack.sources import parse_shard  # noqa: E402
from cpt_ds.token_file import TokenFileError  # noqa: E402
from cpt_ds.tokenizer import TokenizerError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pack_corpus.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_input_options(parser)
    parser.add_argument("--tokenizer", required=True, metavar="TOKENIZER_DIR",
                        help="Hugging Face tokenizer folder (tokenizer.json or sentencepiece tokenizer.model)")
    parser.add_argument("--output", required=True, metavar="PREFIX",
                        help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    parser.add_argument("--bos", choices=BOS_POLICIES, default="auto",
                        help="prepend BOS to every document: auto = when the tokenizer has a BOS distinct from "
                             "its EOS (LLaMA-3: yes); EOS is always appended")
    parser.add_argument("--encoder", choices=ENCODER_CHOICES, default="auto",
                        help="auto = exact tiktoken encoder when the tokenizer allows it (checked against HF "
                             "tokenizers while packing), else HF tokenizers; hf = always HF tokenizers")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--no-resume", action="store_true",
                        help="discard the partial state of an interrupted pack (PREFIX.partial/) and start over")
    parser.add_argument("--shard", metavar="K/N",
                        help="pack only the K-th (1..N) of N byte-balanced parts of the sorted input files, into "
                             "PREFIX-0000K-of-0000N; N jobs with K = 1..N pack the whole corpus, and a data_path "
                             "entry PREFIX-* reads all parts in order")
    parser.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                        help="commit the resumable state at most this often (a crash redoes at most this much "
                             "work); 0 = after every chunk")
    parser.add_argument("--chunk-kb", type=int, default=DEFAULT_CHUNK_BYTES >> 10,
                        help="work unit per worker task in KiB; changes speed and memory, never the output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def pack() -> PackSummary:
        options = PackOptions(txt_unit=args.txt_unit, json_key=args.json_key, bos=args.bos,
                              encoding_errors=args.encoding_errors, encoder=args.encoder)
        shard = parse_shard(args.shard) if args.shard is not None else None
        return pack_corpus(args.input, args.tokenizer, args.output, options, workers=args.workers,
                           overwrite=args.overwrite, chunk_bytes=args.chunk_kb << 10, progress=not args.no_progress,
                           resume=not args.no_resume, shard=shard, checkpoint_seconds=args.checkpoint_seconds)

    return run_corpus_tool("pack_corpus", pack, (PackError, TokenizerError, TokenFileError),
                           interrupted="no output was written; run the same command again to resume", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
