"""Optimizer construction and the learning-rate schedule as a pure function of the step.

Nothing about the schedule is checkpointed but the step: ``lr_at(step)`` gives the same value in an
uninterrupted run and after any resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cpt_ds.config import OptimConfig
from cpt_ds.ds_config import DeepSpeedSettings


def warmup_steps_for(config: OptimConfig, total_steps: int) -> int:
    if config.warmup_steps > 0:
        return min(config.warmup_steps, total_steps)
    return min(total_steps, math.ceil(config.warmup_ratio * total_steps))


def lr_at(step: int, config: OptimConfig, *, total_steps: int, warmup_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to the peak, then the chosen decay.

    Warmup reaches the peak at step ``warmup_steps - 1`` (step 0 already moves the weights, unlike a
    schedule that starts at exactly 0). Decay runs from the peak to ``min_lr_ratio * peak`` at the last step.
    """
    peak = config.learning_rate
    if step < warmup_steps and config.lr_scheduler_type != "constant":
        return peak * (step + 1) / warmup_steps
    if config.lr_scheduler_type in ("constant", "constant_with_warmup"):
        return peak
    floor = peak * config.min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if config.lr_scheduler_type == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _decays(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay on matrices only; not on biases and norm weights (as the HF Trainer does).

    Under ZeRO-3 a parameter is a flat partition, so its true rank comes from ``ds_shape``.
    """
    shape = getattr(parameter, "ds_shape", parameter.shape)
    return len(shape) >= 2 and "norm" not in name.lower()


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decay if _decays(name, parameter) else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(module: nn.Module, config: OptimConfig,
                    ds: DeepSpeedSettings) -> tuple[torch.optim.Optimizer | None, list[dict[str, Any]]]:
    """``(optimizer or None, parameter groups)``; None lets DeepSpeed build the JSON's optimizer.

    torch's AdamW is the default because it resumes bitwise (DeepSpeed's FusedAdam/CPUAdam recompute
    bias correction after a load, ../shared/docs/CPU_DEEPSPEED.md); ZeRO-Offload requires DeepSpeed's
    CPU Adam, so offloaded runs get that one.
    """
    groups = parameter_groups(module, config.weight_decay)
    if ds.has_optimizer:
        return None, groups
    betas = (config.adam_beta1, config.adam_beta2)
    if ds.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                                weight_decay=config.weight_decay, adamw_mode=True), groups
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=betas, eps=config.adam_epsilon,
                             weight_decay=config.weight_decay, fused=torch.cuda.is_available()), groups
