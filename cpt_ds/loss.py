"""The loss: projection to the vocabulary and cross entropy, a chunk of tokens at a time.

With LLaMA-3's 128,256-token vocabulary the logits of one 4,096-token micro-batch are 1.05 GB in bf16
and 2.1 GB once upcast to fp32, plus their gradient: often more than every activation of the model.
Here the head matmul and the cross entropy run over ``chunk_size`` tokens at a time, so at most one
chunk's logits exist. In training the gradient is produced in the same pass (as Liger-Kernel's fused
linear cross entropy does): for each chunk

    logits = h_c W^T (fp32)     loss_i = logsumexp(logits_i) - logits_i[y_i]
    dlogits = softmax(logits) - onehot(y)   (0 on ignored rows)
    dh_c = dlogits W            dW += dlogits^T h_c

and backward only multiplies the stored ``dh`` and ``dW`` by the incoming scalar gradient (the
trainer's ``accumulation * world / global_tokens`` scale). Nothing is recomputed, so the head costs
the same three matmuls as the full-logits path. In eval (no gradient) the pass computes the loss and,
when asked, the argmax of each position; a chunk's logits are freed before the next.

The causal LM's forward is replaced (per instance, ``attach_loss_forward``) by: body -> final hidden
states -> this loss, so the loss runs *inside* the module forward DeepSpeed drives. Under ZeRO-3 the
partitioned head weight is then gathered the way DeepSpeed gathers any parameter read inside a
forward (its ``ZeROOrderedDict`` registers it as an external parameter of the running module and
all-gathers it; released with that module after the forward, fetched again for its backward).
Called without ``labels`` the model keeps its Hugging Face forward (logits), so export, generation and
``tools/`` see an unchanged model.

The output exposes, besides the differentiable sum over labelled positions, the detached float32
per-position losses ``[B, T]`` (0 where the label is ignored) and, when asked, the per-position
correct flags, so per-sample or per-corpus sums need no logits (cpt_ds/metrics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from cpt_ds.data.loader import IGNORE_INDEX
from cpt_ds.hardware import cuda_package_problems


@dataclass
class LossOutput(ModelOutput):
    """What the model returns when it is given labels."""

    loss: torch.Tensor | None = None
    """Differentiable sum of the per-position losses over labelled positions (float32 scalar)."""
    token_losses: torch.Tensor | None = None
    """Detached float32 per-position losses, shape of the labels, 0 where the label is ignored."""
    correct: torch.Tensor | None = None
    """Bool per position: argmax == label (False where ignored); only when ``return_correct``."""


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    chunk_size: int = 1024
    """Tokens per chunk; 0 = full logits in one piece (the Hugging Face path)."""
    use_liger: bool = False


# --------------------------------------------------------------------------------------------------
# The three ways to compute it (same numbers in fp32)
# --------------------------------------------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss sum, per-position losses and correct flags of ``hidden @ weight^T`` against ``labels``, one
    chunk of rows at a time; gradients of ``hidden`` and ``weight`` are made in the same pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
                return_correct: bool):
        rows = hidden.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        losses = torch.zeros(rows, dtype=torch.float32, device=hidden.device)
        correct = torch.zeros(rows if return_correct else 0, dtype=torch.bool, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        # Accumulated in the weight's dtype, as Liger does: an fp32 copy of an 8B model's head would be 2.1 GB.
        grad_weight = torch.zeros_like(weight) if want_weight else None
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            chunk = hidden[start:stop]
            target = labels[start:stop]
            valid = target != IGNORE_INDEX
            safe = torch.where(valid, target, torch.zeros_like(target))
            logits = F.linear(chunk, weight).float()
            picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1)
            if return_correct:
                correct[start:stop] = (logits.argmax(dim=-1) == target) & valid
            # logsumexp in place (max + log sum exp(x - max), as torch.logsumexp computes it), so the
            # chunk's fp32 logits are the only [chunk, vocabulary] tensor alive.
            row_max = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(row_max).exp_()
            total = exps.sum(dim=-1)
            log_sum_exp = row_max.squeeze(1) + total.log()
            losses[start:stop] = torch.where(valid, log_sum_exp - picked, torch.zeros_like(picked))
            if want_hidden or want_weight:
                # softmax - onehot, in place; ignored rows get no gradient.
                grad = exps.div_(total.unsqueeze(1))
                grad.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(picked).unsqueeze(1))
                grad.mul_(valid.unsqueeze(1))
                grad = grad.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[start:stop] = grad @ weight
                if want_weight:
                    grad_weight.addmm_(grad.t(), chunk)
                del grad
            del logits, exps
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(losses, correct)
        return losses.sum(), losses, correct

    @staticmethod
    def backward(ctx, grad_sum: torch.Tensor, _grad_losses: Any, _grad_correct: Any):
        # The stored gradients are scaled in place (no second weight-sized buffer), so they serve one backward.
        if getattr(ctx, "used", False):
            raise RuntimeError("the chunked loss supports one backward per forward (no retain_graph re-use)")
        ctx.used = True
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden.mul_(grad_sum.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_sum.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                 chunk_size: int, return_correct: bool = False) -> LossOutput:
    """``hidden`` [..., H], ``weight`` [V, H], ``labels`` [...] -> LossOutput, never more than
    ``chunk_size`` rows of logits at once."""
    assert chunk_size > 0
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss, losses, correct = _ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(-1), chunk_size,
                                                             return_correct)
    return LossOutput(loss=loss, token_losses=losses.view(labels.shape),
                      correct=correct.view(labels.shape) if return_correct else None)


def full_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              return_correct: bool = False) -> LossOutput:
    """The reference: every position's logits at once, upcast to fp32 (what Hugging Face's loss does)."""
    logits = F.linear(hidden, weight).float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(labels.shape)
    correct = None
    if return_correct:
        correct = (logits.detach().argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)
    return LossOutput(loss=losses.sum(), token_losses=losses.detach(), correct=correct)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               chunk_size: int, return_correct: bool = False) -> LossOutput:
    """Liger-Kernel's fused linear cross entropy (Triton, CUDA) for the differentiable sum; the detached
    per-position losses and flags come from a no-grad chunked pass (one extra head matmul), because
    Liger's ``reduction="none"`` backward expects a scalar upstream gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    flat, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    loss = liger_fused_linear_cross_entropy(flat, weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    with torch.no_grad():
        stats = chunked_linear_cross_entropy(hidden.detach(), weight.detach(), labels, chunk_size=chunk_size or 1024,
                                             return_correct=return_correct)
    return LossOutput(loss=loss.float(), token_losses=stats.token_losses, correct=stats.correct)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, settings: LossSettings, *,
              return_correct: bool = False) -> LossOutput:
    if settings.use_liger:
        return liger_linear_cross_entropy(hidden, weight, labels, chunk_size=settings.chunk_size,
                                          return_correct=return_correct)
    if settings.chunk_size > 0:
        return chunked_linear_cross_entropy(hidden, weight, labels, chunk_size=settings.chunk_size,
                                            return_correct=return_correct)
    return full_linear_cross_entropy(hidden, weight, labels, return_correct=return_correct)


# --------------------------------------------------------------------------------------------------
# Wiring it into the model
# --------------------------------------------------------------------------------------------------


def liger_problems(use_liger: bool) -> list[str]:
    if not use_liger:
        return []
    # Liger's kernels are Triton: CUDA only.
    return cuda_package_problems("use_liger_kernel", module="liger_kernel", package="liger-kernel", extra="gpu",
                                 fallback="the chunked loss")


def apply_liger_kernels(causal_lm: nn.Module) -> None:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this model instance (the loss is ours to call)."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=causal_lm)


def causal_lm_of(module: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a peft model (or the module itself)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def head_weight(head: nn.Module) -> torch.Tensor:
    """The weight the head multiplies by: peft's active ``modules_to_save`` copy when lm_head is trained
    next to LoRA, else the Linear's own (tied embeddings: the embedding matrix itself)."""
    from peft.utils.other import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        adapters = head.active_adapters
        head = head.original_module if head.disable_adapters or not adapters else head.modules_to_save[adapters[0]]
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(f"the chunked loss needs lm_head to be a bias-free nn.Linear (or peft's modules_to_save "
                         f"copy of one), found {type(head).__name__}; set loss_chunk_size 0")
    return head.weight


# Keyword arguments peft and transformers pass along that the body does not take.
_DROPPED = ("output_attentions", "output_hidden_states", "return_dict", "use_cache", "logits_to_keep",
            "num_items_in_batch")


def attach_loss_forward(module: nn.Module, settings: LossSettings) -> None:
    """Make ``module(input_ids=..., labels=..., [position_ids, attention_mask, flash kwargs],
    return_correct=False)`` return a ``LossOutput`` computed by ``head_loss``; without labels the
    module's Hugging Face forward runs unchanged."""
    causal_lm = causal_lm_of(module)
    original = causal_lm.forward
    body = getattr(causal_lm, causal_lm.base_model_prefix)

    def forward(input_ids: torch.Tensor | None = None, attention_mask: Any = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_correct: bool = False, **kwargs: Any):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        kwargs = {key: value for key, value in kwargs.items() if key not in _DROPPED and value is not None}
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                      **kwargs).last_hidden_state
        # Read inside the forward: under ZeRO-3 this is where DeepSpeed gathers the partitioned head.
        weight = head_weight(causal_lm.lm_head)
        return head_loss(hidden, weight, labels, settings, return_correct=return_correct)

    causal_lm.forward = forward
    causal_lm.cpt_ds_loss_settings = settings
