"""Train a small LLaMA-3-shaped tokenizer folder, for tests and the quick start (no downloads).

The result has LLaMA-3's structure at a small scale: byte-level BPE over the full 256-byte alphabet,
LLaMA-3's split regex, ``ignore_merges``, merges in tiktoken form (every split of every token, ordered
by the id of the token formed, as Hugging Face's tiktoken converter writes them for LLaMA-3), then
``<|begin_of_text|>`` / ``<|end_of_text|>`` and reserved special tokens after the BPE ids. It loads with
``transformers.AutoTokenizer`` and is eligible for the packer's fast (tiktoken) encoder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
NUM_BYTE_TOKENS = 256


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train on ``texts`` and write ``tokenizer.json`` + ``tokenizer_config.json`` into ``out_dir``.

    ``vocab_size`` is the final ``len(tokenizer)``: BPE tokens, then BOS (id ``vocab_size - k``), EOS,
    and ``<|reserved_special_token_N|>`` fillers when the text is too small to learn enough merges.
    Deterministic: the same texts and size give byte-identical files. Returns ``out_dir``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from cpt_ds.pack.encoders import LLAMA3_SPLIT_PATTERN

    num_specials = 2
    if vocab_size < NUM_BYTE_TOKENS + num_specials:
        raise ValueError(f"vocab_size must be at least {NUM_BYTE_TOKENS + num_specials} "
                         f"(256 byte tokens + BOS + EOS), got {vocab_size}")
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    trainer_tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    trainer_tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - num_specials,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    trainer_tokenizer.train_from_iterator(texts, trainer)
    vocab: dict[str, int] = trainer_tokenizer.get_vocab()

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=tiktoken_merges(vocab), ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    num_reserved = vocab_size - len(vocab) - num_specials
    specials = [BOS_TOKEN, EOS_TOKEN] + [f"<|reserved_special_token_{i}|>" for i in range(num_reserved)]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tokenizer.get_vocab_size(with_added_tokens=True) == vocab_size

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def tiktoken_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary tokens, ordered by (formed id, left id, right id).

    This is the merge list under which ``tokenizers``' BPE makes the same merges as tiktoken with
    ranks = ids (see ``cpt_ds.tokenizer.plan_fast_encoder``).
    """
    merges = []
    for token, rank in vocab.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]
