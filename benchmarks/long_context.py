#!/usr/bin/env python
"""Long blocks on 2 CPU ranks: sequence parallelism (Ulysses) and tiled MLP, peak memory per rank and speed.

    python benchmarks/long_context.py [--blocks 4096 16384 32768] [--steps 1] [--budget-mib MIB] [--workdir DIR]
    python benchmarks/long_context.py --quick        # a smoke run of a few minutes (tiny blocks and vocabulary)

A LLaMA-3-shaped body (4 layers, GQA 8/2, SwiGLU 3.5x; hidden 128 by default, ``--hidden_size 256``
doubles the time) under LLaMA-3's real 128,256-token vocabulary (untied head), trained from scratch by
train.py with ZeRO-2 fp32, micro-batch 1, on 2 CPU ranks, in four configurations, each block size its
own launch (peak RSS is per process):

- SP1: ``sequence_parallel_size`` 1: each rank trains its own sample of ``block`` tokens (2 samples/step);
- SP2: ``sequence_parallel_size`` 2: both ranks share one sample, ``block / 2`` tokens each (1 sample/step);
- SP1+tiled, SP2+tiled: the same with ``tiled_mlp: true`` (DeepSpeed's TiledMLP, default shards).

The loss is always chunked (``loss_chunk_size`` 1024, the default: the head + cross entropy over 1,024
tokens at a time, never the full logits): that is the tiled logits + loss of ALST, in every column.
The data are uniform random ids in documents of ``--document_length`` tokens (8,192 by default: a
32K block holds 4 documents, a 4K block part of one), with document attention on (the default; on CPU
SDPA once per document; under SP2 after Ulysses' all-to-all, over the whole window's gathered positions).

Measured per launch: each rank's peak resident set (``VmHWM``, start-up included, with glibc's mmap
threshold fixed at 64 KiB in every column (harness ``exact_rss``) so that it follows live tensors: with
glibc's default, blocks freed by one layer's transient copies stay in the heap and the resident set
grows with them, more so under SP2, whose all-to-all makes a few more transient copies per layer
(measured: SP2's growth per block token 0.60x SP1's with the default allocator, 0.50x with the fixed
threshold, the fixed parts equal within 1 MiB; docs/long_context.md), through
benchmarks/harness.py), reported as the larger of the two ranks, and tokens/s **per rank**: global
tokens per step / median seconds of the steps after the first / 2 ranks. Per rank is the fair measure:
SP1 on 2 ranks is 2 data-parallel replicas (a global batch of 2 samples), SP2 is one replica (1 sample),
so SP1's global tokens/s counts twice the batch. The memory that does not depend on the block (the
process, parameters, gradients and ZeRO-2's optimizer states of the 128K-row embedding and head, one
loss chunk) is the same for every column, so the table also shows the growth from the smallest block
and a least-squares line ``peak = fixed + per-token x block`` per configuration. Every launch runs at
least 2 steps (``SEARCH_STEPS``: the optimizer states appear in the first step).

Longest block under a fixed per-rank budget (``--budget-mib``; default: SP1's peak at the middle block,
16K, plus half of its growth per ``--granule`` tokens, so that SP1's longest block is 16K): per
configuration the line above predicts the longest multiple of ``--granule`` under the budget, then
2-step launches check it, one granule up while under the budget, down while over it, until a block
under the budget sits next to one over it, at most ``--max_search_runs`` launches per configuration
(the table's launches count as measured; a search that runs out says ">=").

Targets: growth of peak RSS per rank from the smallest block to the middle one (4K -> 16K) with SP2 <=
0.6x SP1's; longest block under the budget with SP2 >= 1.8x SP1's. A benchmark, not a test: it prints
the numbers side by side and the targets as met or not. The full run takes ~25 minutes on 2 cores
(hidden 128); check ``free -g`` first (two ranks of SP1 at 32K need several GiB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_mfu import write_random_tokens, write_tokenizer
from harness import REPO, BenchmarkError, launch, print_targets

from cpt_ds.toy import TINY_LLAMA3

NUM_RANKS = 2
VOCAB_SIZE = 128256
QUICK_VOCAB_SIZE = 8192
# LLaMA-3 ratios (GQA 4:1, SwiGLU 3.5x, untied head), 4 layers, 8 heads / 2 KV heads (SP2 splits both):
# hidden 128 is cpt_ds.toy.TINY_LLAMA3's body, hidden 256 train_memory.py's. The 128,256-row head is ~90%
# of the FLOPs either way; 256 doubles them (a 32K SP1 step ~140 s on one core instead of ~70 s).
BODIES = {128: {"hidden_size": 128, "intermediate_size": 448},
          256: {"hidden_size": 256, "intermediate_size": 896}}
COMMON_BODY = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "tie_word_embeddings": False}
GROWTH_TARGET, LONGEST_TARGET = 0.6, 1.8
SEARCH_STEPS = 2
"""Steps of a budget-search launch. torch's AdamW creates its states (ZeRO-2: 2 x 4 bytes per parameter of
the rank's partition) in the first optimizer step, after that step's forward and backward: only from the
second step on do activations and optimizer states peak together (measured at 8K, SP1: 2,391 MiB after
1 step, 2,721 after 2, 2,761 after 3). Table launches have at least 2 steps for the same reason."""


@dataclass(frozen=True)
class Layout:
    name: str
    sp_size: int
    tiled: bool


LAYOUTS = (Layout("SP1", 1, False), Layout("SP2", 2, False), Layout("SP1+tiled", 1, True), Layout("SP2+tiled", 2, True))
NAMES = [layout.name for layout in LAYOUTS]
PAIRS = (("SP1", "SP2"), ("SP1+tiled", "SP2+tiled"))
"""(without, with) sequence parallelism, for the ratio columns."""


@dataclass(frozen=True)
class Options:
    blocks: list[int]
    steps: int
    """Timed steps, after one untimed first step."""
    budget_mib: float | None
    granule: int
    max_search_runs: int
    document_length: int
    vocab_size: int
    reference_block: int
    hidden_size: int

    @property
    def body(self) -> dict[str, Any]:
        return {**BODIES[self.hidden_size], **COMMON_BODY}


@dataclass(frozen=True)
class Assets:
    tokenizer: Path
    token_file: Path
    model_config: Path
    deepspeed: Path
    max_block: int
    """The longest block the token file and the model's positions allow."""


@dataclass(frozen=True)
class Run:
    peak_rss_mib: float
    """The larger of the two ranks' peaks."""
    tokens_per_second_per_rank: float
    """Global tokens/s of the steps after the first / the 2 ranks."""
    launch_seconds: float


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def build_assets(root: Path, options: Options) -> Assets:
    """Tokenizer, one random-id token file long enough for every launch, model config, DeepSpeed JSON."""
    # The search may go past the largest table block (SP2's longest block is about twice SP1's).
    max_block = 4 * max(options.blocks)
    tokenizer = write_tokenizer(root / "tokenizer")
    # Windows for 2 samples per step over the table's steps at max_block; +1: a window is block + 1 tokens.
    num_tokens = max_block * NUM_RANKS * (options.steps + 1) + 1
    prefix = write_random_tokens(root / "data" / "random", tokenizer, num_tokens=num_tokens,
                                 vocab_size=options.vocab_size, seed=1234, document=options.document_length)
    model_config = root / "model_config"
    model_config.mkdir(parents=True)
    shape = {**TINY_LLAMA3, **options.body, "vocab_size": options.vocab_size, "max_position_embeddings": max_block}
    (model_config / "config.json").write_text(json.dumps(shape, indent=2) + "\n")
    deepspeed = root / "deepspeed.json"
    # The batch triple comes from the run config (train_batch_size is recomputed per data-parallel size).
    deepspeed.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False,
    }, indent=2) + "\n")
    return Assets(tokenizer=tokenizer, token_file=prefix, model_config=model_config, deepspeed=deepspeed,
                  max_block=max_block)


def run_config(assets: Assets, layout: Layout, block: int, max_steps: int, output_dir: Path) -> dict[str, Any]:
    return {
        "config_name": str(assets.model_config), "tokenizer_name_or_path": str(assets.tokenizer),
        "full_finetuning": True, "data_path": [str(assets.token_file)], "validation_split_percentage": 0.0,
        "block_size": block, "deepspeed": str(assets.deepspeed),
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "sequence_parallel_size": layout.sp_size, "tiled_mlp": layout.tiled,
        "learning_rate": 1e-3, "warmup_steps": 1, "lr_scheduler_type": "constant_with_warmup",
        "max_steps": max_steps, "logging_steps": 1, "output_dir": str(output_dir), "seed": 1234,
        "export_final": False,
    }


# --------------------------------------------------------------------------------------------------
# One launch
# --------------------------------------------------------------------------------------------------


def step_rate(metrics_file: Path, tokens_per_step: int, max_steps: int) -> float:
    """Global tokens/s from the median seconds of steps 2..max_steps (the first is start-up)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rates = {record["step"]: record["tokens_per_second"] for record in records if "tokens_per_second" in record}
    missing = [step for step in range(2, max_steps + 1) if step not in rates]
    if missing:
        raise BenchmarkError(f"{metrics_file} lacks the records of steps {missing}")
    seconds = [tokens_per_step / rates[step] for step in range(2, max_steps + 1)]
    return tokens_per_step / statistics.median(seconds)


def check_layout(log: Path, layout: Layout) -> None:
    """The run must have used what it was asked: 2 ranks, the SP degree, tiling."""
    text = log.read_text(errors="replace")
    wanted = [f"| world {NUM_RANKS}" + (f", sequence parallel {layout.sp_size} " if layout.sp_size > 1 else " |"),
              "document attention on", "loss chunks of 1024 tokens"]
    if layout.tiled:
        wanted.append("tiled_mlp: ")
    missing = [piece for piece in wanted if piece not in text]
    if missing:
        raise BenchmarkError(f"{log} lacks {missing}: the run did not train the {layout.name} layout")


def train(assets: Assets, layout: Layout, block: int, max_steps: int, work: Path) -> Run:
    """One launch of train.py; its final checkpoint (hundreds of MB) is deleted at once."""
    if block > assets.max_block:
        raise BenchmarkError(f"block {block} is past the token file's {assets.max_block}; raise --blocks' largest")
    label = f"{layout.name.replace('+', '_')}_{block}_{max_steps}steps"
    config = work / f"{label}.json"
    config.write_text(json.dumps(run_config(assets, layout, block, max_steps, work / label), indent=2) + "\n")
    print(f"{time.strftime('%H:%M:%S')} start {layout.name} block {block:,}, {max_steps} step(s)", flush=True)
    launched = launch(label, REPO / "train.py", ["--config", str(config)], work, num_ranks=NUM_RANKS,
                      peak_rss=True, exact_rss=True, timeout=3600)
    check_layout(work / f"{label}.log", layout)
    tokens_per_step = block * NUM_RANKS // layout.sp_size  # one sample per data-parallel replica
    rate = step_rate(work / label / "metrics.jsonl", tokens_per_step, max_steps) / NUM_RANKS
    for checkpoint in (work / label).glob("step-*"):
        shutil.rmtree(checkpoint)
    peak = max(launched.peak_rss_mib)
    print(f"{time.strftime('%H:%M:%S')} done  {layout.name} block {block:,}: peak RSS {peak:,.0f} MiB per rank, "
          f"{rate:,.0f} tokens/s per rank", flush=True)
    return Run(peak, rate, launched.seconds)


def check_memory(layout: Layout, block: int, fit: tuple[float, float] | None) -> None:
    """Refuse a launch whose two ranks would not fit in the memory available now (a shared machine)."""
    if fit is None:
        return
    needed = NUM_RANKS * (fit[0] + fit[1] * block)
    available = meminfo_kib("MemAvailable") / 1024
    if needed > 0.9 * available:
        raise BenchmarkError(f"{layout.name} at block {block:,} would need ~{needed:,.0f} MiB for {NUM_RANKS} ranks "
                             f"and {available:,.0f} MiB are available; free memory or pass smaller --blocks")


def meminfo_kib(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"/proc/meminfo has no {name} line; this benchmark needs Linux")


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """Every launch so far, by layout name and block: the table's and the search's."""

    table: dict[str, dict[int, Run]] = field(default_factory=dict)
    peaks: dict[str, dict[int, float]] = field(default_factory=dict)
    """Peak RSS per rank of every launch (table and search), for the fit and the search."""

    def record(self, layout: Layout, block: int, run: Run, *, table: bool) -> None:
        self.peaks.setdefault(layout.name, {})[block] = run.peak_rss_mib
        if table:
            self.table.setdefault(layout.name, {})[block] = run


def line_fit(points: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares ``peak = fixed + per_token * block`` (MiB, MiB per token); None below 2 points."""
    if len(points) < 2:
        return None
    blocks, peaks = list(points), list(points.values())
    mean_block, mean_peak = statistics.fmean(blocks), statistics.fmean(peaks)
    slope = (sum((b - mean_block) * (p - mean_peak) for b, p in zip(blocks, peaks, strict=True))
             / sum((b - mean_block) ** 2 for b in blocks))
    return mean_peak - slope * mean_block, slope


def measure_table(assets: Assets, options: Options, work: Path, measured: Measured) -> None:
    for block in sorted(options.blocks):
        for layout in LAYOUTS:
            check_memory(layout, block, line_fit(measured.peaks.get(layout.name, {})))
            run = train(assets, layout, block, options.steps + 1, work)  # see SEARCH_STEPS
            measured.record(layout, block, run, table=True)


def default_budget(measured: Measured, options: Options) -> float:
    """SP1's peak at the reference block plus half its growth per granule: SP1's longest block is the reference."""
    fit = line_fit(measured.peaks["SP1"])
    assert fit is not None  # parse_args asks for at least 2 blocks
    return measured.peaks["SP1"][options.reference_block] + 0.5 * fit[1] * options.granule


@dataclass(frozen=True)
class Longest:
    block: int | None
    """The longest multiple of the granule seen under the budget; None when none was."""
    bracketed: bool
    """True when the next multiple was seen over the budget (or is past what the token file allows)."""
    predicted: int
    """What the line fit predicted, where the search started."""


def longest_block(assets: Assets, options: Options, work: Path, measured: Measured, layout: Layout,
                  budget: float) -> Longest:
    """From the line fit's prediction, one-step launches one granule up (while under the budget) or
    down (while over it) until a block under the budget sits next to one over it."""
    peaks, granule = measured.peaks[layout.name], options.granule
    fit = line_fit(peaks)
    assert fit is not None
    limit = assets.max_block // granule * granule
    predicted = limit if fit[1] <= 0 else min(limit, max(granule, int((budget - fit[0]) / fit[1]) // granule * granule))
    launches = 0

    def fits(block: int) -> bool | None:
        """Whether ``block`` peaks under the budget; None when the search's launches are spent."""
        nonlocal launches
        if block not in peaks:
            if launches == options.max_search_runs:
                return None
            check_memory(layout, block, fit)
            measured.record(layout, block, train(assets, layout, block, SEARCH_STEPS, work), table=False)
            launches += 1
        return peaks[block] <= budget

    block, first = predicted, fits(predicted)
    if first is None:
        return Longest(None, False, predicted)
    if first:
        while block + granule <= limit:
            above = fits(block + granule)
            if not above:
                return Longest(block, above is False, predicted)
            block += granule
        return Longest(block, True, predicted)  # the token file's limit
    while block > granule:
        below = fits(block - granule)
        if below is None:
            return Longest(None, False, predicted)
        if below:
            return Longest(block - granule, True, predicted)
        block -= granule
    return Longest(None, True, predicted)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def print_table(measured: Measured, options: Options) -> None:
    blocks = sorted(options.blocks)
    header = " | ".join(f"{name} peak MiB | {name} growth | {name} tokens/s/rank" for name in NAMES)
    print(f"\n| block | {header} | growth SP2 / SP1 | growth SP2+tiled / SP1+tiled |")
    print("|---:|" + "---:|" * (3 * len(LAYOUTS) + 2))

    def growth(name: str, block: int) -> float:
        return measured.table[name][block].peak_rss_mib - measured.table[name][blocks[0]].peak_rss_mib

    for block in blocks:
        cells = []
        for layout in LAYOUTS:
            run = measured.table[layout.name][block]
            cells += [f"{run.peak_rss_mib:,.0f}", f"{growth(layout.name, block):+,.0f}",
                      f"{run.tokens_per_second_per_rank:,.0f}"]
        ratios = [ratio(growth(sp2, block), growth(sp1, block)) for sp1, sp2 in PAIRS]
        print(f"| {block:,} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    fits = {layout.name: line_fit({b: run.peak_rss_mib for b, run in measured.table[layout.name].items()})
            for layout in LAYOUTS}
    print("| fit: fixed MiB | " + " | ".join(f"{fits[layout.name][0]:,.0f} | | " for layout in LAYOUTS) + " | |")
    print("| fit: MiB per 1K block tokens | " + " | ".join(f"{1024 * fits[layout.name][1]:,.1f} | | "
                                                       for layout in LAYOUTS) + f" | "
          f"{ratio(fits['SP2'][1], fits['SP1'][1])} | {ratio(fits['SP2+tiled'][1], fits['SP1+tiled'][1])} |")


def ratio(ours: float, reference: float) -> str:
    return f"{ours / reference:.2f}x" if reference > 0 else "-"


def print_longest(longest: dict[str, Longest], measured: Measured, budget: float, options: Options) -> None:
    print(f"\nlongest block under {budget:,.0f} MiB per rank (multiples of {options.granule:,}; "
          "peak RSS per rank, the larger of the two ranks)")
    print("| config | fit predicted | longest under budget | its peak MiB | next block's peak MiB | vs SP1 |")
    print("|---|---:|---:|---:|---:|---:|")
    base = longest["SP1"].block
    for name, found in longest.items():
        peaks = measured.peaks[name]
        block = f"{found.block:,}" if found.block is not None else "none found"
        if found.block is not None and not found.bracketed:
            block = f">= {block} (search launches spent)"
        after = (found.block or 0) + options.granule
        next_peak = (f"{peaks[after]:,.0f} ({after:,})" if after in peaks
                     else "past the token file" if found.bracketed else "-")
        own = f"{peaks[found.block]:,.0f}" if found.block is not None else "-"
        versus = ratio(found.block, base) if found.block and base else "-"
        print(f"| {name} | {found.predicted:,} | {block} | {own} | {next_peak} | {versus} |")


def kilo(block: int) -> str:
    return f"{block // 1024}K" if block % 1024 == 0 else f"{block:,}"


def judge(measured: Measured, longest: dict[str, Longest], options: Options) -> bool:
    small, reference = min(options.blocks), options.reference_block

    def growth(name: str) -> float:
        return measured.table[name][reference].peak_rss_mib - measured.table[name][small].peak_rss_mib

    def longest_ratio(name: str, base: str) -> float:
        found, base_found = longest[name].block, longest[base].block
        return found / base_found if found and base_found else float("nan")

    growth_ratio = growth("SP2") / growth("SP1")
    longer = longest_ratio("SP2", "SP1")
    span = f"{kilo(small)} -> {kilo(reference)}"
    print_targets([
        (f"peak RSS growth per rank {span}, SP2 / SP1 <= {GROWTH_TARGET}x",
         f"{growth('SP2'):,.0f} / {growth('SP1'):,.0f} MiB = {growth_ratio:.2f}x", growth_ratio <= GROWTH_TARGET),
        (f"longest block under the budget, SP2 / SP1 >= {LONGEST_TARGET}x",
         f"{longest['SP2'].block or 0:,} / {longest['SP1'].block or 0:,} = {longer:.2f}x", longer >= LONGEST_TARGET),
        (f"(reference) growth {span}, SP2+tiled / SP1+tiled",
         f"{growth('SP2+tiled') / growth('SP1+tiled'):.2f}x", "-"),
        ("(reference) longest block, SP2+tiled / SP1", f"{longest_ratio('SP2+tiled', 'SP1'):.2f}x", "-")])
    return growth_ratio <= GROWTH_TARGET and longer >= LONGEST_TARGET


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Options, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4096, 16384, 32768],
                        help="block sizes of the table (the middle one is the growth target's and the budget's)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per table launch, after one untimed step")
    parser.add_argument("--hidden_size", type=int, choices=sorted(BODIES), default=128,
                        help="the body's width (128: TINY_LLAMA3's body; 256: train_memory.py's, twice the time)")
    parser.add_argument("--budget-mib", "--budget_mib", dest="budget_mib", type=float,
                        help="per-rank peak RSS budget (default: SP1's longest block is the middle block)")
    parser.add_argument("--granule", type=int, default=2048, help="the longest block is a multiple of this")
    parser.add_argument("--max_search_runs", type=int, default=1,
                        help="one-step launches per configuration when searching for the longest block")
    parser.add_argument("--document_length", type=int, default=8192, help="tokens per random-id document")
    parser.add_argument("--quick", action="store_true", help="smoke run: blocks 512 1024 2048, vocabulary "
                        f"{QUICK_VOCAB_SIZE:,}, 1,024-token documents, granule 256")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args(argv)
    vocab_size = VOCAB_SIZE
    if args.quick:
        args.blocks, args.granule, args.document_length = [512, 1024, 2048], 256, 1024
        vocab_size = QUICK_VOCAB_SIZE
    problems = []
    if len(set(args.blocks)) < 2:
        problems.append("--blocks needs at least 2 different sizes (the growth and the line fit)")
    if args.granule < 2 or args.granule % NUM_RANKS:
        problems.append(f"--granule must be a positive multiple of {NUM_RANKS} (SP2 splits each block in 2)")
    if any(block < 2 or block % NUM_RANKS for block in args.blocks):
        problems.append(f"every --blocks size must be a positive multiple of {NUM_RANKS}")
    if args.steps < 1 or args.max_search_runs < 0 or args.document_length < 1:
        problems.append("--steps and --document_length must be positive, --max_search_runs >= 0")
    if args.budget_mib is not None and args.budget_mib <= 0:
        problems.append("--budget-mib must be positive")
    if problems:
        parser.error("; ".join(problems))
    blocks = sorted(set(args.blocks))
    return Options(blocks=blocks, steps=args.steps, budget_mib=args.budget_mib, granule=args.granule,
                   max_search_runs=args.max_search_runs, document_length=args.document_length,
                   vocab_size=vocab_size, reference_block=blocks[len(blocks) // 2],
                   hidden_size=args.hidden_size), args.workdir


def run(options: Options, work: Path) -> bool:
    print(f"{time.strftime('%H:%M:%S')} assets in {work} (vocabulary {options.vocab_size:,}, documents of "
          f"{options.document_length:,} tokens); {meminfo_kib('MemAvailable') / 2**20:.1f} GiB available",
          flush=True)
    assets = build_assets(work / "assets", options)
    measured = Measured()
    measure_table(assets, options, work, measured)
    budget = options.budget_mib if options.budget_mib is not None else default_budget(measured, options)
    print(f"{time.strftime('%H:%M:%S')} budget {budget:,.0f} MiB per rank; searching the longest block", flush=True)
    longest = {layout.name: longest_block(assets, options, work, measured, layout, budget) for layout in LAYOUTS}
    print(f"\nZeRO-2 fp32, micro-batch 1, {NUM_RANKS} CPU ranks, body {json.dumps(options.body)}, vocabulary "
          f"{options.vocab_size:,}; loss chunked (1,024 tokens) in every column; documents of "
          f"{options.document_length:,} tokens, document attention on; tokens/s per rank = global tokens/s / "
          f"{NUM_RANKS} (SP1 trains 2 samples per step, SP2 one); median of {options.steps} timed step(s)")
    print_table(measured, options)
    print_longest(longest, measured, budget, options)
    return judge(measured, longest, options)


def main(argv: list[str] | None = None) -> int:
    options, workdir = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="long_context_") as scratch:
        work = (workdir or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        try:
            met = run(options, work)
        except BenchmarkError as error:
            print(f"long_context: {error}", file=sys.stderr)
            return 2
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    print("all targets met" if met else "not every target met (see the tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
