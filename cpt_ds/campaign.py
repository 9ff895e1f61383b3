"""Edit the future, never the past: what a campaign's resume may change, as pure functions over plain data.

A run with ``phases`` records its plan in every checkpoint's fingerprints (``plan_fingerprint``): each
phase's name, steps and data (per component: resolved identity, samples, token-file checksums, split),
the schedule fields and the settings that shape every step. Resuming at step ``N`` compares them with
the config's (``resume_problems``):

- refused: anything that decided steps ``1..N`` - the data, steps or name of a phase already begun
  (the phase in progress may change its length, but not end before ``N``), the learning rate of any
  of those steps (``lr_at`` computed under both plans), the samples per step, and the model, optimizer
  and data settings in ``PAST_FIELDS``;
- accepted and logged (``plan_changes``): later phases added, removed or edited, the phase in progress
  lengthened or shortened, a WSD decay moved later. The continued run is then bitwise the run the
  edited plan gives from step 0, because data positions (cpt_ds/data/phased.py) and the LR are pure
  functions of the plan and the step, and the past of both plans is the same.

A run without phases keeps today's rules (cpt_ds/resume.py) and records nothing here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cpt_ds.checkpoint import CheckpointError
from cpt_ds.config import OptimConfig, RunConfig
from cpt_ds.optim import lr_at
from cpt_ds.phases import component_key, parse_phases, run_components

logger = logging.getLogger(__name__)

# Run-config fields that shape every optimizer step: a campaign may not change them at resume.
PAST_FIELDS = ("model_type", "config_overrides", "torch_dtype", "document_attention", "loss_chunk_size",
               "full_finetuning", "trainable", "lora_rank", "lora_alpha", "lora_dropout", "modules_to_save",
               "load_in_kbits", "quant_type", "double_quant", "weight_decay", "adam_beta1", "adam_beta2",
               "adam_epsilon", "block_size", "max_train_samples", "validation_split_percentage", "seed")
# Fields of the learning-rate schedule: compared through the LR they give each step, not by value.
SCHEDULE_FIELDS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "min_lr_ratio",
                   "decay_steps", "decay_ratio", "decay_type")


def plan_fingerprint(*, config: RunConfig, data: Any, component_files: list[list[Any]], total_steps: int,
                     global_batch_size: int, ds: Any) -> dict[str, Any] | None:
    """The campaign's plan as a checkpoint records it; None for a run without phases.

    ``data`` is the run's RunData, ``component_files`` the token files of each of its components.
    """
    if not config.data.phases:
        return None
    specs, blends = run_components(parse_phases(config.data.phases)[0])
    components = [{"key": list(component_key(spec)), "name": corpus.name, "num_samples": len(corpus.samples),
                   "token_files": [(file.meta or {}).get("bin_sha256") or f"{file.num_tokens}:{file.num_documents}"
                                   for file in files], "split": corpus.stream.fingerprint()}
                  for spec, corpus, files in zip(specs, data.train, component_files, strict=True)]
    phases, first_step = [], 0
    for blend in blends:
        weights = blend.weights or (None,) * len(blend.components)
        phases.append({"name": blend.name, "steps": blend.steps, "first_step": first_step,
                       "components": [{**components[index], "weight": weight}
                                      for index, weight in zip(blend.components, weights, strict=True)]})
        first_step += blend.steps
    flat = config.to_flat()
    settings = {key: flat[key] for key in PAST_FIELDS}
    settings.update(gradient_clipping=ds.raw.get("gradient_clipping"), precision=ds.precision)
    return {"phases": phases, "global_batch_size": global_batch_size, "settings": settings,
            "schedule": {**{key: flat[key] for key in SCHEDULE_FIELDS}, "total_steps": total_steps}}


def _phase_at(phases: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The phase that trained optimizer step ``step`` (1-based)."""
    return next((phase for phase in phases if phase["first_step"] < step <= phase["first_step"] + phase["steps"]),
                phases[-1])


def _span(phase: dict[str, Any]) -> str:
    return f"phase {phase['name']!r} (steps {phase['first_step'] + 1}-{phase['first_step'] + phase['steps']})"


def _data_change(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """What differs between two phases' components, by corpus."""
    before, after = {tuple(c["key"]): c for c in old}, {tuple(c["key"]): c for c in new}
    changes = [f"{after[key]['name']} added" for key in after if key not in before]
    changes += [f"{before[key]['name']} removed" for key in before if key not in after]
    for key in [key for key in after if key in before]:
        a, b = before[key], after[key]
        changes += [f"{b['name']} {field} {a[field]} -> {b[field]}" for field in ("weight", "num_samples", "name")
                    if a[field] != b[field]]
        changes += [f"{b['name']} {label} changed" for field, label in (("token_files", "token files"),
                                                                          ("split", "held-out split"))
                    if a[field] != b[field]]
    return ", ".join(changes) or "component order"


def _past_phase_problems(old_phases: list[dict[str, Any]], new_phases: list[dict[str, Any]], step: int) -> list[str]:
    problems = []
    for index, old in enumerate(p for p in old_phases if p["first_step"] < step):
        trained = f"{_span(old)}, trained up to the checkpoint's step {step}"
        if index >= len(new_phases):
            problems.append(f"{trained}: removed")
            continue
        new = new_phases[index]
        if new["name"] != old["name"]:
            problems.append(f"{trained}: name {old['name']!r} -> {new['name']!r}")
        if new["components"] != old["components"]:
            problems.append(f"{trained}: data_path ({_data_change(old['components'], new['components'])})")
        old_end, new_end = old["first_step"] + old["steps"], new["first_step"] + new["steps"]
        if old_end < step and new["steps"] != old["steps"]:
            problems.append(f"{trained}: steps {old['steps']} -> {new['steps']} (a finished phase keeps its length)")
        elif old_end >= step and new_end < step:
            problems.append(f"{trained}: steps {old['steps']} -> {new['steps']} would end it at step {new_end}, "
                            f"before the checkpoint's step {step}")
    return problems


def _lr_of(schedule: dict[str, Any]) -> Callable[[int], float]:
    """``step -> LR`` of a recorded schedule (0-based optimizer steps, as ``lr_at``)."""
    config = OptimConfig(**{key: schedule[key] for key in SCHEDULE_FIELDS})
    total = schedule["total_steps"]
    warmup = config.num_warmup_steps(total)
    return lambda step: lr_at(step, config, total_steps=total, warmup_steps=warmup)


def lr_problem(saved: dict[str, Any], current: dict[str, Any], phases: list[dict[str, Any]], step: int) -> list[str]:
    """The first of steps ``1..step`` whose learning rate the new schedule changes (``lr_at`` of both)."""
    old, new = saved["schedule"], current["schedule"]
    if old == new:
        return []
    old_lr, new_lr = _lr_of(old), _lr_of(new)
    for index in range(step):
        before, after = old_lr(index), new_lr(index)
        if before != after:
            fields = [f"{'max_steps' if key == 'total_steps' else key} {old[key]} -> {new[key]}"
                      for key in old if old[key] != new.get(key)]
            return [f"{_span(_phase_at(phases, index + 1))}: the learning rate of step {index + 1} would change "
                    f"from {before:.6g} to {after:.6g} ({', '.join(fields)})"]
    return []


def resume_problems(saved: dict[str, Any] | None, current: dict[str, Any] | None, *, step: int) -> list[str]:
    """What the config changes of the plan up to the checkpoint's ``step``; [] when only the future changed."""
    if saved is None and current is None:
        return []
    if saved is None or current is None:
        return [f"the checkpoint was saved by a run {'with' if current is None else 'without'} phases and this "
                f"config has {'none' if current is None else 'phases'}: a plan's past is the same on both sides"]
    in_progress = f"{_span(_phase_at(saved['phases'], step))}, in progress at the checkpoint's step {step}"
    problems = []
    if saved["global_batch_size"] != current["global_batch_size"]:
        problems.append(f"{in_progress}: samples per step {saved['global_batch_size']} -> "
                        f"{current['global_batch_size']} (micro-batch x accumulation x ranks)")
    problems += _past_phase_problems(saved["phases"], current["phases"], step)
    problems += [f"{in_progress}: {key} {value!r} -> {current['settings'].get(key)!r}"
                 for key, value in saved["settings"].items() if current["settings"].get(key) != value]
    problems += lr_problem(saved, current, saved["phases"], step)
    return problems


def plan_changes(saved: dict[str, Any], current: dict[str, Any], *, step: int) -> list[str]:
    """The future-only edits ``resume_problems`` accepted, one line each, for the log."""
    changes = []
    old_phases = {phase["name"]: phase for phase in saved["phases"]}
    new_phases = {phase["name"]: phase for phase in current["phases"]}
    changes += [f"{_span(phase)} added" for name, phase in new_phases.items() if name not in old_phases]
    changes += [f"{_span(phase)} removed" for name, phase in old_phases.items() if name not in new_phases]
    for name in [name for name in new_phases if name in old_phases]:
        old, new = old_phases[name], new_phases[name]
        if old["steps"] != new["steps"]:
            changes.append(f"phase {name!r} steps {old['steps']} -> {new['steps']}")
        if old["components"] != new["components"]:
            changes.append(f"phase {name!r} data_path ({_data_change(old['components'], new['components'])})")
    changes += [f"{'max_steps' if key == 'total_steps' else key} {value} -> {current['schedule'][key]} "
                f"(learning rates of steps 1-{step} unchanged)"
                for key, value in saved["schedule"].items() if current["schedule"].get(key) != value]
    return changes


def check_plan(path: Path, marker: dict[str, Any], current: dict[str, Any], *, rank: int) -> None:
    """Refuse a checkpoint whose plan's past this config changes (one error naming each phase and field);
    log the future-only edits that are applied."""
    saved_plan, plan = marker["fingerprints"].get("phases"), current.get("phases")
    problems = resume_problems(saved_plan, plan, step=marker["step"])
    if problems:
        raise CheckpointError(f"cannot resume from {path}: the config changes the plan before the checkpoint's step "
                              f"{marker['step']}: " + "; ".join(problems) + ". Only what comes after step "
                              f"{marker['step']} may change: restore these, or start fresh in a new output_dir")
    changes = plan_changes(saved_plan, plan, step=marker["step"]) if plan is not None else []
    if changes and rank == 0:
        logger.warning("the campaign's plan changed after step %d (applied from there on): %s", marker["step"],
                       "; ".join(changes))


def record_branch(metrics: Any, checkpoint: Path, output_dir: Path, step: int) -> None:
    """A run continuing another run's checkpoint (a branch) starts its metrics.jsonl with where it came from."""
    source = checkpoint.resolve()
    if source.parent == output_dir.resolve():
        return
    logger.info("branching from %s (step %d) into %s; the source run's folder is only read", source, step, output_dir)
    metrics.write({"step": step, "branched_from": str(source)})
