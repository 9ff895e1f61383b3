"""tools/average_models.py: the weighted mean of exported model folders, shard by shard, and every refusal."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpt_ds.toy import TINY_MODEL

from conftest import REPO, launch_env

SHARD_SIZE = "100KB"  # the tiny model in 6 fp32 / 4 bf16 shards


def load_tool():
    spec = importlib.util.spec_from_file_location("average_models_tool", REPO / "tools" / "average_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()


def save_model(folder: Path, *, seed: int, tokenizer: Path, dtype: torch.dtype = torch.float32,
               **config_changes) -> Path:
    """A tiny LlamaForCausalLM saved in several shards with the tests' tokenizer, like an export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**{k: v for k, v in TINY_MODEL.items() if k != "architectures"}, **config_changes})
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder, max_shard_size=SHARD_SIZE)
    for file in tokenizer.iterdir():
        shutil.copy2(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("average-inputs")
    made = {f"fp32-{seed}": save_model(root / f"fp32-{seed}", seed=seed, tokenizer=assets.tokenizer)
            for seed in (1, 2, 3)}
    made.update({f"bf16-{seed}": save_model(root / f"bf16-{seed}", seed=seed, tokenizer=assets.tokenizer,
                                            dtype=torch.bfloat16) for seed in (1, 2)})
    made["rope"] = save_model(root / "rope", seed=4, tokenizer=assets.tokenizer,
                              rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    return made


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def run(capsys, *args: str) -> tuple[int, str]:
    code = TOOL.main([str(arg) for arg in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype,names,weights", [
    ("fp32", ["fp32-1", "fp32-2", "fp32-3"], [1.0, 2.0, 5.0]),
    ("bf16", ["bf16-1", "bf16-2"], None),  # default: equal weights
])
def test_the_average_is_the_elementwise_weighted_mean(models, tmp_path, capsys, dtype, names, weights):
    inputs = [models[name] for name in names]
    out = tmp_path / "averaged"
    code, err = run(capsys, "--output", out, *inputs, *(["--weights", *map(str, weights)] if weights else []))
    assert code == 0, err

    raw = weights or [1.0] * len(inputs)
    normalized = [w / sum(raw) for w in raw]
    sources = [tensors(path) for path in inputs]
    averaged = tensors(out)
    assert set(averaged) == set(sources[0]) and len(averaged) == 2 + 9 * TINY_MODEL["num_hidden_layers"] + 1
    for name, value in averaged.items():
        expected = sum(w * source[name].float() for w, source in zip(normalized, sources)).to(sources[0][name].dtype)
        assert value.dtype == sources[0][name].dtype and torch.equal(value, expected), name
        assert value.dim() == 1 or not torch.equal(value, sources[0][name])  # a mix (norms are all 1 in each)

    # The first input's layout, index, config and tokenizer; the record names inputs and weights.
    first = inputs[0]
    shard_names = sorted(p.name for p in first.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shard_names and len(shard_names) > 2
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    record = json.loads((out / "cpt_ds_export.json").read_text())
    assert record["kind"] == "average" and record["weights"] == normalized
    assert record["inputs"] == [str(path.resolve()) for path in inputs]
    progress = [line for line in err.splitlines() if line.startswith("average: shard ")]
    assert [line.split()[2] for line in progress] == [f"{n}/{len(shard_names)}" for n in range(1, len(shard_names) + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]  # no temporary folder left

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(model.state_dict()["model.norm.weight"], averaged["model.norm.weight"].float())


def test_evaluate_runs_on_the_average(assets, models, tmp_path, capsys):
    out = tmp_path / "averaged"
    assert run(capsys, "--output", out, models["fp32-1"], models["fp32-2"])[0] == 0
    result = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--model", str(out), "--data",
                           str(assets.corpus_b), "--block_size", "32", "--max_samples", "8", "--batch_size", "4",
                           "--output", str(result)], cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    record = json.loads(result.read_text())
    assert record["model"] == str(out) and record["samples"] == 8 and record["eval_tokens"] > 0
    assert math.isfinite(record["eval_loss"]) and 0 < record["eval_loss"] < 2 * math.log(TINY_MODEL["vocab_size"])


def test_overwrite_replaces_only_an_earlier_average(models, tmp_path, capsys):
    out = tmp_path / "averaged"
    assert run(capsys, "--output", out, models["fp32-1"], models["fp32-2"])[0] == 0
    code, err = run(capsys, "--output", out, models["fp32-1"], models["fp32-2"], "--weights", "1", "0", "--overwrite")
    assert code == 0, err
    assert all(torch.equal(tensors(out)[name], t) for name, t in tensors(models["fp32-1"]).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["averaged"]


def damaged_copy(source: Path, folder: Path, edit) -> Path:
    """A copy of ``source`` whose embedding tensor becomes ``edit(tensor)`` (None: dropped from shard and index)."""
    from safetensors.torch import load_file, save_file

    name = "model.embed_tokens.weight"
    shutil.copytree(source, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    state = load_file(shard)
    edited = edit(state.pop(name))
    save_file({**state, **({name: edited} if edited is not None else {})}, shard, metadata={"format": "pt"})
    if edited is None:
        del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def other_tokenizer(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 7}))
    return folder


def adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def existing(folder: Path) -> Path:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    return folder


# Each case: (build the arguments in a work folder, the error's first line with {work} for that folder).
REFUSALS = {
    "one weight for two": (lambda m, w: ["--output", w / "out", m["fp32-1"], m["fp32-2"], "--weights", "1"],
                           "error: --weights gives 1 weight(s) for 2 input folders: give one per input"),
    "negative weight": (lambda m, w: ["--output", w / "out", m["fp32-1"], m["fp32-2"], "--weights", "1", "-0.5"],
                        "error: --weights must be finite and >= 0, got -0.5"),
    "zero sum": (lambda m, w: ["--output", w / "out", m["fp32-1"], m["fp32-2"], "--weights", "0", "0"],
                 "error: --weights sum to 0: give at least one positive weight"),
    "one input": (lambda m, w: ["--output", w / "out", m["fp32-1"]],
                  "error: averaging needs at least two input folders, got 1"),
    "config": (lambda m, w: ["--output", w / "out", m["fp32-1"], m["rope"]],
               "error: {rope}/config.json differs from {fp32-1}/config.json in rope_parameters ({{'rope_theta': "
               "500000.0, 'rope_type': 'default'}} vs {{'rope_theta': 10000.0, 'rope_type': 'default'}}): average "
               "only models of one architecture"),
    "dtype": (lambda m, w: ["--output", w / "out", m["fp32-1"], m["bf16-1"]],
              "error: tensor model.embed_tokens.weight is F32 in {fp32-1} but BF16 in {bf16-1}: export every input "
              "with the same --dtype"),
    "shape": (lambda m, w: ["--output", w / "out", m["fp32-1"],
                            damaged_copy(m["fp32-2"], w / "in", lambda t: t.reshape(-1))],
              "error: tensor model.embed_tokens.weight has shape [512, 64] in {fp32-1} but [32768] in {work}/in: "
              "average only models of one shape"),
    "names": (lambda m, w: ["--output", w / "out", m["fp32-1"], damaged_copy(m["fp32-2"], w / "in", lambda t: None)],
              "error: tensor model.embed_tokens.weight is in {fp32-1} but not in {work}/in: average only models "
              "with the same weights"),
    "tokenizer": (lambda m, w: ["--output", w / "out", m["fp32-1"], other_tokenizer(m["fp32-2"], w / "in")],
                  "error: {work}/in holds another tokenizer than {fp32-1} (fingerprint"),
    "lora": (lambda m, w: ["--output", w / "out", m["fp32-1"], adapter(w / "in")],
             "error: input {work}/in is a LoRA adapter; export the merged model first (tools/export_hf.py "
             "--merge_lora) and average those"),
    "output exists": (lambda m, w: ["--output", existing(w / "out"), m["fp32-1"], m["fp32-2"]],
                      "error: --output {work}/out already exists; choose another folder or pass --overwrite"),
    "overwrite a non-average": (
        lambda m, w: ["--output", existing(w / "out"), m["fp32-1"], m["fp32-2"], "--overwrite"],
        "error: --output {work}/out exists and is not an average written by tools/average_models.py; --overwrite "
        "replaces only those: choose another folder"),
    "output is an input": (lambda m, w: ["--output", m["fp32-2"], m["fp32-1"], m["fp32-2"], "--overwrite"],
                           "error: --output {fp32-2} is input {fp32-2}; write the average to a folder of its own"),
    "output inside an input": (lambda m, w: ["--output", m["fp32-2"] / "avg", m["fp32-1"], m["fp32-2"]],
                               "error: --output {fp32-2}/avg lies inside input {fp32-2}; write the average to a "
                               "folder of its own"),
    "output holds an input": (lambda m, w: ["--output", m["fp32-2"].parent, m["fp32-1"], m["fp32-2"]],
                              "error: --output {parent} holds input {fp32-1}; write the average to a folder of "
                              "its own"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_exit_2_with_one_line_and_write_nothing(models, tmp_path, capsys, case):
    make, message = REFUSALS[case]
    args = make(models, tmp_path)
    watched = [tmp_path, models["fp32-1"].parent]
    before = [snapshot(root) for root in watched]
    code, err = run(capsys, *args)
    assert code == 2, err
    names = {name: str(path) for name, path in models.items()}
    assert err.splitlines()[0].startswith(message.format(work=tmp_path, parent=models["fp32-1"].parent, **names))
    assert len(err.splitlines()) == 1, err
    assert [snapshot(root) for root in watched] == before


def test_an_error_while_writing_leaves_nothing(models, tmp_path):
    from cpt_ds.average import average_models

    def interrupted(line: str) -> None:
        if line.startswith("average: shard 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        average_models([models["fp32-1"], models["fp32-2"]], tmp_path / "out", progress=interrupted)
    assert list(tmp_path.iterdir()) == []
