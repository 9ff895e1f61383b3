"""The baseline side of benchmarks/train_speed.py: one rank of Chinese-LLaMA-Alpaca-3's
``scripts/training/run_clm_pt_with_peft.py``, reduced to what decides its training speed and its eval memory.

    deepspeed ... benchmarks/_baseline_hf_trainer.py --spec SPEC.json --mode train|eval --result OUT.json

It is launched by train_speed.py on the same ranks, with the same DeepSpeed JSON, model config, seed
and token windows as cpt-ds. Kept from the baseline:

- ``HfArgumentParser``-free but otherwise the same objects: ``TrainingArguments(deepspeed=<the JSON as a
  dict>)``, ``set_seed`` then ``AutoModelForCausalLM.from_config`` (full fine-tuning from scratch),
  ``model.config.use_cache = False``, ``Trainer(..., data_collator=fault_tolerance_data_collator,
  compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics)``;
- rows of ``block_size`` tokens with ``labels = input_ids`` as its ``group_texts`` makes them (the model
  shifts the labels itself), served as Python lists like its arrow rows;
- its eval: argmax in ``preprocess_logits_for_metrics``, ``eval_accumulation_steps`` unset (so the
  Trainer gathers every rank's predictions and keeps them all until the end), then accuracy on
  ``preds[:, :-1]`` vs ``labels[:, 1:]``; the baseline runs it after training (``do_train`` then
  ``do_eval``), which is also the only order the HF Trainer allows under ZeRO-1/2.

Left out (they do not run inside the timed steps or the eval): ``datasets.map`` tokenization and its
arrow caches (the rows come from the token file cpt-ds reads, so both sides see identical windows),
PEFT and quantization (the benchmark trains every weight on both sides), checkpoint saving.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

# benchmarks/ is sys.path[0] when the launcher runs this file, so the probe is shared with the driver.
from harness import EvalMemoryProbe

# ---- the baseline's metric functions (verbatim logic) ---------------------------------------------


def accuracy_score(y_true: np.ndarray, y_pred: np.ndarray, normalize: bool = True,
                   sample_weight: np.ndarray | None = None) -> float:
    """``sklearn.metrics.accuracy_score`` for 1-D label arrays (the baseline's only use), in numpy.

    scikit-learn is not a cpt-ds dependency. Same result; sklearn additionally validates the targets
    (``type_of_target`` runs ``np.unique`` over both arrays), so the real baseline allocates somewhat
    *more* at this point than the numbers measured here: the measured growth is a lower bound.
    """
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"accuracy_score: {y_true.shape[0]} labels but {y_pred.shape[0]} predictions")
    score = y_true == y_pred
    if not normalize:
        return float(score.sum() if sample_weight is None else np.dot(score, sample_weight))
    return float(np.average(score, weights=sample_weight))


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy_score(references, predictions)}


def compute_metrics(eval_preds: Any) -> dict[str, float]:
    preds, labels = eval_preds
    # preds have the same shape as the labels (argmax already taken), but the labels need the shift
    labels = labels[:, 1:].reshape(-1)
    preds = preds[:, :-1].reshape(-1)
    return accuracy(predictions=preds, references=labels)


def preprocess_logits_for_metrics(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def fault_tolerance_data_collator(features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The baseline collator's path for rows of equal-length int lists (its only case for packed
    windows): one ``torch.tensor`` per key. Its ragged-batch fallback never triggers here."""
    first = features[0]
    return {key: torch.tensor([feature[key] for feature in features]) for key in first}


# ---- data: the cpt-ds windows as group_texts rows ---------------------------------------------------


class GroupedTexts(torch.utils.data.Dataset):
    """Window ``i`` of the token file as the row ``group_texts`` would make: input_ids = labels."""

    def __init__(self, token_file: str, block_size: int, num_samples: int | None):
        from cpt_ds.data.windows import PackedSamples, TokenStream
        from cpt_ds.token_file import IndexedTokenFile

        self.samples = PackedSamples(TokenStream.whole([IndexedTokenFile(token_file)]), block_size, num_samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.samples[index]["input_ids"].tolist()
        return {"input_ids": ids, "labels": list(ids)}


# ---- timing -------------------------------------------------------------------------------------------


def step_clock(first_losses: list[float]) -> Any:
    """A callback that stamps the end of every optimizer step (the same per-step wall clock cpt-ds logs)
    and keeps the first logged loss as a sanity check."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps[state.global_step] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and not first_losses:
                first_losses.append(float(logs["loss"]))

    return StepClock()


# ---- DeepSpeed on CPU through accelerate ------------------------------------------------------------


def let_accelerate_run_deepspeed_on_cpu() -> None:
    """The only changes to the baseline's code path, both in set-up, outside the timed steps.

    The HF Trainer drives DeepSpeed through accelerate, which has no DeepSpeed-on-CPU mode: without a
    GPU its ``PartialState`` picks no distributed backend (world size 1, so the Trainer then rejects the
    JSON's global batch), and ``use_cpu=True`` switches DeepSpeed off. On a GPU cluster the baseline
    takes accelerate's nccl path; here accelerate is given what DeepSpeed's CPU accelerator uses itself
    (gloo, one process per rank), after which it initializes DeepSpeed exactly as it would on GPUs.
    Likewise ``TrainingArguments(bf16=True)`` is refused without a bf16 GPU (unless ``use_cpu``), while
    DeepSpeed trains bf16 on this CPU; the check is told the truth for this machine.
    """
    import torch
    import transformers.training_args
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        return
    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    original = PartialState._prepare_backend

    def prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False,
                        backend: str | None = None) -> tuple[str | None, Any]:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not cpu:
            return "gloo", DistributedType.MULTI_CPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend


# ---- the run --------------------------------------------------------------------------------------------


def training_arguments(spec: dict[str, Any], ds_config: dict[str, Any], output_dir: Path, max_steps: int) -> Any:
    """Every value the HF Trainer cross-checks against the DeepSpeed JSON is taken from that JSON."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        deepspeed=ds_config,
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        per_device_eval_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        max_grad_norm=ds_config["gradient_clipping"],
        bf16=bool(ds_config.get("bf16", {}).get("enabled", False)),
        learning_rate=spec["learning_rate"],
        weight_decay=spec["weight_decay"],
        adam_beta1=spec["adam_beta1"],
        adam_beta2=spec["adam_beta2"],
        # cpt-ds steps torch's (non-fused) AdamW on CPU and so did this Trainer's default in the
        # transformers the baseline pins (>= 4.40); pinned so the optimizer kernel is not the variable.
        optim="adamw_torch",
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup_steps"],
        max_steps=max_steps,
        logging_steps=spec["logging_steps"],
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec["seed"],
        dataloader_num_workers=0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="the shared benchmark settings written by train_speed.py")
    parser.add_argument("--mode", choices=("train", "eval"), required=True)
    parser.add_argument("--eval_samples", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--result", required=True,
                        help="JSON file this rank writes its numbers to; {rank} is replaced by the rank")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, set_seed

    spec = json.loads(Path(args.spec).read_text())
    ds_config = json.loads(Path(spec["deepspeed"]).read_text())
    max_steps = spec["max_steps"] if args.mode == "train" else spec["eval_warm_steps"]
    let_accelerate_run_deepspeed_on_cpu()
    # TrainingArguments first, as the baseline does: under ZeRO-3 it must exist before the model.
    training_args = training_arguments(spec, ds_config, Path(args.output_dir), max_steps)
    set_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model_config"]),
                                             attn_implementation="sdpa")
    model.config.use_cache = False

    first_losses: list[float] = []
    clock = step_clock(first_losses)
    train_dataset = GroupedTexts(spec["token_file"], spec["block_size"], None)
    eval_dataset = None
    if args.mode == "eval":
        eval_dataset = GroupedTexts(spec["token_file"], spec["block_size"], args.eval_samples)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=fault_tolerance_data_collator,
        compute_metrics=compute_metrics if args.mode == "eval" else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if args.mode == "eval" else None,
        callbacks=[clock],
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    engine = trainer.model_wrapped  # the DeepSpeedEngine accelerate built: report what really ran
    result: dict[str, Any] = {"rank": rank, "first_loss": first_losses[0] if first_losses else None,
                              "world_size": torch.distributed.get_world_size(),
                              "zero_stage": engine.zero_optimization_stage(),
                              "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
                              "optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__}
    if args.mode == "train":
        # Step k took stamps[k] - stamps[k-1]: from the end of one optimizer step to the end of the next.
        result["step_seconds"] = {step: clock.stamps[step] - clock.stamps[step - 1]
                                  for step in range(spec["window_start"] + 1, spec["max_steps"] + 1)}
    else:
        probe = EvalMemoryProbe()
        with probe:
            metrics = trainer.evaluate()
        result.update(probe.as_dict(), eval_samples=len(eval_dataset), eval_accuracy=metrics["eval_accuracy"],
                      eval_loss=metrics["eval_loss"])
    Path(args.result.format(rank=rank)).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
