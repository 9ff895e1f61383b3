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
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.pack.extend_vocab import ExtendOptions, VocabExtensionError, extend_vocabulary  # noqa: E402
from cpt_ds.pack.workers import default_workers  # noqa: E402
from cpt_ds.pack.sources import ENCODING_ERRORS, TXT_UNITS  # noqa: E402
from cpt_ds.tokenizer import TokenizerError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="extend_vocab.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="Hugging Face folder of a byte-level BPE tokenizer (tokenizer.json), e.g. LLaMA-3's")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="domain text as pack_corpus.py reads it: files, folders or globs of .txt, .jsonl, "
                             ".parquet, each optionally .gz or .zst")
    parser.add_argument("--num-new-tokens", type=int, required=True, metavar="N", help="tokens to add")
    parser.add_argument("--output", required=True, metavar="DIR", help="new tokenizer folder (must not exist)")
    parser.add_argument("--min-frequency", type=int, default=2,
                        help="a pair seen fewer times in the training documents never becomes a token")
    parser.add_argument("--eval-fraction", type=float, default=0.05,
                        help="share of whole documents held out for the before/after report")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes that read and pre-tokenize the text (all cores by default); the output "
                             "does not depend on it")
    parser.add_argument("--txt-unit", choices=TXT_UNITS, default="line", help="what one document of a .txt file is")
    parser.add_argument("--json-key", default="text", help="text field of .jsonl / text column of .parquet")
    parser.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default="strict",
                        help="invalid UTF-8: strict = stop; replace = U+FFFD")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        options = ExtendOptions(num_new_tokens=args.num_new_tokens, min_frequency=args.min_frequency,
                                eval_fraction=args.eval_fraction, txt_unit=args.txt_unit, json_key=args.json_key,
                                encoding_errors=args.encoding_errors)
        result = extend_vocabulary(args.tokenizer, args.input, args.output, options, workers=args.workers,
                                   progress=not args.no_progress)
    except (VocabExtensionError, TokenizerError) as error:
        print(f"extend_vocab: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("extend_vocab: interrupted; no output was written", file=sys.stderr)
        return 130
    print(result.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
