"""Shifted-label metrics computed across ranks by all-reducing sums, never by gathering logits.

Labels are already shifted by the sample layout (``labels[t]`` is the token after ``input_ids[t]``,
see cpt_ds/data/windows.py), so the prediction at position ``t`` is scored against ``labels[t]``.
The per-position losses and correct flags come from the loss (cpt_ds/loss.py), which computes them a
chunk of tokens at a time without the full logits. Per rank and batch we keep three numbers, and only
these cross the network:

    loss_sum  = sum over labelled positions of -log p(label)     (fixed point, int64)
    correct   = number of positions whose argmax == label          (int64)
    tokens    = number of labelled positions                       (int64)

    eval_loss = loss_sum / tokens,  accuracy = correct / tokens,  perplexity = exp(eval_loss)

The loss sum is accumulated in fixed point (units of 2**-24 nats): integer addition is associative,
so the all-reduced total equals a single-process sum over the same positions bit for bit, whatever
the split across ranks or batches. Memory stays constant in the size of the eval set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpt_ds.attention import model_inputs, module_attention_implementation
from cpt_ds.data.loader import IGNORE_INDEX
from cpt_ds.loss import LossOutput, causal_lm_of

LOSS_UNITS_PER_NAT = 2**24
"""Fixed-point scale: 2**-24 nats resolution; int64 holds 2**63 / (30 * 2**24), about 1.8e10 tokens at loss 30."""


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross entropy in float32 (0 where the label is ignored), shape of ``labels``."""
    flat = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.view(labels.shape)


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    """A LossOutput from materialized logits (a plain Hugging Face model's output), with correct flags."""
    losses = token_losses(logits, labels)
    correct = (logits.detach().argmax(dim=-1) == labels) & (labels != IGNORE_INDEX)
    return LossOutput(loss=losses.sum(), token_losses=losses.detach(), correct=correct)


def sample_stats(output: LossOutput, labels: torch.Tensor, *, with_accuracy: bool = True) -> torch.Tensor:
    """``int64[B, 3] = [loss_sum (fixed point), correct, tokens]`` per sample (row) of a batch, from the
    loss's per-position losses and correct flags (no logits needed); no gradient.

    Training passes ``with_accuracy=False`` (its loss computes no argmax); ``correct`` is then 0.
    Rows are what per-corpus sums are grouped by: each sample comes from exactly one corpus.
    """
    with torch.no_grad():
        mask = labels != IGNORE_INDEX
        fixed = torch.round(output.token_losses.detach().double() * LOSS_UNITS_PER_NAT).long() * mask
        hits = (output.correct & mask).sum(dim=-1) if with_accuracy else mask.new_zeros(mask.shape[0], dtype=torch.long)
        return torch.stack([fixed.sum(dim=-1), hits, mask.sum(dim=-1)], dim=-1).to(torch.int64).cpu()


def batch_stats(output: LossOutput, labels: torch.Tensor, *, with_accuracy: bool = True) -> torch.Tensor:
    """``int64[3] = [loss_sum (fixed point), correct, tokens]`` of one batch; no gradient."""
    return sample_stats(output, labels, with_accuracy=with_accuracy).sum(dim=0)


def by_corpus(stats: torch.Tensor, corpus: torch.Tensor, num_corpora: int) -> torch.Tensor:
    """Per-sample ``int64[B, 3]`` stats summed into ``int64[num_corpora, 3]`` by each sample's corpus index."""
    return torch.zeros(num_corpora, stats.shape[-1], dtype=torch.int64).index_add_(0, corpus.long().cpu(), stats)


@dataclass(frozen=True)
class TokenMetrics:
    loss_sum: int
    correct: int
    tokens: int

    @classmethod
    def from_tensor(cls, stats: torch.Tensor) -> TokenMetrics:
        loss_sum, correct, tokens = (int(v) for v in stats.tolist())
        return cls(loss_sum=loss_sum, correct=correct, tokens=tokens)

    @property
    def loss(self) -> float:
        return self.loss_sum / LOSS_UNITS_PER_NAT / self.tokens if self.tokens else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        loss = self.loss
        return math.exp(loss) if loss < 700 else math.inf


def all_reduce_stats(stats: torch.Tensor) -> torch.Tensor:
    """Sum int64 stats over all ranks (a copy; gloo and NCCL both reduce int64 exactly)."""
    total = stats.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = _collective_device()
        total = total.to(device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total = total.cpu()
    return total


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def evaluate(engine_or_module: Any, batches: Any, *, document_attention: bool) -> TokenMetrics:
    """Token-weighted loss, next-token accuracy and perplexity of a model over this rank's batches.

    The model must carry cpt-ds's loss forward (``cpt_ds.loss.attach_loss_forward``; ``build_model`` and
    ``load_exported_model`` users attach it), so eval never holds more than one chunk of logits.
    Every rank must call this with the same number of batches (see ``eval_batches``).
    """
    return evaluate_sets(engine_or_module, {"all": batches}, document_attention=document_attention)["all"]


@torch.no_grad()
def evaluate_sets(engine_or_module: Any, sets: dict[str, Any], *, document_attention: bool) -> dict[str, TokenMetrics]:
    """``evaluate`` for several named sets at once: one all-reduce of an ``int64[sets, 3]`` tensor.

    Every rank must pass the same set names, and the same number of batches per set.
    """
    module = engine_or_module
    inner = causal_lm_of(getattr(module, "module", module))
    assert hasattr(inner, "cpt_ds_loss_settings"), "evaluate needs attach_loss_forward(model, ...) first"
    implementation = module_attention_implementation(module)
    was_training = module.training
    module.eval()
    device = next(_parameters_device(module))
    stats = torch.zeros(len(sets), 3, dtype=torch.int64)
    for index, batches in enumerate(sets.values()):
        for batch in batches:
            labels = batch["labels"].to(device)
            output = module(**model_inputs(batch, document_attention=document_attention,
                                           implementation=implementation, device=device),
                            labels=labels, return_correct=True)
            stats[index] += batch_stats(output, labels)
            del output
    if was_training:
        module.train()
    total = all_reduce_stats(stats)
    return {name: TokenMetrics.from_tensor(total[index]) for index, name in enumerate(sets)}


def total_metrics(parts: Any) -> TokenMetrics:
    """The token-weighted combination of several sets' or corpora's sums (exact: integer addition)."""
    parts = list(parts)
    return TokenMetrics(loss_sum=sum(p.loss_sum for p in parts), correct=sum(p.correct for p in parts),
                        tokens=sum(p.tokens for p in parts))


def _parameters_device(module: Any):
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        yield device
        return
    for parameter in module.parameters():
        yield parameter.device
        return
    yield torch.device("cpu")


def peak_memory_gib() -> float:
    """Peak accelerator memory allocated on this rank, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """Appends one JSON object per line to ``output_dir/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written by a run that died before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
