"""Everything checked before anything heavy: one ValueError listing every problem of a run.

Runs on every rank before the model is built (it only reads small files: JSONs, token-file indexes,
tokenizer files), so a bad run fails in seconds with the whole list instead of one problem per
relaunch after minutes of loading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_ds.attention import attention_problems, sequence_parallel_problems
from cpt_ds.config import ConfigError, ModelConfig, RunConfig
from cpt_ds.ds_config import DeepSpeedSettings, load_deepspeed_config
from cpt_ds.hardware import slow_cpu_precision_warning
from cpt_ds.loss import liger_problems
from cpt_ds.model import dtype_problems, grown_vocabulary_problems, load_hf_config, quantization_problems
from cpt_ds.tiled_mlp import model_type_problems
from cpt_ds.token_check import distinct_files, eval_overlap_warnings, same_file_problems, token_id_problems
from cpt_ds.token_file import IndexedTokenFile, TokenFileError, check_shard_plans, resolve_token_prefixes
from cpt_ds.tokenizer import TokenizerError, load_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class Plan:
    """What preflight resolved, handed to the trainer so nothing is read twice."""

    config: RunConfig
    ds: DeepSpeedSettings
    train_components: list[tuple[str, float | None, list[IndexedTokenFile]]]
    """(name, normalized weight or None, token files) of every data_path component."""
    eval_sets: list[tuple[str, list[IndexedTokenFile]]]
    """(name, token files) of every eval_data_path set."""
    hf_config: Any
    tokenizer: Any
    tokenizer_fingerprint: str
    vocab_size: int
    """Rows the embedding must have: max(model vocabulary, tokenizer length)."""

    @property
    def train_files(self) -> list[IndexedTokenFile]:
        return [file for _, _, files in self.train_components for file in files]

    @property
    def eval_files(self) -> list[IndexedTokenFile]:
        return [file for _, files in self.eval_sets for file in files]


def sidecar_tokenizer_fingerprint(meta: dict[str, Any] | None) -> str | None:
    if meta is None:
        return None
    tokenizer = meta.get("tokenizer")
    return tokenizer.get("fingerprint") if isinstance(tokenizer, dict) else None


def _open_token_files(field_name: str, entries: list[str], problems: list[str],
                      origins: list[tuple[str, IndexedTokenFile]]) -> list[IndexedTokenFile]:
    """Every token file the entries name: a prefix, or a glob / folder of them (the shards of a
    ``--shard K/N`` pack) read in sorted order; the files of all entries, flattened, in entry order.
    ``(entry, file)`` of each is appended to ``origins`` (to name the entries of a file named twice)."""
    files = []
    patterns = False
    for entry in entries:
        try:
            prefixes = resolve_token_prefixes(entry)
        except TokenFileError as error:
            problems.append(f"{field_name}: {error}")
            continue
        patterns = patterns or prefixes != [entry]
        for prefix in prefixes:
            try:
                files.append(IndexedTokenFile(prefix))
                origins.append((entry, files[-1]))
            except TokenFileError as error:
                problems.append(f"{field_name}: {error}")
    try:
        # Explicit prefixes may name one shard on purpose; a glob or folder must hold every part.
        check_shard_plans(f"{field_name} {' '.join(entries)}", files, complete=patterns)
    except TokenFileError as error:
        problems.append(str(error))
    return files


def preflight(config: RunConfig, *, world_size: int, rank: int = 0) -> Plan:
    """Check the run config against the files it names; raise one ConfigError with every problem.

    Warnings (things that work but badly) are logged once, by rank 0.
    """
    model_cfg, data_cfg, train_cfg = config.model, config.data, config.train
    problems = config.config_problems()
    sp_size = max(1, train_cfg.sequence_parallel_size)  # below 1 is reported by config_problems
    # DeepSpeed's train_batch_size counts data-parallel replicas: a sequence-parallel group trains one sample.
    ds, ds_problems = load_deepspeed_config(
        train_cfg.deepspeed, world_size=max(1, world_size // sp_size),
        micro_batch_size=train_cfg.per_device_train_batch_size,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps, sequence_parallel_size=sp_size)
    problems += ds_problems
    problems += _path_problems(config, ds)
    tokenizer, fingerprint = _open_tokenizer(model_cfg, problems)
    components, _ = data_cfg.components()
    train_origins: list[tuple[str, IndexedTokenFile]] = []
    eval_origins: list[tuple[str, IndexedTokenFile]] = []
    train_components = [(c.name, c.weight, _open_token_files("data_path", list(c.paths), problems, train_origins))
                        for c in components]
    named_eval, _ = data_cfg.eval_sets()
    eval_sets = [(name, _open_token_files("eval_data_path", [prefix], problems, eval_origins))
                 for name, prefix in named_eval]
    problems += same_file_problems(train_origins)
    if rank == 0:
        for warning in eval_overlap_warnings(train_origins, eval_origins):
            logger.warning(warning)
    files = [file for _, _, group in train_components for file in group] + [
        file for _, group in eval_sets for file in group]
    if fingerprint:
        problems += _packed_with_problems(files, fingerprint, model_cfg.tokenizer_path)
    hf_config, vocab_size = _model_shape(config, tokenizer, problems)
    if ds is not None:
        problems += _engine_problems(config, ds)
        if rank == 0 and not torch.cuda.is_available():
            warning = slow_cpu_precision_warning(ds.precision, ds.path)
            if warning is not None:
                logger.warning(warning)
    problems += attention_problems(model_cfg)
    problems += sequence_parallel_problems(train_cfg.sequence_parallel_size, hf_config, world_size=world_size,
                                           block_size=data_cfg.block_size)
    problems += liger_problems(model_cfg.use_liger_kernel)
    has_eval_data = bool(data_cfg.eval_data_path) or data_cfg.validation_split_percentage > 0
    if train_cfg.eval_steps is not None and not has_eval_data:
        problems.append("eval_steps is set but there is no validation data: set eval_data_path or "
                        "validation_split_percentage > 0")
    if vocab_size:
        # Reading every .bin (once per machine, cached) is worth it only for an otherwise sound run.
        problems += token_id_problems(distinct_files(files), vocab_size, full=not problems, rank=rank)
    if problems:
        raise ConfigError("invalid run configuration:\n  - " + "\n  - ".join(problems))
    assert ds is not None and hf_config is not None and tokenizer is not None
    return Plan(config=config, ds=ds, train_components=train_components, eval_sets=eval_sets, hf_config=hf_config,
                tokenizer=tokenizer, tokenizer_fingerprint=fingerprint, vocab_size=vocab_size)


def _path_problems(config: RunConfig, ds: DeepSpeedSettings | None) -> list[str]:
    """Model, adapter and checkpoint folders that do not exist (nothing is downloaded at run time)."""
    model_cfg, problems = config.model, []
    for name in ("model_name_or_path", "config_name", "peft_path"):
        value = getattr(model_cfg, name)
        if value is not None and not Path(value).exists():
            stage = f" (ZeRO-{ds.zero_stage})" if ds is not None else ""
            problems.append(f"{name}: {value} does not exist{stage}; pass a local folder "
                            "(nothing is downloaded at run time)")
    if model_cfg.peft_path is not None and Path(model_cfg.peft_path).is_dir() \
            and not (Path(model_cfg.peft_path) / "adapter_config.json").is_file():
        problems.append(f"peft_path: {model_cfg.peft_path} holds no adapter_config.json; pass a peft adapter folder")
    resume = config.train.resume_from_checkpoint
    if resume not in ("auto", "none") and not Path(resume).exists():
        problems.append(f"resume_from_checkpoint: {resume} does not exist; pass a step-NNNNNNNN folder, "
                        "'auto' or 'none'")
    output_dir = Path(config.train.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        # Found here, not at the first save after hours of training.
        problems.append(f"output_dir: {output_dir} is a file; pass a folder (it holds checkpoints and metrics)")
    return problems


def _open_tokenizer(model_cfg: ModelConfig, problems: list[str]) -> tuple[Any, str]:
    """``(tokenizer or None, fingerprint or "")``; problems are appended."""
    path = model_cfg.tokenizer_path
    if path is None:
        return None, ""
    if not Path(path).exists():
        problems.append(f"tokenizer_name_or_path: {path} does not exist; "
                        "pass the tokenizer folder the token files were packed with")
        return None, ""
    tokenizer, fingerprint = None, ""
    try:
        fingerprint = tokenizer_fingerprint(path)
        tokenizer = load_tokenizer(path)
    except TokenizerError as error:
        problems.append(f"tokenizer_name_or_path: {error}")
    return tokenizer, fingerprint


def _packed_with_problems(files: list[IndexedTokenFile], fingerprint: str, tokenizer_path: str | None) -> list[str]:
    """Token files packed with another tokenizer than the run's (a sidecar-less file is only warned about)."""
    problems = []
    for file in files:
        packed_with = sidecar_tokenizer_fingerprint(file.meta)
        if packed_with is None:
            logger.warning("%s has no cpt-ds sidecar (a plain Megatron file): its tokenizer cannot be checked",
                           file.bin_path)
        elif packed_with != fingerprint:
            problems.append(f"tokenizer fingerprint {fingerprint[:12]} of {tokenizer_path} != "
                            f"{packed_with[:12]} recorded in {file.json_path}; pack the corpus with this "
                            "tokenizer or point tokenizer_name_or_path at the one it was packed with")
    return problems


def _model_shape(config: RunConfig, tokenizer: Any, problems: list[str]) -> tuple[Any, int]:
    """``(hf_config or None, embedding rows)``: the model config checked against block size, tokenizer and data."""
    model_cfg, block_size = config.model, config.data.block_size
    if not all(getattr(model_cfg, name) is None or Path(getattr(model_cfg, name)).exists()
               for name in ("model_name_or_path", "config_name")):
        return None, 0
    try:
        hf_config = load_hf_config(model_cfg, block_size=block_size)
    except (OSError, ValueError) as error:
        problems.append(f"model config: {error}")
        return None, 0
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if max_positions is not None and block_size > max_positions:
        # Without a RoPE override a longer window is more likely a mistake than a context extension.
        problems.append(f"block_size {block_size} > the model's max_position_embeddings "
                        f"{max_positions}; lower block_size, or extend the context with rope_theta / rope_scaling")
    problems += model_type_problems(model_cfg.tiled_mlp, hf_config)
    vocab_size = max(hf_config.vocab_size, len(tokenizer) if tokenizer is not None else 0)
    problems += grown_vocabulary_problems(model_cfg, hf_config, vocab_size)
    return hf_config, vocab_size


def _engine_problems(config: RunConfig, ds: DeepSpeedSettings) -> list[str]:
    """Precision, quantization and optimizer settings that the DeepSpeed JSON and the run config disagree on."""
    problems = dtype_problems(config.model, ds) + quantization_problems(config.model, ds)
    if ds.has_optimizer:
        params = ds.raw["optimizer"].get("params", {})
        for ours, theirs in (("learning_rate", "lr"), ("weight_decay", "weight_decay")):
            if theirs in params and params[theirs] != getattr(config.optim, ours):
                problems.append(f"{ours} {getattr(config.optim, ours)} != optimizer.params.{theirs} "
                                f"{params[theirs]} in {ds.path}; make them equal or drop it from the JSON")
    return problems
