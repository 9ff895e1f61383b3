"""What a run tells its user: the setup line, one status line per logged step, the eval lines, the
records in ``output_dir/metrics.jsonl`` and the same numbers as DeepSpeed monitor events.

Only rank 0 writes; every rank calls the same methods (the numbers are already global sums). Record keys
and values are what plots and tests read: change them only by adding keys.

The status line ends with the time since training started in this launch and an estimate of the time
left: the mean of the last ``RECENT_STEPS`` step durations (evaluations and saves included, as they
recur) times the steps left.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_ds import __version__
from cpt_ds.data.corpora import RunData
from cpt_ds.metrics import MetricsLog, TokenMetrics, peak_memory_gib, total_metrics
from cpt_ds.model import mfu

logger = logging.getLogger(__name__)

RECENT_STEPS = 20
"""How many recent step durations the time-left estimate averages."""


def format_duration(seconds: float | None) -> str:
    """``42s``, ``1m05s``, ``2h03m09s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def eta_seconds(recent: Sequence[float], num_steps_left: int) -> float | None:
    """Time left: the mean of ``recent`` step durations times the steps left; None before any step."""
    if num_steps_left <= 0:
        return 0.0
    if not recent:
        return None
    return sum(recent) / len(recent) * num_steps_left


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """What the status line and the records need to know about the run; fixed for its whole length."""

    rank: int
    world_size: int
    total_steps: int
    logging_steps: int
    block_size: int
    global_batch_size: int
    flops_per_token: float
    peak_tflops: float | None
    sequence_parallel_size: int = 1


class Reporter:
    def __init__(self, output_dir: Path, facts: RunFacts, *, data: RunData, monitor: Any):
        self.facts = facts
        self.data = data
        self.monitor = monitor
        self.metrics = MetricsLog(output_dir, enabled=facts.rank == 0)
        self.interval = torch.zeros(len(data.train), 3, dtype=torch.int64)  # per corpus: loss_sum, correct, tokens
        self.recent: deque[float] = deque(maxlen=RECENT_STEPS)
        self.started = self.interval_start = self.last_step_end = time.perf_counter()
        self.num_interval_steps = 0

    def epochs_text(self, consumed_samples: int) -> str:
        return " ".join(f"{name} {epoch:.3f}" for name, epoch in self.data.epochs(consumed_samples).items())

    # ---- setup -----------------------------------------------------------------------------------

    def log_setup(self, *, ds: Any, model: Any, warmup_steps: int, num_parameters: int, num_trainable: int,
                  attention_implementation: str, consumed_samples: int) -> None:
        """One line with everything that decides what this run computes (``ds``: DsConfig, ``model``: ModelConfig)."""
        data = self.data
        loss = ("liger" if model.use_liger_kernel else
                f"chunks of {model.loss_chunk_size} tokens" if model.loss_chunk_size else "full logits")
        logger.info(
            "cpt-ds %s | world %d%s | ZeRO-%d %s | micro %d x accumulation %d x replicas %d = %d samples/step "
            "(%d tokens) | %d steps, warmup %d | params %.2fM, trainable %.2fM | %d train samples, %s eval samples | "
            "attention %s, document attention %s | loss %s\n  data: %s\n  eval sets: %s",
            __version__, self.facts.world_size, self._sequence_parallel_text(), ds.zero_stage, ds.precision,
            ds.micro_batch_size, ds.gradient_accumulation_steps,
            self.facts.world_size // self.facts.sequence_parallel_size, self.facts.global_batch_size,
            self.facts.global_batch_size * self.facts.block_size, self.facts.total_steps, warmup_steps,
            num_parameters / 1e6, num_trainable / 1e6, len(data.samples),
            sum(len(c.samples) for c in data.eval_sets) or "no", attention_implementation,
            "on" if model.document_attention else "off", loss, self._components_text(consumed_samples),
            ", ".join(f"{c.name} ({len(c.samples)} samples)" for c in data.eval_sets) or "none")

    def _sequence_parallel_text(self) -> str:
        sp_size = self.facts.sequence_parallel_size
        if sp_size == 1:
            return ""
        return f", sequence parallel {sp_size} ({self.facts.block_size // sp_size} tokens of each sample per rank)"

    def _components_text(self, consumed_samples: int) -> str:
        epochs = self.data.epochs(consumed_samples)
        weights = self.data.weights or [None] * len(self.data.train)
        return "; ".join(
            f"{c.name}{'' if w is None else f' weight {w:.3f}'}: {len(c.samples)} samples of {c.stream.num_tokens:,} "
            f"tokens from {len(c.files)} file(s), epoch {epochs.get(c.name, 0.0):.3f}"
            for c, w in zip(self.data.train, weights)) + self._phases_text()

    def _phases_text(self) -> str:
        """A campaign's phases: name, steps and blend (empty for a run without phases)."""
        names = self.data.names
        return "".join(f"\n  phase {phase.name}: {phase.steps} steps, " + ", ".join(
            f"{names[c]}{'' if w is None else f' {w:.3f}'}"
            for c, w in zip(phase.components, phase.weights or [None] * len(phase.components)))
            for phase in self.data.phases or [])

    # ---- training steps --------------------------------------------------------------------------

    def start(self) -> None:
        """Training steps begin now: the clocks of elapsed time, time left and tokens/s start here."""
        self.started = self.interval_start = self.last_step_end = time.perf_counter()
        self.interval.zero_()
        self.num_interval_steps = 0

    def step(self, step: int, stats: torch.Tensor, *, lr: float, grad_norm: float | None,
             consumed_samples: int) -> None:
        """Count step ``step``'s global per-corpus sums; every ``logging_steps`` (and at the first and last
        step) write the record, the status line and the monitor events of the steps since the last one."""
        now = time.perf_counter()
        self.recent.append(now - self.last_step_end)
        self.last_step_end = now
        self.interval += stats
        self.num_interval_steps += 1
        if step % self.facts.logging_steps == 0 or step == self.facts.total_steps or step == 1:
            self._log_train(step, lr, grad_norm, now - self.interval_start, consumed_samples)
            self.interval.zero_()
            self.interval_start, self.num_interval_steps = time.perf_counter(), 0

    def _log_train(self, step: int, lr: float, grad_norm: float | None, seconds: float, consumed_samples: int) -> None:
        epochs = self.data.epochs(consumed_samples)
        # A campaign lists the corpora of the phases begun so far (the others have drawn no sample yet).
        per_corpus = {name: TokenMetrics.from_tensor(row) for name, row in zip(self.data.names, self.interval)
                      if name in epochs}
        total = total_metrics(per_corpus.values())
        phase = self.data.phase(step)
        tokens_per_second = self.num_interval_steps * self.facts.global_batch_size * self.facts.block_size / max(seconds, 1e-9)
        utilization = mfu(tokens_per_second / self.facts.world_size, self.facts.flops_per_token, self.facts.peak_tflops)
        memory = peak_memory_gib()
        record = {
            "step": step, "loss": total.loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second, "mfu": None if math.isnan(utilization) else utilization,
            "memory_gib": memory, "consumed_samples": consumed_samples,
            "tokens_seen": consumed_samples * self.facts.block_size, "epoch": max(epochs.values()), "epochs": epochs,
            "corpora": {name: {"loss": m.loss, "tokens": m.tokens} for name, m in per_corpus.items()}}
        if phase is not None:  # a run without phases keeps today's records, key for key
            record["phase"] = phase
        self.metrics.write(record)
        corpora = "" if len(per_corpus) == 1 else " | " + " ".join(
            f"{name} {m.loss:.3f}" if m.tokens else f"{name} -" for name, m in per_corpus.items())
        logger.info("step %d/%d%s | loss %.4f%s | lr %.3e | grad_norm %s | tokens/s %s | mfu %s | mem %.2f GiB | epoch %s"
                    " | elapsed %s | eta %s",
                    step, self.facts.total_steps, "" if phase is None else f" | phase {phase}", total.loss, corpora, lr,
                    f"{grad_norm:.4f}" if grad_norm is not None else "-", f"{tokens_per_second:,.0f}",
                    "-" if math.isnan(utilization) else f"{100 * utilization:.1f}%", memory,
                    f"{max(epochs.values()):.3f}" if len(epochs) == 1 else self.epochs_text(consumed_samples),
                    format_duration(time.perf_counter() - self.started),
                    format_duration(eta_seconds(self.recent, self.facts.total_steps - step)))
        events = [("Train/loss", total.loss), ("Train/lr", lr), ("Train/tokens_per_second", tokens_per_second)]
        events += [(f"Train/loss/{name}", m.loss) for name, m in per_corpus.items() if m.tokens]
        self._monitor(step, events)

    # ---- evaluation ------------------------------------------------------------------------------

    def evaluation(self, step: int, per_set: dict[str, TokenMetrics], seconds: float) -> TokenMetrics:
        """Record an evaluation of every validation set; returns the token-weighted total over all of them."""
        result = total_metrics(per_set.values())
        logger.info("eval step %d | loss %.4f | accuracy %.4f | perplexity %.2f | %d tokens | %.1f s%s", step,
                    result.loss, result.accuracy, result.perplexity, result.tokens, seconds,
                    "".join(f"\n  {name}: loss {m.loss:.4f} | accuracy {m.accuracy:.4f} | perplexity {m.perplexity:.2f} "
                            f"| {m.tokens} tokens" for name, m in per_set.items()) if len(per_set) > 1 else "")
        self.metrics.write({
            "step": step, "eval_loss": result.loss, "eval_accuracy": result.accuracy,
            "perplexity": result.perplexity, "eval_tokens": result.tokens,
            "sets": {name: {"eval_loss": m.loss, "eval_accuracy": m.accuracy, "perplexity": m.perplexity,
                            "eval_tokens": m.tokens} for name, m in per_set.items()}})
        events = [("Eval/loss", result.loss), ("Eval/accuracy", result.accuracy), ("Eval/perplexity", result.perplexity)]
        for name, m in per_set.items():
            events += [(f"Eval/loss/{name}", m.loss), (f"Eval/perplexity/{name}", m.perplexity)]
        self._monitor(step, events)
        return result

    def _monitor(self, step: int, events: list[tuple[str, float]]) -> None:
        """DeepSpeed's monitors (TensorBoard, CSV, W&B as its JSON configures them), rank 0 only."""
        if self.monitor is not None and self.monitor.enabled and self.facts.rank == 0:
            self.monitor.write_events([(tag, value, step) for tag, value in events])
