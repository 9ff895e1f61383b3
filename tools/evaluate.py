"""Evaluate a Hugging Face model folder on token files: loss, next-token accuracy, perplexity per set.

    python tools/evaluate.py --model DIR --data [NAME=]PREFIX [--data [NAME=]PREFIX ...] [--block_size 1024]
    deepspeed --num_gpus 8 tools/evaluate.py --model DIR --data zh=data/zh_valid --data en=data/en_valid
    deepspeed --num_gpus 4 tools/evaluate.py --model DIR --data long=data/books --block_size 65536 \
        --sequence_parallel_size 4

Each ``--data`` is one set (named like train.py names eval_data_path sets); one row per set and the
token-weighted total. ``--max_samples`` applies to each set.

Uses the training code's samples, document attention, chunked loss and distributed metrics
(all-reduced sums, never gathered logits), so on the same samples it reproduces the eval_loss that
train.py logged. ``--model`` may be a full model folder or a peft adapter folder (its base model is
loaded from the adapter's config). ``--sequence_parallel_size N`` splits each sample over groups of N
ranks as train.py does (docs/long_context.md), so a sample too long for one device is evaluated.

Before any forward every id a sample reads is checked against the model's embedding rows: a file
with ids outside the vocabulary (packed with another tokenizer, or corrupt) is one error naming the
file and the first bad position. User errors are one line and exit 2 (``--debug``: with a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cpt_ds.attention import (  # noqa: E402
    attention_implementation,
    register_sequence_parallel,
    sequence_parallel_problems,
)
from cpt_ds.checkpoint import CheckpointError  # noqa: E402
from cpt_ds.cli import UsageError, add_debug_flag, run_tool  # noqa: E402
from cpt_ds.config import ModelConfig  # noqa: E402
from cpt_ds.data.blend import parse_named_paths  # noqa: E402
from cpt_ds.data.loader import eval_batches  # noqa: E402
from cpt_ds.data.windows import PackedSamples, TokenStream  # noqa: E402
from cpt_ds.distributed import (  # noqa: E402
    Layout,
    device,
    exit_process,
    init_distributed,
    sequence_parallel_groups,
    setup_logging,
)
from cpt_ds.export import exported_document_attention, load_exported_model  # noqa: E402
from cpt_ds.loss import LossSettings, attach_loss_forward  # noqa: E402
from cpt_ds.metrics import evaluate_sets, total_metrics  # noqa: E402
from cpt_ds.preflight import sidecar_tokenizer_fingerprint  # noqa: E402
from cpt_ds.token_check import check_ids  # noqa: E402
from cpt_ds.token_file import IndexedTokenFile, TokenFileError  # noqa: E402
from cpt_ds.tokenizer import TokenizerError, tokenizer_fingerprint  # noqa: E402

logger = logging.getLogger("cpt_ds.evaluate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder or peft adapter folder")
    parser.add_argument("--data", required=True, action="append",
                        help="one evaluation set: PREFIX or NAME=PREFIX (repeat the flag for several sets)")
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=4, help="samples per forward per rank")
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--document_attention", choices=("true", "false"), default=None,
                        help="attend only within each document of a window; default: what the model was trained "
                             "with (cpt_ds_export.json), else true")
    parser.add_argument("--loss_chunk_size", type=int, default=1024,
                        help="tokens per chunk of the head + loss (0 = full logits)")
    parser.add_argument("--sequence_parallel_size", type=int, default=1,
                        help="ranks sharing each sample (Ulysses, as in training); must divide the number of ranks")
    parser.add_argument("--output", help="also write the result as JSON here")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.loss_chunk_size < 0:
        parser.error(f"--loss_chunk_size must be >= 0, got {args.loss_chunk_size}")
    for name in ("block_size", "batch_size", "max_samples", "sequence_parallel_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    return run_tool(lambda: evaluate(args), TokenFileError, CheckpointError, debug=args.debug)


def check_model_folder(folder: Path) -> None:
    """Refuse what is not an exported model before transformers fails on it with a traceback."""
    if not folder.is_dir():
        raise UsageError(f"--model {folder} does not exist")
    if (folder / "cpt_ds_meta.json").is_file() or (folder / "cpt_ds_complete.json").is_file():
        raise UsageError(f"--model {folder} is a training checkpoint; export it first with tools/export_hf.py "
                         f"--checkpoint {folder} --output DIR and evaluate DIR")
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise UsageError(f"--model {folder} holds no config.json or adapter_config.json; pass a folder written by "
                         "tools/export_hf.py or save_pretrained")


def check_output(output: str | None, inputs: list[Path]) -> None:
    """``--output`` is written after the whole evaluation: refuse now what would fail or overwrite an input."""
    if output is None:
        return
    path = Path(output)
    if not path.parent.is_dir():
        raise UsageError(f"--output {output}: folder {path.parent} does not exist; create it or choose another")
    if path.is_dir():
        raise UsageError(f"--output {output} is a folder; pass a file name for the JSON result")
    target = path.resolve()
    for item in inputs:
        # A new file in the model folder is fine; an existing one there is part of the model.
        inside = item.is_dir() and path.exists() and target.is_relative_to(item.resolve())
        if target == item.resolve() or inside:
            raise UsageError(f"--output {output} is an input of this evaluation ({item}); choose another file")


def load_samples(args: argparse.Namespace, folder: Path) -> dict[str, PackedSamples]:
    """The ``--data`` sets, checked against the model folder: present, packed with its tokenizer, long enough."""
    named, problems = parse_named_paths(args.data, "--data")
    if problems:
        raise UsageError("; ".join(problems))
    sets = {name: IndexedTokenFile(prefix) for name, prefix in named}
    check_model_folder(folder)
    check_output(args.output, [folder, *(path for file in sets.values()
                                         for path in (file.bin_path, file.idx_path, file.json_path))])
    try:
        fingerprint = tokenizer_fingerprint(folder)
    except TokenizerError:  # an adapter folder may hold no tokenizer: then there is nothing to compare
        fingerprint = None
    for file in sets.values():
        packed_with = sidecar_tokenizer_fingerprint(file.meta)
        if fingerprint and packed_with and packed_with != fingerprint:
            raise UsageError(f"{file.json_path} was packed with tokenizer {packed_with[:12]}, but {folder} holds "
                             f"tokenizer {fingerprint[:12]}; evaluate on a file packed with the model's tokenizer")
    samples = {name: PackedSamples(TokenStream.whole([file]), args.block_size, args.max_samples)
               for name, file in sets.items()}
    small = [f"{name} ({sets[name].bin_path})" for name, part in samples.items() if len(part) == 0]
    if small:
        raise UsageError(f"{', '.join(small)} hold fewer than block_size {args.block_size} + 1 tokens")
    return samples


def split_sequences(model, args: argparse.Namespace, layout: Layout, implementation: str,
                    document_attention: bool) -> None:
    """Switch the model to Ulysses attention over groups of ``--sequence_parallel_size`` ranks."""
    problems = sequence_parallel_problems(layout.sp_size, model.config, world_size=layout.world_size,
                                          block_size=args.block_size)
    if problems:
        raise UsageError("; ".join(problems))
    group = sequence_parallel_groups(layout.sp_size).get_sequence_parallel_group()
    model.set_attn_implementation(register_sequence_parallel(implementation, model.config, group,
                                                             document_attention=document_attention))


def evaluate(args: argparse.Namespace) -> None:
    folder = Path(args.model)
    samples = load_samples(args, folder)
    if args.document_attention is not None:
        document_attention = args.document_attention == "true"
    else:
        trained_with = exported_document_attention(folder)
        document_attention = True if trained_with is None else trained_with
    # The attention path training used on this kind of device, so the numbers match train.py's eval.
    implementation = attention_implementation(ModelConfig(document_attention=document_attention))
    model = load_exported_model(folder, dtype=DTYPES[args.dtype], attn_implementation=implementation)
    rows = model.get_input_embeddings().num_embeddings
    for part in samples.values():
        check_ids(part.stream.files[0], rows)  # the training preflight's check: sha256 and ids, cached per machine
    rank, world_size, _ = init_distributed()
    layout = Layout(rank, world_size, args.sequence_parallel_size)
    if layout.sp_size > 1:
        split_sequences(model, args, layout, implementation, document_attention)
    model = model.to(device())
    attach_loss_forward(model, LossSettings(chunk_size=args.loss_chunk_size))
    per_set = evaluate_sets(model, {name: eval_batches(part, micro_batch_size=args.batch_size, dp_rank=layout.dp_rank,
                                                       dp_world_size=layout.dp_size, sp_rank=layout.sp_rank,
                                                       sp_size=layout.sp_size) for name, part in samples.items()},
                            document_attention=document_attention)
    result = total_metrics(per_set.values())
    record = {"model": str(folder), "data": args.data, "block_size": args.block_size,
              "samples": sum(len(part) for part in samples.values()),
              "eval_loss": result.loss, "eval_accuracy": result.accuracy, "perplexity": result.perplexity,
              "eval_tokens": result.tokens, "ranks": world_size, "sequence_parallel_size": layout.sp_size,
              "document_attention": document_attention,
              "sets": {name: {"eval_loss": m.loss, "eval_accuracy": m.accuracy, "perplexity": m.perplexity,
                              "eval_tokens": m.tokens, "samples": len(samples[name])} for name, m in per_set.items()}}
    if rank == 0:
        print(f"{'set':24} {'loss':>8} {'accuracy':>9} {'perplexity':>11} {'tokens':>10}")
        for name, m in [*per_set.items(), ("total", result)]:
            print(f"{name:24} {m.loss:8.4f} {m.accuracy:9.4f} {m.perplexity:11.2f} {m.tokens:10,}")
        if args.output:
            temporary = Path(f"{args.output}.tmp-{os.getpid()}")
            temporary.write_text(json.dumps(record, indent=2) + "\n")
            os.replace(temporary, args.output)


if __name__ == "__main__":
    exit_process(main())
