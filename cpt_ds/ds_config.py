"""The DeepSpeed JSON: load, apply the run config's batch overrides, and check before initialize.

Switching ZeRO stage is switching this file. We accept any valid DeepSpeed JSON, with or without
``optimizer``/``scheduler`` sections: without an optimizer we build torch AdamW ourselves (bitwise
resumable, ../shared/docs/CPU_DEEPSPEED.md); without a scheduler the LR is our pure function of the step.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(kw_only=True)
class DeepSpeedSettings:
    path: str
    raw: dict[str, Any]
    """The config handed to deepspeed.initialize (after overrides)."""
    zero_stage: int
    precision: Literal["fp32", "bf16", "fp16"]
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    has_optimizer: bool
    has_scheduler: bool
    offload_optimizer: bool
    offload_param: bool

    @property
    def train_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def gradient_divisor(self, *, ranks: int, sequence_parallel_size: int) -> int:
        """What DeepSpeed divides the gradients summed over all ``ranks`` by: the data-parallel size
        (ranks / sequence_parallel_size), except ZeRO-3's reduce-scatter (on by default), which
        divides by every rank (DeepSpeed 0.19.8, seen also in hamishivi/tmax PR 9; the
        sequence-parallel exactness tests pin both)."""
        zero = self.raw.get("zero_optimization") or {}
        if self.zero_stage == 3 and zero.get("reduce_scatter", True):
            return ranks
        return ranks // sequence_parallel_size


def _find_auto(value: Any, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _find_auto(item, f"{where}.{key}" if where else key)]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value) for hit in _find_auto(item, f"{where}[{index}]")]
    return [where] if value == "auto" else []


def _enabled(raw: dict[str, Any], section: str) -> bool:
    value = raw.get(section)
    return isinstance(value, dict) and bool(value.get("enabled", False))


def _offload_device(zero: dict[str, Any], key: str) -> bool:
    section = zero.get(key)
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def load_deepspeed_config(
    path: str,
    *,
    world_size: int,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    sequence_parallel_size: int = 1,
) -> tuple[DeepSpeedSettings | None, list[str]]:
    """Read and check a DeepSpeed JSON; returns ``(settings or None, problems)``.

    The run config's ``per_device_train_batch_size`` / ``gradient_accumulation_steps`` (when set)
    replace the JSON's values; ``train_batch_size`` is then recomputed for this world size, because a
    concrete global batch in a shipped file could only be right for one cluster size. ``world_size``
    counts data-parallel replicas: ranks / ``sequence_parallel_size``.
    """
    raw, problems = _read_json(path)
    if raw is None:
        return None, problems
    autos = _find_auto(raw)
    if autos:
        problems.append(f"deepspeed: {path} has \"auto\" at {', '.join(autos)}; write concrete values "
                        "(batch sizes in the JSON or per_device_train_batch_size / gradient_accumulation_steps)")
    micro, accumulation = _batch_sizes(raw, path, world_size, micro_batch_size, gradient_accumulation_steps, problems)
    zero = raw.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    bf16 = _enabled(raw, "bf16") or _enabled(raw, "bfloat16")
    fp16 = _enabled(raw, "fp16")
    if bf16 and fp16:
        problems.append(f"deepspeed: {path} enables both bf16 and fp16; keep one")
    if problems:
        return None, problems
    assert isinstance(micro, int) and isinstance(accumulation, int) and isinstance(zero, dict)
    raw["train_micro_batch_size_per_gpu"] = micro
    raw["gradient_accumulation_steps"] = accumulation
    raw["train_batch_size"] = micro * accumulation * world_size
    if sequence_parallel_size > 1:
        # Read by the DeepSpeed config that ZeRO-3's zero.Init builds before the engine (and its mpu) exists.
        raw["sequence_parallel_size"] = sequence_parallel_size
    raw.setdefault("steps_per_print", 2**31 - 1)  # our own status line replaces DeepSpeed's
    if "optimizer" not in raw:
        # We hand DeepSpeed a torch optimizer; ZeRO refuses "untested" client optimizers unless told.
        raw.setdefault("zero_allow_untested_optimizer", True)
    settings = DeepSpeedSettings(
        path=str(path), raw=raw, zero_stage=int(stage), precision="bf16" if bf16 else "fp16" if fp16 else "fp32",
        micro_batch_size=micro, gradient_accumulation_steps=accumulation, world_size=world_size,
        has_optimizer="optimizer" in raw, has_scheduler="scheduler" in raw,
        offload_optimizer=_offload_device(zero, "offload_optimizer"), offload_param=_offload_device(zero, "offload_param"),
    )
    return settings, problems


def _read_json(path: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The DeepSpeed JSON as a private copy (the run edits it), or None and the one problem."""
    file = Path(path)
    if not file.is_file():
        return None, [f"deepspeed: {path} not found; pass a DeepSpeed JSON such as ds_configs/zero2.json"]
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        return None, [f"deepspeed: {path} is not valid JSON ({error})"]
    if not isinstance(raw, dict):
        return None, [f"deepspeed: {path} must hold a JSON object"]
    return copy.deepcopy(raw), []


def _batch_sizes(raw: dict[str, Any], path: str, world_size: int, micro_batch_size: int | None,
                 gradient_accumulation_steps: int | None, problems: list[str]) -> tuple[Any, Any]:
    """``(micro, accumulation)`` from the JSON and the run config's overrides; problems are appended."""
    micro = micro_batch_size if micro_batch_size is not None else raw.get("train_micro_batch_size_per_gpu")
    accumulation = (gradient_accumulation_steps if gradient_accumulation_steps is not None
                    else raw.get("gradient_accumulation_steps"))
    total = raw.get("train_batch_size")
    if micro_batch_size is None and gradient_accumulation_steps is None and total not in (None, "auto"):
        # The file states the triple itself: it must agree with this world size.
        if micro is None and isinstance(accumulation, int) and isinstance(total, int):
            micro = total // (accumulation * world_size)
        if accumulation is None and isinstance(micro, int) and isinstance(total, int):
            accumulation = total // (micro * world_size)
        if all(isinstance(v, int) for v in (micro, accumulation, total)) and micro * accumulation * world_size != total:
            problems.append(
                f"deepspeed: {path} train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {accumulation} x world size {world_size}; "
                "fix the triple or drop train_batch_size")
    if accumulation is None:
        accumulation = 1
    if not isinstance(micro, int) or micro <= 0:
        problems.append(f"deepspeed: {path} needs a positive train_micro_batch_size_per_gpu "
                        "(or set per_device_train_batch_size)")
    if not isinstance(accumulation, int) or accumulation <= 0:
        problems.append(f"deepspeed: gradient_accumulation_steps must be a positive integer, got {accumulation!r}")
    return micro, accumulation
