"""New embedding rows of an extended vocabulary: the mean of each new token's sub-token rows.

The tiny base model (512 ids) is grown to a tokenizer extended by tools/extend_vocab.py on its own
training text; the rows are read from a live engine on 2 gloo ranks under ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DRIVERS, launch, lora_config, run_config, write_config

NUM_NEW = 64


@pytest.fixture(scope="module")
def grown(assets, tmp_path_factory):
    """(extended tokenizer, its token file, a copy of the base model) for the tiny model."""
    from cpt_ds.pack.extend_vocab import ExtendOptions, extend_vocabulary
    from cpt_ds.pack.packing import PackOptions, pack_corpus

    root = tmp_path_factory.mktemp("grown")
    text = assets.root / "text" / "corpus.jsonl"
    tokenizer = root / "tokenizer"
    extend_vocabulary(assets.tokenizer, [text], tokenizer, ExtendOptions(num_new_tokens=NUM_NEW, eval_fraction=0.0))
    pack_corpus([text], tokenizer, root / "data", PackOptions(), workers=1)
    return tokenizer, root / "data", assets.base_model


def expected_rows(old: torch.Tensor, tokenizer: Path) -> torch.Tensor:
    record = json.loads((tokenizer / "cpt_ds_vocab_extension.json").read_text(encoding="utf-8"))
    rows = [old[token["sub_token_ids"]].double().mean(dim=0).to(old.dtype) for token in record["new_tokens"]]
    assert [token["id"] for token in record["new_tokens"]] == list(range(512, 512 + NUM_NEW))
    return torch.cat([old, torch.stack(rows)])


def base_weights(base: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    disk = load_file(str(base / "model.safetensors"))
    return {"embed_tokens": disk["model.embed_tokens.weight"], "lm_head": disk["lm_head.weight"]}


@pytest.mark.parametrize("stage, mode", [("zero2", "full"), ("zero3", "lora")])
def test_new_rows_are_the_sub_token_means_on_two_ranks(assets, grown, tmp_path, stage, mode):
    """ZeRO-2 full finetuning, and ZeRO-3 LoRA with embed_tokens,lm_head in modules_to_save: every copy
    of the embeddings (peft's frozen original and its trained copy) starts at the sub-token means."""
    tokenizer, data, base = grown
    overrides = {"tokenizer_name_or_path": str(tokenizer), "data_path": [str(data)],
                 "deepspeed": str(assets.ds[stage])}
    if mode == "full":
        config = run_config(assets, tmp_path / "out", model_name_or_path=str(base), **overrides)
        del config["config_name"]
    else:
        config = lora_config(assets, tmp_path / "out", model_name_or_path=str(base), **overrides)
    rows_path = tmp_path / "rows.pt"
    result = launch(["--config", str(write_config(config, tmp_path / "run.json")), "--rows", str(rows_path)],
                    workdir=tmp_path, script=DRIVERS / "embedding_rows.py").check()
    assert f"resized token embeddings from 512 to {512 + NUM_NEW} rows (new rows = mean of each new token's " \
           "sub-token rows" in result.output
    rows = torch.load(rows_path)
    expected = {name: expected_rows(old, tokenizer) for name, old in base_weights(base).items()}
    assert len(rows) == (2 if mode == "full" else 4), sorted(rows)
    for name, weight in rows.items():
        assert torch.equal(weight, expected["embed_tokens" if "embed_tokens" in name else "lm_head"]), name


def tiny_model(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def test_resize_uses_the_record_and_falls_back_with_a_reason(grown, tmp_path, caplog):
    from cpt_ds.model import resize_embeddings

    tokenizer, _, base = grown
    model = tiny_model(base)
    old = base_weights(base)
    assert resize_embeddings(model, 512 + NUM_NEW, tokenizer_path=tokenizer, model_path=base) == 512
    assert torch.equal(model.get_input_embeddings().weight, expected_rows(old["embed_tokens"], tokenizer))
    assert torch.equal(model.get_output_embeddings().weight, expected_rows(old["lm_head"], tokenizer))

    # The model folder's own tokenizer is another one: the record does not describe its rows.
    other = tmp_path / "other_base"
    shutil.copytree(base, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    # A model with more rows than the record's original tokenizer has ids.
    for model_path, rows, warning in ((other, 512, "is not the one"), (base, 520, "extends a tokenizer of 512 ids")):
        model = tiny_model(base)
        if rows != 512:
            model.resize_token_embeddings(rows, mean_resizing=False)
        before = model.get_input_embeddings().weight.detach().clone()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            resize_embeddings(model, 512 + NUM_NEW, tokenizer_path=tokenizer, model_path=model_path)
        assert warning in caplog.text
        assert "(new rows = mean of old:" in caplog.text
        weight = model.get_input_embeddings().weight
        assert torch.equal(weight[rows:], before.mean(dim=0).expand(512 + NUM_NEW - rows, -1))


def test_lora_on_a_grown_vocabulary_needs_embeddings_in_modules_to_save(assets, grown, tmp_path):
    from cpt_ds.config import ConfigError, RunConfig
    from cpt_ds.preflight import preflight

    tokenizer, data, base = grown
    common = {"model_name_or_path": str(base), "tokenizer_name_or_path": str(tokenizer), "data_path": [str(data)]}
    for saved in (None, "embed_tokens", "lm_head"):
        config = RunConfig.from_flat(lora_config(assets, tmp_path / "out", modules_to_save=saved, **common))
        with pytest.raises(ConfigError) as error:
            preflight(config, world_size=1)
        assert f"LoRA would leave the {NUM_NEW} new rows untrained" in str(error.value)
        assert "set modules_to_save embed_tokens,lm_head" in str(error.value)
    good = RunConfig.from_flat(lora_config(assets, tmp_path / "out", modules_to_save="embed_tokens,lm_head", **common))
    assert preflight(good, world_size=1).vocab_size == 512 + NUM_NEW
    # The base tokenizer (no growth): LoRA without modules_to_save stays allowed.
    plain = RunConfig.from_flat(lora_config(assets, tmp_path / "out", modules_to_save=None))
    assert preflight(plain, world_size=1).vocab_size == 512
