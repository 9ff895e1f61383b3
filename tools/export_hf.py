"""Export a cpt-ds checkpoint to a Hugging Face folder.

    python tools/export_hf.py --checkpoint OUTPUT_DIR/step-00001000 --output exported/ [--merge_lora]

Full-finetuning checkpoints become a model folder (config, safetensors, tokenizer) that
``AutoModelForCausalLM.from_pretrained`` loads strictly. LoRA / QLoRA checkpoints become a peft
adapter folder (adapter weights + modules_to_save + tokenizer), or with ``--merge_lora`` a full model
with the adapter merged into the (unquantized) base weights. Any ZeRO stage; weights come from the
fp32 master copy. ``--checkpoint`` may also be an output_dir: its newest complete checkpoint is used.

Every file the checkpoint's completion marker lists is checked (size and sha256) before loading.
``--output`` may not be, hold or lie inside the run folder (except its final/); ``--overwrite``
replaces only a previous export: a folder whose cpt_ds_export.json lists every file in it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.checkpoint import CheckpointError, newest_complete  # noqa: E402
from cpt_ds.cli import UsageError, add_debug_flag, run_tool  # noqa: E402
from cpt_ds.export import DTYPE_NAMES, export_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a step-NNNNNNNN folder, or an output_dir")
    parser.add_argument("--output", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--merge_lora", action="store_true", help="merge a LoRA adapter into the base weights")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="weight dtype of the export (default: the training precision)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous export at --output")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_tool(lambda: export(args), CheckpointError, FileExistsError, debug=args.debug)


def export(args: argparse.Namespace) -> None:
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir() and not checkpoint.name.startswith("step-"):
        newest = newest_complete(checkpoint)
        if newest is None:
            raise UsageError(f"{checkpoint} holds no complete step-NNNNNNNN checkpoint")
        checkpoint = newest
    if not checkpoint.is_dir():
        what = "is a file" if checkpoint.exists() else "does not exist"
        raise UsageError(f"checkpoint {checkpoint} {what}; pass a step-NNNNNNNN folder or an output_dir")
    output = export_checkpoint(checkpoint, args.output, merge_lora=args.merge_lora, dtype=args.dtype,
                               overwrite=args.overwrite)
    print(f"exported {checkpoint} -> {output}")


if __name__ == "__main__":
    sys.exit(main())
