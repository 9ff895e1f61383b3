"""Training modes end to end on 2 gloo ranks through the deepspeed launcher: the loss must fall.

ZeRO-2 / ZeRO-3 full finetuning from scratch, LoRA + modules_to_save under ZeRO-2 and ZeRO-3, and
QLoRA with 4-bit nf4 and 8-bit base weights. LoRA runs must leave every frozen weight bit-identical
(to its value before training and to the base model on disk).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import DRIVERS, eval_records, launch, lora_config, metrics, run_config, train_losses, write_config


def inspect(config: dict, workdir: Path) -> dict:
    path = write_config(config, workdir / "run.json")
    report = workdir / "report.json"
    launch(["--config", str(path), "--report", str(report)], workdir=workdir,
           script=DRIVERS / "inspect_run.py").check()
    return json.loads(report.read_text())


def assert_learned(output_dir: Path, margin: float = 0.2) -> None:
    evals = eval_records(output_dir)
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    # Held-out loss falls clearly, and the logged training loss falls from the first steps to the last.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - margin, evals
    losses = [loss for _, loss in train_losses(output_dir)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin, losses


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_full_finetuning_learns(assets, tmp_path, stage):
    out = tmp_path / "out"
    report = inspect(run_config(assets, out, deepspeed=str(assets.ds[stage]), max_steps=12), tmp_path)
    assert_learned(out)
    assert report["num_frozen"] == 0 and report["trainable_changed"] == report["num_trainable"] > 0


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_lora_with_modules_to_save_learns_and_keeps_base_weights(assets, tmp_path, stage):
    out = tmp_path / "out"
    report = inspect(lora_config(assets, out, deepspeed=str(assets.ds[stage]), max_steps=12), tmp_path)
    assert_learned(out)
    assert report["frozen_changed"] == [], report
    assert report["frozen_equal_to_disk"] and report["frozen_matched_on_disk"] == report["num_frozen"], report
    # Every LoRA matrix and both modules_to_save copies moved.
    assert report["trainable_changed"] == report["num_trainable"] > 0, report
    assert (out / "step-00000012" / "cpt_ds_complete.json").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_learns_after_an_eval_pass(assets, tmp_path, bits):
    """The eval at step 0 runs first: bitsandbytes' CPU inference repack must not zero LoRA gradients."""
    out = tmp_path / "out"
    config = lora_config(assets, out, load_in_kbits=bits, modules_to_save=None, max_steps=12, learning_rate=5e-2,
                         lora_rank=16, lora_alpha=32, eval_steps=4)
    report = inspect(config, tmp_path)
    # LoRA alone on a random base learns slowly; with the repack bug the loss would not move at all.
    assert_learned(out, margin=0.03)
    assert report["frozen_changed"] == [], report
    assert report["trainable_changed"] == report["num_trainable"] > 0, report
    records = [r for r in metrics(out) if "grad_norm" in r]
    # Gradients stay alive after every eval pass (steps 5.. follow the eval at step 4).
    assert all(r["grad_norm"] > 1e-6 for r in records), records


def build(config: dict, ds_path: Path):
    """Our build_model on one process (no engine): what train.py would train for this run config."""
    from cpt_ds.config import RunConfig
    from cpt_ds.ds_config import load_deepspeed_config
    from cpt_ds.model import build_model

    run = RunConfig.from_flat(config)
    ds, problems = load_deepspeed_config(str(ds_path), world_size=1)
    assert ds is not None, problems
    return build_model(run.model, ds, vocab_size=512, seed=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_with_quantized_weights_is_really_quantized(assets, tmp_path, bits):
    import bitsandbytes as bnb

    built = build(lora_config(assets, tmp_path / "out", load_in_kbits=bits, modules_to_save=None), assets.ds["zero2"])
    quantized_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    base_layers = {name: module for name, module in built.module.named_modules() if name.endswith(".base_layer")}
    # Every LoRA target's frozen base is a bitsandbytes layer; the embeddings and the head stay plain.
    assert {name.split(".")[-2] for name in base_layers} == targets
    assert base_layers and all(isinstance(module, quantized_type) for module in base_layers.values())
    weights = [module.weight for module in base_layers.values()]
    if bits == 4:
        assert all(isinstance(weight, bnb.nn.Params4bit) and weight.quant_state is not None for weight in weights)
    else:
        assert all(weight.dtype == torch.int8 for weight in weights)
    causal = built.module.get_base_model()
    assert not isinstance(causal.lm_head, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert causal.model.embed_tokens.weight.dtype == torch.float32
    trainable = {name for name, parameter in built.module.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable), sorted(trainable)


def test_deepspeed_json_with_its_own_optimizer_scheduler_and_csv_monitor(assets, tmp_path):
    """Any valid DeepSpeed JSON: DeepSpeed builds the optimizer and drives the LR; metrics reach its monitor."""
    from conftest import ds_json, train

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(ds_json(
        2, optimizer={"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
        scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                  "warmup_num_steps": 4, "warmup_type": "linear"}},
        csv_monitor={"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "run"})))
    out = tmp_path / "out"
    train(run_config(assets, out, deepspeed=str(ds), max_steps=10), workdir=tmp_path).check()
    assert_learned(out)
    csv = (tmp_path / "monitor" / "run" / "Train_loss.csv").read_text().splitlines()
    assert len(csv) == 1 + 10 and csv[-1].startswith("10,")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_recomputes_each_layer_and_gives_the_same_gradients(assets, tmp_path, mode,
                                                                                   monkeypatch):
    """The flag must really checkpoint: every decoder layer's MLP runs its forward again during backward,
    and the loss and every gradient are those of the plain model."""
    from transformers.models.llama import modeling_llama

    calls = [0]
    mlp_forward = modeling_llama.LlamaMLP.forward

    def counted_forward(self, *args, **kwargs):
        # Module hooks do not fire on a checkpoint's recompute, so the forward itself is counted.
        calls[0] += 1
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counted_forward)
    batch = torch.arange(5, 5 + 2 * 32).view(2, 32)
    results = []
    for checkpointing in (False, True):
        config = (run_config(assets, tmp_path / "out") if mode == "full" else
                  lora_config(assets, tmp_path / "out", lora_dropout=0.0))
        built = build({**config, "gradient_checkpointing": checkpointing}, assets.ds["zero2"])
        built.module.train()
        calls[0] = 0
        output = built.module(input_ids=batch, labels=batch)
        forward_calls = calls[0]
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in built.module.named_parameters() if p.requires_grad}
        results.append((forward_calls, calls[0] - forward_calls, output.loss.detach(), gradients))
    (plain_forward, plain_backward, plain_loss, plain_grads), (forward, backward, loss, grads) = results
    num_layers = built.hf_config.num_hidden_layers
    assert (plain_forward, plain_backward) == (num_layers, 0)
    assert (forward, backward) == (num_layers, num_layers)  # each layer recomputed once in backward
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys() and grads
    assert all(torch.allclose(grads[name], plain_grads[name], rtol=1e-5, atol=1e-7) for name in grads)


def test_gradient_checkpointing_gives_the_same_losses(assets, tmp_path):
    from conftest import train

    curves = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc_{checkpointing}"
        train(run_config(assets, out, max_steps=4, gradient_checkpointing=checkpointing), workdir=tmp_path).check()
        curves.append([(r["step"], r.get("loss", r.get("eval_loss"))) for r in metrics(out)])
    assert curves[0] == curves[1]


def test_embeddings_grow_to_a_larger_tokenizer_under_zero3(assets, tmp_path):
    """Base model 512 rows, tokenizer 600 ids: rows are added (new rows = the mean) and trained."""
    import shutil

    from cpt_ds.export import load_exported_model
    from cpt_ds.pack.packing import PackOptions, pack_corpus
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    from conftest import train

    texts = [json.loads(line)["text"] for line in (assets.root / "text" / "corpus.jsonl").read_text().splitlines()]
    tokenizer = train_tokenizer(texts, tmp_path / "tokenizer600", vocab_size=600)
    pack_corpus([assets.root / "text" / "corpus.jsonl"], tokenizer, tmp_path / "data600", PackOptions(), workers=1)
    base = tmp_path / "base"
    shutil.copytree(assets.base_model, base)
    for file in tokenizer.iterdir():
        shutil.copy2(file, base / file.name)
    out = tmp_path / "out"
    config = run_config(assets, out, model_name_or_path=str(base), tokenizer_name_or_path=str(tokenizer),
                        data_path=[str(tmp_path / "data600")], deepspeed=str(assets.ds["zero3"]), max_steps=6,
                        export_final=True)
    del config["config_name"]
    result = train(config, workdir=tmp_path).check()
    assert "resized token embeddings from 512 to 600 rows" in result.output
    assert_learned(out, margin=0.1)
    model = load_exported_model(out / "final")
    assert model.get_input_embeddings().weight.shape[0] == 600 == model.config.vocab_size


def test_resize_sets_new_rows_to_the_mean_of_the_old():
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_ds.model import resize_embeddings

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings(model, 64) == 50
    assert resize_embeddings(model, 64) is None  # already large enough
    for new, old in ((model.get_input_embeddings().weight, old_input), (model.get_output_embeddings().weight, old_head)):
        assert new.shape == (64, 16)
        assert torch.equal(new[:50], old)
        assert torch.equal(new[50:], old.mean(dim=0).expand(14, 16))
