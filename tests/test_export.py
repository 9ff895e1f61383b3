"""Checkpoint -> Hugging Face export, and tools/evaluate.py.

Each run trains on 2 ranks with a separate validation token file, exports output_dir/final, and
saves the live engine's logits on a fixed batch. The export must load strictly, reproduce those
logits, and tools/evaluate.py on it must reproduce the run's last eval_loss.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DRIVERS, REPO, eval_records, launch, launch_env, lora_config, run_config, write_config

RUNS = {
    "zero2-full": lambda assets, out: run_config(assets, out),
    "zero3-full": lambda assets, out: run_config(assets, out, deepspeed=str(assets.ds["zero3"])),
    "zero2-lora": lambda assets, out: lora_config(assets, out),
    "zero3-lora": lambda assets, out: lora_config(assets, out, deepspeed=str(assets.ds["zero3"])),
    "qlora-4bit": lambda assets, out: lora_config(assets, out, load_in_kbits=4, modules_to_save=None),
}


@pytest.fixture(scope="module")
def exported_runs(assets, tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for name, make in RUNS.items():
        work = tmp_path_factory.mktemp(f"export-{name}")
        config = make(assets, work / "out")
        config.update(max_steps=4, export_final=True, eval_data_path=[str(assets.corpus_b)],
                      validation_split_percentage=0.0)
        if not config["full_finetuning"]:
            config["lora_dropout"] = 0.0
        path = write_config(config, work / "run.json")
        launch(["--config", str(path), "--report", str(work / "report.json")], workdir=work,
               script=DRIVERS / "inspect_run.py").check()
        runs[name] = work
    return runs


def tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *args], cwd=REPO, env=launch_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


@pytest.mark.parametrize("name", ["zero2-full", "zero3-full"])
def test_full_export_loads_strictly_and_matches_the_engine(exported_runs, name):
    from transformers import AutoModelForCausalLM

    work = exported_runs[name]
    final = work / "out" / "final"
    model, info = AutoModelForCausalLM.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    engine = torch.load(work / "report.logits.pt")
    assert torch.allclose(logits_of(model, engine["input_ids"]), engine["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["zero2-lora", "zero3-lora"])
def test_lora_export_is_an_adapter_that_matches_the_engine_and_merges(exported_runs, name, tmp_path):
    from cpt_ds.export import load_exported_model

    work = exported_runs[name]
    final = work / "out" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    adapter = load_exported_model(final)
    engine = torch.load(work / "report.logits.pt")
    adapter_logits = logits_of(adapter, engine["input_ids"])
    assert torch.allclose(adapter_logits, engine["logits"], atol=1e-5, rtol=0)

    merged_dir = tmp_path / "merged"
    done = tool("export_hf", "--checkpoint", str(work / "out"), "--output", str(merged_dir), "--merge_lora")
    assert done.returncode == 0, done.stdout
    from transformers import AutoModelForCausalLM

    merged, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.allclose(logits_of(merged, engine["input_ids"]), adapter_logits, atol=1e-4, rtol=0)


def test_qlora_export_is_an_adapter_for_the_full_precision_base(exported_runs):
    from cpt_ds.export import load_exported_model

    final = exported_runs["qlora-4bit"] / "out" / "final"
    adapter = load_exported_model(final)
    trained = {n: p for n, p in adapter.named_parameters() if "lora_B" in n}
    assert trained and all(p.abs().sum() > 0 for p in trained.values())  # the adapter really learned
    engine = torch.load(exported_runs["qlora-4bit"] / "report.logits.pt")
    # The engine computed through 4-bit weights; the export applies the adapter to the full-precision
    # base, so the two differ by the quantization error only.
    difference = (logits_of(adapter, engine["input_ids"]) - engine["logits"]).abs().mean()
    assert difference < 0.05, difference


@pytest.mark.parametrize("name", ["zero2-full", "zero3-lora"])
def test_evaluate_reproduces_the_runs_last_eval_loss(assets, exported_runs, name, tmp_path):
    work = exported_runs[name]
    last = eval_records(work / "out")[-1]
    result_file = tmp_path / "eval.json"
    done = tool("evaluate", "--model", str(work / "out" / "final"), "--data", str(assets.corpus_b),
                "--block_size", "32", "--max_samples", "16", "--batch_size", "4", "--output", str(result_file))
    assert done.returncode == 0, done.stdout
    result = json.loads(result_file.read_text())
    assert result["eval_tokens"] == last["eval_tokens"]
    assert result["eval_loss"] == pytest.approx(last["eval_loss"], abs=1e-6)
    assert result["eval_accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)


def test_evaluate_on_two_ranks_equals_one_process_per_set(assets, exported_runs, tmp_path):
    final = exported_runs["zero2-full"] / "out" / "final"
    args = ["--model", str(final), "--data", str(assets.corpus), "--data", f"other={assets.corpus_b}",
            "--block_size", "32", "--max_samples", "21", "--batch_size", "2"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    single = launch([*args, "--output", str(one)], workdir=tmp_path, ranks=1, script=REPO / "tools" / "evaluate.py").check()
    launch([*args, "--output", str(two)], workdir=tmp_path, ranks=2, script=REPO / "tools" / "evaluate.py").check()
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["ranks"], b["ranks"]) == (1, 2)
    assert list(a["sets"]) == ["corpus", "other"] and a["sets"]["corpus"]["samples"] == 21
    assert a["sets"] == b["sets"]
    assert (a["eval_loss"], a["eval_accuracy"], a["eval_tokens"]) == (b["eval_loss"], b["eval_accuracy"], b["eval_tokens"])
    # The total is the token-weighted mean of the sets, and each set has one row in the printed table.
    sets = a["sets"].values()
    assert a["eval_tokens"] == sum(s["eval_tokens"] for s in sets)
    assert a["eval_loss"] == pytest.approx(sum(s["eval_loss"] * s["eval_tokens"] for s in sets) / a["eval_tokens"],
                                           rel=1e-12)
    for name in ("corpus", "other", "total"):
        assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d,]+$", single.output, re.M), single.output[-2000:]


def test_export_refuses_incomplete_checkpoints_and_existing_outputs(exported_runs, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(exported_runs["zero2-full"] / "out", out)
    checkpoint = out / "step-00000004"
    done = tool("export_hf", "--checkpoint", str(checkpoint), "--output", str(out / "final"))
    assert done.returncode == 2 and "already exists" in done.stdout, done.stdout
    (checkpoint / "cpt_ds_complete.json").unlink()
    done = tool("export_hf", "--checkpoint", str(checkpoint), "--output", str(tmp_path / "x"))
    assert done.returncode == 2 and "is incomplete" in done.stdout, done.stdout
    assert not (tmp_path / "x").exists()
