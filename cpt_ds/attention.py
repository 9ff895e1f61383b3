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
    model counts positions 0 .. T-1 with a plain causal mask (the baseline's behaviour).
    """
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device)}
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
