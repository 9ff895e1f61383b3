#!/usr/bin/env python
"""Training memory and speed with LLaMA-3's vocabulary: cpt-ds's chunked loss against the HF Trainer.

    python benchmarks/train_memory.py [--blocks 1024 2048 4096] [--steps 3] [--workdir DIR]

A LLaMA-3-shaped body too small to hide the head (hidden 256, 2 layers, GQA 8/2, SwiGLU 896) under
LLaMA-3's 128,256-token vocabulary, trained from scratch with micro-batch 1, ZeRO-2 fp32 on 2 CPU
ranks, for each block size, by cpt-ds (train.py, its defaults: chunked loss, document attention) and
by the baseline's HF Trainer path (benchmarks/_baseline_hf_trainer.py, full logits), with the same
DeepSpeed JSON, model config, seed and token windows (uniform random ids in 8,192-token documents,
as benchmarks/gpu_mfu.py writes them). Both sides run under benchmarks/harness.py's peak-RSS wrapper,
which records each rank's peak resident set (``VmHWM``, the whole process). Tokens/s: median step time over the
steps after ``--window_start`` (as benchmarks/train_speed.py times them).

The baseline materializes the fp32 logits (tokens x 128,256 x 4 bytes: 2.1 GB at 4,096 tokens), the
log-softmax the loss saves and their gradients; cpt-ds holds one 1,024-token chunk. Targets at the
largest block: cpt-ds peak RSS <= 0.4x the baseline's, tokens/s >= 1.0x. The baseline at 4,096 needs
~8 GB per rank: check ``free -g`` first on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gpu_mfu import write_random_tokens, write_tokenizer
from harness import REPO, BenchmarkError, launch, print_targets, ratio_text
from train_speed import (
    BASELINE_SCRIPT, NUM_RANKS, Assets, Settings, baseline_spec, check_setup, deepspeed_json, ours_run_config,
    ours_setup, ours_step_seconds)

from cpt_ds.toy import TINY_LLAMA3

VOCAB_SIZE = 128256
BODY = {"hidden_size": 256, "intermediate_size": 896, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": VOCAB_SIZE, "tie_word_embeddings": False}
RSS_TARGET, SPEED_TARGET = 0.4, 1.0


@dataclass(frozen=True)
class Side:
    peak_rss_mib: list[float]
    """Per rank."""
    tokens_per_second: float
    first_loss: float | None


def build_assets(root: Path, settings: Settings) -> Assets:
    tokenizer = write_tokenizer(root / "tokenizer")
    num_tokens = settings.max_steps * settings.global_batch * settings.block_size + 1
    prefix = write_random_tokens(root / "data" / "random", tokenizer, num_tokens=num_tokens, vocab_size=VOCAB_SIZE,
                                 seed=settings.seed)
    model_config = root / "model_config"
    model_config.mkdir(parents=True)
    shape = {**TINY_LLAMA3, **BODY, "max_position_embeddings": max(4096, settings.block_size)}
    (model_config / "config.json").write_text(json.dumps(shape, indent=2) + "\n")
    deepspeed = root / "deepspeed.json"
    deepspeed.write_text(json.dumps(deepspeed_json(settings), indent=2) + "\n")
    return Assets(root=root, tokenizer=tokenizer, token_file=prefix, model_config=model_config, deepspeed=deepspeed,
                  num_windows=(num_tokens - 1) // settings.block_size)


def run_ours(assets: Assets, settings: Settings, work: Path) -> Side:
    label = f"ours_{settings.block_size}"
    config = work / f"{label}.json"
    config.write_text(json.dumps(ours_run_config(assets, settings, work / label, eval_samples=None), indent=2))
    launched = launch(label, REPO / "train.py", ["--config", str(config)], work, peak_rss=True, timeout=3600)
    check_setup("cpt-ds", ours_setup(work / f"{label}.log"), settings, work / f"{label}.log")
    seconds, first = ours_step_seconds(work / label / "metrics.jsonl", settings)
    return Side(launched.peak_rss_mib, settings.global_batch * settings.block_size / statistics.median(seconds), first)


def run_baseline(assets: Assets, settings: Settings, work: Path) -> Side:
    label = f"baseline_{settings.block_size}"
    spec = work / f"{label}_spec.json"
    spec.write_text(json.dumps(baseline_spec(assets, settings), indent=2))
    args = ["--spec", str(spec), "--mode", "train", "--output_dir", str(work / label),
            "--result", str(work / f"{label}.rank{{rank}}.json")]
    launched = launch(label, BASELINE_SCRIPT, args, work, peak_rss=True, timeout=3600)
    numbers = json.loads((work / f"{label}.rank0.json").read_text())
    check_setup("the baseline", numbers, settings, work / f"{label}.log")
    window = range(settings.window_start + 1, settings.max_steps + 1)
    seconds = [numbers["step_seconds"][str(step)] for step in window]
    return Side(launched.peak_rss_mib, settings.global_batch * settings.block_size / statistics.median(seconds),
                numbers["first_loss"])


def report(results: dict[int, tuple[Side, Side]]) -> bool:
    print("\n| block | cpt-ds peak RSS per rank, MiB | baseline peak RSS per rank, MiB | RSS cpt-ds / baseline | "
          "cpt-ds tokens/s | baseline tokens/s | tokens/s cpt-ds / baseline | step-1 loss cpt-ds / baseline |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for block, (ours, baseline) in sorted(results.items()):
        rss = ratio_text(max(ours.peak_rss_mib), max(baseline.peak_rss_mib))
        speed = ratio_text(ours.tokens_per_second, baseline.tokens_per_second)
        losses = " / ".join(f"{loss:.3f}" if loss is not None else "-" for loss in (ours.first_loss, baseline.first_loss))
        print(f"| {block:,} | {', '.join(f'{v:,.0f}' for v in ours.peak_rss_mib)} | "
              f"{', '.join(f'{v:,.0f}' for v in baseline.peak_rss_mib)} | {rss} | {ours.tokens_per_second:,.0f} | "
              f"{baseline.tokens_per_second:,.0f} | {speed} | {losses} |")
    block = max(results)
    ours, baseline = results[block]
    rss = max(ours.peak_rss_mib) / max(baseline.peak_rss_mib)
    speed = ours.tokens_per_second / baseline.tokens_per_second
    print(f"\nat block {block:,}:")
    print_targets([(f"peak RSS cpt-ds / baseline <= {RSS_TARGET}x", f"{rss:.2f}x", rss <= RSS_TARGET),
                   (f"tokens/s cpt-ds / baseline >= {SPEED_TARGET}x", f"{speed:.2f}x", speed >= SPEED_TARGET)])
    return rss <= RSS_TARGET and speed >= SPEED_TARGET


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--window_start", type=int, default=1, help="steps excluded before the timed ones")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.window_start < 1 or min(args.blocks) < 2:
        parser.error("--steps and --window_start must be positive, blocks at least 2")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_memory_") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[int, tuple[Side, Side]] = {}
        try:
            for block in args.blocks:
                settings = Settings(zero_stage=2, precision="fp32", micro_batch=1, block_size=block,
                                    window_start=args.window_start, window_steps=args.steps, eval_samples=1,
                                    eval_warm_steps=2, repeats=1)
                print(f"block {block}: assets in {work / f'assets_{block}'}", flush=True)
                assets = build_assets(work / f"assets_{block}", settings)
                results[block] = (run_ours(assets, settings, work), run_baseline(assets, settings, work))
        except BenchmarkError as error:
            print(f"train_memory: {error}", file=sys.stderr)
            return 2
        met = report(results)
    print(f"\n{time.perf_counter() - started:.0f} s in all; ZeRO-2 fp32, micro-batch 1, {NUM_RANKS} CPU ranks, "
          f"body {json.dumps(BODY)}")
    print("all targets met" if met else "not every target met (see the table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
