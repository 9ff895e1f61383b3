"""RoPE overrides for context extension: ``rope_theta`` and ``rope_scaling`` of the run config.

Transformers 5 keeps every RoPE setting in one dict, ``config.rope_parameters`` (``rope_theta``,
``rope_type`` and the type's keys such as ``factor``); the old top-level ``rope_theta`` and
``rope_scaling`` attributes are read only when a config is constructed. The two run-config fields
are therefore merged into ``rope_parameters`` of the loaded config, before any weights load, and
checked with transformers' own validation. Everything downstream (preflight, the model, FLOPs,
fingerprints, the checkpoint's and the export's ``config.json``) reads that one config.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

# The rope_type values transformers 5 computes for a flat (not per-layer) rope_parameters dict.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# Types whose frequencies depend on the length the model was trained at; transformers would default
# it to max_position_embeddings, which is wrong once that has been raised, so it must be given.
NEEDS_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")


def override_problems(rope_theta: float | None, rope_scaling: dict[str, Any] | None) -> list[str]:
    """What the values alone show to be wrong (config.py); the type's own keys are checked by
    :func:`apply_overrides`, with the model config at hand."""
    found = []
    if rope_theta is not None and not (math.isfinite(rope_theta) and rope_theta > 0):
        found.append(f"rope_theta must be a positive number (e.g. 1000000.0), got {rope_theta}")
    if rope_scaling is None:
        return found
    example = '{"rope_type": "linear", "factor": 4.0}'
    if "type" in rope_scaling:
        found.append(f"rope_scaling: spell the key 'rope_type' (transformers 5), not 'type', e.g. {example}")
    elif rope_scaling.get("rope_type") not in ROPE_TYPES:
        found.append(f"rope_scaling.rope_type must be one of {', '.join(ROPE_TYPES)}, got "
                     f"{rope_scaling.get('rope_type')!r}; e.g. {example}")
    elif rope_scaling["rope_type"] in NEEDS_ORIGINAL_LENGTH and "original_max_position_embeddings" not in rope_scaling:
        found.append(f"rope_scaling of rope_type {rope_scaling['rope_type']} needs original_max_position_embeddings "
                     "(the context length the model was trained at, e.g. 8192 for Llama 3); add it")
    if "rope_theta" in rope_scaling:
        found.append("rope_scaling holds rope_theta: set the base with the rope_theta field instead")
    return found


def apply_overrides(hf_config: Any, *, rope_theta: float | None, rope_scaling: dict[str, Any] | None,
                    block_size: int | None = None) -> bool:
    """Merge the overrides into ``hf_config.rope_parameters``; False when there are none.

    ``rope_scaling`` replaces the model's scaling (its type and keys), keeping the model's base unless
    ``rope_theta`` is given too; ``rope_theta`` alone keeps the model's scaling. With an override,
    ``max_position_embeddings`` is raised to ``block_size`` when smaller (before validation, which
    compares a scaling's original length with it). Raises ValueError naming the field when
    transformers refuses the result (a missing key of the chosen type).
    """
    if rope_theta is None and rope_scaling is None:
        return False
    from transformers.modeling_rope_utils import RopeParameters

    current = getattr(hf_config, "rope_parameters", None)
    if not isinstance(current, dict) or "rope_theta" not in current:
        raise ValueError(f"rope_theta / rope_scaling: model_type {hf_config.model_type} has no single RoPE "
                         "(rope_parameters); drop both fields")
    if rope_scaling is None:
        parameters = dict(current)
    else:
        kept = {key: current[key] for key in ("rope_theta", "partial_rotary_factor") if key in current}
        parameters = {**kept, **rope_scaling}
    if rope_theta is not None:
        parameters["rope_theta"] = float(rope_theta)
    unknown = sorted(set(parameters) - set(RopeParameters.__annotations__))
    if unknown:
        raise ValueError(f"rope_scaling: unknown keys {unknown} (a typo?); use the keys of transformers' "
                         f"RopeParameters, e.g. factor, original_max_position_embeddings")
    hf_config.rope_parameters = parameters
    if block_size is not None:
        raise_max_positions(hf_config, block_size)
    try:
        hf_config.standardize_rope_params()
        hf_config.validate_rope()
    except (KeyError, ValueError) as error:
        raise ValueError(f"rope_scaling {json.dumps(rope_scaling)}: {error.args[0] if error.args else error}; "
                         "add the missing keys") from None
    return True


def raise_max_positions(hf_config: Any, block_size: int) -> None:
    """``max_position_embeddings`` raised to ``block_size`` when smaller (the context is being extended)."""
    old = getattr(hf_config, "max_position_embeddings", None)
    if old is not None and block_size > old:
        hf_config.max_position_embeddings = block_size
        logger.info("max_position_embeddings raised from %d to block_size %d (rope_theta / rope_scaling extend "
                    "the context); the exported config.json says %d", old, block_size, block_size)


def rope_fingerprint(hf_config: Any) -> dict[str, Any] | None:
    """The RoPE a model was trained with, as a checkpoint records it (None for a model without RoPE)."""
    parameters = getattr(hf_config, "rope_parameters", None)
    return json.loads(json.dumps(parameters)) if parameters else None


def rope_changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """``rope_theta A -> B`` and/or ``rope_scaling {...} -> {...}``: what a resume changed, by run-config field."""
    changes = []
    if saved.get("rope_theta") != current.get("rope_theta"):
        changes.append(f"rope_theta {saved.get('rope_theta')} -> {current.get('rope_theta')}")
    scaling = [{key: value for key, value in side.items() if key != "rope_theta"} for side in (saved, current)]
    if scaling[0] != scaling[1]:
        changes.append(f"rope_scaling {json.dumps(scaling[0], sort_keys=True)} -> "
                       f"{json.dumps(scaling[1], sort_keys=True)}")
    return ", ".join(changes)
