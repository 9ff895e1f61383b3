"""What a checkpoint must share with the run that resumes it, as pure functions over plain data.

A checkpoint records the run's *fingerprints* (data, blend, split, tokenizer, model shape and RoPE,
training mode, ZeRO stage, attention) in its completion marker. Resuming compares them with this run's:

- ``compatibility_problems(saved, current)`` lists what changed and makes the checkpoint unusable
  (the trainer refuses it with ``incompatible``'s one sentence);
- ``config_changes(saved_flat, current_flat)`` lists the other run-config fields that changed; they
  apply from the resume on and are only warned about;
- ``plan_resume(...)`` decides, before anything is built, which folder DeepSpeed loads.

Ordering rule: a checkpoint saved by another number of ranks under ZeRO-1/2/3 can only be loaded
through DeepSpeed's universal format, and DeepSpeed reads ``checkpoint.load_universal`` from its JSON
once, inside ``deepspeed.initialize``. So the plan is made, and ``prepare_deepspeed_config`` applied to
the DeepSpeed JSON, *before* ``deepspeed.initialize``; setting it afterwards is silently ignored and the
load fails on mismatched partitions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_ds.checkpoint import CheckpointError

logger = logging.getLogger(__name__)
from cpt_ds.rope import rope_changes, rope_fingerprint

# Config keys that define the model's shape; any change makes a checkpoint unusable.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
              "tie_word_embeddings")

ROPE_KEY = "rope_parameters"

# Run-config fields that say how to launch, not what to train: changing them at resume is expected.
LAUNCH_ONLY_KEYS = frozenset({"resume_from_checkpoint", "stop_at_step", "save_fault_delay_seconds", "max_wall_minutes",
                              "sequence_parallel_size"})


# --------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------


def token_file_fingerprints(files: list[Any]) -> dict[str, str]:
    """Per token-file prefix: the sha256 its sidecar recorded, or its sizes when it has no sidecar."""
    return {file.prefix: (file.meta or {}).get("bin_sha256") or f"{file.num_tokens} tokens, "
            f"{file.num_documents} documents (no sidecar)" for file in files}


def model_shape(hf_config: Any, vocab_size: int) -> dict[str, Any]:
    """The shape-defining fields of a Hugging Face config, with the run's (possibly grown) vocabulary."""
    shape = {key: getattr(hf_config, key, None) for key in SHAPE_KEYS}
    shape["vocab_size"] = vocab_size
    # The RoPE it was trained with (the run's rope_theta / rope_scaling applied): compared on its own.
    shape[ROPE_KEY] = rope_fingerprint(hf_config)
    return shape


def adapter_fingerprint(model: Any) -> str | dict[str, Any]:
    """``"full"``, or the LoRA settings that decide which tensors are trained (a ``ModelConfig``)."""
    if model.full_finetuning:
        return "full"
    return {"lora_rank": model.lora_rank, "lora_alpha": model.lora_alpha, "trainable": model.trainable,
            "modules_to_save": model.modules_to_save, "load_in_kbits": model.load_in_kbits}


def fingerprints(*, data_split: Any, blend: Any, token_files: dict[str, str], tokenizer: str,
                 model_shape: dict[str, Any], adapter: str | dict[str, Any], zero_stage: int,
                 document_attention: bool) -> dict[str, Any]:
    """The record a checkpoint keeps of what it was trained on (saved in its marker and client state)."""
    return {"data_split": data_split, "blend": blend, "token_files": token_files, "tokenizer": tokenizer,
            "model_shape": model_shape, "adapter": adapter, "zero_stage": zero_stage,
            "document_attention": document_attention}


# --------------------------------------------------------------------------------------------------
# What may not change, and what may
# --------------------------------------------------------------------------------------------------


def compatibility_problems(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between a checkpoint's fingerprints and this run's and forbids resuming; [] when none."""
    changed = []
    if "phases" in saved or "phases" in current:
        pass  # a campaign's data is compared phase by phase, the past only (cpt_ds/campaign.py)
    elif saved["token_files"] != current["token_files"]:
        before, after = saved["token_files"], current["token_files"]
        diffs = [name for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
        changed.append("token files (" + ", ".join(
            f"{name}: {'added' if name not in before else 'removed' if name not in after else 'content changed'}"
            for name in diffs) + ")")
    elif saved["blend"] != current["blend"]:
        changed.append("the blend (" + blend_changes(saved["blend"], current["blend"]) + ")")
    elif saved["data_split"] != current["data_split"]:
        changed.append("the train/validation split (validation_split_percentage, seed or eval_data_path)")
    if saved["tokenizer"] != current["tokenizer"]:
        changed.append(f"tokenizer (fingerprint {saved['tokenizer'][:12]} -> {current['tokenizer'][:12]})")
    saved_shape, current_shape = dict(saved["model_shape"]), dict(current["model_shape"])
    # Checkpoints from before the RoPE record were trained before a run could override it: not compared.
    saved_rope, current_rope = saved_shape.pop(ROPE_KEY, None), current_shape.pop(ROPE_KEY, None)
    if saved_rope is not None and saved_rope != current_rope:
        changed.append(f"RoPE ({rope_changes(saved_rope, current_rope or {})}); resume with the rope_theta / "
                       "rope_scaling the checkpoint was trained with")
    if saved_shape != current_shape:
        diffs = [f"{key} {saved_shape.get(key)} -> {value}" for key, value in current_shape.items()
                 if saved_shape.get(key) != value]
        changed.append("model shape (" + ", ".join(diffs) + ")")
    if saved["adapter"] != current["adapter"]:
        changed.append(f"training mode ({saved['adapter']} -> {current['adapter']})")
    if saved["zero_stage"] != current["zero_stage"]:
        changed.append(f"ZeRO stage ({saved['zero_stage']} -> {current['zero_stage']}); resume with the "
                       "DeepSpeed JSON it was saved with")
    # Checkpoints from before the field existed were trained with attention across documents.
    old_attention = saved.get("document_attention", False)
    if old_attention != current["document_attention"]:
        changed.append(f"document_attention ({old_attention} -> {current['document_attention']}): the model was "
                       f"trained with the other attention; resume with --document_attention {str(old_attention).lower()}")
    return changed


def incompatible(path: Path, problems: list[str]) -> CheckpointError:
    """The error for a checkpoint that ``compatibility_problems`` refused."""
    return CheckpointError(f"cannot resume from {path}: changed since it was saved: " + "; ".join(problems)
                           + ". Restore them, or start fresh in a new output_dir")


def blend_changes(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
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


def config_changes(saved_flat: dict[str, Any], current_flat: dict[str, Any]) -> list[str]:
    """Run-config fields changed since the checkpoint (they apply from the resume on), as ``key: old -> new``."""
    return [f"{key}: {saved_flat.get(key)!r} -> {value!r}" for key, value in sorted(current_flat.items())
            if key not in LAUNCH_ONLY_KEYS and saved_flat.get(key) != value]


# --------------------------------------------------------------------------------------------------
# The resume plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ResumePlan:
    """Which checkpoint this run continues and how DeepSpeed loads it; decided before
    ``deepspeed.initialize`` (see the module docstring for why)."""

    checkpoint: Path
    """The verified ``step-NNNNNNNN`` folder: RNG state and the data position come from here."""
    load_path: Path
    """The folder DeepSpeed loads: ``checkpoint`` itself, or its universal conversion."""
    universal: bool
    """Saved by another number of ranks under ZeRO > 0: convert, and set ``checkpoint.load_universal``."""
    saved_world_size: int
    consumed_samples: int


def plan_resume(checkpoint: Path, marker: dict[str, Any], *, world_size: int, zero_stage: int,
                universal_path: Path) -> ResumePlan:
    """The plan for resuming from ``checkpoint`` (its verified ``marker``); ``universal_path`` is where
    its universal conversion lives, used only when one is needed."""
    # ZeRO-0 keeps whole weights and optimizer state in every rank's file; any world size loads them.
    universal = marker["world_size"] != world_size and zero_stage > 0
    return ResumePlan(checkpoint=checkpoint, load_path=universal_path if universal else checkpoint,
                      universal=universal, saved_world_size=marker["world_size"],
                      consumed_samples=marker["consumed_samples"])


def log_layout_change(state: dict[str, Any], sp_size: int) -> None:
    """One line when the checkpoint's client ``state`` was trained with another sequence_parallel_size
    (allowed: the samples per step and the data position do not depend on it)."""
    saved = int(state.get("sequence_parallel_size", 1))
    if saved != sp_size:
        logger.info("the checkpoint was trained with sequence_parallel_size %d, this run uses %d (each sample's "
                    "tokens on %d rank(s)); the data position continues", saved, sp_size, sp_size)


def prepare_deepspeed_config(plan: ResumePlan, ds_raw: dict[str, Any]) -> None:
    """Edit the DeepSpeed JSON (a dict) for ``plan``; must run before ``deepspeed.initialize``."""
    if plan.universal:
        ds_raw.setdefault("checkpoint", {})["load_universal"] = True
