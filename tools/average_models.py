"""Average exported Hugging Face model folders (e.g. several anneals of one stable checkpoint).

    python tools/average_models.py --output averaged/ exported/anneal_a exported/anneal_b [--weights 0.5 0.5]

Writes the weighted mean of every weight (weights are normalized to sum 1; equal by default),
accumulated in float32 and written in the inputs' dtype, one safetensors shard in memory at a time,
with the first input's shard layout, config and tokenizer. The inputs must agree in config.json,
tensor names, shapes and dtypes, and tokenizer; LoRA adapters are refused (export with --merge_lora
first). The output must not exist (``--overwrite`` replaces only an earlier average) and is written
to a temporary folder beside it, renamed when complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.average import average_models  # noqa: E402
from cpt_ds.cli import run_tool  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="exported Hugging Face model folders")
    parser.add_argument("--output", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                        help="one weight per input, normalized to sum 1 (default: equal)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output if it is an earlier average written by this tool")
    args = parser.parse_args(argv)
    return run_tool(lambda: average(args))


def average(args: argparse.Namespace) -> None:
    average_models(args.inputs, args.output, weights=args.weights, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
