"""Campaign phases in the run config: ``"phases": [{"name", "steps", "data_path"}, ...]``.

Each phase's ``data_path`` is today's blend syntax (cpt_ds/data/blend.py). The run trains the phases
in order; ``max_steps`` is the sum of their steps. The run's training components are every corpus the
phases name, each once, identified by its resolved token-file paths, so a corpus used in several
phases continues where it stopped (cpt_ds/data/phased.py). Pure functions over the config's values;
imports only the blend parser (config.py imports this module).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpt_ds.data.blend import ComponentSpec, PhaseBlend, component_names, parse_data_path

PHASE_KEYS = ("name", "steps", "data_path")


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    steps: int
    data_path: tuple[str, ...]
    components: tuple[ComponentSpec, ...]
    """The phase's blend as written (names are replaced by the run's, see ``run_components``)."""


def component_key(component: ComponentSpec) -> tuple[str, ...]:
    """What makes two phases' components one corpus: the resolved paths of its token files."""
    return tuple(os.path.realpath(path) for path in component.paths)


def _phase_entry_problems(index: int, entry: Any) -> list[str]:
    where = f"phases[{index}]"
    if not isinstance(entry, dict):
        return [f"{where} must be an object {{\"name\", \"steps\", \"data_path\"}}, got {entry!r}"]
    problems = [f"{where}: unknown key {key!r} (a phase has name, steps and data_path)"
                for key in entry if key not in PHASE_KEYS]
    problems += [f"{where}: {key} is missing" for key in PHASE_KEYS if key not in entry]
    name, steps, data_path = entry.get("name"), entry.get("steps"), entry.get("data_path")
    if "name" in entry and not (isinstance(name, str) and name.strip()):
        problems.append(f"{where}: name must be a non-empty string, got {name!r}")
    if "steps" in entry and not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        problems.append(f"{where} {name!r}: steps must be a positive integer, got {steps!r}")
    if "data_path" in entry and not (isinstance(data_path, list) and data_path and all(
            isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in data_path)):
        problems.append(f"{where} {name!r}: data_path must be a non-empty list of prefixes (or weights and "
                        f"prefixes), got {data_path!r}")
    return problems


def parse_phases(entries: Sequence[Any]) -> tuple[list[PhaseSpec], list[str]]:
    """``(phases, problems)`` of the ``phases`` field; phases only when there is no problem."""
    problems: list[str] = []
    phases = []
    for index, entry in enumerate(entries):
        found = _phase_entry_problems(index, entry)
        if not found:
            components, blend_problems = parse_data_path([str(item) for item in entry["data_path"]])
            found = [f"phases[{index}] {entry['name']!r}: {problem}" for problem in blend_problems]
            phases.append(PhaseSpec(name=entry["name"], steps=entry["steps"],
                                    data_path=tuple(str(item) for item in entry["data_path"]),
                                    components=tuple(components)))
        problems += found
    names = [entry["name"] for entry in entries if isinstance(entry, dict) and isinstance(entry.get("name"), str)]
    problems += [f"phases: the name {name!r} is used twice; give each phase its own name"
                 for name in sorted({name for name in names if names.count(name) > 1})]
    return (phases if not problems else []), problems


def run_components(phases: Sequence[PhaseSpec]) -> tuple[list[ComponentSpec], list[PhaseBlend]]:
    """The run's training components (each corpus once, in order of first use) and each phase's blend
    over them.

    Names are fixed phase by phase: the components a phase adds are named among every path used so far,
    so editing a later phase never renames a corpus of an earlier one (records stay comparable).
    """
    keys: list[tuple[str, ...]] = []
    specs: list[ComponentSpec] = []
    blends = []
    for phase in phases:
        indices = []
        for component in phase.components:
            key = component_key(component)
            if key not in keys:
                keys.append(key)
                specs.append(component)
            indices.append(keys.index(key))
        weights = None if phase.components[0].weight is None else tuple(c.weight for c in phase.components)
        blends.append(PhaseBlend(name=phase.name, steps=phase.steps, components=tuple(indices), weights=weights))
    names: list[str] = []
    for blend in blends:
        new = sorted({index for index in blend.components if index >= len(names)})
        paths = [path for spec in specs[: (new[-1] + 1) if new else 0] for path in spec.paths]
        candidates = component_names(paths)
        for index in new:
            start = sum(len(spec.paths) for spec in specs[:index])
            name = "+".join(candidates[start:start + len(specs[index].paths)])
            names.append(name if name not in names else "+".join(specs[index].paths))
    return [ComponentSpec(name=name, paths=spec.paths, weight=None) for name, spec in zip(names, specs)], blends


def phases_problems(phases_field: list[Any], *, data_path: list[str], max_steps: int, max_steps_given: bool) -> list[str]:
    """What ``phases`` may not be given with: a top-level data_path, a max_steps other than their sum."""
    if not phases_field:
        return []
    problems = []
    if data_path:
        problems.append("data_path and phases both name the training data: move data_path into the phases "
                        "(each phase has its own data_path) or drop phases")
    phases, _ = parse_phases(phases_field)
    total = sum(phase.steps for phase in phases)
    if phases and max_steps_given and max_steps != total:
        parts = " + ".join(f"{phase.name} {phase.steps}" for phase in phases)
        problems.append(f"max_steps {max_steps} != {total}, the sum of the phases' steps ({parts}): drop max_steps "
                        "or make them agree")
    return problems


def total_steps(phases_field: list[Any]) -> int | None:
    """The sum of the phases' steps; None without phases or when they have problems."""
    phases, problems = parse_phases(phases_field)
    return sum(phase.steps for phase in phases) if phases and not problems else None
