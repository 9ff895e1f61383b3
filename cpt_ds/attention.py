"""Document attention: each token attends only to earlier tokens of its own document in a packed window.

Position ids restart at the window start and at every document start (cpt_ds/data/windows.py); the
attention implementation turns them into the mask it understands: cu_seqlens for flash-attn varlen
and for SDPA run once per document (``document_sdpa_attention``, the CPU path), a block-sparse
``BlockMask`` for flex_attention on CUDA, an explicit block-diagonal causal mask for plain SDPA / eager.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cpt_ds.config import ModelConfig
from cpt_ds.hardware import cuda_package_problems

DOCUMENT_SDPA = "cpt_document_sdpa"
"""PyTorch SDPA run once per document of a window (registered with transformers' AttentionInterface)."""

ULYSSES = "cpt_ulysses"
"""Sequence parallelism: DeepSpeed's Ulysses all-to-all around one of the implementations above."""

# Model types whose attention runs through transformers' AttentionInterface with the position ids in
# its keyword arguments, which is what the Ulysses wrapper gathers the document boundaries from.
SEQUENCE_PARALLEL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def attention_implementation(model_config: ModelConfig) -> str:
    """flash-attn 2 (varlen) when asked; with document attention, on CUDA PyTorch flex_attention (a
    block-sparse mask: blocks between documents are skipped), elsewhere PyTorch SDPA once per document
    (``document_sdpa_attention``); without document attention PyTorch SDPA."""
    if model_config.use_flash_attention_2:
        return "flash_attention_2"
    if model_config.document_attention:
        if torch.cuda.is_available():
            return "flex_attention"
        register_document_sdpa()
        return DOCUMENT_SDPA
    return "sdpa"


def document_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, cu_seq_lens_q: torch.Tensor | None = None,
                            **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Block-diagonal causal attention as causal SDPA over each document's rows.

    The same numbers as SDPA with the explicit block-diagonal mask, but each document only meets
    itself: sum of L_i^2 instead of T^2 work, where the explicit mask makes CPU SDPA compute (and
    then discard) every block of the window. ``cu_seq_lens_q`` (from ``flash_varlen_kwargs``) marks the
    documents of the flattened ``[B * T]`` batch; without it this is plain causal SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, length = query.shape[0], query.shape[2]
    bounds = cu_seq_lens_q.tolist()
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        row, offset = divmod(start, length)
        rows = slice(offset, offset + stop - start)  # a document never crosses rows: each row starts one
        out, _ = sdpa_attention_forward(module, query[row:row + 1, :, rows], key[row:row + 1, :, rows],
                                        value[row:row + 1, :, rows], None, **kwargs)
        pieces.append(out)
    return torch.cat(pieces, dim=1).view(batch, length, *pieces[0].shape[2:]), None


def register_document_sdpa() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(DOCUMENT_SDPA, document_sdpa_attention)


# --------------------------------------------------------------------------------------------------
# Sequence parallelism (Ulysses)
# --------------------------------------------------------------------------------------------------

def register_sequence_parallel(core: str, hf_config: Any, group: Any, *, document_attention: bool) -> str:
    """Register DeepSpeed's ``UlyssesSPAttentionHF`` around the ``core`` implementation for ``group``;
    build the model with the returned name.

    Each rank holds ``T / N`` tokens of every head; the all-to-all gives it all ``T`` tokens of
    ``heads / N`` heads, the core attention runs on whole windows, and a second all-to-all returns
    the rank's tokens with every head. The wrapper drops any mask and all-gathers the position ids, so
    the document boundaries come from the gathered positions (a new document wherever the position
    is 0), never from boundaries computed on the local shard.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface

    text = hf_config.get_text_config()
    shape = {"attn_head_count": text.num_attention_heads, "kv_head_count": text.num_key_value_heads,
             "attn_head_size": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
             "num_hidden_layers": text.num_hidden_layers}
    core_function = _whole_window_attention(core, document_attention)
    by_batch_size: dict[int, Any] = {}  # the wrapper fixes its batch size; eval may use another one

    def ulysses(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        batch = query.shape[0]
        if batch not in by_batch_size:
            by_batch_size[batch] = UlyssesSPAttentionHF(attn=core_function, batch_size=batch, process_group=group,
                                                        seq_length_is_variable=True, **shape)
        return by_batch_size[batch](module, query, key, value, None, *args, **kwargs)

    AttentionInterface.register(ULYSSES, ulysses)
    return ULYSSES


def _whole_window_attention(core: str, document_attention: bool) -> Any:
    """The attention function Ulysses calls on whole windows (``position_ids`` gathered over the group)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core == DOCUMENT_SDPA:
        register_document_sdpa()
    function = ALL_ATTENTION_FUNCTIONS[core]
    if not document_attention:
        return function  # mask None: plain causal over the window
    if core == "flex_attention":
        return _document_flex(function)

    def by_document(module, query, key, value, attention_mask, **kwargs):
        kwargs.update(flash_varlen_kwargs(kwargs["position_ids"]))
        return function(module, query, key, value, None, **kwargs)

    return by_document


def _document_flex(function: Any) -> Any:
    """flex_attention with the document mask of the gathered positions; one BlockMask per forward (every
    layer sees the same positions), rebuilt when they change."""
    cached: dict[str, Any] = {}

    def by_document(module, query, key, value, attention_mask, **kwargs):
        positions = kwargs["position_ids"]
        if "positions" not in cached or not torch.equal(cached["positions"], positions):
            cached["positions"], cached["mask"] = positions, document_block_mask(positions)
        return function(module, query, key, value, cached["mask"], **kwargs)

    return by_document


# --------------------------------------------------------------------------------------------------
# Document attention: model inputs from a batch
# --------------------------------------------------------------------------------------------------

def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of each token's document within its row: a new document wherever the position is 0."""
    return (position_ids == 0).cumsum(dim=-1)


def document_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, 1, T, T]``: query ``q`` may attend key ``k`` when ``k <= q`` in the same document
    (block-diagonal causal). True = attend, as SDPA reads a bool mask."""
    length = position_ids.shape[-1]
    documents = document_ids(position_ids)
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (documents.unsqueeze(-1) == documents.unsqueeze(-2))).unsqueeze(1)


def document_block_mask(position_ids: torch.Tensor) -> Any:
    """The same mask as a flex_attention ``BlockMask``: blocks wholly across documents are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = document_ids(position_ids)

    def same_document_causal(batch, head, query, key):
        return (key <= query) & (documents[batch, query] == documents[batch, key])

    batch, length = position_ids.shape
    return create_block_mask(same_document_causal, batch, None, length, length, device=position_ids.device)


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """flash-attn varlen arguments for the flattened batch, as transformers derives them from position
    ids (``DataCollatorWithFlattening``): every row start and document start opens a sequence."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu_seqlens = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": longest,
            "max_length_k": longest}


def model_inputs(batch: dict[str, torch.Tensor], *, document_attention: bool, implementation: str,
                 device: torch.device) -> dict[str, Any]:
    """Keyword arguments of the model's forward for a batch from ``collate`` (labels excluded).

    With ``document_attention`` the position ids restart per document and attention is limited to
    the token's own document: cu_seqlens for flash-attn varlen and for SDPA once per document, a
    BlockMask for flex_attention, an explicit block-diagonal causal mask for plain SDPA / eager. Without it only the input ids go in and the
    model counts positions 0 .. T-1 with a plain causal mask (the baseline's behaviour). Under sequence
    parallelism (``ULYSSES``) only the shard's positions go in (``register_sequence_parallel``).
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device)}
    if implementation == ULYSSES:
        # Only positions: the wrapper gathers them and masks by document (or plainly causal) itself.
        positions = batch["position_ids"]
        if not document_attention:
            positions = torch.arange(positions.shape[1]).expand_as(positions) + batch.get("token_offset", 0)
        inputs["position_ids"] = positions.to(device)
        return inputs
    if not document_attention:
        return inputs
    position_ids = batch["position_ids"].to(device)
    inputs["position_ids"] = position_ids
    if implementation in ("flash_attention_2", DOCUMENT_SDPA):
        inputs.update(flash_varlen_kwargs(position_ids))
    elif implementation == "flex_attention":
        inputs["attention_mask"] = document_block_mask(position_ids)
    else:
        mask = document_causal_mask(position_ids)
        if implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, device=device).masked_fill_(~mask, torch.finfo(torch.float32).min)
        inputs["attention_mask"] = mask
    return inputs


def module_attention_implementation(module: Any) -> str:
    """The attention implementation a (peft-wrapped, DeepSpeed-wrapped) model was built with."""
    module = getattr(module, "module", module)
    return module.config._attn_implementation


def attention_problems(model_config: ModelConfig) -> list[str]:
    if not model_config.use_flash_attention_2:
        return []
    return cuda_package_problems("use_flash_attention_2", module="flash_attn", package="flash-attn", extra="flash",
                                 fallback="PyTorch SDPA")


def sequence_parallel_problems(sp_size: int, hf_config: Any, *, world_size: int, block_size: int) -> list[str]:
    """What keeps ``world_size`` ranks from sharing ``block_size``-token samples in groups of ``sp_size``,
    and this model (None: not known yet) from splitting its attention heads over a group."""
    if sp_size <= 1:
        return []  # below 1 is reported by the config check
    problems = []
    if world_size % sp_size:
        problems.append(f"sequence_parallel_size {sp_size} does not divide the world size {world_size}; launch a "
                        f"multiple of {sp_size} ranks or change sequence_parallel_size")
    if block_size % sp_size:
        problems.append(f"block_size {block_size} is not divisible by sequence_parallel_size {sp_size} (each rank "
                        f"holds block_size / N tokens); use a multiple of {sp_size}")
    return problems if hf_config is None else problems + _head_split_problems(sp_size, hf_config)


def _head_split_problems(sp_size: int, hf_config: Any) -> list[str]:
    text = hf_config.get_text_config()
    fix = "set sequence_parallel_size to a divisor of it, or 1"
    if text.model_type not in SEQUENCE_PARALLEL_MODEL_TYPES:
        return [f"sequence_parallel_size {sp_size}: model_type {text.model_type} has no supported sequence-parallel "
                f"attention path (supported: {', '.join(SEQUENCE_PARALLEL_MODEL_TYPES)}); set sequence_parallel_size 1"]
    problems = []
    if text.num_attention_heads % sp_size:
        problems.append(f"sequence_parallel_size {sp_size} does not divide the model's num_attention_heads "
                        f"{text.num_attention_heads} (each rank computes heads / N of them); {fix}")
    kv_heads = text.num_key_value_heads
    if kv_heads % sp_size and sp_size % kv_heads:
        problems.append(f"sequence_parallel_size {sp_size} and the model's num_key_value_heads {kv_heads} must divide "
                        f"one another (key/value heads are split or replicated across the group); {fix}")
    return problems
