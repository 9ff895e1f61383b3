"""The training loop on a DeepSpeed engine: batch -> forward -> loss -> backward -> step.

Per micro-batch the model returns the loss summed over its labelled positions (cpt_ds/loss.py: the head
and cross entropy run a chunk of tokens at a time, never holding the full logits), with attention
limited to each token's own document when ``document_attention`` is on (cpt_ds/model.py).

Gradient math: per micro-batch we backpropagate ``loss_sum * accumulation * world / global_tokens``.
DeepSpeed divides by the accumulation steps and averages gradients over data-parallel ranks, so the
applied gradient is exactly that of the token-weighted mean loss over the whole global batch
(every label counts once, whichever rank or micro-batch it landed in).
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

from cpt_ds import __version__
from cpt_ds.checkpoint import Checkpointer, CheckpointError
from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.data.corpora import RunData, build_run_data
from cpt_ds.data.loader import IGNORE_INDEX, TrainLoader, eval_batches
from cpt_ds.distributed import barrier, destroy_process_group, device, init_distributed, setup_logging
from cpt_ds.loss import LossOutput
from cpt_ds.metrics import (
    MetricsLog,
    TokenMetrics,
    all_reduce_stats,
    by_corpus,
    evaluate_sets,
    peak_memory_gib,
    sample_stats,
    total_metrics,
)
from cpt_ds.model import (
    BuiltModel,
    build_model,
    count_parameters,
    flops_per_token,
    matmul_parameters,
    mfu,
    model_inputs,
    module_attention_implementation,
    peak_tflops,
    training_dtype,
)
from cpt_ds.optim import build_optimizer, lr_at, warmup_steps_for
from cpt_ds.preflight import Plan, preflight
from cpt_ds.token_file import IndexedTokenFile

logger = logging.getLogger(__name__)

# Config keys that define the model's shape; any change makes a checkpoint unusable.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "tie_word_embeddings")


class DivergedError(RuntimeError):
    """Training produced non-finite numbers; raised before any save, so the last checkpoint is good."""


class NonFiniteLossError(DivergedError):
    """The loss became NaN/inf on some rank; raised before the optimizer step."""


class NonFiniteGradientError(DivergedError):
    """The gradients overflowed in fp32/bf16, where DeepSpeed would otherwise skip the update silently."""


def _file_fingerprints(files: list[IndexedTokenFile]) -> dict[str, str]:
    return {file.prefix: (file.meta or {}).get("bin_sha256") or f"{file.num_tokens} tokens, "
            f"{file.num_documents} documents (no sidecar)" for file in files}


class Trainer:
    def __init__(self, config: RunConfig):
        self.config = config
        self.rank, self.world_size, self.local_rank = init_distributed(config.train.dist_timeout_minutes)
        setup_logging(self.rank)
        self.plan: Plan = preflight(config, world_size=self.world_size, rank=self.rank)
        self.ds = self.plan.ds
        self.device = device()
        self.output_dir = Path(config.train.output_dir)
        self.metrics = MetricsLog(self.output_dir, enabled=self.rank == 0)
        self.checkpointer = Checkpointer(self.output_dir, rank=self.rank, world_size=self.world_size,
                                         save_total_limit=config.train.save_total_limit,
                                         fault_delay_seconds=config.train.save_fault_delay_seconds)

        self._build_data()
        self.total_steps = self._total_steps()
        self.warmup_steps = warmup_steps_for(config.optim, self.total_steps)
        self.fingerprints = self._fingerprints()

        resume_path = self.checkpointer.resolve(config.train.resume_from_checkpoint)
        marker = self.checkpointer.verify(resume_path) if resume_path is not None else None
        load_path = resume_path
        if marker is not None:
            self._check_compatible(resume_path, marker)
            if marker["world_size"] != self.world_size and self.ds.zero_stage > 0:
                load_path = self._prepare_universal(resume_path, marker)

        self.built: BuiltModel = build_model(config.model, self.ds, vocab_size=self.plan.vocab_size,
                                             seed=config.train.seed)
        self.attention_implementation = module_attention_implementation(self.built.module)
        self.num_parameters, self.num_trainable = count_parameters(self.built.module)
        optimizer, parameters = build_optimizer(self.built.module, config.optim, self.ds)
        import deepspeed

        self.engine, self.optimizer, _, self.ds_scheduler = deepspeed.initialize(
            model=self.built.module, optimizer=optimizer, model_parameters=parameters, config=self.ds.raw)
        self.loader = TrainLoader(self.train_samples, micro_batch_size=self.ds.micro_batch_size,
                                  gradient_accumulation_steps=self.ds.gradient_accumulation_steps,
                                  dp_rank=self.rank, dp_world_size=self.world_size, seed=config.train.seed,
                                  order=self.data.order)
        self.step = 0
        self.resumed_from: Path | None = None
        if resume_path is not None:
            assert load_path is not None
            self._load(resume_path, load_path)
        matmul_trainable, matmul_frozen = matmul_parameters(self.built.module)
        self.flops_per_token = flops_per_token(self.built.hf_config, config.data.block_size,
                                               matmul_trainable=matmul_trainable, matmul_frozen=matmul_frozen)
        self.peak_tflops = peak_tflops(config.train.peak_tflops)
        self._log_setup()

    # ---- setup -----------------------------------------------------------------------------------

    def _build_data(self) -> None:
        data = self.config.data
        try:
            self.data: RunData = build_run_data(
                self.plan.train_components, self.plan.eval_sets, block_size=data.block_size,
                validation_split_percentage=data.validation_split_percentage,
                max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
                seed=self.config.train.seed)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.train_samples = self.data.samples

    def _total_steps(self) -> int:
        if self.config.train.max_steps > 0:
            return self.config.train.max_steps
        return max(1, math.ceil(self.config.train.num_train_epochs * len(self.train_samples)
                                / (self.ds.micro_batch_size * self.ds.gradient_accumulation_steps * self.world_size)))

    def _fingerprints(self) -> dict[str, Any]:
        model = self.config.model
        shape = {key: getattr(self.plan.hf_config, key, None) for key in SHAPE_KEYS}
        shape["vocab_size"] = self.plan.vocab_size
        adapter = "full" if model.full_finetuning else {
            "lora_rank": model.lora_rank, "lora_alpha": model.lora_alpha, "trainable": model.trainable_modules,
            "modules_to_save": model.modules_to_save_list, "load_in_kbits": model.load_in_kbits}
        return {
            "data_split": self.data.split_fingerprint(),
            "blend": self.data.blend_fingerprint(),
            "token_files": _file_fingerprints(self.plan.train_files + self.plan.eval_files),
            "tokenizer": self.plan.tokenizer_fingerprint,
            "model_shape": shape,
            "adapter": adapter,
            "zero_stage": self.ds.zero_stage,
            "document_attention": model.document_attention,
        }

    def _check_compatible(self, path: Path, marker: dict[str, Any]) -> None:
        """Refuse a checkpoint whose data, tokenizer or model differ from this run's, naming what changed."""
        old, new = marker["fingerprints"], self.fingerprints
        changed = []
        if old["token_files"] != new["token_files"]:
            before, after = old["token_files"], new["token_files"]
            names = sorted(set(before) | set(after))
            diffs = [name for name in names if before.get(name) != after.get(name)]
            changed.append("token files (" + ", ".join(
                f"{name}: {'added' if name not in before else 'removed' if name not in after else 'content changed'}"
                for name in diffs) + ")")
        elif old["blend"] != new["blend"]:
            changed.append("the blend (" + _blend_changes(old["blend"], new["blend"]) + ")")
        elif old["data_split"] != new["data_split"]:
            changed.append("the train/validation split (validation_split_percentage, seed or eval_data_path)")
        if old["tokenizer"] != new["tokenizer"]:
            changed.append(f"tokenizer (fingerprint {old['tokenizer'][:12]} -> {new['tokenizer'][:12]})")
        if old["model_shape"] != new["model_shape"]:
            diffs = [f"{key} {old['model_shape'].get(key)} -> {value}" for key, value in new["model_shape"].items()
                     if old["model_shape"].get(key) != value]
            changed.append("model shape (" + ", ".join(diffs) + ")")
        if old["adapter"] != new["adapter"]:
            changed.append(f"training mode ({old['adapter']} -> {new['adapter']})")
        if old["zero_stage"] != new["zero_stage"]:
            changed.append(f"ZeRO stage ({old['zero_stage']} -> {new['zero_stage']}); resume with the "
                           "DeepSpeed JSON it was saved with")
        # Checkpoints from before the field existed were trained with attention across documents.
        if old.get("document_attention", False) != new["document_attention"]:
            changed.append(f"document_attention ({old.get('document_attention', False)} -> "
                           f"{new['document_attention']}): the model was trained with the other attention; "
                           f"resume with --document_attention {str(old.get('document_attention', False)).lower()}")
        if changed:
            raise CheckpointError(f"cannot resume from {path}: changed since it was saved: " + "; ".join(changed)
                                  + ". Restore them, or start fresh in a new output_dir")

    def _prepare_universal(self, path: Path, marker: dict[str, Any]) -> Path:
        logger.warning("checkpoint %s was saved by %d ranks, this run has %d: loading it through DeepSpeed's "
                       "universal checkpoint format (the data position continues at consumed_samples %d)",
                       path, marker["world_size"], self.world_size, marker["consumed_samples"])
        self.ds.raw.setdefault("checkpoint", {})["load_universal"] = True
        return self.checkpointer.universal_checkpoint(path)

    def _load(self, resume_path: Path, load_path: Path) -> None:
        strict = not self.built.is_peft
        loaded, client_state = self.engine.load_checkpoint(
            str(load_path.parent), tag=load_path.name, load_module_strict=strict,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {load_path}; it reported no checkpoint there")
        if client_state is None or "cpt_ds" not in client_state:
            raise CheckpointError(f"{load_path} holds no cpt-ds client state; it was not written by train.py")
        if load_path != resume_path and self.ds.zero_stage == 3:
            self._repair_zero3_universal_load(load_path)
        state = client_state["cpt_ds"]
        if self.built.is_peft:
            self._verify_trainable_loaded(load_path)
        self.step = int(state["step"])
        self.loader.load_state_dict(state["data"])
        self.checkpointer.load_rng(resume_path, fallback_seed=self.config.train.seed + 1000003 * self.rank + self.step)
        self.resumed_from = resume_path
        self._warn_config_changes(state["config"])
        self.metrics.truncate_after(self.step)
        logger.info("resumed at step %d, consumed_samples %d (epochs %s) from %s", self.step,
                    self.loader.consumed_samples, self._epochs_text(), resume_path)

    def _repair_zero3_universal_load(self, universal_path: Path) -> None:
        """Undo two slips of DeepSpeed's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
        that make a resumed run drift from the uninterrupted one (~1e-3 in the loss within three steps):

        - it copies the first param group's hyperparameters into every group, so the no-decay group
          (norms) would resume with weight decay: put each group's saved values back;
        - it gives every sub-group's Adam state the *same* ``step`` tensor, which torch's AdamW then
          increments once per sub-group per step, so all but the first sub-group use a wrong bias
          correction: give each its own copy.
        """
        saved = torch.load(universal_path / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
        saved_groups = saved["optimizer_state_dict"]["param_groups"]
        inner = self.engine.optimizer.optimizer
        if len(saved_groups) != len(inner.param_groups):
            raise CheckpointError(f"{universal_path} holds {len(saved_groups)} optimizer param groups, this run has "
                                  f"{len(inner.param_groups)}; resume with the configuration it was saved with")
        for group, saved_group in zip(inner.param_groups, saved_groups, strict=True):
            group.update({key: value for key, value in saved_group.items() if key != "params"})
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()

    def _verify_trainable_loaded(self, load_path: Path) -> None:
        """Non-strict loads (needed for LoRA: frozen weights are not saved) could hide a mismatch: check
        that every trainable tensor of this model is in the checkpoint and equals what was loaded."""
        saved = _saved_module_state(load_path)
        if saved is None:
            return  # ZeRO-3: trainable tensors live in the optimizer partitions, loaded strictly by DeepSpeed
        expected = {name for name, parameter in self.engine.module.named_parameters() if parameter.requires_grad}
        missing = sorted(expected - set(saved))
        if missing:
            raise CheckpointError(f"{load_path} lacks trainable weights {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                                  "it was saved with another LoRA configuration")

    def _warn_config_changes(self, old_flat: dict[str, Any]) -> None:
        new_flat = self.config.to_flat()
        ignored = {"resume_from_checkpoint", "stop_at_step", "save_fault_delay_seconds"}
        changes = [f"{key}: {old_flat.get(key)!r} -> {value!r}" for key, value in sorted(new_flat.items())
                   if key not in ignored and old_flat.get(key) != value]
        if changes and self.rank == 0:
            logger.warning("run config changed since the checkpoint (applied from now on): %s", "; ".join(changes))

    def _log_setup(self) -> None:
        ds = self.ds
        logger.info(
            "cpt-ds %s | world %d | ZeRO-%d %s | micro %d x accumulation %d x ranks %d = %d samples/step "
            "(%d tokens) | %d steps, warmup %d | params %.2fM, trainable %.2fM | %d train samples, %s eval samples | "
            "attention %s, document attention %s | loss %s\n  data: %s\n  eval sets: %s",
            __version__, self.world_size, ds.zero_stage, ds.precision, ds.micro_batch_size,
            ds.gradient_accumulation_steps, self.world_size, self.loader.global_batch_size,
            self.loader.global_batch_size * self.config.data.block_size, self.total_steps, self.warmup_steps,
            self.num_parameters / 1e6, self.num_trainable / 1e6, len(self.train_samples),
            sum(len(c.samples) for c in self.data.eval_sets) or "no", self.attention_implementation,
            "on" if self.config.model.document_attention else "off",
            "liger" if self.config.model.use_liger_kernel else
            f"chunks of {self.config.model.loss_chunk_size} tokens" if self.config.model.loss_chunk_size else "full logits",
            self._components_text(),
            ", ".join(f"{c.name} ({len(c.samples)} samples)" for c in self.data.eval_sets) or "none")

    def _components_text(self) -> str:
        epochs = self.data.epochs(self.loader.consumed_samples)
        weights = self.data.weights or [None] * len(self.data.train)
        return "; ".join(
            f"{c.name}{'' if w is None else f' weight {w:.3f}'}: {len(c.samples)} samples of {c.stream.num_tokens:,} "
            f"tokens from {len(c.files)} file(s), epoch {epochs[c.name]:.3f}" for c, w in zip(self.data.train, weights))

    def _epochs_text(self) -> str:
        return " ".join(f"{name} {epoch:.3f}" for name, epoch in self.data.epochs(self.loader.consumed_samples).items())

    # ---- the loop --------------------------------------------------------------------------------

    def lr(self, step: int) -> float:
        return lr_at(step, self.config.optim, total_steps=self.total_steps, warmup_steps=self.warmup_steps)

    def train(self) -> TokenMetrics | None:
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
        interval = torch.zeros(len(self.data.train), 3, dtype=torch.int64)  # per corpus: loss_sum, correct, tokens
        interval_start, interval_steps = time.perf_counter(), 0
        stop = min(self.total_steps, train_cfg.stop_at_step or self.total_steps)
        while self.step < stop:
            lr = self.lr(self.step)
            stats, grad_norm = self.train_step(self.loader.next_step(), lr)
            self.step += 1
            interval += stats
            interval_steps += 1
            if self.step % train_cfg.logging_steps == 0 or self.step == self.total_steps or self.step == 1:
                self._log_train(interval, lr, grad_norm, time.perf_counter() - interval_start, interval_steps)
                interval.zero_()
                interval_start, interval_steps = time.perf_counter(), 0
            last = self.step == self.total_steps
            if self.data.eval_sets and not last and train_cfg.eval_steps \
                    and self.step % train_cfg.eval_steps == 0:
                self.evaluate_and_log()
            if not last and (self.step == stop or (train_cfg.save_steps and self.step % train_cfg.save_steps == 0)):
                self.save()
        if self.step < self.total_steps:
            logger.info("stopped at step %d of %d (stop_at_step); relaunch the same command to continue",
                        self.step, self.total_steps)
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
        local_tokens = sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches)
        global_tokens = int(all_reduce_stats(torch.tensor([local_tokens], dtype=torch.int64)).item())
        scale = self.ds.gradient_accumulation_steps * self.world_size / global_tokens
        num_corpora = len(self.data.train)
        # Rows: one per corpus (loss_sum, correct, tokens), then [non-finite micro-batches, 0, 0]; one all-reduce.
        stats = torch.zeros(num_corpora + 1, 3, dtype=torch.int64)
        self.engine.train()
        for index, batch in enumerate(micro_batches):
            labels = batch["labels"].to(self.device)
            output = self.forward(batch, labels)
            finite = bool(torch.isfinite(output.loss))
            if finite:
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
            raise NonFiniteLossError(
                f"non-finite loss at step {self.step + 1} in {int(total[num_corpora, 0])} micro-batch(es) across ranks; "
                "stopped before the optimizer step and before any save. Lower learning_rate, check the data, "
                f"or resume from the last checkpoint in {self.output_dir}")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        # Under fp16 a skipped step is how loss scaling works; in fp32/bf16 it means the run diverged,
        # and carrying on would report success for a model that stopped learning.
        if not self.engine.was_step_applied() and self.ds.precision != "fp16":
            raise NonFiniteGradientError(
                f"non-finite gradient at step {self.step + 1} (grad norm {norm}); DeepSpeed skipped the update and "
                "training stopped before any save. Lower learning_rate, enable gradient_clipping in the DeepSpeed "
                f"JSON, check the data, or resume from the last checkpoint in {self.output_dir}")
        return total[:num_corpora], (float(norm) if norm is not None else None)

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
            corpus.name: eval_batches(corpus.samples, micro_batch_size=micro, dp_rank=self.rank,
                                      dp_world_size=self.world_size) for corpus in self.data.eval_sets},
            document_attention=self.config.model.document_attention)
        result = total_metrics(per_set.values())
        record = {"step": self.step, "eval_loss": result.loss, "eval_accuracy": result.accuracy,
                  "perplexity": result.perplexity, "eval_tokens": result.tokens,
                  "sets": {name: {"eval_loss": m.loss, "eval_accuracy": m.accuracy, "perplexity": m.perplexity,
                                  "eval_tokens": m.tokens} for name, m in per_set.items()}}
        logger.info("eval step %d | loss %.4f | accuracy %.4f | perplexity %.2f | %d tokens | %.1f s%s", self.step,
                    result.loss, result.accuracy, result.perplexity, result.tokens, time.perf_counter() - started,
                    "".join(f"\n  {name}: loss {m.loss:.4f} | accuracy {m.accuracy:.4f} | perplexity {m.perplexity:.2f} "
                            f"| {m.tokens} tokens" for name, m in per_set.items()) if len(per_set) > 1 else "")
        self.metrics.write(record)
        events = [("Eval/loss", result.loss), ("Eval/accuracy", result.accuracy), ("Eval/perplexity", result.perplexity)]
        for name, m in per_set.items():
            events += [(f"Eval/loss/{name}", m.loss), (f"Eval/perplexity/{name}", m.perplexity)]
        self._monitor(events)
        return result

    def _log_train(self, interval: torch.Tensor, lr: float, grad_norm: float | None, seconds: float,
                   steps: int) -> None:
        per_corpus = {name: TokenMetrics.from_tensor(row) for name, row in zip(self.data.names, interval)}
        total = total_metrics(per_corpus.values())
        tokens_per_second = steps * self.loader.global_batch_size * self.config.data.block_size / max(seconds, 1e-9)
        utilization = mfu(tokens_per_second / self.world_size, self.flops_per_token, self.peak_tflops)
        memory = peak_memory_gib()
        epochs = self.data.epochs(self.loader.consumed_samples)
        record = {"step": self.step, "loss": total.loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_second": tokens_per_second, "mfu": None if math.isnan(utilization) else utilization,
                  "memory_gib": memory, "consumed_samples": self.loader.consumed_samples,
                  "tokens_seen": self.loader.consumed_samples * self.config.data.block_size,
                  "epoch": max(epochs.values()), "epochs": epochs,
                  "corpora": {name: {"loss": m.loss, "tokens": m.tokens} for name, m in per_corpus.items()}}
        corpora = "" if len(per_corpus) == 1 else " | " + " ".join(
            f"{name} {m.loss:.3f}" if m.tokens else f"{name} -" for name, m in per_corpus.items())
        logger.info("step %d/%d | loss %.4f%s | lr %.3e | grad_norm %s | tokens/s %s | mfu %s | mem %.2f GiB | epoch %s",
                    self.step, self.total_steps, total.loss, corpora, lr,
                    f"{grad_norm:.4f}" if grad_norm is not None else "-", f"{tokens_per_second:,.0f}",
                    "-" if math.isnan(utilization) else f"{100 * utilization:.1f}%", memory,
                    f"{max(epochs.values()):.3f}" if len(epochs) == 1 else self._epochs_text())
        self.metrics.write(record)
        events = [("Train/loss", total.loss), ("Train/lr", lr), ("Train/tokens_per_second", tokens_per_second)]
        events += [(f"Train/loss/{name}", m.loss) for name, m in per_corpus.items() if m.tokens]
        self._monitor(events)

    def _monitor(self, events: list[tuple[str, float]]) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled and self.rank == 0:
            monitor.write_events([(tag, value, self.step) for tag, value in events])

    # ---- checkpoints and export ------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {"cpt_ds": {"format_version": 1, "version": __version__, "step": self.step,
                           "data": self.loader.state_dict(), "fingerprints": self.fingerprints,
                           "world_size": self.world_size, "config": self.config.to_flat()}}

    def save(self) -> Path:
        return self.checkpointer.save(self.engine, self.step, self.client_state(), exclude_frozen=self.built.is_peft,
                                      write_extra=self._write_model_files)

    def _write_model_files(self, path: Path) -> None:
        """What export needs besides weights: model config, adapter config, tokenizer, run config."""
        (path / "model").mkdir(parents=True)
        self.built.hf_config.save_pretrained(path / "model")
        if self.built.is_peft:
            self.engine.module.peft_config["default"].save_pretrained(path / "model")
        tokenizer_dir = path / "tokenizer"
        tokenizer_dir.mkdir()
        from cpt_ds.tokenizer import tokenizer_files

        for file in tokenizer_files(self.config.model.tokenizer_path):
            shutil.copy2(file, tokenizer_dir / file.name)
        (path / "run_config.json").write_text(json.dumps(self.config.to_flat(), indent=2, sort_keys=True) + "\n")
        meta = {"step": self.step, "zero_stage": self.ds.zero_stage, "precision": self.ds.precision,
                "dtype": str(training_dtype(self.config.model, self.ds)).removeprefix("torch."),
                "is_peft": self.built.is_peft, "base_model": self.config.model.model_name_or_path,
                "world_size": self.world_size, "cpt_ds_version": __version__}
        (path / "cpt_ds_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def export_final(self) -> None:
        """Rank 0 converts the final checkpoint to a Hugging Face folder in output_dir/final."""
        from cpt_ds.export import export_checkpoint

        barrier()
        if self.rank == 0:
            final = self.output_dir / "final"
            export_checkpoint(self.output_dir / f"step-{self.step:08d}", final, overwrite=True)
            logger.info("exported the trained model to %s", final)
        barrier()

    def close(self) -> None:
        barrier()
        self.engine.destroy()
        # Tear the process group down here rather than during interpreter exit, where the order in
        # which gloo's threads and buffers go away is not defined (seen: a rank aborting after success).
        destroy_process_group()


def _saved_module_state(path: Path) -> dict[str, Any] | None:
    file = path / "mp_rank_00_model_states.pt"
    if not file.is_file():
        return None
    state = torch.load(file, map_location="cpu", weights_only=False)
    return state.get("module")


def _blend_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """What differs between two blend fingerprints, by component name."""
    before, after = {c["name"]: c for c in old}, {c["name"]: c for c in new}
    changes = [f"{name} added" for name in after if name not in before]
    changes += [f"{name} removed" for name in before if name not in after]
    for name in after.keys() & before.keys():
        if before[name]["weight"] != after[name]["weight"]:
            changes.append(f"{name} weight {before[name]['weight']} -> {after[name]['weight']}")
        if before[name]["num_samples"] != after[name]["num_samples"]:
            changes.append(f"{name} samples {before[name]['num_samples']} -> {after[name]['num_samples']}")
    return ", ".join(sorted(changes)) or "component order"
