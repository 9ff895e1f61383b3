"""The README's main job, end to end on a built-in default (CPU or GPU, a few minutes):

1. a small real-text corpus from text shipped with Python (its reference manual, plus the Chinese
   and Japanese sample texts of its codec tests when the install has them);
2. a small LLaMA-3-shaped tokenizer trained on it;
3. tools/pack_corpus.py's packer -> a token file;
4. a tiny LLaMA-3-shaped model (GQA, SwiGLU, RoPE theta 500k) trained from scratch with ZeRO-2 on
   2 ranks through the deepspeed launcher and a hostfile, evaluated before and after;
5. a table of loss / next-token accuracy / perplexity before and after.

    python -m cpt_ds.quickstart [--workdir quickstart_out] [--max_steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# LLaMA-3-8B's shape ratios at toy size: GQA 4:1 heads, SwiGLU at 3.5x, RoPE theta 500k, untied head.
TINY_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def python_corpus_documents() -> dict[str, list[str]]:
    """Real text that ships with CPython: {file name: documents}."""
    from pydoc_data.topics import topics

    english = [paragraph.strip() for key in sorted(topics) for paragraph in topics[key].split("\n\n")
               if len(paragraph.strip()) >= 80]
    corpus = {"python_reference.jsonl": english}
    cjk_dir = Path(sysconfig.get_path("stdlib")) / "test" / "cjkencodings"
    cjk = []
    for name in ("gb18030-utf8.txt", "gb2312-utf8.txt", "big5-utf8.txt", "euc_jp-utf8.txt"):
        file = cjk_dir / name
        if file.is_file():
            cjk += [block.strip() for block in file.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    if cjk:
        corpus["cjk_samples.jsonl"] = cjk
    return corpus


def write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, documents in python_corpus_documents().items():
        path = folder / name
        path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in documents),
                        encoding="utf-8")
        written.append(path)
    return written


def write_model_config(path: Path, vocab_size: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**TINY_LLAMA3, "vocab_size": vocab_size}, indent=2) + "\n")
    return path


def launcher_command(*, hostfile: Path, master_port: int, num_ranks: int) -> list[str]:
    """The documented one-machine launch: a hostfile, no ssh (the launcher would ssh to localhost)."""
    hostfile.write_text(f"localhost slots={num_ranks}\n")
    # `python -m deepspeed.launcher.runner` is the `deepspeed` command, without relying on PATH.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
            "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(master_port)]


def choose_precision() -> tuple[str, str, Path]:
    """``(device, precision, DeepSpeed JSON)``: bf16 on GPUs that have it, fp32 on every CPU.

    Many CPUs emulate bf16 (~100x slower than fp32, cpt_ds/hardware.py), and even where it is native
    the quick start's tiny matmuls gain nothing from it, so CPUs always train in fp32.
    """
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return f"cuda ({name})", "bf16", REPO / "ds_configs" / "zero2.json"
        return f"cuda ({name})", "fp32", REPO / "ds_configs" / "zero2_fp32.json"
    from cpt_ds.hardware import cpu_capability

    return f"cpu (PyTorch {cpu_capability()})", "fp32", REPO / "ds_configs" / "zero2_fp32.json"


def read_evals(metrics: Path) -> list[dict]:
    return [record for line in metrics.read_text().splitlines() if "eval_loss" in (record := json.loads(line))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart_out", help="where corpus, token file and run go")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--master_port", type=int, default=29555)
    args = parser.parse_args(argv)

    import torch

    from cpt_ds.data.packing import PackOptions, pack_corpus
    from cpt_ds.distributed import remove_shm_buffers
    from cpt_ds.data.tiny_tokenizer import train_tokenizer

    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    print(f"[1/5] corpus from text shipped with Python -> {work / 'corpus'}", flush=True)
    files = write_corpus(work / "corpus")
    texts = [json.loads(line)["text"] for file in files for line in file.read_text(encoding="utf-8").splitlines()]
    print(f"      {len(texts):,} documents, {sum(map(len, texts)):,} characters", flush=True)

    print("[2/5] training a 2,048-token LLaMA-3-shaped BPE tokenizer", flush=True)
    tokenizer = train_tokenizer(texts, work / "tokenizer", vocab_size=2048)

    print("[3/5] packing the corpus (tools/pack_corpus.py's packer)", flush=True)
    summary = pack_corpus([work / "corpus"], tokenizer, work / "data" / "corpus", PackOptions(), workers=2)
    print("      " + summary.format().replace("\n", "\n      "), flush=True)

    num_ranks = torch.cuda.device_count() or 2
    device_name, precision, ds_json = choose_precision()
    model_config = write_model_config(work / "model_config", vocab_size=2048)
    run_config = {
        "config_name": str(model_config),
        "tokenizer_name_or_path": str(tokenizer),
        "full_finetuning": True,
        "data_path": [str(work / "data" / "corpus")],
        "validation_split_percentage": 0.05,
        "block_size": 128,
        "deepspeed": str(ds_json),
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2e-3,
        "warmup_ratio": 0.05,
        "weight_decay": 0.01,
        "max_steps": args.max_steps,
        "logging_steps": 25,
        "eval_steps": 100,
        "save_steps": 100,
        "save_total_limit": 2,
        "output_dir": str(work / "run"),
        "seed": 1234,
    }
    config_path = work / "run.json"
    config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    command = launcher_command(hostfile=work / "hostfile", master_port=args.master_port, num_ranks=num_ranks) + [
        str(REPO / "train.py"), "--config", str(config_path)]
    print(f"[4/5] training on {num_ranks} ranks with ZeRO-2 | device {device_name} | precision {precision} "
          f"({ds_json.relative_to(REPO)}):\n      {' '.join(command)}", flush=True)
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    try:
        result = subprocess.run(command, env=env, cwd=REPO)
    finally:
        remove_shm_buffers(args.master_port)
    if result.returncode != 0:
        print(f"training failed (exit {result.returncode}); see the log above", file=sys.stderr)
        return result.returncode

    evals = read_evals(work / "run" / "metrics.jsonl")
    before, after = evals[0], evals[-1]
    print(f"[5/5] held-out evaluation ({after['eval_tokens']:,} tokens), {time.perf_counter() - started:.0f} s in all")
    print(f"      {'':10} {'loss':>8} {'accuracy':>9} {'perplexity':>11}")
    for label, record in (("before", before), ("after", after)):
        print(f"      {label:10} {record['eval_loss']:8.4f} {record['eval_accuracy']:9.4f} {record['perplexity']:11.2f}")
    print(f"      model: {work / 'run' / 'final'}   metrics: {work / 'run' / 'metrics.jsonl'}")
    if not after["perplexity"] < before["perplexity"] / 4:
        print("the model did not learn: perplexity fell less than 4x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
