#!/usr/bin/env python
"""Training speed and eval memory: cpt-ds against the baseline, same model, data and DeepSpeed JSON.

    python benchmarks/train_speed.py [--quick] [--zero_stage 2] [--precision fp32|bf16] [--repeats 3]

The baseline is Chinese-LLaMA-Alpaca-3's ``run_clm_pt_with_peft.py``: the HF Trainer with the same
DeepSpeed JSON and its ``compute_metrics`` (benchmarks/_baseline_hf_trainer.py). Both sides run on 2 CPU
ranks through the deepspeed launcher (hostfile, no ssh, their own port), from scratch on the same
LLaMA-3-shaped model config and seed, over the same ``block_size`` windows of one token file packed here
from text shipped with Python, with the same micro-batch, ZeRO stage, precision, clipping and AdamW.

1. Training tokens/s over the same steady-state window: steps ``window_start+1 .. window_start+steps``
   (start-up and the first steps excluded), from the wall time of each step. cpt-ds: the per-step
   interval it logs to metrics.jsonl (``logging_steps`` 1; the interval excludes the logging itself);
   baseline: a callback's clock from the end of one optimizer step to the end of the next. Launches
   alternate ours/baseline ``--repeats`` times. The target is judged on the median step time over all
   launches of a side (this 2-core machine is shared, and another job's burst only ever lengthens some
   steps); the mean over each launch's window is printed next to it.
2. Eval peak memory for eval sets of N and 10N windows: a launch per (side, N) trains 2 steps (the HF
   Trainer refuses to evaluate before training under ZeRO-1/2), then evaluates inside a probe that asks
   the kernel for this process's peak resident set: free heap is handed back (``malloc_trim``), the
   high-water mark is reset (``/proc/self/clear_refs``), and growth = ``VmHWM`` after the eval minus
   ``VmRSS`` before it; these launches fix glibc's mmap threshold so that the resident set follows
   live memory (see ``launch``). The largest growth over the ranks is reported. The baseline's grows
   with N because the Trainer gathers and keeps every rank's argmax predictions and labels (``int64``
   per token) until ``compute_metrics``; cpt-ds all-reduces three integers per eval.

Prints one table, then each target (ratio >= 1.1x; our eval memory flat from N to 10N) as met or not.
Everything is written to a temporary folder (``--workdir`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    REPO, BenchmarkError, Row, check_probe_supported, launch, print_side_by_side, print_targets, side_row)

BENCHMARKS = Path(__file__).resolve().parent
BASELINE_SCRIPT = BENCHMARKS / "_baseline_hf_trainer.py"
OURS_EVAL_SCRIPT = BENCHMARKS / "_cpt_ds_eval.py"
NUM_RANKS = 2
VOCAB_SIZE = 2048

# TINY_LLAMA3's LLaMA-3 ratios (GQA 4:1, SwiGLU 3.5x, RoPE theta 500k, untied head) at twice the
# width: ~4.4M parameters, enough that the matmuls and not per-step Python dominate a CPU step.
BENCH_MODEL = {
    "hidden_size": 256,
    "intermediate_size": 896,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
}

# The eval growth of cpt-ds counts as "flat" when the 10N eval's peak is within this of the N eval's.
FLAT_TOLERANCE = 0.10
SPEED_TARGET = 1.1


# --------------------------------------------------------------------------------------------------
# Assets: corpus -> tokenizer -> token file, model config, the one DeepSpeed JSON
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    zero_stage: int
    precision: str
    micro_batch: int
    block_size: int
    window_start: int
    window_steps: int
    eval_samples: int
    eval_warm_steps: int
    repeats: int
    seed: int = 1234

    @property
    def max_steps(self) -> int:
        return self.window_start + self.window_steps

    @property
    def global_batch(self) -> int:
        return self.micro_batch * NUM_RANKS  # gradient accumulation 1 on both sides


@dataclass(frozen=True)
class Assets:
    root: Path
    tokenizer: Path
    token_file: Path
    model_config: Path
    deepspeed: Path
    num_windows: int


def deepspeed_json(settings: Settings) -> dict[str, Any]:
    """The DeepSpeed JSON both sides get. The batch triple, clipping and precision are stated once here;
    the baseline's TrainingArguments are derived from this dict, because the HF Trainer refuses a JSON
    that disagrees with them. No optimizer section: both sides step torch's AdamW."""
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": settings.global_batch,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": settings.precision == "bf16"},
        "zero_optimization": {"stage": settings.zero_stage, "overlap_comm": False, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def pack_token_file(root: Path, texts: list[str], tokenizer: Path, copies: int) -> Path:
    from cpt_ds.pack.packing import PackOptions, pack_corpus

    corpus = root / f"corpus_x{copies}"
    corpus.mkdir(parents=True)
    (corpus / "python_docs.jsonl").write_text(
        "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts * copies), encoding="utf-8")
    prefix = root / "data" / f"python_docs_x{copies}"
    pack_corpus([corpus], tokenizer, prefix, PackOptions(), workers=1)
    return prefix


def build_assets(root: Path, settings: Settings) -> Assets:
    """Text shipped with Python -> a 2,048-token LLaMA-3-style tokenizer -> one token file holding at
    least the 10N eval windows (the corpus is repeated when it is too short)."""
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer
    from cpt_ds.token_file import IndexedTokenFile
    from cpt_ds.toy import TINY_LLAMA3, python_corpus_texts

    texts = python_corpus_texts()
    tokenizer = train_tokenizer(texts, root / "tokenizer", vocab_size=VOCAB_SIZE)
    needed = 10 * settings.eval_samples
    prefix = pack_token_file(root, texts, tokenizer, copies=1)
    windows = (IndexedTokenFile(prefix).num_tokens - 1) // settings.block_size
    if windows < needed:
        prefix = pack_token_file(root, texts, tokenizer, copies=math.ceil(needed / windows) + 1)
        windows = (IndexedTokenFile(prefix).num_tokens - 1) // settings.block_size
    model_config = root / "model_config"
    model_config.mkdir()
    shape = {**TINY_LLAMA3, **BENCH_MODEL, "max_position_embeddings": max(1024, settings.block_size)}
    (model_config / "config.json").write_text(json.dumps(shape, indent=2) + "\n")
    deepspeed = root / "deepspeed.json"
    deepspeed.write_text(json.dumps(deepspeed_json(settings), indent=2) + "\n")
    return Assets(root=root, tokenizer=tokenizer, token_file=prefix, model_config=model_config,
                  deepspeed=deepspeed, num_windows=windows)


# Training hyper-parameters shared by both sides (they do not change the work per step, but both
# sides must do the same thing, down to the LR schedule and weight decay).
HYPER = {"learning_rate": 1e-3, "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.95, "warmup_steps": 2}


def ours_run_config(assets: Assets, settings: Settings, output_dir: Path, *,
                    eval_samples: int | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "config_name": str(assets.model_config),
        "tokenizer_name_or_path": str(assets.tokenizer),
        "full_finetuning": True,
        "data_path": [str(assets.token_file)],
        "validation_split_percentage": 0.0,
        "block_size": settings.block_size,
        "deepspeed": str(assets.deepspeed),
        "lr_scheduler_type": "cosine",
        **HYPER,
        "max_steps": settings.max_steps,
        # One record per step: its interval is that step's wall time (the logging itself excluded).
        "logging_steps": 1,
        "output_dir": str(output_dir),
        "seed": settings.seed,
        "export_final": False,
    }
    if eval_samples is not None:
        config.update(eval_data_path=[str(assets.token_file)], max_eval_samples=eval_samples,
                      max_steps=settings.eval_warm_steps)
    return config


def baseline_spec(assets: Assets, settings: Settings) -> dict[str, Any]:
    return {"deepspeed": str(assets.deepspeed), "model_config": str(assets.model_config),
            "token_file": str(assets.token_file), "block_size": settings.block_size, "seed": settings.seed,
            **HYPER, "max_steps": settings.max_steps, "window_start": settings.window_start,
            "logging_steps": settings.window_start, "eval_warm_steps": settings.eval_warm_steps}


# --------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedRun:
    step_seconds: list[float]
    """Wall seconds of each step of the timed window."""
    launch_seconds: float
    first_loss: float | None


def ours_step_seconds(metrics_file: Path, settings: Settings) -> tuple[list[float], float | None]:
    """Seconds of steps window_start+1 .. max_steps from cpt-ds's per-step records, and the step-1 loss.

    A record's interval is ``global_tokens_per_step / tokens_per_second`` (one step per record).
    """
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = {record["step"]: record for record in records if "tokens_per_second" in record}
    window = range(settings.window_start + 1, settings.max_steps + 1)
    missing = [step for step in window if step not in train]
    if missing:
        raise BenchmarkError(f"{metrics_file} lacks the records of steps {missing}")
    tokens_per_step = settings.global_batch * settings.block_size
    first = train[1]["loss"] if 1 in train else None
    return [tokens_per_step / train[step]["tokens_per_second"] for step in window], first


def check_setup(label: str, found: dict[str, Any], settings: Settings, log: Path) -> None:
    """Both sides must have run what was asked: 2 ranks, the ZeRO stage, the precision."""
    wanted = {"world_size": NUM_RANKS, "zero_stage": settings.zero_stage, "precision": settings.precision}
    wrong = [f"{key} {found.get(key)!r} (wanted {value!r})" for key, value in wanted.items() if found.get(key) != value]
    if wrong:
        raise BenchmarkError(f"{label} ran with {', '.join(wrong)}; see {log}")


def ours_setup(log: Path) -> dict[str, Any]:
    """World size, ZeRO stage and precision from the trainer's set-up line ("world 2 | ZeRO-2 fp32")."""
    match = re.search(r"\| world (\d+) \| ZeRO-(\d) (\w+) \|", log.read_text(errors="replace"))
    if match is None:
        return {}
    return {"world_size": int(match[1]), "zero_stage": int(match[2]), "precision": match[3]}


def run_ours_speed(assets: Assets, settings: Settings, work: Path, index: int) -> SpeedRun:
    output_dir = work / f"ours_train_{index}"
    config = work / f"ours_train_{index}.json"
    config.write_text(json.dumps(ours_run_config(assets, settings, output_dir, eval_samples=None), indent=2))
    wall = launch(f"ours_train_{index}", REPO / "train.py", ["--config", str(config)], work).seconds
    check_setup("cpt-ds", ours_setup(work / f"ours_train_{index}.log"), settings, work / f"ours_train_{index}.log")
    step_seconds, first = ours_step_seconds(output_dir / "metrics.jsonl", settings)
    shutil.rmtree(output_dir / f"step-{settings.max_steps:08d}", ignore_errors=True)  # the final checkpoint
    return SpeedRun(step_seconds, wall, first)


def run_baseline_speed(assets: Assets, settings: Settings, work: Path, index: int) -> SpeedRun:
    spec = work / "baseline_spec.json"
    spec.write_text(json.dumps(baseline_spec(assets, settings), indent=2))
    result = work / f"baseline_train_{index}.rank0.json"
    wall = launch(f"baseline_train_{index}", BASELINE_SCRIPT,
                  ["--spec", str(spec), "--mode", "train", "--output_dir", str(work / f"baseline_train_{index}"),
                   "--result", str(work / f"baseline_train_{index}.rank{{rank}}.json")], work).seconds
    numbers = json.loads(result.read_text())
    check_setup("the baseline", numbers, settings, work / f"baseline_train_{index}.log")
    window = range(settings.window_start + 1, settings.max_steps + 1)
    return SpeedRun([numbers["step_seconds"][str(step)] for step in window], wall, numbers["first_loss"])


@dataclass(frozen=True)
class EvalRun:
    growth_mib: float
    """Peak resident-set growth during the eval, the largest over the ranks."""
    rss_before_mib: float


def read_eval_results(label: str, stem: str, work: Path, settings: Settings, eval_samples: int) -> EvalRun:
    files = sorted(work.glob(f"{stem}.rank*.json"))
    if len(files) != NUM_RANKS:
        raise BenchmarkError(f"expected {NUM_RANKS} result files {stem}.rank*.json in {work}, found {len(files)}")
    results = [json.loads(file.read_text()) for file in files]
    for result in results:
        check_setup(label, result, settings, work / f"{stem}.log")
        if result["eval_samples"] != eval_samples:
            raise BenchmarkError(f"{stem}: rank {result['rank']} evaluated {result['eval_samples']} windows, "
                                 f"not {eval_samples}; see {work / stem}.log")
    worst = max(results, key=lambda result: result["growth_kib"])
    return EvalRun(growth_mib=worst["growth_kib"] / 1024, rss_before_mib=worst["rss_before_kib"] / 1024)


def run_ours_eval(assets: Assets, settings: Settings, work: Path, eval_samples: int) -> EvalRun:
    stem = f"ours_eval_{eval_samples}"
    config = work / f"{stem}.json"
    config.write_text(json.dumps(ours_run_config(assets, settings, work / stem, eval_samples=eval_samples), indent=2))
    launch(stem, OURS_EVAL_SCRIPT, ["--config", str(config), "--warm_steps", str(settings.eval_warm_steps),
                                   "--result", str(work / f"{stem}.rank{{rank}}.json")], work, exact_rss=True)
    return read_eval_results("cpt-ds", stem, work, settings, eval_samples)


def run_baseline_eval(assets: Assets, settings: Settings, work: Path, eval_samples: int) -> EvalRun:
    stem = f"baseline_eval_{eval_samples}"
    spec = work / "baseline_spec.json"
    spec.write_text(json.dumps(baseline_spec(assets, settings), indent=2))
    launch(stem, BASELINE_SCRIPT, ["--spec", str(spec), "--mode", "eval", "--eval_samples", str(eval_samples),
                                   "--output_dir", str(work / stem),
                                   "--result", str(work / f"{stem}.rank{{rank}}.json")], work, exact_rss=True)
    return read_eval_results("the baseline", stem, work, settings, eval_samples)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def speed_rows(settings: Settings, ours: list[SpeedRun], baseline: list[SpeedRun]) -> list[Row]:
    tokens_per_step = settings.global_batch * settings.block_size

    def median_rate(runs: list[SpeedRun]) -> float:
        return tokens_per_step / statistics.median(seconds for run in runs for seconds in run.step_seconds)

    def mean_rates(runs: list[SpeedRun]) -> list[float]:
        return [tokens_per_step * len(run.step_seconds) / sum(run.step_seconds) for run in runs]

    def fastest_rate(runs: list[SpeedRun]) -> float:
        return tokens_per_step / min(seconds for run in runs for seconds in run.step_seconds)

    window = f"steps {settings.window_start + 1}-{settings.max_steps}"
    rows = [
        side_row(f"train tokens/s, median step of {len(ours)} launch(es), {window}", median_rate(ours),
                 median_rate(baseline), ",.0f"),
        side_row(f"train tokens/s, best launch's mean over {window}", max(mean_rates(ours)),
                 max(mean_rates(baseline)), ",.0f"),
        # On a shared machine the fastest steps are the ones no other job competed with.
        side_row("train tokens/s, fastest step (least contended)", fastest_rate(ours), fastest_rate(baseline), ",.0f")]
    if settings.repeats > 1:
        rows.append(("train tokens/s, each launch's mean", ", ".join(f"{rate:,.0f}" for rate in mean_rates(ours)),
                     ", ".join(f"{rate:,.0f}" for rate in mean_rates(baseline)), ""))
    rows.append(side_row("median seconds per step", tokens_per_step / median_rate(ours),
                         tokens_per_step / median_rate(baseline), ".3f"))
    rows.append(side_row(f"whole launch, s ({settings.max_steps} steps, start-up included, fastest)",
                         min(run.launch_seconds for run in ours), min(run.launch_seconds for run in baseline), ".1f"))
    first = [ours[0].first_loss, baseline[0].first_loss]
    rows.append((f"step-1 train loss (same untrained model: both ~ ln {VOCAB_SIZE} = {math.log(VOCAB_SIZE):.2f})",
                 *(f"{loss:.4f}" if loss is not None else "-" for loss in first), ""))
    return rows


def bytes_per_eval_token(settings: Settings, runs: dict[int, EvalRun]) -> float:
    """The slope of eval memory: growth from the N-window eval to the 10N one, per token added."""
    n_small, n_large = sorted(runs)
    return (runs[n_large].growth_mib - runs[n_small].growth_mib) * 2**20 / ((n_large - n_small) * settings.block_size)


def eval_rows(settings: Settings, ours: dict[int, EvalRun], baseline: dict[int, EvalRun]) -> list[Row]:
    n_small, n_large = sorted(ours)
    rows = [side_row(f"eval peak RSS growth, {n} windows, MiB (max over ranks)", ours[n].growth_mib,
                     baseline[n].growth_mib, ".1f") for n in (n_small, n_large)]
    growth = [runs[n_large].growth_mib / runs[n_small].growth_mib for runs in (ours, baseline)]
    rows.append((f"eval peak, {n_large} / {n_small} windows", f"{growth[0]:.2f}x", f"{growth[1]:.2f}x", ""))
    rows.append(side_row("eval memory per extra eval token, bytes", bytes_per_eval_token(settings, ours),
                         bytes_per_eval_token(settings, baseline), ".1f", ratio=False))
    rows.append(side_row("RSS before the eval, MiB", ours[n_large].rss_before_mib, baseline[n_large].rss_before_mib,
                         ".0f"))
    return rows


def report(settings: Settings, assets: Assets, ours_speed: list[SpeedRun], baseline_speed: list[SpeedRun],
           ours_eval: dict[int, EvalRun], baseline_eval: dict[int, EvalRun]) -> bool:
    """Print the table and the targets; returns whether every target was met."""
    tokens_per_step = settings.global_batch * settings.block_size
    print(f"\nZeRO-{settings.zero_stage} {settings.precision}, {NUM_RANKS} CPU ranks, "
          f"micro-batch {settings.micro_batch} x block {settings.block_size} ({tokens_per_step:,} tokens/step), "
          f"model {json.dumps(BENCH_MODEL)}, token file of {assets.num_windows:,} windows\n")
    print_side_by_side(speed_rows(settings, ours_speed, baseline_speed) + eval_rows(settings, ours_eval, baseline_eval))
    slope = bytes_per_eval_token(settings, baseline_eval)
    print(f"\nThe baseline keeps {slope:.0f} bytes per eval token per rank until compute_metrics (measured "
          f"slope): an eval set of 10,000 windows of 1,024 tokens would add ~{slope * 10_000 * 1024 / 2**20:,.0f} MiB "
          "per rank (extrapolated); cpt-ds keeps 3 integers.")

    def median_seconds(runs: list[SpeedRun]) -> float:
        return statistics.median(seconds for run in runs for seconds in run.step_seconds)

    n_small, n_large = sorted(ours_eval)
    speed_ratio = median_seconds(baseline_speed) / median_seconds(ours_speed)
    ours_growth = ours_eval[n_large].growth_mib / ours_eval[n_small].growth_mib
    base_growth = baseline_eval[n_large].growth_mib / baseline_eval[n_small].growth_mib
    flat = ours_eval[n_large].growth_mib <= (1 + FLAT_TOLERANCE) * ours_eval[n_small].growth_mib
    print_targets([
        (f"train tokens/s cpt-ds / baseline >= {SPEED_TARGET}x (median steps)", f"{speed_ratio:.2f}x",
         speed_ratio >= SPEED_TARGET),
        (f"cpt-ds eval peak flat from {n_small} to {n_large} windows (within {FLAT_TOLERANCE:.0%})",
         f"{ours_growth:.2f}x", flat),
        (f"(reference) baseline eval peak grows from {n_small} to {n_large} windows", f"{base_growth:.2f}x",
         "yes" if base_growth > 1 + FLAT_TOLERANCE else "no")])
    return speed_ratio >= SPEED_TARGET and flat


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 5 timed steps, eval sets of 16 and 160, one launch per side")
    parser.add_argument("--zero_stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (CPU default) or bf16; sets the DeepSpeed JSON's bf16 section for both sides")
    parser.add_argument("--micro_batch", type=int, default=8, help="per-rank micro-batch (no gradient accumulation)")
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--window_start", type=int, default=5, help="steps excluded before the timed window")
    parser.add_argument("--steps", type=int, default=25, help="timed steps after --window_start")
    parser.add_argument("--eval_samples", type=int, default=64, help="N: eval sets of N and 10N windows")
    parser.add_argument("--repeats", type=int, default=3, help="training launches per side, alternating")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_samples, args.repeats = args.window_start, 16, 1
    problems = []
    for name in ("window_start", "steps", "micro_batch", "eval_samples", "repeats"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be positive")
    if args.block_size < 2:
        problems.append("--block_size must be at least 2")
    if problems:
        parser.error("; ".join(problems))
    settings = Settings(zero_stage=args.zero_stage, precision=args.precision, micro_batch=args.micro_batch,
                        block_size=args.block_size, window_start=args.window_start, window_steps=args.steps,
                        eval_samples=args.eval_samples, eval_warm_steps=2, repeats=args.repeats)
    return settings, args.workdir


def run(settings: Settings, work: Path) -> bool:
    started = time.perf_counter()
    check_probe_supported()
    print(f"[1/3] corpus, tokenizer and token file in {work}", flush=True)
    assets = build_assets(work / "assets", settings)
    print(f"[2/3] training speed: {settings.repeats} launch(es) per side, steps {settings.window_start + 1}-"
          f"{settings.max_steps} timed", flush=True)
    ours_speed: list[SpeedRun] = []
    baseline_speed: list[SpeedRun] = []
    for index in range(settings.repeats):
        # ABBA order: whatever drifts on the machine over the run hits both sides alike.
        if index % 2 == 0:
            ours_speed.append(run_ours_speed(assets, settings, work, index))
            baseline_speed.append(run_baseline_speed(assets, settings, work, index))
        else:
            baseline_speed.append(run_baseline_speed(assets, settings, work, index))
            ours_speed.append(run_ours_speed(assets, settings, work, index))
    sizes = (settings.eval_samples, 10 * settings.eval_samples)
    print(f"[3/3] eval peak memory: {sizes[0]} and {sizes[1]} windows per side", flush=True)
    ours_eval = {n: run_ours_eval(assets, settings, work, n) for n in sizes}
    baseline_eval = {n: run_baseline_eval(assets, settings, work, n) for n in sizes}
    met = report(settings, assets, ours_speed, baseline_speed, ours_eval, baseline_eval)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\n{time.perf_counter() - started:.0f} s in all; load average at the end {load} on {os.cpu_count()} "
          "cores (other jobs on the machine lengthen steps on both sides)", flush=True)
    return met


def main(argv: list[str] | None = None) -> int:
    settings, workdir = parse_args(argv)
    try:
        if workdir is not None:
            if workdir.exists() and any(workdir.iterdir()):
                raise BenchmarkError(f"--workdir {workdir} is not empty; pass a new or empty folder")
            workdir.mkdir(parents=True, exist_ok=True)
            met = run(settings, workdir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="train_speed_") as scratch:
                met = run(settings, Path(scratch))
    except BenchmarkError as error:
        print(f"train_speed: {error}", file=sys.stderr)
        return 2
    # A missed target is a result to report, not a failure of the benchmark.
    print("all targets met" if met else "not every target met (see the table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
