"""The resume rules (cpt_ds/resume.py) and the checkpoint format checks, without launching ranks."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cpt_ds.checkpoint import (
    COMPLETE_MARKER,
    FORMAT_VERSION,
    MODEL_STATES_FILE,
    ZERO3_MODEL_STATES_FILE,
    CheckpointError,
    load_rng_file,
    read_checked_marker,
    rng_state,
    saved_client_state,
    set_rng_state,
)
from cpt_ds.resume import (
    adapter_fingerprint,
    compatibility_problems,
    config_changes,
    fingerprints,
    incompatible,
    model_shape,
    plan_resume,
    prepare_deepspeed_config,
    token_file_fingerprints,
)

ASSETS = Path(__file__).parent / "assets"
OLD_CHECKPOINT = ASSETS / "pre_house_run" / "run" / "step-00000003"

SHAPE = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2}


def run_fingerprints(**changes) -> dict:
    base = fingerprints(
        data_split={"train": {"a": "x", "b": "y"}, "eval": {}},
        blend=[{"name": "a", "weight": 0.7, "num_samples": 9}, {"name": "b", "weight": 0.3, "num_samples": 5}],
        token_files={"data/a": "sha-a", "data/b": "sha-b"}, tokenizer="t" * 64, model_shape=dict(SHAPE),
        adapter="full", zero_stage=2, document_attention=True)
    return {**base, **changes}


def one_problem(saved: dict, current: dict) -> str:
    problems = compatibility_problems(saved, current)
    assert len(problems) == 1, problems
    return problems[0]


def test_unchanged_fingerprints_have_no_problems():
    assert compatibility_problems(run_fingerprints(), run_fingerprints()) == []


@pytest.mark.parametrize("files, expected", [
    ({"data/a": "sha-a", "data/b": "sha-b", "data/c": "sha-c"}, "token files (data/c: added)"),
    ({"data/a": "sha-a"}, "token files (data/b: removed)"),
    ({"data/a": "sha-a", "data/b": "other"}, "token files (data/b: content changed)"),
])
def test_token_file_changes_are_named(files, expected):
    # A token-file change also changes the blend and split; only the root cause is reported.
    current = run_fingerprints(token_files=files, blend=[], data_split={})
    assert one_problem(run_fingerprints(), current) == expected


@pytest.mark.parametrize("blend, expected", [
    ([{"name": "a", "weight": 0.6, "num_samples": 9}, {"name": "b", "weight": 0.3, "num_samples": 5}],
     "the blend (a weight 0.7 -> 0.6)"),
    ([{"name": "a", "weight": 0.7, "num_samples": 8}, {"name": "b", "weight": 0.3, "num_samples": 5}],
     "the blend (a samples 9 -> 8)"),
    ([{"name": "b", "weight": 0.3, "num_samples": 5}, {"name": "a", "weight": 0.7, "num_samples": 9}],
     "the blend (component order)"),
    ([{"name": "a", "weight": 0.7, "num_samples": 9}, {"name": "c", "weight": 0.3, "num_samples": 5}],
     "the blend (b removed, c added)"),
])
def test_blend_changes_are_named(blend, expected):
    assert one_problem(run_fingerprints(), run_fingerprints(blend=blend, data_split={})) == expected


def test_split_change():
    current = run_fingerprints(data_split={"train": {"a": "x2", "b": "y"}, "eval": {}})
    assert one_problem(run_fingerprints(), current) == \
        "the train/validation split (validation_split_percentage, seed or eval_data_path)"


def test_tokenizer_change():
    assert one_problem(run_fingerprints(), run_fingerprints(tokenizer="u" * 64)) == \
        "tokenizer (fingerprint tttttttttttt -> uuuuuuuuuuuu)"


def test_model_shape_change():
    current = run_fingerprints(model_shape={**SHAPE, "num_hidden_layers": 3, "vocab_size": 640})
    assert one_problem(run_fingerprints(), current) == "model shape (vocab_size 512 -> 640, num_hidden_layers 2 -> 3)"


def test_adapter_change():
    lora = {"lora_rank": 4, "lora_alpha": 8, "trainable": ["q_proj"], "modules_to_save": None, "load_in_kbits": None}
    assert one_problem(run_fingerprints(), run_fingerprints(adapter=lora)) == f"training mode (full -> {lora})"


def test_zero_stage_change():
    assert one_problem(run_fingerprints(), run_fingerprints(zero_stage=3)) == \
        "ZeRO stage (2 -> 3); resume with the DeepSpeed JSON it was saved with"


def test_several_changes_make_one_sentence():
    problems = compatibility_problems(run_fingerprints(), run_fingerprints(tokenizer="u" * 64, zero_stage=3))
    error = incompatible(Path("out/step-00000004"), problems)
    assert isinstance(error, CheckpointError)
    assert str(error) == ("cannot resume from out/step-00000004: changed since it was saved: tokenizer (fingerprint "
                          "tttttttttttt -> uuuuuuuuuuuu); ZeRO stage (2 -> 3); resume with the DeepSpeed JSON it was "
                          "saved with. Restore them, or start fresh in a new output_dir")


def test_resume_refuses_a_change_of_document_attention():
    """Moved from test_attention_and_loss.py (it called Trainer._check_compatible on a stand-in)."""
    fingerprints = {"data_split": {"train": {"a": "x"}, "eval": {}}, "blend": [{"name": "a", "weight": None,
                                                                               "num_samples": 9}],
                    "token_files": {}, "tokenizer": "t" * 12,
                    "model_shape": {}, "adapter": "full", "zero_stage": 2, "document_attention": True}
    assert compatibility_problems(dict(fingerprints), fingerprints) == []  # unchanged: fine
    # A changed value, and a checkpoint from before the field existed (trained across documents).
    for old in ({**fingerprints, "document_attention": False},
                {key: value for key, value in fingerprints.items() if key != "document_attention"}):
        with pytest.raises(CheckpointError, match=r"document_attention \(False -> True\).*--document_attention false"):
            raise incompatible(Path("step-1"), compatibility_problems(old, fingerprints))


def test_old_checkpoint_without_document_attention_resumes_without_it():
    old = {key: value for key, value in run_fingerprints().items() if key != "document_attention"}
    assert compatibility_problems(old, run_fingerprints(document_attention=False)) == []


def test_fingerprint_helpers_read_plain_inputs():
    files = [SimpleNamespace(prefix="data/a", meta={"bin_sha256": "abc"}, num_tokens=10, num_documents=2),
             SimpleNamespace(prefix="data/b", meta=None, num_tokens=10, num_documents=2)]
    assert token_file_fingerprints(files) == {"data/a": "abc", "data/b": "10 tokens, 2 documents (no sidecar)"}
    shape = model_shape(SimpleNamespace(model_type="llama", hidden_size=64, vocab_size=300), 320)
    assert shape["vocab_size"] == 320 and shape["hidden_size"] == 64 and shape["head_dim"] is None
    assert adapter_fingerprint(SimpleNamespace(full_finetuning=True)) == "full"
    lora = SimpleNamespace(full_finetuning=False, lora_rank=4, lora_alpha=8, trainable=["q_proj"],
                           modules_to_save=["lm_head"], load_in_kbits=4)
    assert adapter_fingerprint(lora) == {"lora_rank": 4, "lora_alpha": 8, "trainable": ["q_proj"],
                                         "modules_to_save": ["lm_head"], "load_in_kbits": 4}


def test_config_changes_are_listed_except_launch_only_fields():
    saved = {"learning_rate": 0.003, "eval_steps": 2, "stop_at_step": 3, "resume_from_checkpoint": "auto",
             "save_fault_delay_seconds": 0.0}
    current = {"learning_rate": 0.001, "eval_steps": 2, "stop_at_step": None, "resume_from_checkpoint": "none",
               "save_fault_delay_seconds": 2.0, "new_field": True}
    assert config_changes(saved, current) == ["learning_rate: 0.003 -> 0.001", "new_field: None -> True"]
    assert config_changes(saved, dict(saved)) == []


@pytest.mark.parametrize("saved_world, world, stage, universal", [
    (2, 2, 2, False), (2, 1, 2, True), (1, 2, 3, True), (2, 1, 1, True), (2, 1, 0, False)])
def test_the_resume_plan_converts_only_across_world_sizes_under_zero(saved_world, world, stage, universal):
    checkpoint, converted = Path("out/step-00000004"), Path("out/universal/step-00000004")
    marker = {"world_size": saved_world, "consumed_samples": 32}
    plan = plan_resume(checkpoint, marker, world_size=world, zero_stage=stage, universal_path=converted)
    assert plan.universal is universal
    assert plan.checkpoint == checkpoint and plan.load_path == (converted if universal else checkpoint)
    assert (plan.saved_world_size, plan.consumed_samples) == (saved_world, 32)
    ds_raw = {"zero_optimization": {"stage": stage}}
    prepare_deepspeed_config(plan, ds_raw)
    assert ds_raw.get("checkpoint", {}).get("load_universal", False) is universal


# --------------------------------------------------------------------------------------------------
# Format versions and what torch.load is allowed to build
# --------------------------------------------------------------------------------------------------


def test_marker_format_version_is_checked(tmp_path):
    marker = json.loads((OLD_CHECKPOINT / COMPLETE_MARKER).read_text())
    (tmp_path / COMPLETE_MARKER).write_text(json.dumps(marker))
    assert read_checked_marker(tmp_path)["format_version"] == FORMAT_VERSION
    (tmp_path / COMPLETE_MARKER).write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(CheckpointError, match=rf"{COMPLETE_MARKER} has format_version 99, but cpt-ds .* reads "
                                              rf"format_version {FORMAT_VERSION}"):
        read_checked_marker(tmp_path)


def test_client_state_format_version_is_checked(tmp_path):
    assert saved_client_state(OLD_CHECKPOINT)["step"] == 3  # the pre-refactor checkpoint: version 1
    torch.save({"module": {}, "cpt_ds": {"format_version": 2, "step": 3}}, tmp_path / MODEL_STATES_FILE)
    with pytest.raises(CheckpointError, match=rf"{MODEL_STATES_FILE} has format_version 2, but cpt-ds .* reads "
                                              "format_version 1"):
        saved_client_state(tmp_path)
    zero3 = tmp_path / "zero3"  # ZeRO-3 names rank 0's model-states file differently
    zero3.mkdir()
    torch.save({"module": None, "cpt_ds": {"format_version": 1, "step": 5}}, zero3 / ZERO3_MODEL_STATES_FILE)
    assert saved_client_state(zero3)["step"] == 5


def draws() -> list:
    return [random.random(), float(np.random.rand()), float(torch.rand(1))]


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    torch.save(rng_state(), tmp_path / "rng_state_0.pt")
    expected = draws()
    torch.load(tmp_path / "rng_state_0.pt", weights_only=True)  # plain tensors and values only
    set_rng_state(load_rng_file(tmp_path / "rng_state_0.pt"))
    assert draws() == expected


def test_rng_state_of_an_old_checkpoint_still_loads():
    """Written before the numpy state was stored as a tensor: a pickled numpy array."""
    old = torch.load(OLD_CHECKPOINT / "rng_state_0.pt", weights_only=False)
    set_rng_state(old)
    expected = draws()
    set_rng_state(load_rng_file(OLD_CHECKPOINT / "rng_state_0.pt"))
    assert draws() == expected


class Payload:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_rng_file_with_other_objects_is_refused(tmp_path):
    file = tmp_path / "rng_state_0.pt"
    torch.save({"python": Payload()}, file, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="rng_state_0.pt holds objects other than tensors"):
        load_rng_file(file)


def test_a_data_error_ends_train_py_with_exit_2_and_one_line(monkeypatch, capsys):
    """E.g. "cannot resume the data position" from TrainLoader.load_state_dict: a user error, no traceback."""
    import train
    from cpt_ds.data import DataError

    def refuse(config):
        raise DataError("cannot resume the data position: the data changed; restore it or start fresh")

    monkeypatch.setattr(train.RunConfig, "load", staticmethod(lambda argv: None))
    monkeypatch.setattr(train, "Trainer", refuse)
    assert train.main([]) == 2
    assert capsys.readouterr().err == ("error (rank 0): cannot resume the data position: the data changed; "
                                       "restore it or start fresh\n")
