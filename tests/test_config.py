"""Run configuration: parsing, CLI overrides, and preflight validation that reports every problem at once."""

from __future__ import annotations

import json

import pytest

from cpt_ds.config import ConfigError, RunConfig
from cpt_ds.ds_config import load_deepspeed_config
from cpt_ds.preflight import preflight

from conftest import REPO, run_config, write_config

SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))


def load(assets, tmp_path, argv: list[str] = (), **fields) -> RunConfig:
    path = write_config(run_config(assets, tmp_path / "out", **fields), tmp_path / "run.json")
    return RunConfig.load(["--config", str(path), *argv])


def test_command_line_overrides_the_json(assets, tmp_path):
    config = load(assets, tmp_path, ["--learning_rate", "1e-5", "--data_path", "a", "b", "--gradient_checkpointing",
                                     "--max_eval_samples", "null", "--load_in_kbits", "4", "--local_rank=1"])
    assert config.optim.learning_rate == 1e-5
    assert config.data.data_path == ["a", "b"]
    assert config.model.gradient_checkpointing is True
    assert config.data.max_eval_samples is None
    assert config.model.load_in_kbits == 4
    assert config.data.block_size == 32  # untouched JSON value


def test_unknown_keys_and_bad_types_are_reported_together(assets, tmp_path):
    with pytest.raises(ConfigError) as error:
        load(assets, tmp_path, ["--learning_rat", "1", "--block_size", "big", "--dataset_dir", "x",
                                "--lr_scheduler_type", "step", "--full_finetuning", "maybe"])
    message = str(error.value)
    for expected in ("learning_rat: unknown field", "block_size: must be an integer, got 'big'",
                     "dataset_dir: not a cpt-ds field (pack the corpus once with tools/pack_corpus.py",
                     "lr_scheduler_type: must be one of ['cosine', 'linear', 'constant', 'constant_with_warmup', "
                     "'wsd']",
                     "full_finetuning: must be true or false"):
        assert expected in message, message


def test_every_shipped_deepspeed_json_is_concrete_and_valid():
    assert {p.name for p in SHIPPED} >= {"zero2.json", "zero3.json", "zero3_offload.json"}
    for path in SHIPPED:
        assert '"auto"' not in path.read_text(), path
        for world_size in (1, 2, 8):
            settings, problems = load_deepspeed_config(str(path), world_size=world_size)
            assert problems == [] and settings is not None, (path, problems)
            assert settings.train_batch_size == settings.micro_batch_size * settings.gradient_accumulation_steps * world_size
        expected_stage = 3 if "zero3" in path.name else 2
        assert settings.zero_stage == expected_stage
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        settings, _ = load_deepspeed_config(str(REPO / "ds_configs" / name), world_size=8)
        assert settings.precision == "bf16", name
    offload, _ = load_deepspeed_config(str(REPO / "ds_configs" / "zero3_offload.json"), world_size=1)
    assert offload.offload_optimizer and offload.offload_param


def test_deepspeed_json_problems(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2,
                               "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
                               "fp16": {"enabled": True}, "zero_optimization": {"stage": "auto"}}))
    _, problems = load_deepspeed_config(str(bad), world_size=2)
    text = "; ".join(problems)
    assert "has \"auto\" at zero_optimization.stage" in text
    assert "train_batch_size 10 != train_micro_batch_size_per_gpu 2 x gradient_accumulation_steps 2 x world size 2" in text
    assert "enables both bf16 and fp16" in text
    # Run-config batch sizes replace the JSON's and the global batch follows the world size.
    good, problems = load_deepspeed_config(str(REPO / "ds_configs" / "zero2.json"), world_size=4,
                                           micro_batch_size=3, gradient_accumulation_steps=5)
    assert problems == [] and good.raw["train_batch_size"] == 60


def test_preflight_reports_every_problem_in_one_error(assets, tmp_path):
    """ZeRO-3 + missing checkpoint path, block_size > max positions, batch triple, tokenizer mismatch,
    a missing token file and LoRA without a pretrained model: one error naming them all."""
    from cpt_ds.pack.tiny_tokenizer import train_tokenizer

    other_tokenizer = train_tokenizer(["some other text " * 50, "and more words here " * 30], tmp_path / "tok2",
                                      vocab_size=300)
    triple = tmp_path / "triple.json"
    triple.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
                                  "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}))
    config = RunConfig.from_flat(run_config(
        assets, tmp_path / "out", block_size=4096, deepspeed=str(triple), model_name_or_path=str(tmp_path / "nope"),
        tokenizer_name_or_path=str(other_tokenizer), data_path=[str(assets.corpus), str(tmp_path / "missing")],
        full_finetuning=False, config_name=None))
    with pytest.raises(ConfigError) as error:
        preflight(config, world_size=2)
    message = str(error.value)
    for expected in (
        f"model_name_or_path: {tmp_path / 'nope'} does not exist",
        "train_batch_size 64 != train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 x world size 2",
        "tokenizer fingerprint",
        f"recorded in {assets.corpus}.json",
        f"{tmp_path / 'missing'}.idx: token file index not found",
    ):
        assert expected in message, message

    lora_from_scratch = RunConfig.from_flat(run_config(assets, tmp_path / "out", full_finetuning=False, block_size=4096))
    with pytest.raises(ConfigError) as error:
        preflight(lora_from_scratch, world_size=1)
    assert "LoRA (full_finetuning false) adapts a pretrained model" in str(error.value)
    assert "block_size 4096 > the model's max_position_embeddings 128" in str(error.value)


def test_impossible_combinations_are_refused(assets, tmp_path):
    config = RunConfig.from_flat(run_config(assets, tmp_path / "out", load_in_kbits=4, use_flash_attention_2=True,
                                            eval_steps=5, validation_split_percentage=0.0,
                                            deepspeed=str(REPO / "ds_configs" / "zero3_offload.json")))
    with pytest.raises(ConfigError) as error:
        preflight(config, world_size=1)
    message = str(error.value)
    assert "full_finetuning cannot train quantized weights" in message
    assert "load_in_kbits needs pretrained weights to quantize" in message
    assert "cannot be combined with ZeRO-3 parameter offload" in message
    assert "use_flash_attention_2 is set but flash-attn is not installed" in message
    assert "eval_steps is set but there is no validation data" in message


def test_preflight_accepts_a_good_config(assets, tmp_path):
    plan = preflight(load(assets, tmp_path), world_size=2)
    assert plan.ds.train_batch_size == 8 and plan.vocab_size == 512
    assert [f.prefix for f in plan.train_files] == [str(assets.corpus)]


def test_train_py_prints_one_clear_error_and_exits_2(assets, tmp_path):
    from conftest import launch

    path = write_config(run_config(assets, tmp_path / "out", block_size=4096), tmp_path / "run.json")
    result = launch(["--config", str(path), "--max_steps", "0"], workdir=tmp_path)
    assert result.returncode == 2, result.output[-3000:]
    assert "block_size 4096 > the model's max_position_embeddings 128" in result.output
    assert "max_steps must be positive or -1" in result.output
    assert "Traceback" not in result.output


def test_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        RunConfig.load(["--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert all(f"--{name} " in shown for name in RunConfig.field_types())
    assert '--block_size                    default 1024' in shown


def test_comma_fields_are_lists_in_the_code_and_keep_their_spelling_in_json(assets, tmp_path):
    config = load(assets, tmp_path, ["--trainable", "q_proj,v_proj", "--modules_to_save", "embed_tokens, lm_head"],
                  full_finetuning=False, model_name_or_path="base", config_name=None,
                  config_overrides="attention_dropout=0.1,num_hidden_layers=3")
    assert config.model.trainable == ["q_proj", "v_proj"]
    assert config.model.modules_to_save == ["embed_tokens", "lm_head"]
    assert config.model.config_overrides == ["attention_dropout=0.1", "num_hidden_layers=3"]
    flat = config.to_flat()
    assert (flat["trainable"], flat["modules_to_save"]) == ("q_proj,v_proj", "embed_tokens,lm_head")
    assert flat["config_overrides"] == "attention_dropout=0.1,num_hidden_layers=3"
    # A JSON list is accepted too, null is empty, and the flat form reads back to the same config.
    listed = RunConfig.from_flat({**flat, "trainable": ["q_proj", "v_proj"], "modules_to_save": None})
    assert listed.model.trainable == ["q_proj", "v_proj"] and listed.model.modules_to_save == []
    assert listed.to_flat()["modules_to_save"] is None
    assert RunConfig.from_flat(flat).model == config.model
    with pytest.raises(ConfigError, match=r"trainable: must be a list of strings, got 3"):
        RunConfig.from_flat({**flat, "trainable": 3})


def test_lora_fields_with_full_finetuning_are_refused_by_name(assets, tmp_path):
    config = load(assets, tmp_path, ["--lora_rank", "8", "--trainable", "q_proj"])
    assert config.model.full_finetuning
    problems = config.config_problems()
    assert problems == ["trainable, lora_rank configure LoRA, which full_finetuning true does not train: drop them "
                        "or set full_finetuning false"], problems
    assert load(assets, tmp_path).config_problems() == []  # the defaults of LoRA fields are not "given"
    single = load(assets, tmp_path, ["--modules_to_save", "lm_head"]).config_problems()
    assert single == ["modules_to_save configure LoRA, which full_finetuning true does not train: drop it or set "
                      "full_finetuning false"]


def test_config_overrides_items_must_be_key_value(assets, tmp_path):
    problems = load(assets, tmp_path, config_overrides="attention_dropout=0.1,oops,=2").config_problems()
    assert problems == ["config_overrides items are KEY=VALUE, got 'oops', '=2'"], problems
