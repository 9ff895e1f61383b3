"""Long-context model settings: RoPE overrides (rope_theta / rope_scaling) and DeepSpeed's TiledMLP.

One 2-rank launch (tests/drivers/train_several.py) trains three runs: a LoRA run with a rope_theta
override, a ZeRO-3 run with a llama3 RoPE override and block_size above the model's
max_position_embeddings, and the same run with tiled_mlp and gradient checkpointing; everything else is
in-process.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from conftest import DRIVERS, launch, lora_config, run_config, train_losses, write_config
from cpt_ds.config import ConfigError, ModelConfig, RunConfig
from cpt_ds.toy import TINY_MODEL

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 128}
LONG_BLOCK = 160  # above TINY_MODEL's max_position_embeddings (128)


def tiny_llama_config(**changes):
    from transformers import LlamaConfig

    return LlamaConfig(**{**{k: v for k, v in TINY_MODEL.items() if k != "architectures"}, **changes})


def model_config(assets, **fields) -> ModelConfig:
    return ModelConfig(config_name=str(assets.model_config), tokenizer_name_or_path=str(assets.tokenizer),
                       full_finetuning=True, **fields)


# --------------------------------------------------------------------------------------------------
# RoPE overrides: checks
# --------------------------------------------------------------------------------------------------


def test_rope_and_tiling_fields_are_checked_in_one_error(assets, tmp_path):
    config = RunConfig.from_flat(run_config(assets, tmp_path, rope_theta=-1.0, rope_scaling={"type": "linear"},
                                            tiled_mlp_shards=2))
    problems = config.config_problems()
    assert "rope_theta must be a positive number (e.g. 1000000.0), got -1.0" in problems
    assert any(p.startswith("rope_scaling: spell the key 'rope_type'") for p in problems), problems
    assert "tiled_mlp_shards (2) only applies with tiled_mlp true; drop it" in problems
    for scaling, expected in [({"rope_type": "llama4", "factor": 2.0}, "rope_scaling.rope_type must be one of"),
                              ({"rope_type": "yarn", "factor": 4.0}, "needs original_max_position_embeddings"),
                              ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "set the base with")]:
        problems = RunConfig.from_flat(run_config(assets, tmp_path, rope_scaling=scaling)).config_problems()
        assert len(problems) == 1 and expected in problems[0], problems
    with pytest.raises(ConfigError, match="rope_scaling: must be a JSON object"):
        RunConfig.from_flat(run_config(assets, tmp_path, rope_scaling=[8.0]))


def test_rope_scaling_is_a_json_object_on_the_command_line(assets, tmp_path):
    path = write_config(run_config(assets, tmp_path), tmp_path / "run.json")
    config = RunConfig.load(["--config", str(path), "--rope_scaling", json.dumps(LLAMA3_SCALING),
                             "--rope_theta", "1e6"])
    assert config.model.rope_scaling == LLAMA3_SCALING and config.model.rope_theta == 1e6
    assert config.to_flat()["rope_scaling"] == LLAMA3_SCALING  # run_config.json records it as given
    with pytest.raises(ConfigError, match="rope_scaling: must be a JSON object, got '{rope_type: linear}'"):
        RunConfig.load(["--config", str(path), "--rope_scaling", "{rope_type: linear}"])


@pytest.mark.parametrize("scaling, expected", [
    ({"rope_type": "linear"}, "rope_scaling {\"rope_type\": \"linear\"}: Missing required keys in `rope_parameters` "
                              "for 'rope_type'='linear': {'factor'}; add the missing keys"),
    ({"rope_type": "linear", "factor": 2.0, "facotr": 3.0}, "rope_scaling: unknown keys ['facotr'] (a typo?)"),
])
def test_transformers_refusal_is_reported_naming_the_field(assets, scaling, expected):
    from cpt_ds.model import load_hf_config

    with pytest.raises(ValueError) as error:
        load_hf_config(model_config(assets, rope_scaling=scaling))
    assert expected in str(error.value)


def test_max_position_embeddings_is_raised_to_block_size_with_a_log_line(assets, caplog):
    from cpt_ds.model import load_hf_config

    caplog.set_level(logging.INFO, logger="cpt_ds")
    config = load_hf_config(model_config(assets, rope_scaling=LLAMA3_SCALING, rope_theta=1e6), block_size=LONG_BLOCK)
    assert config.max_position_embeddings == LONG_BLOCK
    assert config.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 1e6}
    assert f"max_position_embeddings raised from 128 to block_size {LONG_BLOCK}" in caplog.text
    # Only a context extension raises it: without an override preflight refuses the block size instead.
    assert load_hf_config(model_config(assets), block_size=LONG_BLOCK).max_position_embeddings == 128
    # rope_theta alone keeps the model's (default) scaling; the original length is the model's own.
    assert load_hf_config(model_config(assets, rope_theta=2e6)).rope_parameters == {"rope_type": "default",
                                                                                     "rope_theta": 2e6}


def test_a_pretrained_model_is_built_with_the_override(assets):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from cpt_ds.ds_config import load_deepspeed_config
    from cpt_ds.model import build_model, load_hf_config

    fields = {"model_name_or_path": str(assets.base_model), "full_finetuning": True, "rope_theta": 1e6,
              "rope_scaling": LLAMA3_SCALING}
    ds, problems = load_deepspeed_config(str(assets.ds["zero2"]), world_size=1)
    assert ds is not None, problems
    hf_config = load_hf_config(ModelConfig(**fields), block_size=LONG_BLOCK)
    built = build_model(ModelConfig(**fields), ds, vocab_size=512, seed=0, hf_config=hf_config)
    assert built.hf_config.rope_parameters == {**LLAMA3_SCALING, "rope_theta": 1e6}
    assert built.hf_config.max_position_embeddings == LONG_BLOCK
    weights = load_file(assets.base_model / "model.safetensors")
    ids = torch.randint(0, 512, (1, LONG_BLOCK), generator=torch.Generator().manual_seed(0))
    expected, plain = (_logits(LlamaForCausalLM(config), weights, ids) for config in (
        tiny_llama_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 1e6}), tiny_llama_config()))
    with torch.no_grad():
        logits = built.module(input_ids=ids).logits  # without labels the module runs the HF forward
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - plain).abs().max() > 1e-3  # the override changes what the model computes


def _logits(model, weights, ids):
    model.load_state_dict(weights, strict=False)  # lm_head / embeddings as saved; buffers are the config's
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --------------------------------------------------------------------------------------------------
# RoPE overrides and tiled MLP in training: one launch, three runs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_runs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("long_runs")
    rope = {"rope_theta": 1e6, "rope_scaling": LLAMA3_SCALING, "block_size": LONG_BLOCK, "max_steps": 4,
            "deepspeed": str(assets.ds["zero3"]), "export_final": True}
    # The ZeRO-2 run first: the driver's next Trainer is built while the last one (and, under ZeRO-3, its
    # HfDeepSpeedConfig, which makes transformers partition at construction) is still referenced.
    configs = {
        "lora": lora_config(assets, root / "lora", rope_theta=1e6, lora_dropout=0.0, max_steps=2, export_final=True),
        "rope": run_config(assets, root / "rope", **rope),
        "tiled": run_config(assets, root / "tiled", **{**rope, "export_final": False}, tiled_mlp=True,
                            tiled_mlp_shards=3, gradient_checkpointing=True),
    }
    paths = [str(write_config(config, root / f"{name}.json")) for name, config in configs.items()]
    result = launch(paths, workdir=root, script=DRIVERS / "train_several.py").check()
    return {name: Path(config["output_dir"]) for name, config in configs.items()}, result.output


def test_tiled_mlp_under_zero3_with_checkpointing_trains_the_same_losses(long_runs):
    runs, output = long_runs
    assert "tiled_mlp: 2 MLPs run in shards of the sequence (3)" in output
    plain, tiled = train_losses(runs["rope"]), train_losses(runs["tiled"])
    assert [step for step, _ in plain] == [step for step, _ in tiled] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(plain, tiled, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (plain, tiled)


def test_export_carries_the_rope_override_and_its_logits(long_runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    runs, output = long_runs
    assert f"max_position_embeddings raised from 128 to block_size {LONG_BLOCK}" in output
    final = runs["rope"] / "final"
    exported = json.loads((final / "config.json").read_text())
    assert exported["rope_parameters"] == {**LLAMA3_SCALING, "rope_theta": 1e6}
    assert exported["max_position_embeddings"] == LONG_BLOCK
    weights = load_file(final / "model.safetensors")
    ids = torch.randint(0, 512, (2, LONG_BLOCK), generator=torch.Generator().manual_seed(1))
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    direct = _logits(LlamaForCausalLM(tiny_llama_config(rope_parameters={**LLAMA3_SCALING, "rope_theta": 1e6},
                                                        max_position_embeddings=LONG_BLOCK)), weights, ids)
    plain = _logits(LlamaForCausalLM(tiny_llama_config()), weights, ids)
    torch.testing.assert_close(logits, direct, rtol=0, atol=0)
    assert (logits - plain).abs().max() > 1e-3


def test_lora_exports_keep_the_override(long_runs, tmp_path):
    from cpt_ds.export import export_checkpoint, load_exported_model

    runs, _ = long_runs
    adapter = load_exported_model(runs["lora"] / "final")  # the adapter's base rebuilt with the override
    assert adapter.config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    merged = export_checkpoint(runs["lora"] / "step-00000002", tmp_path / "merged", merge_lora=True)
    assert json.loads((merged / "config.json").read_text())["rope_parameters"] == {"rope_type": "default",
                                                                                  "rope_theta": 1e6}
    inv_freq = adapter.get_base_model().model.rotary_emb.inv_freq
    head_dim = TINY_MODEL["hidden_size"] // TINY_MODEL["num_attention_heads"]
    expected = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(inv_freq, expected)


@pytest.mark.parametrize("change, named", [
    ({"rope_theta": 2e6}, "RoPE (rope_theta 1000000.0 -> 2000000.0)"),
    ({"rope_scaling": {**LLAMA3_SCALING, "factor": 4.0}}, "RoPE (rope_scaling {\"factor\": 8.0, "),
])
def test_resume_with_another_rope_is_refused_naming_the_field(assets, long_runs, change, named):
    from cpt_ds.checkpoint import read_checked_marker
    from cpt_ds.model import load_hf_config
    from cpt_ds.resume import compatibility_problems, incompatible, model_shape

    runs, _ = long_runs
    checkpoint = runs["rope"] / "step-00000004"
    saved = read_checked_marker(checkpoint)["fingerprints"]
    fields = {"rope_theta": 1e6, "rope_scaling": LLAMA3_SCALING}
    same = model_shape(load_hf_config(model_config(assets, **fields), block_size=LONG_BLOCK), 512)
    assert compatibility_problems(saved, {**saved, "model_shape": json.loads(json.dumps(same))}) == []
    changed = model_shape(load_hf_config(model_config(assets, **{**fields, **change}), block_size=LONG_BLOCK), 512)
    problems = compatibility_problems(saved, {**saved, "model_shape": changed})
    assert len(problems) == 1 and problems[0].startswith(named), problems
    assert ("rope_theta" in change) == ("rope_theta 1000000.0" in problems[0])  # only what changed is named
    assert ("rope_scaling" in change) == ('-> {"factor": 4.0, ' in problems[0])
    message = str(incompatible(checkpoint, problems))
    assert "resume with the rope_theta / rope_scaling the checkpoint was trained with" in message


# --------------------------------------------------------------------------------------------------
# Tiled MLP: exactness and refusals
# --------------------------------------------------------------------------------------------------


def test_shard_counts_are_what_torch_chunk_makes_for_any_batch():
    from cpt_ds.tiled_mlp import num_shards

    assert num_shards(9, 64, 4) == 3  # chunk makes 3, 3, 3 of 9 rows asked for 4
    assert num_shards(160, 64, None) == 3 and num_shards(40, 64, None) == 1 and num_shards(5, 64, 99) == 5
    for seq in range(1, 40):
        for requested in range(1, 12):
            count = num_shards(seq, 64, requested)
            for batch in (1, 2, 3):
                assert len(torch.arange(batch * seq).chunk(count)) == count, (seq, requested, batch)


@pytest.mark.parametrize("variant", ["full", "lora", "checkpointing"])
def test_tiled_mlp_gives_the_untiled_loss_and_gradients(variant):
    from transformers import LlamaForCausalLM

    from cpt_ds.tiled_mlp import enable_tiled_mlp

    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config())
    tiled = copy.deepcopy(plain)
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        # init_lora_weights False: B is random too, so every LoRA weight gets a non-zero gradient.
        lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"])
        torch.manual_seed(1)
        plain = get_peft_model(plain, copy.deepcopy(lora))
        torch.manual_seed(1)
        tiled = get_peft_model(tiled, lora)
    if variant == "checkpointing":
        for model in (plain, tiled):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
    assert enable_tiled_mlp(tiled, shards=3) == TINY_MODEL["num_hidden_layers"]
    calls = []
    first_mlp = [m for name, m in tiled.named_modules() if name.endswith("layers.0.mlp")][0]
    first_mlp.gate_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    losses = []
    for model in (plain, tiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    # Forward in 3 shards of the sequence (14, 14, 12 tokens), backward recomputes 3 shards of the 80 rows;
    # checkpointing adds its own recomputation of the forward.
    forward = [14, 14, 12]
    assert calls == forward + ([27, 27, 26] if variant != "checkpointing" else forward + [27, 27, 26])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    grads = [{name: p.grad for name, p in model.named_parameters() if p.requires_grad} for model in (plain, tiled)]
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, expected in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()),
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_tiled_mlp_refusals(assets, tmp_path):
    from transformers import CONFIG_MAPPING

    from cpt_ds.tiled_mlp import model_type_problems

    problems = RunConfig.from_flat(lora_config(assets, tmp_path, tiled_mlp=True, tiled_mlp_shards=0)).config_problems()
    assert "tiled_mlp_shards must be positive or null, got 0" in problems
    assert ("tiled_mlp recomputes the MLP in backward, where LoRA dropout on gate_proj,up_proj,down_proj would "
            "draw other masks than the forward did; set lora_dropout 0") in problems
    assert RunConfig.from_flat(lora_config(assets, tmp_path, tiled_mlp=True, lora_dropout=0.0)).config_problems() == []
    problems = ModelConfig(full_finetuning=True, tiled_mlp=True, use_liger_kernel=True).problems()
    assert "tiled_mlp and use_liger_kernel both replace the MLP's forward; keep one" in problems
    assert model_type_problems(True, CONFIG_MAPPING["gpt2"]()) == [
        "tiled_mlp supports model types llama, mistral, qwen2, qwen3 (a gate/up/down MLP), not gpt2; "
        "set tiled_mlp false"]
    assert model_type_problems(True, tiny_llama_config()) == []
