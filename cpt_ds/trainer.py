"""The training loop on a DeepSpeed engine: set up, resume, then per step batch -> forward/backward ->
optimizer step -> record -> evaluate -> save; finally export.

Per micro-batch the model returns the loss summed over its labelled positions (cpt_ds/loss.py: the head
and cross entropy run a chunk of tokens at a time, never holding the full logits), with attention
limited to each token's own document when ``document_attention`` is on (cpt_ds/attention.py).

Gradient math: per micro-batch we backpropagate ``loss_sum * accumulation * d / global_tokens``.
DeepSpeed divides by the accumulation steps, sums gradients over all ranks and divides by ``d`` (the
data-parallel replicas; every rank under ZeRO-3, ``DeepSpeedSettings.gradient_divisor``), so the applied
gradient is exactly that of the token-weighted mean loss over the whole global batch (every label counts
once, whichever rank or micro-batch it landed in). Under sequence parallelism (``sequence_parallel_size`` N, data-parallel size world / N) each rank of a group
holds 1/N of each sample's tokens (cpt_ds/data/loader.py) and the attention exchanges them
(cpt_ds/attention.py); every token still lives on exactly one rank, so the same sums hold.

Elsewhere: which checkpoint may be resumed and how (cpt_ds/resume.py), saving and loading it
(cpt_ds/checkpoint.py), status lines and metrics.jsonl records (cpt_ds/reporter.py).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cpt_ds import __version__, campaign, resume
from cpt_ds.attention import model_inputs, module_attention_implementation
from cpt_ds.checkpoint import CLIENT_FORMAT_VERSION, Checkpointer
from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.data import DataError
from cpt_ds.data.corpora import RunData, build_run_data
from cpt_ds.data.loader import IGNORE_INDEX, TrainLoader, eval_batches
from cpt_ds.distributed import (
    Layout,
    barrier,
    destroy_process_group,
    device,
    init_distributed,
    sequence_parallel_groups,
    setup_logging,
)
from cpt_ds.loss import LossOutput
from cpt_ds.metrics import TokenMetrics, all_reduce_stats, by_corpus, evaluate_sets, sample_stats
from cpt_ds.model import (
    BuiltModel,
    build_model,
    count_parameters,
    flops_per_token,
    matmul_parameters,
    peak_tflops,
    training_dtype,
)
from cpt_ds.optim import build_optimizer, check_schedule, lr_at, warmup_steps_for
from cpt_ds.preemption import Stopper
from cpt_ds.preflight import Plan, preflight
from cpt_ds.reporter import Reporter, RunFacts

logger = logging.getLogger(__name__)


class DivergedError(RuntimeError):
    """Training produced non-finite numbers; raised before any save, so the last checkpoint is good."""


class NonFiniteLossError(DivergedError):
    """The loss became NaN/inf on some rank; raised before the optimizer step."""


class NonFiniteGradientError(DivergedError):
    """The gradients overflowed in fp32/bf16, where DeepSpeed would otherwise skip the update silently."""


_DIVERGED_ADVICE = ("Lower learning_rate, enable gradient_clipping in the DeepSpeed JSON, check the data, or resume "
                   "from the last checkpoint in {}")


class Trainer:
    """Set up (data, resume plan, engine), resume, ``train()`` step by step, export; ``close()`` at the end."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.rank, self.world_size, self.local_rank = init_distributed(config.train.dist_timeout_minutes)
        setup_logging(self.rank)
        self.layout = Layout(self.rank, self.world_size, config.train.sequence_parallel_size)
        self.plan: Plan = preflight(config, world_size=self.world_size, rank=self.rank)
        self.ds = self.plan.ds
        self.device = device()
        self.output_dir = Path(config.train.output_dir)
        self.checkpointer = Checkpointer(self.output_dir, rank=self.rank, world_size=self.world_size,
                                         save_total_limit=config.train.save_total_limit,
                                         fault_delay_seconds=config.train.save_fault_delay_seconds)
        self.stopper = Stopper(config.train.max_wall_minutes, save_durations=self.checkpointer.save_durations,
                               rank=self.rank)
        self.data = build_data(config, self.plan, global_batch_size=self.global_batch_size)
        self.total_steps = total_steps_of(config, len(self.data.samples), self.global_batch_size)
        self.warmup_steps = warmup_steps_for(config.optim, self.total_steps)
        check_schedule(config.optim, self.total_steps)
        self.fingerprints = self._fingerprints()
        resume_plan = self._plan_resume()  # edits the DeepSpeed JSON: before deepspeed.initialize
        self._build_engine()
        self.loader = TrainLoader(self.data.samples, micro_batch_size=self.ds.micro_batch_size,
                                  gradient_accumulation_steps=self.ds.gradient_accumulation_steps,
                                  dp_rank=self.layout.dp_rank, dp_world_size=self.layout.dp_size,
                                  seed=config.train.seed, order=self.data.order, sp_rank=self.layout.sp_rank,
                                  sp_size=self.layout.sp_size)
        matmul_trainable, matmul_frozen = matmul_parameters(self.built.module)
        facts = RunFacts(
            rank=self.rank, world_size=self.world_size, total_steps=self.total_steps,
            logging_steps=config.train.logging_steps, block_size=config.data.block_size,
            global_batch_size=self.loader.global_batch_size, peak_tflops=peak_tflops(config.train.peak_tflops),
            sequence_parallel_size=self.layout.sp_size,
            flops_per_token=flops_per_token(self.built.hf_config, config.data.block_size,
                                            matmul_trainable=matmul_trainable, matmul_frozen=matmul_frozen))
        self.reporter = Reporter(self.output_dir, facts, data=self.data, monitor=getattr(self.engine, "monitor", None))
        self.step = 0
        if resume_plan is not None:
            self._resume(resume_plan)
        self.reporter.log_setup(ds=self.ds, model=config.model, warmup_steps=self.warmup_steps,
                                num_parameters=self.num_parameters, num_trainable=self.num_trainable,
                                attention_implementation=self.attention_implementation,
                                consumed_samples=self.loader.consumed_samples)

    # ---- setup -----------------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step: a sequence-parallel group trains one sample per micro-batch slot."""
        return self.ds.micro_batch_size * self.ds.gradient_accumulation_steps * self.layout.dp_size

    def _fingerprints(self) -> dict[str, Any]:
        return run_fingerprints(self.config, self.plan, self.data, total_steps=self.total_steps,
                                global_batch_size=self.global_batch_size)

    def _plan_resume(self) -> resume.ResumePlan | None:
        """Find, verify and vet the checkpoint to resume from; convert it to the universal format and set
        ``checkpoint.load_universal`` in the DeepSpeed JSON when the world size changed."""
        path = self.checkpointer.resolve(self.config.train.resume_from_checkpoint)
        if path is None:
            return None
        marker = self.checkpointer.verify(path)
        problems = resume.compatibility_problems(marker["fingerprints"], self.fingerprints)
        if problems:
            raise resume.incompatible(path, problems)
        campaign.check_plan(path, marker, self.fingerprints, rank=self.rank)
        plan = resume.plan_resume(path, marker, world_size=self.world_size, zero_stage=self.ds.zero_stage,
                                  universal_path=self.checkpointer.universal_path(path))
        if plan.universal:
            logger.warning("checkpoint %s was saved by %d ranks, this run has %d: loading it through DeepSpeed's "
                           "universal checkpoint format (the data position continues at consumed_samples %d)",
                           path, plan.saved_world_size, self.world_size, plan.consumed_samples)
            resume.prepare_deepspeed_config(plan, self.ds.raw)
            self.checkpointer.universal_checkpoint(path)
        return plan

    def _build_engine(self) -> None:
        # DeepSpeed's sequence-parallel state doubles as the "mpu" that tells ZeRO which ranks hold
        # the same sample.
        groups = sequence_parallel_groups(self.layout.sp_size) if self.layout.sp_size > 1 else None
        self.built: BuiltModel = build_model(
            self.config.model, self.ds, vocab_size=self.plan.vocab_size, seed=self.config.train.seed,
            hf_config=self.plan.hf_config,
            sequence_parallel_group=groups.get_sequence_parallel_group() if groups else None)
        self.attention_implementation = module_attention_implementation(self.built.module)
        self.num_parameters, self.num_trainable = count_parameters(self.built.module)
        optimizer, parameters = build_optimizer(self.built.module, self.config.optim, self.ds)
        import deepspeed

        self.engine, self.optimizer, _, self.ds_scheduler = deepspeed.initialize(
            model=self.built.module, optimizer=optimizer, model_parameters=parameters, config=self.ds.raw, mpu=groups)

    def _resume(self, plan: resume.ResumePlan) -> None:
        state = self.checkpointer.load(self.engine, plan.load_path, universal=plan.universal,
                                       is_peft=self.built.is_peft, zero_stage=self.ds.zero_stage)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        self.checkpointer.load_rng(plan.checkpoint,
                                   fallback_seed=self.config.train.seed + 1000003 * self.rank + self.step)
        changes = resume.config_changes(state["config"], self.config.to_flat())
        if changes and self.rank == 0:
            logger.warning("run config changed since the checkpoint (applied from now on): %s", "; ".join(changes))
        resume.log_layout_change(state, self.layout.sp_size)
        self.reporter.metrics.truncate_after(self.step)
        campaign.record_branch(self.reporter.metrics, plan.checkpoint, self.output_dir, self.step)
        logger.info("resumed at step %d, consumed_samples %d (epochs %s) from %s", self.step,
                    self.loader.consumed_samples, self.reporter.epochs_text(self.loader.consumed_samples),
                    plan.checkpoint)

    # ---- the loop --------------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        return lr_at(step, self.config.optim, total_steps=self.total_steps, warmup_steps=self.warmup_steps)

    def train(self) -> TokenMetrics | None:
        """Train to ``max_steps`` (or ``stop_at_step``), evaluating and saving on schedule; returns the
        final evaluation (None when stopped early, already complete, or without eval sets)."""
        train_cfg = self.config.train
        if self.step >= self.total_steps:
            # Relaunching a finished run must not append a second final eval or retrain anything.
            logger.info("training is already complete at step %d of %d in %s; nothing to do", self.step,
                        self.total_steps, self.output_dir)
            if train_cfg.export_final and not (self.output_dir / "final").exists():
                self.export_final()
            return None
        if self.step == 0 and self.data.eval_sets:
            self.evaluate_and_log()
        self.reporter.start()
        stop = min(self.total_steps, train_cfg.stop_at_step or self.total_steps)
        while self.step < stop and not self.stopper.agreed():  # a notice or the wall clock: every rank agrees
            lr = self.lr(self.step)
            stats, grad_norm = self.train_step(self.loader.next_step(), lr)
            self.step += 1
            self.reporter.step(self.step, stats, lr=lr, grad_norm=grad_norm,
                               consumed_samples=self.loader.consumed_samples)
            last = self.step == self.total_steps
            if self.data.eval_sets and not last and train_cfg.eval_steps and self.step % train_cfg.eval_steps == 0:
                self.evaluate_and_log()
            if not last and (self.step == stop or (train_cfg.save_steps and self.step % train_cfg.save_steps == 0)):
                self.save()
        if self.step < self.total_steps:  # stop_at_step, or a notice / the wall clock (raises Preempted)
            self.stopper.finish(self.step, self.total_steps, save=self.save, metrics=self.reporter.metrics)
            return None
        final = self.evaluate_and_log() if self.data.eval_sets else None
        self.save()
        if train_cfg.export_final:
            self.export_final()
        return final

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], lr: float) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over this rank's micro-batches; returns the global ``int64[corpora, 3]`` sums
        (loss, correct, tokens) per training corpus, whose column sums are the global totals."""
        if not self.ds.has_scheduler:
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
        total = self.accumulate_gradients(micro_batches)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        # Under fp16 a skipped step is how loss scaling works; in fp32/bf16 it means the run diverged,
        # and carrying on would report success for a model that stopped learning.
        if not self.engine.was_step_applied() and self.ds.precision != "fp16":
            raise NonFiniteGradientError(f"non-finite gradient at step {self.step + 1} (grad norm {norm}); DeepSpeed "
                                         f"skipped the update and training stopped before any save. "
                                         f"{_DIVERGED_ADVICE.format(self.output_dir)}")
        return total, (float(norm) if norm is not None else None)

    def accumulate_gradients(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward of every micro-batch, up to (not including) the optimizer step; returns the
        global per-corpus sums. Raises before the step when any rank's loss was not finite."""
        local_tokens = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches)
        global_tokens = int(all_reduce_stats(torch.tensor([local_tokens], dtype=torch.int64)).item())
        divisor = self.ds.gradient_divisor(ranks=self.world_size, sequence_parallel_size=self.layout.sp_size)
        scale = self.ds.gradient_accumulation_steps * divisor / global_tokens
        num_corpora = len(self.data.train)
        # Rows: one per corpus (loss_sum, correct, tokens), then [non-finite micro-batches, 0, 0]; one all-reduce.
        stats = torch.zeros(num_corpora + 1, 3, dtype=torch.int64)
        self.engine.train()
        for index, batch in enumerate(micro_batches):
            labels = batch["labels"].to(self.device)
            output = self.forward(batch, labels)
            if bool(torch.isfinite(output.loss)):
                stats[:num_corpora] += by_corpus(sample_stats(output, labels, with_accuracy=False), batch["corpus"],
                                                 num_corpora)
            else:
                stats[num_corpora, 0] += 1
            self.engine.backward(output.loss * scale)
            del output
            if index < len(micro_batches) - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; no optimizer step before the boundary
        total = all_reduce_stats(stats)
        if int(total[num_corpora, 0]) > 0:
            raise NonFiniteLossError(f"non-finite loss at step {self.step + 1} in {int(total[num_corpora, 0])} "
                                     f"micro-batch(es) across ranks; stopped before the optimizer step and before "
                                     f"any save. {_DIVERGED_ADVICE.format(self.output_dir)}")
        return total[:num_corpora]

    def forward(self, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> LossOutput:
        """The loss of one micro-batch (cpt_ds/loss.py): summed over its labelled positions, plus the
        detached per-position losses; only model inputs go in (a batch may carry other keys)."""
        inputs = model_inputs(batch, document_attention=self.config.model.document_attention,
                              implementation=self.attention_implementation, device=self.device)
        return self.engine(**inputs, labels=labels)

    def evaluate_and_log(self) -> TokenMetrics:
        """Evaluate every validation set; ``eval_loss`` is the token-weighted mean over all of them."""
        assert self.data.eval_sets
        started = time.perf_counter()
        micro = self.config.train.per_device_eval_batch_size or self.ds.micro_batch_size
        per_set = evaluate_sets(self.engine, {
            corpus.name: eval_batches(corpus.samples, micro_batch_size=micro, dp_rank=self.layout.dp_rank,
                                      dp_world_size=self.layout.dp_size, sp_rank=self.layout.sp_rank,
                                      sp_size=self.layout.sp_size) for corpus in self.data.eval_sets},
            document_attention=self.config.model.document_attention)
        return self.reporter.evaluation(self.step, per_set, time.perf_counter() - started)

    # ---- checkpoints and export ------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {"cpt_ds": {"format_version": CLIENT_FORMAT_VERSION, "version": __version__, "step": self.step,
                           "data": self.loader.state_dict(), "fingerprints": self.fingerprints,
                           "world_size": self.world_size, "sequence_parallel_size": self.layout.sp_size,
                           "config": self.config.to_flat()}}

    def save(self) -> Path:
        def write_model_files(path: Path) -> None:
            write_export_files(path, config=self.config, built=self.built, ds=self.ds, step=self.step,
                               world_size=self.world_size)

        return self.checkpointer.save(self.engine, self.step, self.client_state(), exclude_frozen=self.built.is_peft,
                                      write_extra=write_model_files)

    def export_final(self) -> None:
        """Rank 0 converts the final checkpoint to a Hugging Face folder in output_dir/final."""
        from cpt_ds.export import export_checkpoint

        barrier()
        if self.rank == 0:
            final = self.output_dir / "final"
            export_checkpoint(self.output_dir / f"step-{self.step:08d}", final, overwrite=True, verify=False)
            logger.info("exported the trained model to %s", final)
        barrier()

    def close(self) -> None:
        barrier()
        self.engine.destroy()
        # Tear the process group down here rather than during interpreter exit, where the order in
        # which gloo's threads and buffers go away is not defined (seen: a rank aborting after success).
        destroy_process_group()


def total_steps_of(config: RunConfig, num_samples: int, global_batch_size: int) -> int:
    """``max_steps``, or the steps of ``num_train_epochs`` over the training samples."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.num_train_epochs * num_samples / global_batch_size))


def build_data(config: RunConfig, plan: Plan, *, global_batch_size: int) -> RunData:
    """The run's training components and eval sets (a data problem is a configuration error)."""
    data = config.data
    try:
        return build_run_data(
            plan.train_components, plan.eval_sets, block_size=data.block_size,
            validation_split_percentage=data.validation_split_percentage,
            max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
            seed=config.train.seed, phases=data.phase_blends(), global_batch_size=global_batch_size)
    except DataError as error:
        raise ConfigError(str(error)) from None


def run_fingerprints(config: RunConfig, plan: Plan, data: RunData, *, total_steps: int,
                     global_batch_size: int) -> dict[str, Any]:
    """What this run's checkpoints record of what they were trained on (cpt_ds/resume.py); a campaign
    adds its plan (cpt_ds/campaign.py), which a run without phases does not have."""
    found = resume.fingerprints(
        data_split=data.split_fingerprint(), blend=data.blend_fingerprint(),
        token_files=resume.token_file_fingerprints(plan.train_files + plan.eval_files),
        tokenizer=plan.tokenizer_fingerprint, model_shape=resume.model_shape(plan.hf_config, plan.vocab_size),
        adapter=resume.adapter_fingerprint(config.model), zero_stage=plan.ds.zero_stage,
        document_attention=config.model.document_attention)
    phases = campaign.plan_fingerprint(
        config=config, data=data, component_files=[files for _, _, files in plan.train_components],
        total_steps=total_steps, ds=plan.ds, global_batch_size=global_batch_size)
    return found if phases is None else {**found, "phases": phases}


def write_export_files(path: Path, *, config: RunConfig, built: BuiltModel, ds: Any, step: int,
                       world_size: int) -> None:
    """What export needs in a checkpoint besides weights: model config, adapter config, tokenizer, run config."""
    (path / "model").mkdir(parents=True)
    built.hf_config.save_pretrained(path / "model")
    if built.is_peft:
        built.module.peft_config["default"].save_pretrained(path / "model")
    tokenizer_dir = path / "tokenizer"
    tokenizer_dir.mkdir()
    from cpt_ds.tokenizer import tokenizer_files

    for file in tokenizer_files(config.model.tokenizer_path):
        shutil.copy2(file, tokenizer_dir / file.name)
    (path / "run_config.json").write_text(json.dumps(config.to_flat(), indent=2, sort_keys=True) + "\n")
    meta = {"step": step, "zero_stage": ds.zero_stage, "precision": ds.precision,
            "dtype": str(training_dtype(config.model, ds)).removeprefix("torch."),
            "is_peft": built.is_peft, "base_model": config.model.model_name_or_path,
            "world_size": world_size, "cpt_ds_version": __version__}
    (path / "cpt_ds_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
