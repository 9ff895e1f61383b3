#!/usr/bin/env python
"""Extend a byte-level BPE tokenizer (LLaMA-3) with N domain tokens by continuing its BPE on domain text.

    python tools/extend_vocab.py --tokenizer LLAMA3_DIR --input data/zh/ --num-new-tokens 20000 \\
        --output tokenizers/llama3-zh [--min-frequency 2] [--eval-fraction 0.05] [--workers N]

Original ids, special tokens and the chat template are kept; new ids follow the last existing id.
Writes a Hugging Face tokenizer folder plus extend_report.json (tokens per character before/after on
held-out documents). See docs/vocab_extension.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.pack.cli import add_input_options, run_corpus_tool  # noqa: E402
from cpt_ds.pack.extend_vocab import ExtendOptions, ExtendResult, VocabExtensionError, extend_vocabulary  # noqa: E402
from cpt_ds.tokenizer import TokenizerError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="extend_vocab.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="Hugging Face folder of a byte-level BPE tokenizer (tokenizer.json), e.g. LLaMA-3's")
    add_input_options(parser)
    parser.add_argument("--num-new-tokens", type=int, required=True, metavar="N", help="tokens to add")
    parser.add_argument("--output", required=True, metavar="DIR", help="new tokenizer folder (must not exist)")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="a pair seen fewer times in the training documents never becomes a token")
    parser.add_argument("--eval-fraction", type=float, default=0.05,
                        help="share of whole documents held out for the before/after report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def extend() -> ExtendResult:
        options = ExtendOptions(num_new_tokens=args.num_new_tokens, min_frequency=args.min_frequency,
                                eval_fraction=args.eval_fraction, txt_unit=args.txt_unit, json_key=args.json_key,
                                encoding_errors=args.encoding_errors)
        return extend_vocabulary(args.tokenizer, args.input, args.output, options, workers=args.workers,
                                 progress=not args.no_progress)

    return run_corpus_tool("extend_vocab", extend, (VocabExtensionError, TokenizerError),
                           interrupted="no output was written", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
