"""Crash-safe checkpoints and exact resume (../shared/docs/RELIABILITY.md), 2 gloo ranks on CPU fp32.

The reference is an uninterrupted run; every interrupted variant must reproduce its per-step losses,
learning rates, eval losses and final weights bit for bit (or, across a world-size change, to float
rounding with the data position exactly preserved).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers_runs import assert_same_curve_to_float_rounding, change_world_size
from conftest import (
    DRIVERS,
    Background,
    eval_records,
    launch,
    lora_config,
    metrics,
    run_config,
    train,
    write_config,
)

STEPS = 8
# 36 training samples at 8 per step: epoch 1 ends inside step 5, after the resume point 4.
EPOCH_SAMPLES = 36


def curve(output_dir: Path) -> list[tuple]:
    """Every logged (step, loss, lr) and (step, eval_loss, accuracy) in order."""
    return [(r["step"], r["loss"], r["lr"]) if "loss" in r else (r["step"], r["eval_loss"], r["eval_accuracy"])
            for r in metrics(output_dir)]


def final_weights(output_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    from cpt_ds.export import checkpoint_meta, trained_state_dict

    checkpoint = output_dir / f"step-{step:08d}"
    return trained_state_dict(checkpoint, exclude_frozen=checkpoint_meta(checkpoint)["is_peft"])


def assert_same_run(reference: Path, resumed: Path) -> None:
    assert curve(resumed) == curve(reference)
    ours, theirs = final_weights(resumed), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


MODES = {
    "zero2-full": lambda assets, out: run_config(assets, out, config_overrides="attention_dropout=0.1"),
    "zero3-full": lambda assets, out: run_config(assets, out, config_overrides="attention_dropout=0.1",
                                                 deepspeed=str(assets.ds["zero3"])),
    "zero2-lora": lambda assets, out: lora_config(assets, out),  # lora_dropout 0.1
    "zero2-qlora4": lambda assets, out: lora_config(assets, out, load_in_kbits=4, modules_to_save=None),
}


def mode_config(assets, mode: str, out: Path, **overrides) -> dict:
    config = MODES[mode](assets, out)
    config.update(max_steps=STEPS, max_train_samples=EPOCH_SAMPLES, eval_steps=4)
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def reference_runs(assets, tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted run per mode, shared by the tests below."""
    runs = {}
    for mode in MODES:
        work = tmp_path_factory.mktemp(f"reference-{mode}")
        train(mode_config(assets, mode, work / "out"), workdir=work).check()
        runs[mode] = work / "out"
    return runs


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_is_bitwise_identical_across_an_epoch_boundary(assets, tmp_path, reference_runs, mode):
    out = tmp_path / "out"
    config = mode_config(assets, mode, out)
    first = train({**config, "stop_at_step": STEPS // 2}, workdir=tmp_path).check()
    assert "stopped at step 4 of 8" in first.output
    assert not (out / f"step-{STEPS:08d}").exists()
    second = train(config, workdir=tmp_path).check()
    assert "resumed at step 4, consumed_samples 32" in second.output
    assert_same_run(reference_runs[mode], out)
    # The resumed half crossed the epoch boundary: 64 samples consumed of 36 per epoch.
    assert [r["consumed_samples"] for r in metrics(out) if "loss" in r][-1] == STEPS * 8


def test_lr_after_resume_equals_the_uninterrupted_lr(assets, tmp_path, reference_runs):
    """Stopped at step 3 (inside the decay, after warmup) and relaunched: every step logs the lr of the
    uninterrupted run, which is the pure schedule ``lr_at(step - 1)``; lr is a function of the global
    step, never of the steps since this launch."""
    from cpt_ds.config import OptimConfig
    from cpt_ds.optim import lr_at, warmup_steps_for

    out = tmp_path / "out"
    config = mode_config(assets, "zero2-full", out)
    train({**config, "stop_at_step": 3}, workdir=tmp_path).check()
    resumed = train(config, workdir=tmp_path).check()
    assert "resumed at step 3" in resumed.output, resumed.output[-3000:]
    logged = [(r["step"], r["lr"]) for r in metrics(out) if "lr" in r]
    reference = [(r["step"], r["lr"]) for r in metrics(reference_runs["zero2-full"]) if "lr" in r]
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=1)
    expected = [(step, lr_at(step - 1, optim, total_steps=STEPS, warmup_steps=warmup_steps_for(optim, STEPS)))
                for step in range(1, STEPS + 1)]
    assert logged == reference == expected


def test_kill_during_training_resumes_from_last_complete_checkpoint(assets, tmp_path, reference_runs):
    out = tmp_path / "out"
    path = write_config(mode_config(assets, "zero2-full", out, save_steps=2), tmp_path / "run.json")
    job = Background(["--config", str(path)], workdir=tmp_path)
    job.wait_for(lambda: (out / "step-00000004" / "cpt_ds_complete.json").is_file())
    job.kill()
    assert not (out / f"step-{STEPS:08d}").exists()
    relaunch = launch(["--config", str(path)], workdir=tmp_path).check()
    assert "resuming from" in relaunch.output
    assert curve(out) == curve(reference_runs["zero2-full"])
    reference = final_weights(reference_runs["zero2-full"])
    assert all(torch.equal(tensor, reference[name]) for name, tensor in final_weights(out).items())


def test_kill_during_save_ignores_the_partial_checkpoint(assets, tmp_path, reference_runs):
    out = tmp_path / "out"
    # The fault-injection switch holds every save open for 2 s after the shards, before the marker.
    config = mode_config(assets, "zero2-full", out, save_steps=2, save_fault_delay_seconds=2.0)
    path = write_config(config, tmp_path / "run.json")
    partial = out / "step-00000004"
    job = Background(["--config", str(path)], workdir=tmp_path)
    job.wait_for(lambda: (partial / "rng_state_1.pt").is_file())
    job.kill()
    assert not (partial / "cpt_ds_complete.json").exists()
    assert (out / "latest").read_text() == "step-00000002"

    relaunch = launch(["--config", str(path)], workdir=tmp_path).check()
    assert f"resuming from {out / 'step-00000002'}" in relaunch.output
    assert "removing incomplete checkpoint" in relaunch.output
    assert (partial / "cpt_ds_complete.json").is_file()
    assert curve(out) == curve(reference_runs["zero2-full"])


def test_explicit_resume_target_missing_or_incomplete_is_fatal(assets, tmp_path, reference_runs):
    source = reference_runs["zero2-full"]
    out = tmp_path / "out"
    shutil.copytree(source, out)
    incomplete = out / f"step-{STEPS:08d}"
    (incomplete / "cpt_ds_complete.json").unlink()
    config = mode_config(assets, "zero2-full", out, max_steps=10)
    for target, message in ((out / "step-00000099", "does not exist"), (incomplete, "is incomplete")):
        result = train({**config, "resume_from_checkpoint": str(target)}, workdir=tmp_path, ranks=1)
        assert result.returncode == 2, result.output
        assert message in result.output and str(target) in result.output


def test_auto_resume_from_an_empty_folder_starts_fresh(assets, tmp_path):
    out = tmp_path / "out"
    result = train(run_config(assets, out, max_steps=1, validation_split_percentage=0.0), workdir=tmp_path).check()
    assert f"no complete checkpoint in {out}: starting fresh" in result.output


def test_save_total_limit_keeps_the_newest_complete_checkpoints(assets, tmp_path):
    out = tmp_path / "out"
    train(run_config(assets, out, max_steps=5, save_steps=1, save_total_limit=2), workdir=tmp_path).check()
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000004", "step-00000005"]
    assert (out / "latest").read_text() == "step-00000005"


@pytest.mark.parametrize("change", ["token files", "tokenizer", "model shape"])
def test_resume_refuses_changed_data_tokenizer_or_model(assets, tmp_path, reference_runs, change):
    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    out = tmp_path / "out"
    shutil.copytree(reference_runs["zero2-full"], out)
    config = mode_config(assets, "zero2-full", out, max_steps=10)
    if change == "token files":
        config["data_path"] = [str(assets.corpus_b)]
        expected = f"{assets.corpus_b}: added"
    elif change == "tokenizer":
        texts = [json.loads(line)["text"] for line in (assets.root / "text" / "corpus.jsonl").read_text().splitlines()]
        other = train_tokenizer(texts[::-1][:200], tmp_path / "tokenizer2", vocab_size=512)
        pack_corpus([assets.root / "text" / "corpus.jsonl"], other, tmp_path / "data2", PackOptions(), workers=1)
        config.update(tokenizer_name_or_path=str(other), data_path=[str(tmp_path / "data2")])
        expected = "tokenizer (fingerprint"
    else:
        config["config_overrides"] = "attention_dropout=0.1,num_hidden_layers=3"
        expected = "model shape (num_hidden_layers 2 -> 3)"
    result = train(config, workdir=tmp_path, ranks=1)
    assert result.returncode == 2, result.output[-3000:]
    assert "changed since it was saved" in result.output and expected in result.output, result.output[-3000:]


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_shard_is_named(assets, tmp_path, reference_runs, damage):
    out = tmp_path / "out"
    shutil.copytree(reference_runs["zero2-full"], out)
    shard = out / f"step-{STEPS:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        expected = "truncated or replaced"
    else:
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "(corrupted)"
    result = train(mode_config(assets, "zero2-full", out, max_steps=10), workdir=tmp_path)
    assert result.returncode == 2, result.output[-3000:]
    assert str(shard) in result.output and expected in result.output, result.output[-3000:]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_world_size_change_continues_the_data_position(assets, tmp_path, stage):
    """2 ranks x 2 micro-batches -> 1 rank x 4 micro-batches keeps the global batch (and so the curve)."""
    base = dict(deepspeed=str(assets.ds[f"{stage}_ga2"]), max_steps=STEPS, eval_steps=4,
                max_train_samples=EPOCH_SAMPLES)
    # One world-size change goes through the real launcher: the 1-rank process starts fresh.
    reference, out, _ = change_world_size(run_config, assets, tmp_path, launcher=stage == "zero2", **base)
    ours, theirs = metrics(out), metrics(reference)
    assert [r["consumed_samples"] for r in ours if "loss" in r] == [r["consumed_samples"] for r in theirs if "loss" in r]
    assert_same_curve_to_float_rounding(out, reference)

    # And back: the 1-rank checkpoint continues on 2 ranks.
    back = train(run_config(assets, out, **{**base, "max_steps": STEPS + 2}), workdir=tmp_path / "b").check()
    assert "saved by 1 ranks, this run has 2" in back.output and f"resumed at step {STEPS}" in back.output
    assert [r["consumed_samples"] for r in metrics(out) if "loss" in r][-2:] == [72, 80]


@pytest.mark.parametrize("mode", ["zero3-lora", "zero2-qlora4"])
def test_world_size_change_of_an_adapter_run(assets, tmp_path, mode):
    """LoRA (frozen base weights outside the optimizer) and 4-bit QLoRA go through the universal path too."""
    stage = mode.split("-")[0]
    extra = dict(load_in_kbits=4, modules_to_save=None) if "qlora" in mode else {}
    # No dropout: its masks come from per-rank generators, so 1 rank cannot draw what 2 ranks drew.
    reference, out, _ = change_world_size(lora_config, assets, tmp_path, deepspeed=str(assets.ds[f"{stage}_ga2"]),
                                          max_steps=STEPS, eval_steps=4, max_train_samples=EPOCH_SAMPLES,
                                          lora_dropout=0.0, **extra)
    assert_same_curve_to_float_rounding(out, reference)


def test_non_finite_loss_stops_before_the_step_and_any_save(assets, tmp_path):
    """A NaN on rank 1 only, at step 3: both ranks stop, no optimizer step, no step-3 checkpoint."""
    out = tmp_path / "out"
    path = write_config(run_config(assets, out, save_steps=1, max_steps=6), tmp_path / "run.json")
    report = tmp_path / "report.json"
    result = launch(["--config", str(path), "--report", str(report), "--nan_at_step", "3", "--nan_rank", "1"],
                    workdir=tmp_path, script=DRIVERS / "nan_run.py")
    assert result.returncode == 1, result.output[-3000:]
    assert "non-finite loss at step 3 in 1 micro-batch(es) across ranks" in result.output
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000001", "step-00000002"]
    facts = json.loads(report.read_text())
    assert facts["optimizer_steps"] == 2
    assert facts["weights_equal_step_2_checkpoint"]


def test_train_py_reports_a_diverged_run_in_one_line(assets, tmp_path):
    """A learning rate that blows the weights up ends the job with one sentence and exit 1, not a traceback,
    and not DeepSpeed's silent skipping of every later step in fp32."""
    out = tmp_path / "out"
    result = train(run_config(assets, out, learning_rate=1e30, warmup_steps=0, max_steps=6, save_steps=100),
                   workdir=tmp_path)
    assert result.returncode == 1, result.output[-3000:]
    assert "non-finite gradient at step 2" in result.output and "Traceback" not in result.output, result.output[-3000:]
    assert not list(out.glob("step-*"))


def test_logged_losses_are_global_token_weighted_means(assets, tmp_path):
    """Step-1 train loss and the step-0 eval of a 2-rank LoRA run (LoRA B starts at 0, so the model is
    the base model) equal a single-process computation over the same samples, exactly."""
    from transformers import AutoModelForCausalLM

    from cpt_ds.attention import DOCUMENT_SDPA, model_inputs, register_document_sdpa
    from cpt_ds.data.loader import SampleOrder, collate, eval_batches
    from cpt_ds.data.windows import PackedSamples, TokenStream, split_documents
    from cpt_ds.loss import LossSettings, attach_loss_forward
    from cpt_ds.metrics import TokenMetrics, batch_stats, evaluate
    from cpt_ds.token_file import IndexedTokenFile

    out = tmp_path / "out"
    train(lora_config(assets, out, lora_dropout=0.0, max_steps=1), workdir=tmp_path).check()
    logged_train = [r for r in metrics(out) if "loss" in r][0]["loss"]
    logged_eval = eval_records(out)[0]

    torch.set_num_threads(1)  # the ranks ran single-threaded; same kernels, same bits
    register_document_sdpa()  # the run's attention path on CPU, loss and document attention (defaults)
    model = AutoModelForCausalLM.from_pretrained(assets.base_model, dtype=torch.float32,
                                                 attn_implementation=DOCUMENT_SDPA)
    attach_loss_forward(model, LossSettings())
    files = [IndexedTokenFile(assets.corpus)]
    train_segments, eval_segments = split_documents(files, 0.05, seed=7)
    train_samples = PackedSamples(TokenStream(files, train_segments), 32)
    eval_samples = PackedSamples(TokenStream(files, eval_segments), 32, max_samples=16)
    ids = SampleOrder(len(train_samples), seed=7).ids(0, 8)
    stats = torch.zeros(3, dtype=torch.int64)
    with torch.no_grad():
        for rank_ids in (ids[:4], ids[4:]):  # each rank's micro-batch of 4
            batch = collate([train_samples[int(i)] for i in rank_ids])
            inputs = model_inputs(batch, document_attention=True, implementation=DOCUMENT_SDPA, device=torch.device("cpu"))
            stats += batch_stats(model(**inputs, labels=batch["labels"]), batch["labels"], with_accuracy=False)
    assert TokenMetrics.from_tensor(stats).loss == logged_train

    single = evaluate(model, eval_batches(eval_samples, micro_batch_size=4, dp_rank=0, dp_world_size=1),
                      document_attention=True)
    assert (single.loss, single.accuracy, single.tokens) == (
        logged_eval["eval_loss"], logged_eval["eval_accuracy"], logged_eval["eval_tokens"])


def test_relaunching_a_finished_run_changes_nothing(assets, tmp_path, reference_runs):
    out = tmp_path / "out"
    shutil.copytree(reference_runs["zero2-full"], out)
    before = (out / "metrics.jsonl").read_text()
    result = train(mode_config(assets, "zero2-full", out), workdir=tmp_path).check()
    assert "training is already complete at step 8 of 8" in result.output
    assert (out / "metrics.jsonl").read_text() == before
