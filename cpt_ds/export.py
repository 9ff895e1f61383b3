"""Checkpoint -> Hugging Face folder: full weights (safetensors), a peft adapter, or a merged LoRA model.

Weights come from DeepSpeed's fp32 master copy (``zero_to_fp32``, any ZeRO stage), never from the
low-precision module, so the export is as exact as training state allows. The tokenizer files are
copied byte for byte from the checkpoint, so the exported folder has the same tokenizer fingerprint
and the same token files keep working for the next stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cpt_ds.checkpoint import (MODEL_STATES_FILE, CheckpointError, read_checked_marker, saved_client_state,
                               verified_marker)
from cpt_ds.fileio import replace_folder

logger = logging.getLogger(__name__)

EXPORT_INFO = "cpt_ds_export.json"
"""Written last into every export: what it was exported from, and ``files``, every name it wrote."""
PARTIAL_MARKER = "cpt_ds_export_partial"
"""Marks ``OUTPUT.export-partial``, an export being written (a leftover one is safe to delete)."""
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASE_CONFIG_OVERRIDES = ("rope_parameters", "max_position_embeddings")
"""What a LoRA run may change in its base model's config (rope_theta / rope_scaling and the positions
raised with them): an adapter's base is rebuilt with them, and an adapter export records them."""


def base_config(base_path: str | os.PathLike, trained: dict[str, Any]) -> Any:
    """The base model's config with the trained model's ``BASE_CONFIG_OVERRIDES`` (a dict of them)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path)
    for key in BASE_CONFIG_OVERRIDES:
        if trained.get(key) is not None:
            setattr(config, key, json.loads(json.dumps(trained[key])))
    return config


def checkpoint_meta(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / "cpt_ds_meta.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no cpt_ds_meta.json; pass a step-NNNNNNNN folder written by train.py")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the checkpoint is corrupt") from None


def trained_state_dict(checkpoint: Path, *, exclude_frozen: bool) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint (trainable only when ``exclude_frozen``), keyed like the engine's module."""
    meta = checkpoint_meta(checkpoint)
    if meta["zero_stage"] == 0:
        # DeepSpeed's model-states file holds tensors, sizes, dicts and its JSON config: weights_only loads it.
        state = torch.load(checkpoint / MODEL_STATES_FILE, map_location="cpu", weights_only=True)
        return {name: tensor.float() for name, tensor in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name,
                                                         exclude_frozen_parameters=exclude_frozen))


@contextlib.contextmanager
def _local_construction():
    """Build models whole on this process even inside a ZeRO-3 training process.

    train.py exports on rank 0 while the ZeRO-3 ``HfDeepSpeedConfig`` is registered, which would make
    transformers construct under ``zero.Init`` and wait for the other ranks' collectives forever.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_trained_model(checkpoint: Path, *, dtype: torch.dtype = torch.float32) -> Any:
    """The trained model of a checkpoint as an in-memory HF model (a PeftModel for LoRA runs)."""
    with _local_construction():
        return _load_trained_model(checkpoint, dtype=dtype)


def _load_trained_model(checkpoint: Path, *, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt_ds.model import resize_embeddings

    read_checked_marker(checkpoint)  # refuses an incomplete checkpoint, or one in a format we do not read
    saved_client_state(checkpoint)  # the same for our client state
    meta = checkpoint_meta(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint / "model")
    if not meta["is_peft"]:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = trained_state_dict(checkpoint, exclude_frozen=False)
        _load_strict(model, state, checkpoint)
        return model

    from peft import LoraConfig, get_peft_model

    base_path = meta["base_model"]
    if not Path(base_path).is_dir():
        raise CheckpointError(f"LoRA export needs the base model {base_path} recorded in {checkpoint}; "
                              "it no longer exists there: restore it or pass --base_model")
    overrides = {key: getattr(config, key, None) for key in BASE_CONFIG_OVERRIDES}
    base = AutoModelForCausalLM.from_pretrained(base_path, config=base_config(base_path, overrides), dtype=dtype)
    resize_embeddings(base, config.vocab_size, tokenizer_path=checkpoint / "tokenizer", model_path=base_path)
    model = get_peft_model(base, LoraConfig.from_pretrained(checkpoint / "model"))
    state = trained_state_dict(checkpoint, exclude_frozen=True)
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: trainable weights do not match the adapter config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    result = model.load_state_dict({name: tensor.to(dtype) for name, tensor in state.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return model


def _load_strict(model: Any, state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    tied = {name for name in model.state_dict() if name not in state and _is_tied(model, name)}
    expected = set(model.state_dict()) - tied
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint}: weights do not match the model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()


def _is_tied(model: Any, name: str) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name.startswith("lm_head")


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, merge_lora: bool = False,
                      dtype: str | None = None, overwrite: bool = False, verify: bool = True) -> Path:
    """Write a Hugging Face folder for ``checkpoint`` to ``output`` (temp folder + rename).

    Full runs: config + safetensors + tokenizer. LoRA runs: a peft adapter folder (adapter + any
    modules_to_save) + tokenizer, or with ``merge_lora`` a full model with the adapter merged in.
    ``dtype`` defaults to the training precision. ``output`` may not be, hold or lie in the run
    (``output_dir/final`` excepted); ``overwrite`` replaces only a previous export (:func:`check_output`).
    ``verify`` checks every file against the completion marker's sha256 first (a read of the whole
    checkpoint); train.py's final export skips it for the checkpoint it has just written and hashed.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if verify:
        verified_marker(checkpoint)  # a truncated or altered file is named here, not by torch.load
    meta = checkpoint_meta(checkpoint)
    check_output(checkpoint, output, overwrite=overwrite)
    torch_dtype = DTYPE_NAMES[dtype or meta["dtype"]]
    model = load_trained_model(checkpoint, dtype=torch.float32)
    kind = "full"
    if meta["is_peft"] and merge_lora:
        model = model.merge_and_unload()
        kind = "merged"
    elif meta["is_peft"]:
        kind = "adapter"
    model = model.to(torch_dtype)
    info = {"checkpoint": str(checkpoint.resolve()), "kind": kind, "dtype": str(torch_dtype).removeprefix("torch."),
            "step": meta["step"], "base_model": meta.get("base_model"),
            "document_attention": trained_document_attention(checkpoint)}
    if kind == "adapter":  # the adapter folder has no config.json to carry them
        info["base_config"] = {key: getattr(model.config, key, None) for key in BASE_CONFIG_OVERRIDES}
    with _partial_folder(output) as temporary:
        model.save_pretrained(temporary, safe_serialization=True)
        for file in sorted((checkpoint / "tokenizer").iterdir()):
            shutil.copy2(file, temporary / file.name)
        # The marker, written last, lists what this export wrote: all that a later --overwrite may delete.
        info["files"] = sorted(child.name for child in temporary.iterdir() if child.name != PARTIAL_MARKER)
        (temporary / PARTIAL_MARKER).unlink()
        (temporary / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        # check_output made sure OUTPUT.export-previous is free (a leftover one holds an older export).
        replace_folder(temporary, output, output.with_name(output.name + ".export-previous"))
    logger.info("exported %s (%s, %s) to %s", checkpoint, kind, torch_dtype, output)
    return output


def check_output(checkpoint: Path, output: Path, *, overwrite: bool) -> None:
    """Refuse an ``output`` that would write into, or delete, anything export did not write.

    The run folder (the checkpoint's parent) holds checkpoints that rotation and resume manage, so the
    output may not be it, hold it, or lie inside it, except ``output_dir/final`` where train.py exports
    (paths compared resolved: aliases and symlinks count). ``overwrite`` replaces only a folder whose
    ``cpt_ds_export.json`` lists every file in it: a previous export, nothing added since.
    """
    run, target = checkpoint.resolve().parent, output.resolve()
    if target == run or run.is_relative_to(target):
        raise CheckpointError(f"--output {output} is or holds the run folder {run} of {checkpoint}; exporting "
                              "there would replace its checkpoints: choose an --output outside the run")
    if target.is_relative_to(run) and target != run / "final":
        raise CheckpointError(f"--output {output} lies inside the run folder {run} of {checkpoint}, whose "
                              "folders checkpointing manages; choose an --output outside it (or its final/)")
    if not os.path.lexists(output):
        return
    previous = output.with_name(output.name + ".export-previous")
    if os.path.lexists(previous):
        raise CheckpointError(f"{previous} is left by an export interrupted while replacing {output} (it holds "
                              "the export being replaced): delete it or move it back, then export again")
    if not overwrite:
        raise FileExistsError(f"{output} already exists; choose another --output or pass --overwrite")
    if output.is_symlink() or not output.is_dir():
        kind = "a symlink" if output.is_symlink() else "a file"
        raise CheckpointError(f"--output {output} is {kind}, not a folder export wrote; --overwrite replaces only "
                              "a previous export: choose another --output")
    written = exported_files(output)
    others = sorted(child.name for child in output.iterdir() if child.name not in written)
    if others:
        raise CheckpointError(f"--output {output} holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} "
                              f"that no export wrote (its {EXPORT_INFO} does not list them); --overwrite replaces only "
                              "a previous export: move them away or choose another --output")


def exported_files(folder: Path) -> set[str]:
    """The names a previous export wrote into ``folder``, from its marker; refused if it has none."""
    info = folder / EXPORT_INFO
    try:
        files = json.loads(info.read_text(encoding="utf-8")).get("files")
    except FileNotFoundError:
        raise CheckpointError(f"--output {folder} is not a previous export (no {EXPORT_INFO}); --overwrite replaces "
                              "only what export wrote: choose another --output or empty it yourself") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        files = None
    if not isinstance(files, list):
        raise CheckpointError(f"{info} does not list the files its export wrote (an export by an older cpt-ds, or "
                              "edited); --overwrite cannot tell what is safe to delete: remove the folder yourself")
    return {*files, EXPORT_INFO}


@contextlib.contextmanager
def _partial_folder(output: Path):
    """``OUTPUT.export-partial``, marked as ours; removed if the export stops, and a leftover of an
    export killed before it could clean up (it holds the mark) removed before starting again."""
    temporary = output.with_name(output.name + ".export-partial")
    if temporary.is_dir() and (temporary / PARTIAL_MARKER).is_file():
        logger.warning("removing %s left by an interrupted export", temporary)
        shutil.rmtree(temporary)
    elif os.path.lexists(temporary):
        raise CheckpointError(f"{temporary} exists but is not an unfinished export (no {PARTIAL_MARKER}); "
                              "move it away")
    temporary.mkdir(parents=True)
    (temporary / PARTIAL_MARKER).write_text("an unfinished export; safe to delete\n")
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # only what this export wrote; the error goes on
        raise


def trained_document_attention(checkpoint: Path) -> bool:
    """Whether the checkpoint was trained with document attention (runs from before the field: no)."""
    run_config = checkpoint / "run_config.json"
    if not run_config.is_file():
        return False
    return bool(json.loads(run_config.read_text()).get("document_attention", False))


def exported_document_attention(folder: str | os.PathLike) -> bool | None:
    """The document_attention an exported folder was trained with, or None when it does not say."""
    info = Path(folder) / EXPORT_INFO
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("document_attention")


def load_exported_model(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa") -> Any:
    """Load what ``export_checkpoint`` wrote: a full model folder, or a peft adapter on its base model.

    For an adapter the base is grown to the tokenizer's size exactly as training did (same new rows),
    so the adapter's modules_to_save and the frozen rows line up.
    """
    from transformers import AutoModelForCausalLM

    from cpt_ds.model import resize_embeddings
    from cpt_ds.tokenizer import load_tokenizer

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    from peft import PeftModel

    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    info = folder / EXPORT_INFO
    recorded = json.loads(info.read_text()) if info.is_file() else {}
    base = recorded.get("base_model") or base
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{folder} is a LoRA adapter whose base model {base!r} is not a local folder; "
                              "set base_model_name_or_path in its adapter_config.json")
    with _local_construction():
        model = AutoModelForCausalLM.from_pretrained(base, config=base_config(base, recorded.get("base_config") or {}),
                                                     dtype=dtype, attn_implementation=attn_implementation)
        resize_embeddings(model, len(load_tokenizer(folder)), tokenizer_path=folder, model_path=base)
        return PeftModel.from_pretrained(model, folder)
