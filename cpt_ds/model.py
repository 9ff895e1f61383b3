"""Build the model to train: pretrained or from scratch, ZeRO-3 partitioned, full / LoRA / QLoRA.

Under ZeRO-3 an ``HfDeepSpeedConfig`` must exist before the model is constructed so transformers
wraps construction in ``deepspeed.zero.Init`` and no rank ever holds the whole model; the object is
returned so the caller keeps it alive (transformers only holds a weak reference).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cpt_ds.attention import attention_implementation, register_sequence_parallel
from cpt_ds.config import ModelConfig
from cpt_ds.ds_config import DeepSpeedSettings
from cpt_ds.loss import LossSettings, apply_liger_kernels, attach_loss_forward, causal_lm_of
from cpt_ds.rope import apply_overrides
from cpt_ds.tiled_mlp import enable_tiled_mlp
from cpt_ds.tokenizer import VOCAB_EXTENSION_FILE

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def training_dtype(model_config: ModelConfig, ds: DeepSpeedSettings) -> torch.dtype:
    """The dtype weights are loaded in: the DeepSpeed precision unless torch_dtype says otherwise."""
    if model_config.torch_dtype == "auto":
        return PRECISION_DTYPE[ds.precision]
    return DTYPES[model_config.torch_dtype]


def dtype_problems(model_config: ModelConfig, ds: DeepSpeedSettings) -> list[str]:
    if model_config.torch_dtype == "auto" or DTYPES[model_config.torch_dtype] == PRECISION_DTYPE[ds.precision]:
        return []
    # DeepSpeed casts the module to its own precision; a different load dtype would silently not apply.
    return [f"torch_dtype {model_config.torch_dtype} disagrees with the DeepSpeed JSON's precision "
            f"({ds.precision} in {ds.path}); use torch_dtype auto or change the JSON"]


def load_hf_config(model_config: ModelConfig, *, block_size: int | None = None) -> Any:
    """The transformers config of the model to train (no weights are read), with the run's RoPE
    overrides; with those and ``block_size``, ``max_position_embeddings`` is raised to it when smaller."""
    config = _base_hf_config(model_config)
    apply_overrides(config, rope_theta=model_config.rope_theta, rope_scaling=model_config.rope_scaling,
                    block_size=block_size)
    return config


def _base_hf_config(model_config: ModelConfig) -> Any:
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_config.model_name_or_path is not None:
        return AutoConfig.from_pretrained(model_config.model_name_or_path)
    if model_config.config_name is not None:
        config = AutoConfig.from_pretrained(model_config.config_name)
    else:
        if model_config.model_type not in CONFIG_MAPPING:
            raise ValueError(f"model_type {model_config.model_type!r} is not a transformers model type")
        config = CONFIG_MAPPING[model_config.model_type]()
    if model_config.config_overrides:
        try:
            config.update_from_string(",".join(model_config.config_overrides))
        except ValueError as error:
            raise ValueError(f"config_overrides {','.join(model_config.config_overrides)!r}: {error}") from None
    return config


def loss_settings(model_config: ModelConfig) -> LossSettings:
    return LossSettings(chunk_size=model_config.loss_chunk_size, use_liger=model_config.use_liger_kernel)


def quantization_problems(model_config: ModelConfig, ds: DeepSpeedSettings) -> list[str]:
    if model_config.load_in_kbits == 16:
        return []
    found = []
    if importlib.util.find_spec("bitsandbytes") is None:
        found.append("load_in_kbits needs bitsandbytes: pip install 'cpt-ds[quant]'")
    if ds.offload_param:
        found.append("load_in_kbits cannot be combined with ZeRO-3 parameter offload (quantized weights "
                     "are not offloadable); use ds_configs/zero2.json or zero3.json")
    return found


@dataclass
class BuiltModel:
    module: nn.Module
    keepalive: Any
    """The HfDeepSpeedConfig under ZeRO-3 (None otherwise); hold it as long as the model lives."""
    hf_config: Any
    is_peft: bool
    resized_from: int | None
    """The vocabulary size before embeddings were grown to the tokenizer's, or None."""


def build_model(model_config: ModelConfig, ds: DeepSpeedSettings, *, vocab_size: int, seed: int,
                hf_config: Any = None, sequence_parallel_group: Any = None) -> BuiltModel:
    """``hf_config``: preflight's (``Plan.hf_config``, RoPE overrides and positions applied), so the model,
    FLOPs and fingerprints read one config; None loads it here (without raising the positions).
    ``sequence_parallel_group``: the ranks that share each sample (Ulysses around the attention), or None."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    # A copy: transformers keeps and edits the config it is given (attention implementation, dtype).
    config = copy.deepcopy(hf_config) if hf_config is not None else load_hf_config(model_config)
    dtype = training_dtype(model_config, ds)
    keepalive = HfDeepSpeedConfig(ds.raw) if ds.zero_stage == 3 else None
    attn = attention_implementation(model_config)
    if sequence_parallel_group is not None:
        attn = register_sequence_parallel(attn, config, sequence_parallel_group,
                                          document_attention=model_config.document_attention)
    torch.manual_seed(seed)  # the same random init on every rank (from-scratch runs and new rows)
    if model_config.model_name_or_path is not None:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
        if model_config.load_in_kbits in (4, 8):
            kwargs["quantization_config"] = _quantization_config(model_config, dtype)
        module = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path, config=config, **kwargs)
    else:
        module = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)

    resized_from = resize_embeddings(module, vocab_size, tokenizer_path=model_config.tokenizer_path,
                                     model_path=model_config.model_name_or_path)

    if model_config.gradient_checkpointing:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.config.use_cache = False

    is_peft = False
    if model_config.load_in_kbits in (4, 8):
        from peft import prepare_model_for_kbit_training

        module = prepare_model_for_kbit_training(
            module, use_gradient_checkpointing=model_config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        disable_bnb_cpu_inference_repack(module)
    if not model_config.full_finetuning:
        module = _wrap_lora(module, model_config)
        is_peft = True
        if model_config.gradient_checkpointing:
            # With frozen embeddings the checkpointed blocks would get inputs without grad and skip backward.
            module.enable_input_require_grads()
    module.config.use_cache = False
    if model_config.tiled_mlp:
        logger.info("tiled_mlp: %d MLPs run in shards of the sequence (%s)", enable_tiled_mlp(
            module, shards=model_config.tiled_mlp_shards), model_config.tiled_mlp_shards or "ceil(tokens / hidden_size)")
    if model_config.use_liger_kernel:
        apply_liger_kernels(causal_lm_of(module))
    attach_loss_forward(module, loss_settings(model_config))
    return BuiltModel(module=module, keepalive=keepalive, hf_config=module.config, is_peft=is_peft,
                      resized_from=resized_from)


def _quantization_config(model_config: ModelConfig, dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    # Embeddings and the head stay unquantized: CPT trains them (modules_to_save) and their
    # quantization error would be paid on every token.
    return BitsAndBytesConfig(
        load_in_4bit=model_config.load_in_kbits == 4,
        load_in_8bit=model_config.load_in_kbits == 8,
        bnb_4bit_quant_type=model_config.quant_type,
        bnb_4bit_use_double_quant=model_config.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        llm_int8_skip_modules=["lm_head", "embed_tokens"],
    )


def resize_embeddings(module: nn.Module, vocab_size: int, *, tokenizer_path: str | Path | None = None,
                      model_path: str | Path | None = None) -> int | None:
    """Grow input embeddings (and an untied head) to ``vocab_size`` rows; returns the old size or None.

    When the tokenizer folder ``tokenizer_path`` was made by ``tools/extend_vocab.py`` from the
    tokenizer this model was trained with, each new token's rows start as the mean of the rows of its
    sub-tokens (its tokenization by the original tokenizer, recorded in
    ``cpt_ds_vocab_extension.json``): the model reads and predicts it as what it spells, so training
    starts without a loss spike. Every other new row (a vocabulary grown any other way, or the record
    not matching this model) is exactly the mean of the old rows, so a new token starts as an
    "average" token rather than noise; the log says which rule applied and why. Both rules are
    deterministic, so export rebuilds the same rows (transformers' mean_resizing samples randomly).
    ``model_path``: the model folder; tokenizer files there must be the record's original tokenizer.
    Under ZeRO-3 rank 0 computes the rows on the gathered weights and DeepSpeed re-partitions them.
    """
    weight = module.get_input_embeddings().weight
    old_rows = int(getattr(weight, "ds_shape", weight.shape)[0])
    if vocab_size <= old_rows:
        return None
    sub_tokens, reason = sub_token_rows(tokenizer_path, old_rows=old_rows, vocab_size=vocab_size,
                                        model_path=model_path)
    module.resize_token_embeddings(vocab_size, mean_resizing=False)
    layers = [module.get_input_embeddings()]
    head = module.get_output_embeddings()
    if head is not None and head.weight is not layers[0].weight:
        layers.append(head)
    import deepspeed

    for layer in layers:
        parameter = layer.weight
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            if parameter.numel() > 0:  # ZeRO-3: only the modifier rank sees the whole tensor
                parameter[old_rows:] = parameter[:old_rows].float().mean(dim=0).to(parameter.dtype)
                for token_id, ids in sub_tokens.items():
                    # float64 sum of a few rows, rounded once to the weight's dtype.
                    parameter[token_id] = parameter[ids].double().mean(dim=0).to(parameter.dtype)
    if sub_tokens:
        rest = vocab_size - old_rows - len(sub_tokens)
        logger.info("resized token embeddings from %d to %d rows (new rows = mean of each new token's sub-token "
                    "rows, from %s%s)", old_rows, vocab_size, VOCAB_EXTENSION_FILE,
                    f"; {rest} rows without a record = mean of old" if rest else "")
    else:
        logger.info("resized token embeddings from %d to %d rows (new rows = mean of old: %s)",
                    old_rows, vocab_size, reason)
    return old_rows


def sub_token_rows(tokenizer_path: str | Path | None, *, old_rows: int, vocab_size: int,
                   model_path: str | Path | None = None) -> tuple[dict[int, list[int]], str]:
    """``{new id: its sub-token ids}`` from the tokenizer's extension record, or ``({}, why not)``.

    The record applies when it names exactly the model's rows as the original ids (the new ids
    start at ``old_rows``) and, when ``model_path`` holds tokenizer files, those are the original
    tokenizer (same fingerprint): then the sub-token ids index rows this model has learned.
    """
    from cpt_ds.tokenizer import read_extension, tokenizer_files, tokenizer_fingerprint

    if tokenizer_path is None:
        return {}, "no tokenizer folder given"
    record = read_extension(tokenizer_path)
    if record is None:
        return {}, (f"{tokenizer_path} has no {VOCAB_EXTENSION_FILE}, so the vocabulary was not grown by "
                    "tools/extend_vocab.py")
    base = record["base_tokenizer"]
    if record["first_new_id"] != old_rows or base["num_ids"] != old_rows:
        logger.warning("%s extends a tokenizer of %d ids (new ids from %d) but the model has %d embedding rows; "
                       "new rows = mean of old", VOCAB_EXTENSION_FILE, base["num_ids"], record["first_new_id"],
                       old_rows)
        return {}, f"the record's original tokenizer has {base['num_ids']} ids, the model {old_rows} rows"
    if model_path is not None and Path(model_path).is_dir():
        try:
            tokenizer_files(model_path)
        except ValueError:
            pass  # no tokenizer beside the weights: nothing to compare
        else:
            fingerprint = tokenizer_fingerprint(model_path)
            if fingerprint != base["fingerprint"]:
                logger.warning("the tokenizer in %s (fingerprint %s) is not the one %s was extended from (%s); "
                               "new rows = mean of old", model_path, fingerprint[:12], tokenizer_path,
                               base["fingerprint"][:12])
                return {}, "the model's own tokenizer is not the record's original tokenizer"
    rows = {}
    for token in record["new_tokens"]:
        token_id, ids = int(token["id"]), [int(i) for i in token["sub_token_ids"]]
        assert old_rows <= token_id < vocab_size and ids and max(ids) < old_rows, token
        rows[token_id] = ids
    return rows, ""


def grown_vocabulary_problems(model_config: ModelConfig, hf_config: Any, vocab_size: int) -> list[str]:
    """LoRA on a grown vocabulary must train the embeddings in full, or the new rows stay at their init."""
    if model_config.full_finetuning or vocab_size <= hf_config.vocab_size:
        return []
    needed = ["embed_tokens"] if getattr(hf_config, "tie_word_embeddings", False) else ["embed_tokens", "lm_head"]
    saved = model_config.modules_to_save
    source = "modules_to_save"
    if model_config.peft_path is not None:
        adapter = Path(model_config.peft_path) / "adapter_config.json"
        if not adapter.is_file():
            return []  # reported by preflight itself
        saved = json.loads(adapter.read_text()).get("modules_to_save") or []
        source = f"the adapter's modules_to_save ({adapter})"
    missing = [name for name in needed if name not in saved]
    if not missing:
        return []
    return [f"the tokenizer has {vocab_size} ids but the model {hf_config.vocab_size} rows: LoRA would leave the "
            f"{vocab_size - hf_config.vocab_size} new rows untrained, as {source} lacks {','.join(missing)}; "
            f"set modules_to_save {','.join(needed)} (or full_finetuning true)"]


def disable_bnb_cpu_inference_repack(module: nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repack of 4-bit weights (../shared/docs/CPU_DEEPSPEED.md, trap 2).

    On CPUs with avx512_bf16 one eval-mode no_grad forward repacks ``Linear4bit`` weights for
    inference; afterwards LoRA gradients through them are silently zero. Returns the layers patched.
    """
    import bitsandbytes as bnb

    patched = 0
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
            patched += 1
    return patched


def lora_config(model_config: ModelConfig) -> Any:
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=model_config.lora_rank,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        target_modules=model_config.trainable,
        modules_to_save=model_config.modules_to_save or None,
        inference_mode=False,
    )


def _wrap_lora(module: nn.Module, model_config: ModelConfig) -> nn.Module:
    from peft import PeftModel, get_peft_model

    if model_config.peft_path is not None:
        adapter_config = json.loads((Path(model_config.peft_path) / "adapter_config.json").read_text())
        logger.info("continuing LoRA adapter %s (r=%s, targets=%s); the lora_* fields are taken from it",
                    model_config.peft_path, adapter_config.get("r"), adapter_config.get("target_modules"))
        return PeftModel.from_pretrained(module, model_config.peft_path, is_trainable=True)
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    missing = [target for target in model_config.trainable + model_config.modules_to_save
               if target not in names]
    if missing:
        raise ValueError(f"trainable/modules_to_save name modules the model does not have: {missing}; "
                         f"choose among e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,"
                         f"embed_tokens,lm_head")
    return get_peft_model(module, lora_config(model_config))


def _full_numel(parameter: nn.Parameter) -> int:
    """Elements of a parameter at full size: ZeRO-3 partitions report ``ds_numel``, 4-bit packs two per byte."""
    numel = int(getattr(parameter, "ds_numel", parameter.numel()))
    if type(parameter).__name__ == "Params4bit":
        numel *= 2
    return numel


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, full sizes even under ZeRO-3 partitioning."""
    total = trainable = 0
    for parameter in module.parameters():
        numel = _full_numel(parameter)
        total += numel
        if parameter.requires_grad:
            trainable += numel
    return total, trainable


def matmul_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters that multiply activations in the forward pass.

    Left out: the input embedding (a lookup, unless tied to the head, whose matmul it then is) and
    peft's idle ``original_module`` copies of ``modules_to_save``.
    """
    embedding = module.get_input_embeddings()
    head = module.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(embedding, "weight", object())
    lookup = set() if tied else {id(parameter) for parameter in embedding.parameters()}
    trainable = frozen = 0
    for name, parameter in module.named_parameters():
        if id(parameter) in lookup or ".original_module." in name:
            continue
        if parameter.requires_grad:
            trainable += _full_numel(parameter)
        else:
            frozen += _full_numel(parameter)
    return trainable, frozen


def flops_per_token(hf_config: Any, sequence_length: int, *, matmul_trainable: int, matmul_frozen: int = 0) -> float:
    """Training FLOPs per token: 6 per trainable and 4 per frozen matmul parameter, plus attention.

    Forward costs 2 FLOPs per parameter, backward 2 for the input gradient and 2 more for the weight
    gradient, which frozen (LoRA base) weights skip. Attention adds 12 * layers * heads * head_dim *
    seq (the PaLM / torchtitan count). For full finetuning this is the usual 6N + 12*l*h*d*s with N
    the matmul parameters.
    """
    heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    attention = 12 * hf_config.num_hidden_layers * heads * head_dim * sequence_length
    return 6 * matmul_trainable + 4 * matmul_frozen + attention


# Dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
                "L40S": 362.0, "A6000": 155.0, "4090": 165.0, "3090": 71.0, "V100": 125.0}


def peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def mfu(tokens_per_second_per_device: float, flops_token: float, peak: float | None) -> float:
    return math.nan if peak is None else tokens_per_second_per_device * flops_token / (peak * 1e12)
