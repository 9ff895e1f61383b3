"""Tiled MLP (``tiled_mlp``): DeepSpeed's ``TiledMLP`` around every gate/up/down MLP of the model.

The MLP's intermediate activations (``[tokens, intermediate_size]``, 3.5x the hidden size in LLaMA 3)
dominate activation memory at long sequence lengths. ``TiledMLP`` runs the MLP over shards of the
sequence without keeping them, and in backward recomputes one shard at a time, so only one shard's
intermediates live at once. The MLP is position-wise, so the result is the untiled one up to float
summation order. Under ZeRO it tells DeepSpeed that a weight's gradient is complete only after the
last shard (``ds_grad_is_ready``), so the shards' partial gradients are not reduced one by one.
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from cpt_ds.config import ModelConfig

# Model types whose MLP is LlamaMLP's down(act(gate(x)) * up(x)), the function the shards compute.
TILED_MLP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def tiling_problems(model: ModelConfig) -> list[str]:
    """The run-config checks of ``tiled_mlp`` (the model type is checked by :func:`model_type_problems`)."""
    if not model.tiled_mlp:
        return [f"tiled_mlp_shards ({model.tiled_mlp_shards}) only applies with tiled_mlp true; drop it"] \
            if model.tiled_mlp_shards is not None else []
    found = [] if model.tiled_mlp_shards is None or model.tiled_mlp_shards > 0 else [
        f"tiled_mlp_shards must be positive or null, got {model.tiled_mlp_shards}"]
    if model.use_liger_kernel:
        found.append("tiled_mlp and use_liger_kernel both replace the MLP's forward; keep one")
    mlp_targets = [name for name in MLP_PARTS if name in model.trainable]
    if not model.full_finetuning and model.lora_dropout > 0 and mlp_targets:
        # The backward recomputes the MLP over other groups of tokens than the forward: new dropout masks.
        found.append(f"tiled_mlp recomputes the MLP in backward, where LoRA dropout on {','.join(mlp_targets)} "
                     "would draw other masks than the forward did; set lora_dropout 0")
    return found


def model_type_problems(tiled_mlp: bool, hf_config: Any) -> list[str]:
    if not tiled_mlp or hf_config.model_type in TILED_MLP_MODEL_TYPES:
        return []
    return [f"tiled_mlp supports model types {', '.join(TILED_MLP_MODEL_TYPES)} (a gate/up/down MLP), not "
            f"{hf_config.model_type}; set tiled_mlp false"]


def num_shards(seq_len: int, hidden_size: int, requested: int | None) -> int:
    """Shards for a sequence of ``seq_len``: ``requested``, else ceil(seq_len / hidden_size) (DeepSpeed's ALST
    tutorial), reduced to the number of pieces ``torch.chunk`` really makes.

    ``torch.chunk`` can make fewer pieces than asked (9 rows in 4: 3, 3, 3), and TiledMLP's backward marks a
    weight's gradient ready for ZeRO only at piece number ``shards``: with fewer pieces it never would. A
    count that chunk reaches for ``seq_len`` rows it also reaches for any ``batch * seq_len`` rows (the
    backward's), and it depends on the sequence alone, so every rank calls the MLP equally often (ZeRO-3
    gathers its weights at each call).
    """
    wanted = min(seq_len, max(1, requested or math.ceil(seq_len / hidden_size)))
    return math.ceil(seq_len / math.ceil(seq_len / wanted))


def _mlp(mlp: nn.Module, x: Any) -> Any:
    """LlamaMLP.forward: what each shard computes."""
    return mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))


def _tiled_forward(mlp: nn.Module, x: Any, *, shards: int | None) -> Any:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    count = num_shards(x.shape[-2], x.shape[-1], shards)
    if count == 1:
        return _mlp(mlp, x)
    # Every parameter of the MLP (LoRA's A and B included): TiledMLP keeps those that need a gradient.
    return TiledMLP.apply(_mlp, mlp, x, count, list(mlp.parameters()))


def enable_tiled_mlp(module: nn.Module, *, shards: int | None) -> int:
    """Replace the forward of each gate/up/down MLP of ``module`` (on the instance: other models in the
    process keep theirs); returns how many. LoRA layers live inside the MLP's Linear modules, so a
    peft-wrapped model is tiled the same way, before or after wrapping."""
    patched = 0
    for layer in module.modules():
        if all(hasattr(layer, name) for name in (*MLP_PARTS, "act_fn")):
            layer.forward = types.MethodType(lambda mlp, x: _tiled_forward(mlp, x, shards=shards), layer)
            patched += 1
    assert patched, f"tiled_mlp: no gate/up/down MLP found in {type(module).__name__}"
    return patched
