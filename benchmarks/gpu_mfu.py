#!/usr/bin/env python
"""Tokens/s and MFU of cpt-ds on GPUs: a LLaMA-3-shaped ~1B model, random init, seq 2048, bf16, ZeRO-2.

    python benchmarks/gpu_mfu.py [--steps 30] [--micro_batch 4] [--gradient_checkpointing] [--flash]
    python benchmarks/gpu_mfu.py --dry_run      # build and check everything, print the command; no GPU needed

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, SwiGLU 8192, vocabulary
128,256, RoPE theta 500k, tied embeddings; ``--untied`` gives LLaMA-3-8B's untied head instead). It is
trained from scratch by train.py, launched with ``deepspeed --num_gpus N``, on a temporary token file of
uniformly random ids (the work per token does not depend on the ids), with ds_configs/zero2.json (bf16,
ZeRO-2) and the run config written here. Tokens/s per GPU and MFU are read from the run's metrics.jsonl
over the steps after ``--warmup`` (the engine logs every step; its intervals exclude the logging itself).

MFU = tokens/s per GPU x training FLOPs per token / peak bf16 FLOP/s of the GPU, with cpt-ds's FLOPs
formula (cpt_ds/model.py ``flops_per_token``, the one torchtitan and PaLM use):

    FLOPs/token = 6 * N_matmul + 12 * layers * heads * head_dim * seq

N_matmul = parameters that multiply activations: all of them except the input embedding (a lookup),
which with tied embeddings is also the LM head and then counts. Target: MFU >= 45%.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import BenchmarkError

from cpt_ds.distributed import free_port
from cpt_ds.launch import deepspeed_command

REPO = Path(__file__).resolve().parents[1]
MFU_TARGET = 0.45

# Llama-3.2-1B's shape (the LLaMA-3 family at ~1B).
MODEL_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
}


# --------------------------------------------------------------------------------------------------
# Model arithmetic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMath:
    num_parameters: int
    """As cpt-ds counts them (a tied embedding/head matrix once)."""
    embedding: int
    """V * H."""
    matmul_parameters: int
    """N_matmul: N without the input embedding, unless it is tied to the LM head."""
    flops_per_token: float
    """cpt_ds.model.flops_per_token: 6 * N_matmul + attention."""


def parameter_count(shape: dict[str, Any]) -> int:
    hidden, heads, kv_heads = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["head_dim"]
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * shape["intermediate_size"]  # gate, up, down
    norms = 2 * hidden
    embedding = shape["vocab_size"] * hidden
    head = 0 if shape["tie_word_embeddings"] else embedding
    return embedding + shape["num_hidden_layers"] * (attention + mlp + norms) + hidden + head


def model_math(shape: dict[str, Any], sequence_length: int) -> ModelMath:
    from transformers import LlamaConfig

    from cpt_ds.model import flops_per_token

    config = LlamaConfig(**{key: value for key, value in shape.items() if key not in ("architectures", "model_type")})
    num_parameters = parameter_count(shape)
    embedding = shape["vocab_size"] * shape["hidden_size"]
    # Full finetuning: every matmul parameter is trainable; the input embedding is a lookup unless it
    # is tied to the LM head, whose matmul it then is (cpt_ds.model.matmul_parameters on the live model).
    matmul_trainable = num_parameters - (0 if shape["tie_word_embeddings"] else embedding)
    engine = flops_per_token(config, sequence_length, matmul_trainable=matmul_trainable)
    return ModelMath(num_parameters, embedding, matmul_trainable, engine)


# --------------------------------------------------------------------------------------------------
# Inputs: tokenizer, random token file, model config, run config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    steps: int
    warmup: int
    micro_batch: int
    gradient_accumulation: int
    seq: int
    gradient_checkpointing: bool
    flash: bool
    untied: bool
    num_gpus: int
    peak_tflops: float | None
    loss_chunk_size: int = 1024
    document_attention: bool = True
    document_length: int = 8192
    sequence_parallel_size: int = 1
    seed: int = 1234

    @property
    def global_samples(self) -> int:
        """Samples per optimizer step: a sequence-parallel group of GPUs trains one sample per micro-step."""
        return self.micro_batch * self.gradient_accumulation * (self.num_gpus // self.sequence_parallel_size)


def write_tokenizer(folder: Path) -> Path:
    """Any tokenizer will do (the ids are random); train.py needs one whose fingerprint matches the file's."""
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer
    from cpt_ds.toy import python_corpus_texts

    texts = python_corpus_texts()[:200]
    return train_tokenizer(texts, folder, vocab_size=512)


def write_random_tokens(prefix: Path, tokenizer: Path, *, num_tokens: int, vocab_size: int, seed: int,
                        document: int = 8192) -> Path:
    """Uniform random ids in documents of ``document`` tokens, with the sidecar train.py's preflight checks."""
    import numpy as np

    from cpt_ds.pack.writer import IndexedTokenWriter
    from cpt_ds.token_file import token_dtype_for_vocab
    from cpt_ds.tokenizer import tokenizer_fingerprint

    generator = np.random.default_rng(seed)
    dtype = token_dtype_for_vocab(vocab_size)
    with IndexedTokenWriter(prefix, dtype=dtype) as writer:
        for start in range(0, num_tokens, 64 * document):
            count = min(64 * document, num_tokens - start)
            tokens = generator.integers(0, vocab_size, size=count, dtype=np.int64)
            lengths = np.full(-(-count // document), document, dtype=np.int64)
            lengths[-1] = count - document * (lengths.size - 1)
            writer.add_documents(tokens, lengths)
        writer.finalize({"tokenizer": {"path": str(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)},
                         "vocab_size": vocab_size, "note": "uniform random ids for benchmarks/gpu_mfu.py"})
    return prefix


def build_inputs(work: Path, options: Options) -> tuple[dict[str, Any], Path]:
    """Model config, tokenizer, token file and run config in ``work``; returns (model shape, run config path)."""
    shape = {**MODEL_1B, "tie_word_embeddings": not options.untied,
             "max_position_embeddings": max(MODEL_1B["max_position_embeddings"], options.seq)}
    model_dir = work / "model_config"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(shape, indent=2) + "\n")
    tokenizer = write_tokenizer(work / "tokenizer")
    # Every step reads fresh windows (no epoch wrap); +1: a window is seq + 1 tokens.
    num_tokens = options.steps * max(1, options.global_samples) * options.seq + 1
    prefix = write_random_tokens(work / "data" / "random", tokenizer, num_tokens=num_tokens,
                                 vocab_size=shape["vocab_size"], seed=options.seed, document=options.document_length)
    run_config = {
        "config_name": str(model_dir),
        "tokenizer_name_or_path": str(tokenizer),
        "full_finetuning": True,
        "use_flash_attention_2": options.flash,
        "loss_chunk_size": options.loss_chunk_size,
        "document_attention": options.document_attention,
        "gradient_checkpointing": options.gradient_checkpointing,
        "sequence_parallel_size": options.sequence_parallel_size,
        "data_path": [str(prefix)],
        "validation_split_percentage": 0.0,
        "block_size": options.seq,
        "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
        "per_device_train_batch_size": options.micro_batch,
        "gradient_accumulation_steps": options.gradient_accumulation,
        "learning_rate": 3e-4,
        "warmup_steps": 2,
        "max_steps": options.steps,
        "logging_steps": 1,  # one record per step: the timed window is any range of steps
        "output_dir": str(work / "run"),
        "seed": options.seed,
        "export_final": False,
        "peak_tflops": options.peak_tflops,
    }
    config_path = work / "run.json"
    config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    return shape, config_path


def preflight_check(config_path: Path, num_gpus: int) -> None:
    """train.py's own checks (config, DeepSpeed JSON, token file vs tokenizer), without building the model."""
    from cpt_ds.config import ConfigError, RunConfig
    from cpt_ds.preflight import preflight

    try:
        preflight(RunConfig.load(["--config", str(config_path)]), world_size=num_gpus)
    except ConfigError as error:
        raise BenchmarkError(f"the generated run config {config_path} fails train.py's preflight: {error}") from None


# --------------------------------------------------------------------------------------------------
# Launch and read back
# --------------------------------------------------------------------------------------------------


class OutOfMemory(BenchmarkError):
    """train.py ran out of GPU memory: a result for this shape (gpu_check.sh skips it), not a broken run."""


def launch_command(config_path: Path, num_gpus: int, port: int) -> list[str]:
    return deepspeed_command(REPO / "train.py", ["--config", str(config_path)], master_port=port, num_gpus=num_gpus)


def run_training(command: list[str], log: Path, timeout: float) -> None:
    """Run train.py into ``log``, echoing cpt-ds's own lines; the job is killed as a whole on timeout."""
    print("  " + " ".join(command), flush=True)
    deadline = time.monotonic() + timeout
    with open(log, "w") as handle, open(log) as follow:
        # Its own session, so that a timeout or Ctrl-C ends the launcher and every rank together.
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None:
                time.sleep(2)
                for line in follow.read().splitlines():
                    if "cpt_ds" in line:
                        print("  | " + line, flush=True)
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"train.py did not finish in {timeout:.0f} s; see {log}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode != 0:
        text = log.read_text(errors="replace")
        if "CUDA out of memory" in text or "OutOfMemoryError" in text:
            raise OutOfMemory(f"train.py ran out of GPU memory (see {log}); lower --seq or --micro_batch, or add "
                              "--gradient_checkpointing")
        tail = "\n".join(text.splitlines()[-30:])
        raise BenchmarkError(f"train.py failed with exit {process.returncode}; last lines of {log}:\n{tail}")


@dataclass(frozen=True)
class Measured:
    tokens_per_second: float
    """All GPUs together, over the timed window."""
    seconds: float
    engine_mfu: float | None
    """The MFU the engine logged, time-weighted over the window."""
    memory_gib: float
    final_loss: float


def read_window(metrics_file: Path, options: Options) -> Measured:
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [record for record in records if "tokens_per_second" in record and record["step"] > options.warmup]
    if len(steps) != options.steps - options.warmup:
        raise BenchmarkError(f"{metrics_file} has {len(steps)} step records after step {options.warmup}, "
                             f"expected {options.steps - options.warmup}")
    tokens_per_step = options.global_samples * options.seq
    seconds = [tokens_per_step / record["tokens_per_second"] for record in steps]
    total = sum(seconds)
    mfus = [record["mfu"] for record in steps]
    engine_mfu = None if None in mfus else sum(m * s for m, s in zip(mfus, seconds, strict=True)) / total
    return Measured(tokens_per_second=len(steps) * tokens_per_step / total, seconds=total, engine_mfu=engine_mfu,
                    memory_gib=max(record["memory_gib"] for record in steps), final_loss=steps[-1]["loss"])


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Options, bool, Path | None, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps in all")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timed window")
    parser.add_argument("--micro_batch", type=int, default=4, help="sequences per GPU per micro-step")
    parser.add_argument("--gradient_accumulation", type=int, default=1)
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (block_size)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--flash", action="store_true", help="use_flash_attention_2 (needs flash-attn); else SDPA")
    parser.add_argument("--untied", action="store_true", help="an untied LM head (LLaMA-3-8B style, 1.50B parameters)")
    parser.add_argument("--loss_chunk_size", type=int, default=1024,
                        help="tokens per chunk of the head + loss; 0 = full logits (the Hugging Face path)")
    parser.add_argument("--document_attention", choices=("true", "false"), default="true",
                        help="attention within documents (see --document_length)")
    parser.add_argument("--document_length", type=int, default=8192,
                        help="tokens per document of the random-id file (shorter than --seq: several per window)")
    parser.add_argument("--num_gpus", type=int, help="GPUs to use (default: all visible)")
    parser.add_argument("--sequence_parallel_size", type=int, default=1,
                        help="GPUs sharing each sample (Ulysses); must divide the GPU count")
    parser.add_argument("--peak_tflops", type=float,
                        help="per-GPU dense bf16 peak TFLOP/s, when the engine's table lacks the GPU")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is killed")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--dry_run", action="store_true",
                        help="build and check the inputs, print parameters, formula and command; no GPU needed")
    args = parser.parse_args(argv)
    problems = [f"--{name} must be positive" for name in ("steps", "micro_batch", "gradient_accumulation", "seq")
                if getattr(args, name) < 1]
    if args.sequence_parallel_size < 1:
        problems.append(f"--sequence_parallel_size must be positive, got {args.sequence_parallel_size}")
    if args.document_length < 1:
        problems.append(f"--document_length must be positive, got {args.document_length}")
    if args.loss_chunk_size < 0:
        problems.append(f"--loss_chunk_size must be >= 0, got {args.loss_chunk_size}")
    if not 0 <= args.warmup < args.steps:
        problems.append(f"--warmup must be in [0, --steps), got {args.warmup}")
    if problems:
        parser.error("; ".join(problems))
    options = Options(steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch,
                      gradient_accumulation=args.gradient_accumulation, seq=args.seq,
                      gradient_checkpointing=args.gradient_checkpointing, flash=args.flash, untied=args.untied,
                      num_gpus=args.num_gpus or 0, peak_tflops=args.peak_tflops,
                      loss_chunk_size=args.loss_chunk_size, document_attention=args.document_attention == "true",
                      document_length=args.document_length, sequence_parallel_size=args.sequence_parallel_size)
    return options, args.dry_run, args.workdir, args.timeout


def check_machine(options: Options) -> Options:
    """One clear sentence, before anything is built, when this machine cannot run the benchmark."""
    import torch

    from cpt_ds.model import peak_tflops

    if not torch.cuda.is_available():
        raise BenchmarkError("needs a CUDA GPU, and torch.cuda.is_available() is False on this machine "
                             "(use --dry_run to check the inputs here, benchmarks/train_speed.py for CPU)")
    visible = torch.cuda.device_count()
    num_gpus = options.num_gpus or visible
    if num_gpus > visible:
        raise BenchmarkError(f"--num_gpus {num_gpus} but only {visible} GPU(s) are visible")
    if num_gpus % options.sequence_parallel_size:
        raise BenchmarkError(f"--sequence_parallel_size {options.sequence_parallel_size} must divide the GPU count "
                             f"{num_gpus}; pass --num_gpus as a multiple of it")
    if options.flash and importlib.util.find_spec("flash_attn") is None:
        raise BenchmarkError("--flash needs flash-attn: pip install 'cpt-ds[flash]' (or drop --flash for SDPA)")
    if peak_tflops(options.peak_tflops) is None:
        raise BenchmarkError(f"the engine has no bf16 peak for {torch.cuda.get_device_name()}; pass --peak_tflops")
    return dataclasses.replace(options, num_gpus=num_gpus)


def print_model(shape: dict[str, Any], math_: ModelMath, options: Options) -> None:
    tied = "tied" if shape["tie_word_embeddings"] else "untied"
    print(f"model: LLaMA-3 shape, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
          f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads "
          f"(head_dim {shape['head_dim']}), SwiGLU {shape['intermediate_size']}, vocabulary {shape['vocab_size']:,}, "
          f"RoPE theta {shape['rope_theta']:g}, {tied} embeddings")
    print(f"parameters: {math_.num_parameters:,} ({math_.num_parameters / 1e9:.3f}B; embedding {math_.embedding:,})")
    heads_dim = shape["num_attention_heads"] * shape["head_dim"]
    print(f"FLOPs/token (cpt_ds.model.flops_per_token) = 6 * N_matmul + 12 * layers * heads * head_dim * seq\n"
          f"  = 6 * {math_.matmul_parameters:,} + 12 * {shape['num_hidden_layers']} * "
          f"{heads_dim} * {options.seq} = {math_.flops_per_token / 1e9:.3f} GFLOP")


def run(options: Options, work: Path, dry_run: bool, timeout: float) -> int:
    if not dry_run:
        options = check_machine(options)
    elif options.num_gpus == 0:
        options = dataclasses.replace(options, num_gpus=options.sequence_parallel_size)
    print(f"[1/3] inputs in {work}", flush=True)
    shape, config_path = build_inputs(work, options)
    math_ = model_math(shape, options.seq)
    print_model(shape, math_, options)
    preflight_check(config_path, options.num_gpus)
    command = launch_command(config_path, options.num_gpus, free_port())
    if dry_run:
        print(f"dry run: inputs pass train.py's preflight; on a GPU machine this runs\n  {' '.join(command)}")
        return 0

    import torch

    from cpt_ds.model import peak_tflops

    gpu = torch.cuda.get_device_name()
    peak = peak_tflops(options.peak_tflops)
    assert peak is not None  # check_machine refused this case
    print(f"[2/3] training {options.steps} steps on {options.num_gpus} x {gpu} (ZeRO-2 bf16, micro-batch "
          f"{options.micro_batch} x seq {options.seq}, accumulation {options.gradient_accumulation}, "
          f"{'flash-attn 2' if options.flash else 'SDPA / flex'}, sequence parallel {options.sequence_parallel_size}, "
          f"gradient checkpointing "
          f"{'on' if options.gradient_checkpointing else 'off'}, loss chunk {options.loss_chunk_size or 'off (full logits)'}, "
          f"document attention {'on' if options.document_attention else 'off'})", flush=True)
    run_training(command, work / "train.log", timeout)
    print_results(read_window(work / "run" / "metrics.jsonl", options), shape, math_, options, peak)
    return 0


def print_results(measured: Measured, shape: dict[str, Any], math_: ModelMath, options: Options, peak: float) -> None:
    per_gpu = measured.tokens_per_second / options.num_gpus
    mfu_engine = per_gpu * math_.flops_per_token / (peak * 1e12)
    print(f"[3/3] steps {options.warmup + 1}-{options.steps} ({measured.seconds:.1f} s), "
          f"peak bf16 {peak:g} TFLOP/s per GPU\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| tokens/s, all {options.num_gpus} GPU(s) | {measured.tokens_per_second:,.0f} |")
    print(f"| tokens/s per GPU | {per_gpu:,.0f} |")
    print(f"| MFU, cpt-ds formula (recomputed here) | {100 * mfu_engine:.1f}% |")
    if options.document_attention and options.document_length < options.seq:
        # The formula's attention term counts the whole window; within documents each token attends
        # only to its own document, so at long blocks the formula overstates the work done.
        within = model_math(shape, options.document_length)
        print(f"| MFU, attention within {options.document_length:,}-token documents (seq = document length) | "
              f"{100 * per_gpu * within.flops_per_token / (peak * 1e12):.1f}% |")
    if measured.engine_mfu is not None:
        print(f"| MFU as the engine logged it (time-weighted) | {100 * measured.engine_mfu:.1f}% |")
    print(f"| achieved TFLOP/s per GPU (cpt-ds formula) | {per_gpu * math_.flops_per_token / 1e12:.1f} |")
    print(f"| peak memory per GPU, GiB | {measured.memory_gib:.1f} |")
    print(f"| loss at step {options.steps} (random ids: ~ln {shape['vocab_size']:,} = "
          f"{math.log(shape['vocab_size']):.2f}) | {measured.final_loss:.3f} |")
    met = mfu_engine >= MFU_TARGET
    print(f"\nMFU target >= {MFU_TARGET:.0%}: {'met' if met else 'NOT met'} ({100 * mfu_engine:.1f}%, cpt-ds formula)")


def main(argv: list[str] | None = None) -> int:
    options, dry_run, workdir, timeout = parse_args(argv)
    try:
        if workdir is not None:
            if workdir.exists() and any(workdir.iterdir()):
                raise BenchmarkError(f"--workdir {workdir} is not empty; pass a new or empty folder")
            workdir.mkdir(parents=True, exist_ok=True)
            return run(options, workdir.resolve(), dry_run, timeout)
        with tempfile.TemporaryDirectory(prefix="gpu_mfu_") as scratch:
            return run(options, Path(scratch), dry_run, timeout)
    except BenchmarkError as error:
        if isinstance(error, OutOfMemory):
            print(f"gpu_mfu: skipped seq {options.seq}, micro-batch {options.micro_batch}: {error}", file=sys.stderr)
            return 3
        print(f"gpu_mfu: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
