#!/usr/bin/env python
"""What document attention costs on CPU: training tokens/s with and without, per block size.

    python benchmarks/document_attention_cost.py [--blocks 1024 4096] [--steps 4] [--threads 1]

One process, ``--threads`` torch threads (1 = what each of 2 ranks gets on a 2-core machine), the
model of benchmarks/train_speed.py (LLaMA-3 ratios, hidden 256, 4 layers, vocabulary 2,048) trained
with AdamW on windows of the Python documentation packed by that benchmark's tokenizer (real
document lengths, so windows hold several documents). Each step is forward + cpt-ds's chunked loss
+ backward + optimizer step on one window, through cpt-ds's model inputs, in three modes: without
document attention (SDPA's plain causal mask); with it through SDPA once per document (cpt-ds's CPU
path); with it through SDPA and the explicit block-diagonal mask. The modes take turns step by step
over the same windows (which goes first rotates); the median step time is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))

from train_speed import BENCH_MODEL, Settings, build_assets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and block (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_ds.attention import DOCUMENT_SDPA, model_inputs, register_document_sdpa
    from cpt_ds.data.loader import collate
    from cpt_ds.data.windows import PackedSamples, TokenStream
    from cpt_ds.loss import LossSettings, attach_loss_forward
    from cpt_ds.token_file import IndexedTokenFile

    torch.set_num_threads(args.threads)
    register_document_sdpa()
    rows = []
    with tempfile.TemporaryDirectory(prefix="document_attention_cost_") as scratch:
        settings = Settings(zero_stage=2, precision="fp32", micro_batch=1, block_size=max(args.blocks), window_start=1,
                            window_steps=1, eval_samples=2 * (args.steps + 1), eval_warm_steps=1, repeats=1)
        assets = build_assets(Path(scratch), settings)
        stream = TokenStream.whole([IndexedTokenFile(assets.token_file)])
        for block in args.blocks:
            torch.manual_seed(0)
            config = AutoConfig.from_pretrained(assets.model_config)
            config.max_position_embeddings = max(config.max_position_embeddings, block)
            # SDPA once per document (the default off CUDA); without cu_seqlens it is plain causal SDPA.
            model = AutoModelForCausalLM.from_config(config, attn_implementation=DOCUMENT_SDPA).float()
            attach_loss_forward(model, LossSettings())
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            samples = PackedSamples(stream, block)
            modes = {"off": (False, "sdpa"), "per_document": (True, DOCUMENT_SDPA), "mask": (True, "sdpa")}
            seconds: dict[str, list[float]] = {mode: [] for mode in modes}
            documents = []
            for step in range(args.steps + 1):
                batch = collate([samples[step % len(samples)]])
                documents.append(int((batch["position_ids"] == 0).sum()))
                order = list(modes)[step % 3:] + list(modes)[:step % 3]  # rotate which mode goes first
                for mode in order:
                    document_attention, implementation = modes[mode]
                    model.set_attn_implementation(implementation)
                    started = time.perf_counter()
                    inputs = model_inputs(batch, document_attention=document_attention, implementation=implementation,
                                          device=torch.device("cpu"))
                    model(**inputs, labels=batch["labels"]).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if step > 0:
                        seconds[mode].append(time.perf_counter() - started)
            rates = {mode: block / statistics.median(values) for mode, values in seconds.items()}
            rows.append((block, float(np.mean(documents)), rates))
    print(f"\nCPU, {args.threads} thread(s), model {json.dumps(BENCH_MODEL)}, micro-batch 1, median of {args.steps} steps\n")
    print("| block | documents per window (mean) | tokens/s, document_attention false | true (SDPA per document, "
          "the CPU default) | cost | true, SDPA with the explicit mask | cost |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for block, docs, rates in rows:
        off = rates["off"]
        print(f"| {block:,} | {docs:.1f} | {off:,.0f} | {rates['per_document']:,.0f} | "
              f"{100 * (off / rates['per_document'] - 1):+.1f}% | {rates['mask']:,.0f} | "
              f"{100 * (off / rates['mask'] - 1):+.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
