#!/usr/bin/env python
"""GPU checks of document attention and the loss, bf16 on one CUDA device (run by gpu_check.sh).

    python benchmarks/gpu_check.py [--json OUT.json]

(a) Document attention through each CUDA path, SDPA (explicit block-diagonal mask), flex_attention
    (BlockMask) and, when flash-attn is installed, flash-attn 2 varlen (cu_seqlens): every position of
    windows holding several documents, one cut by the window start, against its fragment run alone.
    In bf16 the two runs round differently (other shapes, other kernels), so the check is that the
    differences are small and far below what attending across documents changes.
(b) The chunked loss against full logits, and Liger's fused linear cross entropy (when installed)
    against the chunked loss, LLaMA-3-8B's head (hidden 4,096, vocabulary 128,256) over 4,096
    tokens in bf16: loss, gradients, peak memory and time.

Exits 1 when a check fails, 2 when the machine cannot run it; prints one table per part.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

TOLERANCE_DOCUMENT_MEAN = 2e-2
"""Mean |loss together - loss alone| per position allowed in bf16 (nats)."""
TOLERANCE_LOSS_RELATIVE = 1e-3
TOLERANCE_GRAD_RELATIVE = 2e-2
"""Relative Frobenius error of a bf16 gradient."""


def document_check(implementation: str) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from cpt_ds.attention import model_inputs
    from cpt_ds.data.loader import collate
    from cpt_ds.loss import LossSettings, attach_loss_forward

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, rope_theta=500000.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=torch.bfloat16).cuda()
    model.eval()
    attach_loss_forward(model, LossSettings())
    rng = np.random.default_rng(0)
    length = 1024
    windows = []
    for _ in range(2):
        # 4-8 documents per window; the first stands for one cut by the window start (PackedSamples restarts
        # its positions at 0 there, so the model sees it as a document of its own).
        lengths = [int(rng.integers(100, 300)) for _ in range(8)]
        positions = np.concatenate([np.arange(n) for n in lengths])[:length]
        ids = rng.integers(1, config.vocab_size, size=length + 1)
        windows.append({"input_ids": ids[:-1], "labels": ids[1:], "position_ids": positions})
    batch = collate(windows)
    device = torch.device("cuda")
    worst = total = count = across = 0.0
    with torch.no_grad():
        together = model(**model_inputs(batch, document_attention=True, implementation=implementation, device=device),
                         labels=batch["labels"].to(device)).token_losses
        plain = model(**model_inputs(batch, document_attention=False, implementation=implementation, device=device),
                      labels=batch["labels"].to(device)).token_losses
        for row, window in enumerate(windows):
            bounds = np.flatnonzero(window["position_ids"] == 0).tolist() + [length]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                alone = collate([{key: value[start:stop] for key, value in window.items()}])
                expected = model(**model_inputs(alone, document_attention=False, implementation=implementation,
                                                device=device), labels=alone["labels"].to(device)).token_losses[0]
                difference = (together[row, start:stop] - expected).abs()
                worst, total, count = max(worst, float(difference.max())), total + float(difference.sum()), count + stop - start
            across = max(across, float((plain[row, bounds[1]:] - together[row, bounds[1]:]).abs().mean()))
    mean = total / count
    return {"path": implementation, "mean_difference": mean, "max_difference": worst, "across_mean": across,
            "ok": mean <= TOLERANCE_DOCUMENT_MEAN and across > 10 * mean}


def relative(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def loss_check() -> list[dict[str, Any]]:
    import torch

    from cpt_ds.loss import chunked_linear_cross_entropy, full_linear_cross_entropy, liger_linear_cross_entropy

    torch.manual_seed(0)
    tokens, width, vocab = 4096, 4096, 128256
    hidden0 = (torch.randn(1, tokens, width, device="cuda") * 1.0).bfloat16()
    weight0 = (torch.randn(vocab, width, device="cuda") * 0.02).bfloat16()
    labels = torch.randint(0, vocab, (1, tokens), device="cuda")
    labels[0, :100] = -100
    variants = [("full logits", lambda h, w: full_linear_cross_entropy(h, w, labels)),
                ("chunked 1024", lambda h, w: chunked_linear_cross_entropy(h, w, labels, chunk_size=1024)),
                ("chunked 256", lambda h, w: chunked_linear_cross_entropy(h, w, labels, chunk_size=256))]
    if importlib.util.find_spec("liger_kernel") is not None:
        variants.append(("liger", lambda h, w: liger_linear_cross_entropy(h, w, labels, chunk_size=1024)))
    results = {}
    for name, compute in variants:
        hidden = hidden0.clone().requires_grad_()
        weight = weight0.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        started = time.perf_counter()
        output = compute(hidden, weight)
        output.loss.backward()
        torch.cuda.synchronize()
        results[name] = {"loss": output.loss.detach().float(), "hidden": hidden.grad.detach(),
                         "weight": weight.grad.detach(), "seconds": time.perf_counter() - started,
                         "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
        del output, hidden, weight
    rows = []
    for name, result in results.items():
        reference = results["chunked 1024"] if name == "liger" else results["full logits"]
        row = {"variant": name, "against": "chunked 1024" if name == "liger" else "full logits",
               "loss_relative": abs(float(result["loss"] - reference["loss"])) / float(reference["loss"]),
               "grad_hidden_relative": relative(result["hidden"], reference["hidden"]),
               "grad_weight_relative": relative(result["weight"], reference["weight"]),
               "peak_gib": result["peak_gib"], "seconds": result["seconds"]}
        row["ok"] = (row["loss_relative"] <= TOLERANCE_LOSS_RELATIVE and row["grad_hidden_relative"] <= TOLERANCE_GRAD_RELATIVE
                     and row["grad_weight_relative"] <= TOLERANCE_GRAD_RELATIVE)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    paths = ["sdpa", "flex_attention"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])
    documents = [document_check(path) for path in paths]
    print("\n(a) document attention, bf16: |loss in the packed window - loss of the fragment alone| per position")
    print("| path | mean | max | mean change when attending across documents | ok |\n|---|---:|---:|---:|---|")
    for row in documents:
        print(f"| {row['path']} | {row['mean_difference']:.2e} | {row['max_difference']:.2e} | {row['across_mean']:.2e} | "
              f"{'yes' if row['ok'] else 'NO'} |")
    losses = loss_check()
    print("\n(b) loss of LLaMA-3-8B's head over 4,096 tokens, bf16 (relative errors against the reference)")
    print("| variant | against | loss | grad hidden | grad weight | peak extra GiB | seconds | ok |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in losses:
        print(f"| {row['variant']} | {row['against']} | {row['loss_relative']:.1e} | {row['grad_hidden_relative']:.1e} | "
              f"{row['grad_weight_relative']:.1e} | {row['peak_gib']:.2f} | {row['seconds']:.3f} | "
              f"{'yes' if row['ok'] else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps({"documents": documents, "losses": losses}, indent=2) + "\n")
    return 0 if all(row["ok"] for row in documents + losses) else 1


if __name__ == "__main__":
    sys.exit(main())
