"""The README's main job: continued pretraining end to end on a built-in default (CPU or GPU, minutes).

1. two small real-text corpora shipped with Python and cpt-ds: English (Python's reference manual)
   and Chinese (classics), every 10th document held out;
2. a small LLaMA-3-shaped byte-level BPE tokenizer trained on both;
3. tools/pack_corpus.py's packer -> four token files (train / valid per language);
4. a tiny LLaMA-3-shaped base model (GQA, SwiGLU, RoPE theta 500k) pretrained briefly on English,
   with ZeRO-2 on 2 ranks through the deepspeed launcher and a hostfile;
5. continued pretraining of that model on Chinese with a replay share of English through a blend
   (data_path 0.75 zh 0.25 en), evaluated per set (zh, en) before, during and after;
6. the per-set table (Chinese falls, English holds) and each run's plot (tools/plot_run.py).

    python tools/quickstart.py [--workdir quickstart_out] [--pretrain_steps 70] [--cpt_steps 50]

The workdir is made afresh on every run, and deleted first only when an earlier quick start made it
(it holds the marker file .cpt_ds_quickstart): any other non-empty folder is refused, never deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from cpt_ds.cli import UsageError, add_debug_flag, run_tool  # noqa: E402
from cpt_ds.launch import local_command  # noqa: E402
from cpt_ds.toy import TINY_LLAMA3, choose_precision, cpt_corpora, held_out_split, write_jsonl_texts  # noqa: E402

MARKER = ".cpt_ds_quickstart"
"""Written into the workdir the quick start makes: only a folder holding it is ever deleted."""
VOCAB_SIZE = 2048
LOGGING_STEPS = 5
"""A training point every 5 steps: a curve, not two dots."""
NUM_EVALS = 5
"""At least this many evaluations per run (step 0 and the end included)."""
BASE_EVAL_SAMPLES = 32
"""The base run's English eval is only for its curve: a few windows keep it cheap."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quickstart_out",
                        help="where corpora, token files and runs go (new, empty, or made by an earlier quick start)")
    parser.add_argument("--pretrain_steps", type=int, default=70, help="steps of the English base model")
    parser.add_argument("--cpt_steps", type=int, default=50, help="steps of continued pretraining on the blend")
    parser.add_argument("--replay", type=float, default=0.25, help="share of English replay in the blend")
    parser.add_argument("--master_port", type=int, default=29555)
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if min(args.pretrain_steps, args.cpt_steps) < 1:
        parser.error("--pretrain_steps and --cpt_steps must be positive")
    return args


def prepare_workdir(work: Path) -> None:
    """Make ``work`` afresh; an existing one is deleted only when it holds the quick start's marker."""
    if work.exists() and not work.is_dir():
        raise UsageError(f"--workdir {work} is a file; pass a folder that does not exist yet")
    if (work / MARKER).is_file():
        shutil.rmtree(work)
    elif work.exists() and any(work.iterdir()):
        raise UsageError(f"--workdir {work} is not empty and was not made by the quick start, so it is left "
                         "untouched; pass a new or empty folder (e.g. --workdir quickstart_out)")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("made by tools/quickstart.py: a rerun deletes and remakes this folder\n")


def prepare_data(work: Path) -> tuple[Path, dict[str, Path]]:
    """Steps 1-3: corpora, tokenizer, token files; returns (tokenizer folder, {"en_train": prefix, ...})."""
    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    corpora = cpt_corpora()
    print(f"[1/6] corpora from text shipped with Python and cpt-ds -> {work / 'corpus'}", flush=True)
    files = {}
    for language, documents in corpora.items():
        train, valid = held_out_split(documents, every=10, offset=9)
        files[language] = (write_jsonl_texts(work / "corpus" / f"{language}_train.jsonl", train),
                           write_jsonl_texts(work / "corpus" / f"{language}_valid.jsonl", valid))
        print(f"      {language}: {len(documents):,} documents, {sum(map(len, documents)):,} characters "
              "(every 10th document held out)", flush=True)

    print(f"[2/6] training a {VOCAB_SIZE:,}-token LLaMA-3-shaped BPE tokenizer on both languages", flush=True)
    tokenizer = train_tokenizer([text for documents in corpora.values() for text in documents], work / "tokenizer",
                                vocab_size=VOCAB_SIZE)

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
    return tokenizer, data


def eval_steps_for(max_steps: int) -> int:
    """Every ``max_steps // NUM_EVALS`` steps: with the step-0 and the final eval, at least NUM_EVALS + 1."""
    return max(1, max_steps // NUM_EVALS)


def run_configs(args: argparse.Namespace, work: Path, tokenizer: Path, data: dict[str, Path],
                ds_json: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The base run (English) and the continued-pretraining run (the zh/en blend)."""
    model_config = work / "model_config"
    model_config.mkdir(parents=True, exist_ok=True)
    (model_config / "config.json").write_text(json.dumps({**TINY_LLAMA3, "vocab_size": VOCAB_SIZE}, indent=2) + "\n")
    common = {
        "tokenizer_name_or_path": str(tokenizer), "full_finetuning": True, "block_size": 128,
        "deepspeed": str(ds_json), "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.05, "weight_decay": 0.01, "logging_steps": LOGGING_STEPS, "save_total_limit": 2,
        "seed": 1234,
    }
    # The base run's eval draws its curve; the table's "before" is the continued-pretraining run's step-0 eval.
    base = {**common, "config_name": str(model_config), "data_path": [str(data["en_train"])], "learning_rate": 2e-3,
            "eval_data_path": [f"en={data['en_valid']}"], "max_eval_samples": BASE_EVAL_SAMPLES,
            "max_steps": args.pretrain_steps, "eval_steps": eval_steps_for(args.pretrain_steps),
            "output_dir": str(work / "base")}
    weights = [f"{1 - args.replay:g}", str(data["zh_train"]), f"{args.replay:g}", str(data["en_train"])]
    cpt = {**common, "model_name_or_path": str(work / "base" / "final"), "data_path": weights, "learning_rate": 1e-3,
           "eval_data_path": [f"zh={data['zh_valid']}", f"en={data['en_valid']}"],
           "max_steps": args.cpt_steps, "eval_steps": eval_steps_for(args.cpt_steps), "output_dir": str(work / "cpt")}
    return base, cpt


def launch_training(run_config: dict[str, Any], work: Path, name: str, *, master_port: int, num_ranks: int) -> int:
    from cpt_ds.distributed import remove_shm_buffers

    config_path = work / f"{name}.json"
    config_path.write_text(json.dumps(run_config, indent=2) + "\n")
    command = local_command(REPO / "train.py", ["--config", str(config_path)], num_ranks=num_ranks,
                            master_port=master_port, folder=work)
    print(f"      {' '.join(command)}", flush=True)
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    try:
        result = subprocess.run(command, env=env, cwd=REPO)
    finally:
        remove_shm_buffers(master_port)
    if result.returncode != 0:
        print(f"{name} failed (exit {result.returncode}); see the log above", file=sys.stderr)
    return result.returncode


def read_evals(metrics: Path) -> list[dict[str, Any]]:
    return [record for line in metrics.read_text().splitlines() if "eval_loss" in (record := json.loads(line))]


def report(work: Path, started: float) -> int:
    """Step 6: the plots and the before/after table; 1 when Chinese was not learned."""
    from plot_run import plot_run  # tools/plot_run.py, next to this file

    for run in ("base", "cpt"):
        plot_run(work / run, work / run / "metrics.png")
    evals = read_evals(work / "cpt" / "metrics.jsonl")
    before, after = evals[0], evals[-1]
    print(f"[6/6] held-out loss / perplexity per set before and after continued pretraining, "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"      {'':18} {'zh loss':>8} {'zh ppl':>9} {'en loss':>8} {'en ppl':>9}")
    for label, record in (("before (base)", before), ("after CPT", after)):
        zh, en = record["sets"]["zh"], record["sets"]["en"]
        print(f"      {label:18} {zh['eval_loss']:8.4f} {zh['perplexity']:9.2f} {en['eval_loss']:8.4f} "
              f"{en['perplexity']:9.2f}")
    print(f"      model: {work / 'cpt' / 'final'}   metrics: {work / 'cpt' / 'metrics.jsonl'}   "
          f"plots: {work / 'cpt' / 'metrics.png'}, {work / 'base' / 'metrics.png'}")
    if not after["sets"]["zh"]["perplexity"] < before["sets"]["zh"]["perplexity"] / 2:
        print("continued pretraining did not learn Chinese: its perplexity fell less than 2x", file=sys.stderr)
        return 1
    return 0


def quickstart(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    work = Path(args.workdir).resolve()
    prepare_workdir(work)  # before any import that takes seconds: a refusal is immediate
    import torch

    tokenizer, data = prepare_data(work)
    num_ranks = torch.cuda.device_count() or 2
    device_name, precision, ds_name = choose_precision()
    ds_json = REPO / "ds_configs" / ds_name
    base, cpt = run_configs(args, work, tokenizer, data, ds_json)
    print(f"[4/6] pretraining a tiny LLaMA-3-shaped base model on English ({args.pretrain_steps} steps, "
          f"{num_ranks} ranks, ZeRO-2 | device {device_name} | precision {precision} ({ds_json.relative_to(REPO)}))",
          flush=True)
    if launch_training(base, work, "base", master_port=args.master_port, num_ranks=num_ranks) != 0:
        return 1
    weights = cpt["data_path"]
    print(f"[5/6] continued pretraining on Chinese with {args.replay:.0%} English replay "
          f"(data_path {weights[0]} data/zh {weights[2]} data/en, {args.cpt_steps} steps)", flush=True)
    if launch_training(cpt, work, "cpt", master_port=args.master_port, num_ranks=num_ranks) != 0:
        return 1
    return report(work, started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: quickstart(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
