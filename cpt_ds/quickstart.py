"""The README's main job: continued pretraining end to end on a built-in default (CPU or GPU, minutes).

1. two small real-text corpora shipped with Python and cpt-ds: English (Python's reference manual)
   and Chinese (classics), every 10th document held out;
2. a small LLaMA-3-shaped byte-level BPE tokenizer trained on both;
3. tools/pack_corpus.py's packer -> four token files (train / valid per language);
4. a tiny LLaMA-3-shaped base model (GQA, SwiGLU, RoPE theta 500k) pretrained briefly on English,
   with ZeRO-2 on 2 ranks through the deepspeed launcher and a hostfile;
5. continued pretraining of that model on Chinese with a replay share of English through a blend
   (data_path 0.75 zh 0.25 en), evaluated per set (zh, en) before and after;
6. the per-set table (Chinese falls, English holds) and the run's plot (tools/plot_run.py).

    python -m cpt_ds.quickstart [--workdir quickstart_out] [--pretrain_steps 70] [--cpt_steps 50]
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


def cpt_corpora() -> dict[str, list[str]]:
    """The two languages of the continued-pretraining demo: {"en": documents, "zh": documents}.

    English: Python's reference manual. Chinese: the classics shipped in cpt_ds/assets plus the Chinese
    sample texts of CPython's codec tests where the install has them.
    """
    corpora = python_corpus_documents()
    chinese = [json.loads(line)["text"] for line in
               (Path(__file__).parent / "assets" / "zh_sample.jsonl").read_text(encoding="utf-8").splitlines()]
    chinese += [text for text in corpora.get("cjk_samples.jsonl", []) if not _mostly_kana(text)]
    return {"en": corpora["python_reference.jsonl"], "zh": chinese}


def _mostly_kana(text: str) -> bool:
    kana = sum(1 for char in text if "\u3040" <= char <= "\u30ff")
    return kana > 0.1 * len(text)


def write_split(folder: Path, name: str, documents: list[str], every: int = 10) -> tuple[Path, Path]:
    """Every ``every``-th document (by position, so the split is fixed) goes to the validation file."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{name}_train.jsonl", folder / f"{name}_valid.jsonl"
    for path, part in zip(paths, ([d for i, d in enumerate(documents) if i % every != every - 1],
                                  [d for i, d in enumerate(documents) if i % every == every - 1])):
        path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in part),
                        encoding="utf-8")
    return paths


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


def launch_training(run_config: dict, work: Path, name: str, *, master_port: int, num_ranks: int) -> int:
    config_path = work / f"{name}.json"
    config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    command = launcher_command(hostfile=work / "hostfile", master_port=master_port, num_ranks=num_ranks) + [
        str(REPO / "train.py"), "--config", str(config_path)]
    print(f"      {' '.join(command)}", flush=True)
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    from cpt_ds.distributed import remove_shm_buffers

    try:
        result = subprocess.run(command, env=env, cwd=REPO)
    finally:
        remove_shm_buffers(master_port)
    if result.returncode != 0:
        print(f"{name} failed (exit {result.returncode}); see the log above", file=sys.stderr)
    return result.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart_out", help="where corpora, token files and runs go")
    parser.add_argument("--pretrain_steps", type=int, default=70, help="steps of the English base model")
    parser.add_argument("--cpt_steps", type=int, default=50, help="steps of continued pretraining on the blend")
    parser.add_argument("--replay", type=float, default=0.25, help="share of English replay in the blend")
    parser.add_argument("--master_port", type=int, default=29555)
    args = parser.parse_args(argv)

    import torch

    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    corpora = cpt_corpora()
    print(f"[1/6] corpora from text shipped with Python and cpt-ds -> {work / 'corpus'}", flush=True)
    files = {}
    for language, documents in corpora.items():
        files[language] = write_split(work / "corpus", language, documents)
        print(f"      {language}: {len(documents):,} documents, {sum(map(len, documents)):,} characters "
              "(every 10th document held out)", flush=True)

    print("[2/6] training a 2,048-token LLaMA-3-shaped BPE tokenizer on both languages", flush=True)
    tokenizer = train_tokenizer([text for documents in corpora.values() for text in documents], work / "tokenizer",
                                vocab_size=2048)

    print("[3/6] packing four token files (tools/pack_corpus.py's packer)", flush=True)
    data = {}
    for language, (train_file, valid_file) in files.items():
        # Training prefixes data/zh and data/en name the blend's components "zh" and "en".
        for split, source, prefix in (("train", train_file, work / "data" / language),
                                      ("valid", valid_file, work / "data" / "valid" / language)):
            data[f"{language}_{split}"] = prefix
            summary = pack_corpus([source], tokenizer, prefix, PackOptions(), workers=1)
            print(f"      {language}_{split}: {summary.num_documents:,} documents, {summary.num_tokens:,} tokens",
                  flush=True)

    num_ranks = torch.cuda.device_count() or 2
    device_name, precision, ds_json = choose_precision()
    model_config = write_model_config(work / "model_config", vocab_size=2048)
    common = {
        "tokenizer_name_or_path": str(tokenizer), "full_finetuning": True, "block_size": 128,
        "deepspeed": str(ds_json), "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.05, "weight_decay": 0.01, "logging_steps": 25, "save_total_limit": 2, "seed": 1234,
    }
    print(f"[4/6] pretraining a tiny LLaMA-3-shaped base model on English ({args.pretrain_steps} steps, "
          f"{num_ranks} ranks, ZeRO-2 | device {device_name} | precision {precision} ({ds_json.relative_to(REPO)}))",
          flush=True)
    # The base run is not evaluated: the table's "before" is the continued-pretraining run's step-0 eval.
    base = {**common, "config_name": str(model_config), "data_path": [str(data["en_train"])], "learning_rate": 2e-3,
            "validation_split_percentage": 0, "max_steps": args.pretrain_steps, "output_dir": str(work / "base")}
    if launch_training(base, work, "base", master_port=args.master_port, num_ranks=num_ranks) != 0:
        return 1

    weights = [f"{1 - args.replay:g}", str(data["zh_train"]), f"{args.replay:g}", str(data["en_train"])]
    print(f"[5/6] continued pretraining on Chinese with {args.replay:.0%} English replay "
          f"(data_path {weights[0]} data/zh {weights[2]} data/en, {args.cpt_steps} steps)", flush=True)
    cpt = {**common, "model_name_or_path": str(work / "base" / "final"), "data_path": weights, "learning_rate": 1e-3,
           "eval_data_path": [f"zh={data['zh_valid']}", f"en={data['en_valid']}"],
           "max_steps": args.cpt_steps, "output_dir": str(work / "cpt")}
    if launch_training(cpt, work, "cpt", master_port=args.master_port, num_ranks=num_ranks) != 0:
        return 1

    before, after = read_evals(work / "cpt" / "metrics.jsonl")[0], read_evals(work / "cpt" / "metrics.jsonl")[-1]
    sys.path.insert(0, str(REPO / "tools"))
    from plot_run import plot_run

    plot_run(work / "cpt", work / "cpt" / "metrics.png")
    print(f"[6/6] held-out loss / perplexity per set before and after continued pretraining, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"      {'':18} {'zh loss':>8} {'zh ppl':>9} {'en loss':>8} {'en ppl':>9}")
    for label, record in (("before (base)", before), ("after CPT", after)):
        zh, en = record["sets"]["zh"], record["sets"]["en"]
        print(f"      {label:18} {zh['eval_loss']:8.4f} {zh['perplexity']:9.2f} {en['eval_loss']:8.4f} "
              f"{en['perplexity']:9.2f}")
    print(f"      model: {work / 'cpt' / 'final'}   metrics: {work / 'cpt' / 'metrics.jsonl'}   "
          f"plot: {work / 'cpt' / 'metrics.png'}")
    zh_before, zh_after = before["sets"]["zh"]["perplexity"], after["sets"]["zh"]["perplexity"]
    if not zh_after < zh_before / 2:
        print("continued pretraining did not learn Chinese: its perplexity fell less than 2x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
