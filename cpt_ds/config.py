"""The run configuration: one flat JSON file whose every field can be overridden by ``--field value``.

Field names and meanings follow the baseline ``run_clm_pt_with_peft.py`` / ``run_pt.sh`` wherever the
baseline has the flag, so a user's script migrates by search-and-replace (docs/configuration.md: migration table).
Internally the flat namespace is split into one small dataclass per component; ``RunConfig.load``
parses, routes each key to its component, and ``validate`` reports every problem in one ValueError.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cpt_ds.cli import DEBUG_HELP
from cpt_ds.config_values import coerce, parse_overrides, split_commas
from cpt_ds.data.blend import ComponentSpec, PhaseBlend, is_weighted, parse_data_path, parse_named_paths
from cpt_ds.phases import parse_phases, phases_problems, run_components, total_steps
from cpt_ds.rope import override_problems
from cpt_ds.tiled_mlp import tiling_problems

# Baseline flags that have no counterpart here, with what to do instead. Named so the unknown-key
# error for a migrated run_pt.sh says why instead of just "unknown".
RETIRED_FIELDS: dict[str, str] = {
    "dataset_dir": "pack the corpus once with tools/pack_corpus.py and pass the prefixes as data_path",
    "data_cache_dir": "token files replace arrow caches: pack with tools/pack_corpus.py and use data_path",
    "preprocessing_num_workers": "tokenization is offline: use tools/pack_corpus.py --workers",
    "overwrite_output_dir": "training resumes from output_dir (resume_from_checkpoint auto); "
                            "use a new output_dir or resume_from_checkpoint none to start over",
    "do_train": "train.py always trains; drop the flag",
    "do_eval": "evaluation runs every eval_steps and at the end; drop the flag",
    "bf16": "precision comes from the DeepSpeed JSON (its bf16 section); drop the flag",
    "fp16": "precision comes from the DeepSpeed JSON (its fp16 section); drop the flag",
    "evaluation_strategy": "set eval_steps",
    "eval_strategy": "set eval_steps",
    "save_strategy": "set save_steps",
    "logging_strategy": "set logging_steps",
    "logging_first_step": "step 1 is always logged; drop the flag",
    "ddp_timeout": "set the process-group timeout with dist_timeout_minutes",
    "report_to": "enable TensorBoard/CSV in the DeepSpeed JSON's monitor sections",
    "logging_dir": "set the monitor output_path in the DeepSpeed JSON",
}


# Fields spelled as one comma-separated string in JSON and on the command line (the baseline's
# spelling, so run_pt.sh values carry over) and held as lists in the code.
COMMA_FIELDS = ("trainable", "modules_to_save", "config_overrides")
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj")
# Fields that only shape LoRA; given together with full_finetuning they would be ignored.
LORA_ONLY_FIELDS = ("trainable", "lora_rank", "lora_alpha", "lora_dropout", "modules_to_save")


class ConfigError(ValueError):
    """The run configuration is invalid; the message lists every problem found."""


def unknown_field_problem(key: str, table: dict[str, Any]) -> str:
    """Why ``key`` is refused: a retired baseline flag and what replaces it, else the nearest field names."""
    hint = RETIRED_FIELDS.get(key)
    if hint:
        return f"{key}: not a cpt-ds field ({hint})"
    close = difflib.get_close_matches(key, table, n=2)
    guess = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{key}: unknown field{guess} (see docs/configuration.md)"


@dataclass(kw_only=True)
class ModelConfig:
    model_name_or_path: str | None = None
    """Local Hugging Face model folder to continue pretraining; None trains from scratch from a config."""
    tokenizer_name_or_path: str | None = None
    """Tokenizer folder; defaults to model_name_or_path. Its fingerprint must match the token files'."""
    config_name: str | None = None
    """Model config (folder or config.json) for training from scratch."""
    model_type: str = "llama"
    """Model type for training from scratch when no config_name is given."""
    config_overrides: list[str] = field(default_factory=list)
    """From scratch: 'hidden_size=256,num_hidden_layers=4,...' applied to the config (KEY=VALUE items)."""
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype to load weights in; 'auto' follows the DeepSpeed JSON (bf16 -> bfloat16, fp16 -> float16, else float32)."""
    use_flash_attention_2: bool = False
    """Use flash_attention_2 (needs the 'flash' extra and a GPU); otherwise PyTorch SDPA."""
    document_attention: bool = True
    """Attend only within each document of a packed sample (position ids restart at every document start);
    false lets a token attend to earlier documents of its window (the baseline's behaviour). Part of the
    resume fingerprint."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of the fused head projection + cross entropy: the full [tokens, vocabulary]
    logits are never held, only one chunk's. 0 computes the full logits (the Hugging Face path)."""
    use_liger_kernel: bool = False
    """CUDA + the 'gpu' extra: Liger-Kernel's fused linear cross entropy (and its RMSNorm / SwiGLU / RoPE
    kernels) instead of the chunked loss."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    rope_theta: float | None = None
    """Override of the model's RoPE base (context extension, e.g. 1000000.0); null keeps the model's."""
    rope_scaling: dict[str, Any] | None = None
    """Override of the model's RoPE scaling in Hugging Face's form, e.g. {"rope_type": "yarn", "factor": 4.0,
    "original_max_position_embeddings": 8192}; null keeps the model's. Fingerprinted and exported."""
    tiled_mlp: bool = False
    """DeepSpeed's TiledMLP: each MLP runs over shards of the sequence, recomputed in backward (long sequences)."""
    tiled_mlp_shards: int | None = None
    """Shards per MLP call with tiled_mlp; null = ceil(block_size / hidden_size) (DeepSpeed's ALST rule)."""
    full_finetuning: bool = False
    """Train every weight; False trains LoRA adapters (the baseline's default)."""
    trainable: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    """LoRA target modules, comma separated."""
    lora_rank: int = 64
    lora_alpha: float = 128.0
    lora_dropout: float = 0.05
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full next to LoRA, comma separated (e.g. 'embed_tokens,lm_head')."""
    peft_path: str | None = None
    """An existing LoRA adapter folder to continue training from."""
    load_in_kbits: Literal[4, 8, 16] = 16
    """QLoRA: quantize the frozen base weights to 4 or 8 bits with bitsandbytes; 16 = no quantization."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True

    def problems(self) -> list[str]:
        found = []
        if self.model_name_or_path is None and self.config_name is None and not self.model_type:
            found.append("set model_name_or_path (continue pretraining) or config_name / model_type (from scratch)")
        if self.model_name_or_path is not None and self.config_overrides:
            found.append("config_overrides only applies when training from scratch; "
                         "drop it or drop model_name_or_path")
        if self.tokenizer_name_or_path is None and self.model_name_or_path is None:
            found.append("tokenizer_name_or_path is required when training from scratch")
        if not self.full_finetuning:
            if self.model_name_or_path is None:
                found.append("LoRA (full_finetuning false) adapts a pretrained model: set model_name_or_path, "
                             "or set full_finetuning true to train from scratch")
            if self.lora_rank <= 0:
                found.append(f"lora_rank must be positive, got {self.lora_rank}")
            if not 0.0 <= self.lora_dropout < 1.0:
                found.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.trainable:
                found.append("trainable names no LoRA target modules")
        else:
            if self.peft_path is not None:
                found.append("peft_path loads a LoRA adapter, which full_finetuning does not train; drop one")
            if self.load_in_kbits != 16:
                found.append("load_in_kbits 4/8 quantizes frozen base weights for QLoRA; "
                             "full_finetuning cannot train quantized weights: set full_finetuning false")
        if self.loss_chunk_size < 0:
            found.append(f"loss_chunk_size must be >= 0 (0 = full logits), got {self.loss_chunk_size}")
        if not self.full_finetuning and "lm_head" in self.trainable and \
                (self.loss_chunk_size > 0 or self.use_liger_kernel):
            found.append("LoRA on lm_head cannot run through the chunked / Liger loss (it reads the head weight "
                         "directly); train lm_head in full with modules_to_save, or set loss_chunk_size 0")
        if self.load_in_kbits != 16 and self.model_name_or_path is None:
            found.append("load_in_kbits needs pretrained weights to quantize: set model_name_or_path")
        found += override_problems(self.rope_theta, self.rope_scaling) + tiling_problems(self)
        malformed = [item for item in self.config_overrides if "=" not in item or item.startswith("=")]
        if malformed:
            found.append(f"config_overrides items are KEY=VALUE, got {', '.join(map(repr, malformed))}")
        return found

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer_name_or_path or self.model_name_or_path


@dataclass(kw_only=True)
class DataConfig:
    data_path: list[str] = field(default_factory=list)
    """Token-file prefixes (from tools/pack_corpus.py), read back to back in this order; or a weighted
    blend in Megatron's form, 'W1 PREFIX1 W2 PREFIX2 ...' (weights are normalized). An entry may be a
    glob or a folder of token files (the parts of a --shard K/N pack), read in sorted order as one."""
    eval_data_path: list[str] = field(default_factory=list)
    """Validation sets, each PREFIX or NAME=PREFIX; otherwise documents are held out of every data_path component."""
    block_size: int = 1024
    """Tokens per training sample (the model sees block_size inputs and block_size next-token labels)."""
    validation_split_percentage: float = 0.001
    """Fraction (0.001 = 0.1%) of documents held out for validation when eval_data_path is empty."""
    max_train_samples: int | None = None
    """Use only the first N training samples (windows) of the stream."""
    max_eval_samples: int | None = None
    """Evaluate on only the first N validation samples."""
    phases: list[dict[str, Any]] = field(default_factory=list)
    """A campaign: [{"name", "steps", "data_path"}, ...] trained in order, each phase with its own data_path
    (blend syntax); replaces data_path, and max_steps is the sum of the steps (docs/campaigns.md)."""

    def problems(self) -> list[str]:
        found = []
        if not self.data_path and not self.phases:
            found.append("data_path is empty: pass one or more token-file prefixes made by tools/pack_corpus.py")
        found += self.components()[1]
        found += self.eval_sets()[1]
        if self.block_size < 2:
            found.append(f"block_size must be at least 2, got {self.block_size}")
        if not 0.0 <= self.validation_split_percentage < 1.0:
            found.append(f"validation_split_percentage is a fraction in [0, 1), got {self.validation_split_percentage}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                found.append(f"{name} must be positive or null, got {value}")
        return found

    def components(self) -> tuple[list[ComponentSpec], list[str]]:
        """The training components of ``data_path`` (one unweighted stream or a weighted blend), or of
        every phase (each corpus once)."""
        if self.phases:
            phases, problems = parse_phases(self.phases)
            return (run_components(phases)[0] if phases else []), problems
        return parse_data_path(self.data_path)

    def phase_blends(self) -> list[PhaseBlend] | None:
        """Each phase's blend over the run's components; None without phases."""
        return run_components(parse_phases(self.phases)[0])[1] if self.phases else None

    def eval_sets(self) -> tuple[list[tuple[str, str]], list[str]]:
        """``[(name, prefix)]`` of ``eval_data_path``."""
        return parse_named_paths(self.eval_data_path, "eval_data_path")

    @property
    def is_blend(self) -> bool:
        return is_weighted(self.data_path)


@dataclass(kw_only=True)
class OptimConfig:
    learning_rate: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup", "wsd"] = "cosine"
    """'wsd' is warmup-stable-decay: warmup, the peak held, then a final decay of decay_steps / decay_ratio."""
    warmup_ratio: float = 0.05
    """Warmup as a fraction of the total steps (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of learning_rate."""
    decay_steps: int | None = None
    """wsd only: optimizer steps of the final decay (give this or decay_ratio)."""
    decay_ratio: float | None = None
    """wsd only: the final decay as a fraction of the total steps, rounded up (give this or decay_steps)."""
    decay_type: Literal["linear", "cosine", "1-sqrt"] = "1-sqrt"
    """wsd only: the shape of the final decay (1-sqrt: Haegele et al. 2024, MiniCPM)."""

    def problems(self) -> list[str]:
        rules = [("learning_rate", self.learning_rate > 0, "must be positive"),
                 ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                 ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "must be in [0, 1)"),
                 ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                 ("min_lr_ratio", 0.0 <= self.min_lr_ratio <= 1.0, "must be in [0, 1]"),
                 ("decay_steps", self.decay_steps is None or self.decay_steps > 0, "must be positive"),
                 ("decay_ratio", self.decay_ratio is None or 0.0 < self.decay_ratio <= 1.0, "must be in (0, 1]")]
        found = [f"{name} {rule}, got {getattr(self, name)}" for name, holds, rule in rules if not holds]
        given = [name for name in ("decay_steps", "decay_ratio") if getattr(self, name) is not None]
        if self.lr_scheduler_type != "wsd":
            found += [f"{name} ({getattr(self, name)}) sets the decay of lr_scheduler_type wsd, not "
                      f"{self.lr_scheduler_type}: drop it or set lr_scheduler_type wsd" for name in given]
        elif not given:
            found.append("lr_scheduler_type wsd needs the length of its final decay: set decay_steps or decay_ratio")
        elif len(given) == 2:
            found.append(f"decay_steps ({self.decay_steps}) and decay_ratio ({self.decay_ratio}) both set the wsd "
                         "decay: keep one")
        return found

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: warmup_steps when > 0, else warmup_ratio rounded up."""
        if self.warmup_steps > 0:
            return min(self.warmup_steps, total_steps)
        return min(total_steps, math.ceil(self.warmup_ratio * total_steps))

    def num_decay_steps(self, total_steps: int) -> int:
        """wsd: steps of the final decay; decay_ratio rounds up (after dropping float noise: 0.07 x 100 is 7)."""
        if self.decay_steps is not None:
            return self.decay_steps
        assert self.decay_ratio is not None, "num_decay_steps of a config without decay_steps or decay_ratio"
        return math.ceil(round(self.decay_ratio * total_steps, 9))

    def schedule_problems(self, total_steps: int) -> list[str]:
        """What only the run's length can show: a wsd decay longer than the steps warmup leaves."""
        if self.lr_scheduler_type != "wsd" or self.problems():
            return []  # not wsd, or problems() already reports the decay fields
        warmup, decay = self.num_warmup_steps(total_steps), self.num_decay_steps(total_steps)
        if decay <= total_steps - warmup:
            return []
        field_name = "decay_steps" if self.decay_steps is not None else "decay_ratio"
        return [f"the wsd decay ({field_name} {getattr(self, field_name)} = {decay} steps) is longer than the "
                f"{total_steps - warmup} steps that {warmup} warmup steps leave of {total_steps}: shorten "
                f"{field_name} or the warmup"]


@dataclass(kw_only=True)
class TrainConfig:
    deepspeed: str = "ds_configs/zero2.json"
    """The DeepSpeed JSON (ZeRO stage, precision, batch sizes, optional optimizer/scheduler/monitor)."""
    output_dir: str = "outputs/run"
    per_device_train_batch_size: int | None = None
    """Micro-batch per rank; overrides the DeepSpeed JSON's train_micro_batch_size_per_gpu when set."""
    gradient_accumulation_steps: int | None = None
    """Overrides the DeepSpeed JSON's gradient_accumulation_steps when set."""
    per_device_eval_batch_size: int | None = None
    """Eval micro-batch per rank; defaults to the training micro-batch."""
    max_steps: int = -1
    """Optimizer steps to train; -1 derives them from num_train_epochs."""
    num_train_epochs: float = 1.0
    stop_at_step: int | None = None
    """Save and exit after this step without finishing (time-limited jobs); relaunch to continue.
    Unlike lowering max_steps it leaves the LR schedule untouched."""
    max_wall_minutes: float | None = None
    """Stop like a preemption (checkpoint, exit code 3) before this many minutes from the rank's start have
    passed, keeping back one step and the last save's time (docs/preemption.md)."""
    seed: int = 42
    """Seeds the model init, the data order, the held-out split and dropout."""
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every N steps (and always at the end); None = only at the end."""
    save_steps: int | None = None
    """Checkpoint every N steps (and always at the end); None = only at the end."""
    save_total_limit: int | None = None
    """Keep only the newest N complete checkpoints (at least 2); None keeps all."""
    resume_from_checkpoint: str = "auto"
    """'auto' (newest complete checkpoint in output_dir, else a fresh start), 'none', or a checkpoint folder."""
    peak_tflops: float | None = None
    """Per-device peak TFLOP/s for the MFU estimate; None = known GPUs' bf16 peak, no MFU on CPU."""
    dist_timeout_minutes: int = 30
    """Process-group timeout (the baseline's ddp_timeout, in minutes)."""
    save_fault_delay_seconds: float = 0.0
    """Fault injection for tests: sleep this long in the middle of every save (after the shards, before the marker)."""
    export_final: bool = True
    """Write the trained model in Hugging Face format to output_dir/final at the end."""
    sequence_parallel_size: int = 1
    """Ranks that share one sample, each holding 1/N of its tokens (Ulysses; docs/long_context.md); the
    data-parallel size is world size / N."""

    def problems(self) -> list[str]:
        found = []
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                     "eval_steps", "save_steps", "stop_at_step"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                found.append(f"{name} must be positive or null, got {value}")
        if self.max_steps == 0 or self.max_steps < -1:
            found.append(f"max_steps must be positive or -1 (derive from num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            found.append(f"num_train_epochs must be positive when max_steps is -1, got {self.num_train_epochs}")
        if self.logging_steps <= 0:
            found.append(f"logging_steps must be positive, got {self.logging_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 2:
            found.append(f"save_total_limit must be at least 2 (the newest checkpoint may be mid-save when "
                         f"an older one is deleted), got {self.save_total_limit}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            found.append(f"peak_tflops must be positive, got {self.peak_tflops}")
        if self.max_wall_minutes is not None and self.max_wall_minutes <= 0:
            found.append(f"max_wall_minutes must be positive or null, got {self.max_wall_minutes}")
        if self.save_fault_delay_seconds < 0:
            found.append(f"save_fault_delay_seconds must be >= 0, got {self.save_fault_delay_seconds}")
        if self.sequence_parallel_size < 1:
            found.append(f"sequence_parallel_size must be >= 1 (1 = off), got {self.sequence_parallel_size}")
        return found


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    given: frozenset[str] = frozenset()
    """The field names the user set (JSON or command line); defaults are not in it."""

    SECTIONS: typing.ClassVar[tuple[str, ...]] = ("model", "data", "optim", "train")

    def __post_init__(self) -> None:
        # A campaign's length is its phases' (a max_steps that disagrees is reported by config_problems).
        phase_steps = total_steps(self.data.phases)
        if phase_steps is not None and "max_steps" not in self.given:
            self.train.max_steps = phase_steps

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def field_types(cls) -> dict[str, tuple[str, Any]]:
        """Flat field name -> (section, type) for every configurable field."""
        table: dict[str, tuple[str, Any]] = {}
        for section in cls.SECTIONS:
            section_type = typing.get_type_hints(cls)[section]
            hints = typing.get_type_hints(section_type)
            for item in dataclasses.fields(section_type):
                assert item.name not in table, f"field {item.name} is defined twice"
                table[item.name] = (section, hints[item.name])
        return table

    @classmethod
    def from_flat(cls, values: dict[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a flat ``{field: value}`` dict; every unknown key and bad type is reported at once."""
        table = cls.field_types()
        problems: list[str] = []
        sections: dict[str, dict[str, Any]] = {section: {} for section in cls.SECTIONS}
        for key, value in values.items():
            if key in COMMA_FIELDS:
                value = split_commas(value)
            if key not in table:
                problems.append(unknown_field_problem(key, table))
                continue
            section, tp = table[key]
            try:
                sections[section][key] = coerce(value, tp)
            except (TypeError, ValueError) as error:
                problems.append(f"{key}: {error}")
        if problems:
            raise ConfigError(f"invalid run configuration ({source}): " + "; ".join(problems))
        hints = typing.get_type_hints(cls)
        return cls(**{section: hints[section](**sections[section]) for section in cls.SECTIONS},
                   given=frozenset(values))

    @classmethod
    def fields_help(cls) -> str:
        """Every field with its default, by section: what ``--help`` shows after the options."""
        lines = ["every field below is a JSON key of --config and a flag --FIELD VALUE that overrides it",
                 "(list fields take several values); meanings: docs/configuration.md"]
        hints = typing.get_type_hints(cls)
        for section in cls.SECTIONS:
            lines.append(f"\n{section}:")
            for item in dataclasses.fields(hints[section]):
                default = item.default if item.default is not dataclasses.MISSING else (
                    item.default_factory() if item.default_factory is not dataclasses.MISSING else "(required)")
                shown = json.dumps(default) if default != "(required)" else default
                lines.append(f"  --{item.name:<29} default {shown}")
        return "\n".join(lines)

    @classmethod
    def load(cls, argv: list[str] | None = None) -> RunConfig:
        """Parse ``[--config RUN.json] [--field value ...]``; flags override the JSON's values."""
        parser = argparse.ArgumentParser(description="cpt-ds continued pretraining", allow_abbrev=False,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog=cls.fields_help())
        parser.add_argument("--config", help="run configuration JSON (flat field -> value)")
        # The deepspeed launcher appends --local_rank; ranks are read from the environment instead.
        parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
        # Read by train.py itself (cpt_ds.cli.debug_in_argv), which needs it before this parse can fail.
        parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
        args, rest = parser.parse_known_args(argv)
        values: dict[str, Any] = {}
        source = "command line"
        if args.config:
            path = Path(args.config)
            if not path.is_file():
                found = "is a folder" if path.is_dir() else "file not found"
                raise ConfigError(f"--config {path}: {found}; pass the run configuration JSON")
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"--config {path}: not valid JSON ({error}); fix the file") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"--config {path}: must hold a JSON object of field -> value")
            values.update(loaded)
            source = f"{path} + command line"
        try:
            values.update(parse_overrides(rest, cls.field_types()))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        return cls.from_flat(values, source=source)

    def to_flat(self) -> dict[str, Any]:
        """The flat JSON form (comma fields as one string, or null when empty): what run_config.json and
        checkpoints record, so it reads like the user's own run JSON."""
        flat: dict[str, Any] = {}
        for section in self.SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        for key in COMMA_FIELDS:
            flat[key] = ",".join(flat[key]) or None
        return flat

    # ---- validation ------------------------------------------------------------------------------

    def config_problems(self) -> list[str]:
        """Problems visible from the values alone (no file access)."""
        found: list[str] = []
        for section in self.SECTIONS:
            found += getattr(self, section).problems()
        ignored = [name for name in LORA_ONLY_FIELDS if name in self.given]
        if self.model.full_finetuning and ignored:
            found.append(f"{', '.join(ignored)} configure LoRA, which full_finetuning true does not train: drop "
                         f"{'them' if len(ignored) > 1 else 'it'} or set full_finetuning false")
        if "decay_type" in self.given and self.optim.lr_scheduler_type != "wsd":
            found.append(f"decay_type ({self.optim.decay_type}) shapes the decay of lr_scheduler_type wsd, not "
                         f"{self.optim.lr_scheduler_type}: drop it or set lr_scheduler_type wsd")
        found += phases_problems(self.data.phases, data_path=self.data.data_path, max_steps=self.train.max_steps,
                                 max_steps_given="max_steps" in self.given)
        if self.train.max_steps > 0:
            found += self.optim.schedule_problems(self.train.max_steps)
        if self.data.is_blend and self.train.max_steps == -1:
            found.append("a weighted data_path has no epoch (each component repeats or is sub-sampled by its "
                         "weight): set max_steps instead of num_train_epochs")
        return found
