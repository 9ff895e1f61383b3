"""Optimizer construction and the learning-rate schedule as a pure function of the step.

Nothing about the schedule is checkpointed but the step: ``lr_at(step)`` gives the same value in an
uninterrupted run and after any resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cpt_ds.config import ConfigError, OptimConfig
from cpt_ds.ds_config import DeepSpeedSettings


def warmup_steps_for(config: OptimConfig, total_steps: int) -> int:
    return config.num_warmup_steps(total_steps)


def check_schedule(config: OptimConfig, total_steps: int) -> None:
    """Raise the ConfigError of a schedule that does not fit the run's length: with max_steps -1 that
    length is known only once the data is read, after the config checks."""
    problems = config.schedule_problems(total_steps)
    if problems:
        raise ConfigError(f"invalid learning-rate schedule for {total_steps} steps: " + "; ".join(problems))


def lr_at(step: int, config: OptimConfig, *, total_steps: int, warmup_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup to the peak, then the chosen decay.

    Warmup reaches the peak at step ``warmup_steps - 1`` (step 0 already moves the weights, unlike a
    schedule that starts at exactly 0). Decay runs from the peak to ``min_lr_ratio * peak`` at the last step.
    ``wsd`` is the exception: it is transformers' ``get_wsd_schedule`` step for step (see ``wsd_factor``).
    """
    peak = config.learning_rate
    if config.lr_scheduler_type == "wsd":
        return peak * wsd_factor(step, num_warmup_steps=warmup_steps,
                                 num_decay_steps=config.num_decay_steps(total_steps), total_steps=total_steps,
                                 decay_type=config.decay_type, min_lr_ratio=config.min_lr_ratio)
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


def wsd_factor(step: int, *, num_warmup_steps: int, num_decay_steps: int, total_steps: int, decay_type: str,
               min_lr_ratio: float) -> float:
    """Warmup-stable-decay multiplier of optimizer step ``step`` (0-based), the same floating-point
    operations as transformers' ``_get_wsd_scheduler_lambda`` (linear warmup, ``num_cycles`` 0.5), so
    ``learning_rate x wsd_factor(k - 1)`` is the LR a plain torch loop with ``get_wsd_schedule`` gives its
    k-th ``optimizer.step()``.

    Unlike this module's cosine/linear warmup, step 0 runs at ``min_lr_ratio x peak`` (0 by default),
    and the decay ends one step above the floor: its last step has progress ``(decay - 1) / decay``.
    """
    num_stable_steps = total_steps - num_warmup_steps - num_decay_steps
    if step < num_warmup_steps:
        factor = float(step) / float(max(1, num_warmup_steps))
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < total_steps:
        progress = float(step - num_warmup_steps - num_stable_steps) / float(max(1, num_decay_steps))
        if decay_type == "linear":
            factor = 1.0 - progress
        elif decay_type == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))  # transformers: pi x num_cycles (0.5) x 2 x progress
        else:
            assert decay_type == "1-sqrt", decay_type
            factor = 1.0 - math.sqrt(progress)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


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
