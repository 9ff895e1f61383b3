"""Evaluate a Hugging Face model folder on a token file: loss, next-token accuracy, perplexity.

    python tools/evaluate.py --model DIR --data PREFIX [--block_size 1024] [--max_samples N]
    deepspeed --num_gpus 8 tools/evaluate.py --model DIR --data PREFIX      # several ranks

Uses the training code's samples, document attention, chunked loss and distributed metrics (all-reduced sums, never gathered logits),
so on the same samples it reproduces the eval_loss that train.py logged. ``--model`` may be a full
model folder or a peft adapter folder (its base model is loaded from the adapter's config).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from cpt_ds.config import ModelConfig
from cpt_ds.data.indexed import IndexedTokenFile, TokenFileError
from cpt_ds.data.samples import PackedSamples, TokenStream
from cpt_ds.data.sampler import eval_batches
from cpt_ds.data.tokenizer import tokenizer_files, tokenizer_fingerprint
from cpt_ds.distributed import device, exit_process, init_distributed, setup_logging
from cpt_ds.export import exported_document_attention, load_exported_model
from cpt_ds.loss import LossSettings, attach_loss_forward
from cpt_ds.metrics import evaluate
from cpt_ds.model import attention_implementation
from cpt_ds.preflight import sidecar_tokenizer_fingerprint

logger = logging.getLogger("cpt_ds.evaluate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder or peft adapter folder")
    parser.add_argument("--data", required=True, nargs="+", help="token-file prefixes, read back to back")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4, help="samples per forward per rank")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--document_attention", choices=("true", "false"), default=None,
                        help="attend only within each document of a window; default: what the model was trained "
                             "with (cpt_ds_export.json), else true")
    parser.add_argument("--loss_chunk_size", type=int, default=1024,
                        help="tokens per chunk of the head + loss (0 = full logits)")
    parser.add_argument("--output", help="also write the result as JSON here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loss_chunk_size < 0:
        parser.error(f"--loss_chunk_size must be >= 0, got {args.loss_chunk_size}")

    rank, world_size, _ = init_distributed()
    setup_logging(rank)
    folder = Path(args.model)
    try:
        files = [IndexedTokenFile(prefix) for prefix in args.data]
    except TokenFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not folder.is_dir():
        print(f"error: --model {folder} does not exist", file=sys.stderr)
        return 2
    fingerprint = tokenizer_fingerprint(folder) if _has_tokenizer(folder) else None
    for file in files:
        packed_with = sidecar_tokenizer_fingerprint(file.meta)
        if fingerprint and packed_with and packed_with != fingerprint:
            print(f"error: {file.json_path} was packed with tokenizer {packed_with[:12]}, but {folder} holds "
                  f"tokenizer {fingerprint[:12]}; evaluate on a file packed with the model's tokenizer",
                  file=sys.stderr)
            return 2
    samples = PackedSamples(TokenStream.whole(files), args.block_size, args.max_samples)
    if len(samples) == 0:
        print(f"error: the data holds fewer than block_size {args.block_size} + 1 tokens", file=sys.stderr)
        return 2
    if args.document_attention is not None:
        document_attention = args.document_attention == "true"
    else:
        trained_with = exported_document_attention(folder)
        document_attention = True if trained_with is None else trained_with
    # The attention path training used on this kind of device, so the numbers match train.py's eval.
    implementation = attention_implementation(ModelConfig(document_attention=document_attention))
    model = load_exported_model(folder, dtype=DTYPES[args.dtype], attn_implementation=implementation).to(device())
    attach_loss_forward(model, LossSettings(chunk_size=args.loss_chunk_size))
    result = evaluate(model, eval_batches(samples, micro_batch_size=args.batch_size, dp_rank=rank,
                                          dp_world_size=world_size), document_attention=document_attention)
    record = {"model": str(folder), "data": args.data, "block_size": args.block_size, "samples": len(samples),
              "eval_loss": result.loss, "eval_accuracy": result.accuracy, "perplexity": result.perplexity,
              "eval_tokens": result.tokens, "ranks": world_size, "document_attention": document_attention}
    if rank == 0:
        print(json.dumps(record, indent=2))
        if args.output:
            Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _has_tokenizer(folder: Path) -> bool:
    try:
        tokenizer_files(folder)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    exit_process(main())
