"""Sequence parallelism (Ulysses): 2 ranks sharing each sample compute what 1 rank computes alone.

Packed windows of many short documents, whose boundaries fall inside each half and across the cut
between the two ranks' halves: per-step training losses, per-corpus sums, per-set eval losses and
the gradients of one step agree with sequence_parallel_size 1 on one rank (same global batch) within
1e-5 relative in fp32; a checkpoint moves between the two layouts with its data position kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DRIVERS, REPO, eval_records, launch, lora_config, metrics, run_config, train, write_config
from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.toy import python_corpus_texts

BLOCK = 64


@pytest.fixture(scope="module")
def short_documents(assets, tmp_path_factory) -> Path:
    """A token file of documents of 2 to 8 words (a few to ~40 tokens): every 64-token window holds
    several, so boundaries fall in both halves and documents cross the cut at token 32."""
    from cpt_ds.pack.packing import PackOptions, pack_corpus

    words = " ".join(python_corpus_texts()[:40]).split()
    lengths = np.random.default_rng(3).integers(2, 9, size=len(words))
    documents, start = [], 0
    for length in lengths:
        if start >= len(words):
            break
        documents.append(" ".join(words[start:start + length]))
        start += length
    root = tmp_path_factory.mktemp("short_documents")
    source = root / "short.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
    pack_corpus([source], assets.tokenizer, root / "short", PackOptions(), workers=1)
    return root / "short"


def sp_config(make, assets, short_documents: Path, out: Path, **overrides):
    """A blend of short documents and the manual, two named eval sets, eval and save every 2 steps."""
    config = make(assets, out, data_path=["0.6", str(short_documents), "0.4", str(assets.corpus)],
                  eval_data_path=[f"short={short_documents}", f"manual={assets.corpus_b}"], max_eval_samples=6,
                  block_size=BLOCK, max_steps=4, eval_steps=2, save_steps=2, deepspeed=str(assets.ds["zero2_ga2"]),
                  per_device_eval_batch_size=3)  # eval shards of another batch size than training's
    config.pop("validation_split_percentage")
    config.update(overrides)
    return config


def assert_same_run(sp2: Path, sp1: Path) -> None:
    """Training losses, per-corpus sums and per-set eval losses of two runs agree within 1e-5 relative."""
    train_2, train_1 = [r for r in metrics(sp2) if "loss" in r], [r for r in metrics(sp1) if "loss" in r]
    assert [r["step"] for r in train_2] == [r["step"] for r in train_1] == [1, 2, 3, 4]
    for a, b in zip(train_2, train_1, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["corpora"].keys() == b["corpora"].keys() and len(a["corpora"]) == 2
        for name in a["corpora"]:
            assert a["corpora"][name]["tokens"] == b["corpora"][name]["tokens"]
            assert a["corpora"][name]["loss"] == pytest.approx(b["corpora"][name]["loss"], rel=1e-5)
    eval_2, eval_1 = eval_records(sp2), eval_records(sp1)
    assert [r["step"] for r in eval_2] == [r["step"] for r in eval_1] == [0, 2, 4]
    for a, b in zip(eval_2, eval_1, strict=True):
        assert sorted(a["sets"]) == ["manual", "short"]
        for name in a["sets"]:
            assert a["sets"][name]["eval_tokens"] == b["sets"][name]["eval_tokens"]
            assert a["sets"][name]["eval_loss"] == pytest.approx(b["sets"][name]["eval_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def zero2_runs(assets, short_documents, tmp_path_factory) -> dict[str, Path]:
    """ZeRO-2 full finetuning: sequence_parallel_size 2 on 2 ranks and 1 on 1 rank, same global batch."""
    root = tmp_path_factory.mktemp("sp_zero2")
    runs = {"sp2": root / "sp2" / "out", "sp1": root / "sp1" / "out"}
    done = train(sp_config(run_config, assets, short_documents, runs["sp2"], sequence_parallel_size=2,
                           export_final=True), workdir=root / "sp2").check()
    assert "sequence parallel 2 (32 tokens of each sample per rank)" in done.output
    assert "attention cpt_ulysses" in done.output
    train(sp_config(run_config, assets, short_documents, runs["sp1"]), workdir=root / "sp1", ranks=1).check()
    return runs


def test_windows_cross_the_cut_between_the_two_halves(assets, short_documents):
    """The data the exactness tests rely on: documents start in both halves and cross the cut."""
    from cpt_ds.data.windows import PackedSamples, TokenStream
    from cpt_ds.token_file import IndexedTokenFile

    samples = PackedSamples(TokenStream.whole([IndexedTokenFile(str(short_documents))]), BLOCK)
    both_halves = crossing = 0
    for index in range(len(samples)):
        starts = np.flatnonzero(samples[index]["position_ids"] == 0)
        both_halves += int(((starts > 0) & (starts < BLOCK // 2)).any() and (starts >= BLOCK // 2).any())
        crossing += int(samples[index]["position_ids"][BLOCK // 2] != 0)
    assert both_halves > 0.8 * len(samples) and crossing > 0.5 * len(samples), (both_halves, crossing, len(samples))


def test_sequence_parallel_matches_one_rank_zero2_full(zero2_runs):
    assert_same_run(zero2_runs["sp2"], zero2_runs["sp1"])


def test_sequence_parallel_matches_one_rank_zero3_lora_checkpointing(assets, short_documents, tmp_path):
    """ZeRO-3 partitions, LoRA adapters with trained embeddings and head, recomputed activations (no
    dropout: its random masks are drawn per rank, so they differ between the layouts by design)."""
    runs = {}
    for name, sp_size, ranks in (("sp2", 2, 2), ("sp1", 1, 1)):
        runs[name] = tmp_path / name / "out"
        config = sp_config(lora_config, assets, short_documents, runs[name], sequence_parallel_size=sp_size,
                           deepspeed=str(assets.ds["zero3_ga2"]), gradient_checkpointing=True, lora_dropout=0.0)
        train(config, workdir=tmp_path / name, ranks=ranks).check()
    assert_same_run(runs["sp2"], runs["sp1"])


def test_qlora_matches_one_rank(assets, short_documents, tmp_path):
    """4-bit base weights (bitsandbytes) under the Ulysses all-to-all: the adapters train the same."""
    runs = {}
    for name, sp_size, ranks in (("sp2", 2, 2), ("sp1", 1, 1)):
        runs[name] = tmp_path / name / "out"
        config = sp_config(lora_config, assets, short_documents, runs[name], sequence_parallel_size=sp_size,
                           load_in_kbits=4, lora_dropout=0.0)
        train(config, workdir=tmp_path / name, ranks=ranks).check()
    assert_same_run(runs["sp2"], runs["sp1"])


@pytest.mark.parametrize("document_attention", [True, False], ids=["documents", "whole-window"])
def test_gradients_of_one_step_match_one_rank(assets, short_documents, tmp_path, document_attention):
    """Also with attention across documents: the shard's positions then continue the window's count."""
    reports = {}
    for name, sp_size, ranks in (("sp2", 2, 2), ("sp1", 1, 1)):
        reports[name] = tmp_path / f"{name}.pt"
        config = sp_config(run_config, assets, short_documents, tmp_path / name / "out", sequence_parallel_size=sp_size,
                           document_attention=document_attention)
        path = write_config(config, tmp_path / name / "run.json")
        launch(["--config", str(path), "--report", str(reports[name])], workdir=tmp_path / name, ranks=ranks,
               script=DRIVERS / "sp_gradients.py").check()
    sp2, sp1 = (torch.load(reports[name]) for name in ("sp2", "sp1"))
    assert torch.equal(sp2["sums"][:, 2], sp1["sums"][:, 2])  # every label counted once
    assert sp2["gradients"].keys() == sp1["gradients"].keys() and len(sp1["gradients"]) == 2 + 2 * 9 + 1
    for name, expected in sp1["gradients"].items():
        scale = float(expected.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(sp2["gradients"][name], expected, rtol=1e-5, atol=1e-6 * scale, msg=name)


def test_evaluate_splits_long_samples_like_training(assets, short_documents, zero2_runs, tmp_path):
    """tools/evaluate.py with --sequence_parallel_size 2 on 2 ranks reproduces the run's last eval per set."""
    result = tmp_path / "eval.json"
    launch(["--model", str(zero2_runs["sp2"] / "final"), "--data", f"short={short_documents}", "--data",
            f"manual={assets.corpus_b}", "--block_size", str(BLOCK), "--max_samples", "6", "--batch_size", "2",
            "--sequence_parallel_size", "2", "--output", str(result)], workdir=tmp_path, ranks=2,
           script=REPO / "tools" / "evaluate.py").check()
    found, last = json.loads(result.read_text()), eval_records(zero2_runs["sp2"])[-1]
    assert (found["ranks"], found["sequence_parallel_size"]) == (2, 2)
    for name in ("short", "manual"):
        assert found["sets"][name]["eval_tokens"] == last["sets"][name]["eval_tokens"]
        assert found["sets"][name]["eval_loss"] == pytest.approx(last["sets"][name]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("source, target", [("sp2", "sp1"), ("sp1", "sp2")])
def test_a_checkpoint_moves_between_layouts_keeping_the_data_position(assets, short_documents, zero2_runs, tmp_path,
                                                                      source, target):
    """Step 2 of one layout's run continues in the other (2 ranks <-> 1 rank: DeepSpeed's universal
    checkpoint) and ends where the uninterrupted run of the other layout ends."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(zero2_runs[source] / "step-00000002", out / "step-00000002")
    shutil.copy(zero2_runs[source] / "metrics.jsonl", out / "metrics.jsonl")
    sp_size, ranks = (2, 2) if target == "sp2" else (1, 1)
    resumed = train(sp_config(run_config, assets, short_documents, out, sequence_parallel_size=sp_size),
                    workdir=tmp_path, ranks=ranks).check()
    assert "resumed at step 2, consumed_samples 8" in resumed.output
    assert f"trained with sequence_parallel_size {3 - sp_size}, this run uses {sp_size}" in resumed.output
    assert_same_run(out, zero2_runs[target])


# --------------------------------------------------------------------------------------------------
# Refusals (preflight, in-process: the checks read only small files)
# --------------------------------------------------------------------------------------------------


def preflight_problems(config: dict, world_size: int) -> str:
    from cpt_ds.preflight import preflight

    with pytest.raises(ConfigError) as error:
        preflight(RunConfig.from_flat(config), world_size=world_size)
    return str(error.value)


def test_sequence_parallel_refusals_name_the_field_and_the_fix(assets, tmp_path):
    config = run_config(assets, tmp_path / "out", sequence_parallel_size=3, block_size=32)
    message = preflight_problems(config, world_size=4)
    assert "sequence_parallel_size 3 does not divide the world size 4; launch a multiple of 3 ranks" in message
    assert "block_size 32 is not divisible by sequence_parallel_size 3" in message
    assert "sequence_parallel_size 3 does not divide the model's num_attention_heads 4" in message
    assert "sequence_parallel_size 3 and the model's num_key_value_heads 2 must divide one another" in message

    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 512, "n_positions": 128,
                                                   "n_embd": 64, "n_layer": 2, "n_head": 4}))
    config = run_config(assets, tmp_path / "out", sequence_parallel_size=2, config_name=str(other))
    assert "model_type gpt2 has no supported sequence-parallel attention path (supported: llama, mistral, qwen2, " \
           "qwen3); set sequence_parallel_size 1" in preflight_problems(config, world_size=2)
    assert "sequence_parallel_size must be >= 1" in preflight_problems(
        run_config(assets, tmp_path / "out", sequence_parallel_size=0), world_size=2)
