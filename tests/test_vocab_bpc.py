"""An extended vocabulary on a model that has learned something: bits per character at step 0.

A tiny LLaMA-3-shaped model is first trained (plain fp32 torch loop, a few hundred steps) on Chinese
and English text with the tiny tokenizer; the tokenizer is then extended on the Chinese training
documents, and the model grown by cpt_ds's own ``resize_embeddings``: new rows = the sub-token mean
(the extension record) or the mean of all rows (no record). On held-out Chinese documents the
sub-token-mean init must cost fewer bits per character than the mean-of-all init.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from helpers_data import chinese_documents, english_documents

SEQ = 64
HELD_OUT_EVERY = 5  # every 5th Chinese document is held out (whole documents)


def encode_documents(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def bits_per_char(model, documents: list[list[int]], texts: list[str], bos: int, window: int = 128) -> float:
    """Sum of next-token losses / ln 2 / characters; windows overlap by one token, so every token
    after BOS is predicted exactly once."""
    total = 0.0
    model.eval()
    with torch.no_grad():
        for ids in documents:
            ids = [bos] + ids
            for start in range(0, len(ids) - 1, window - 1):
                chunk = torch.tensor([ids[start:start + window]])
                logits = model(input_ids=chunk).logits.float()
                total += torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum").item()
    return total / math.log(2) / sum(len(t) for t in texts)


def pretrain(model, documents: list[list[int]], *, bos: int, eos: int, steps: int, seed: int = 0) -> None:
    stream = torch.tensor([t for ids in documents for t in [bos, *ids, eos]])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        starts = torch.randint(0, stream.numel() - SEQ - 1, (16,), generator=generator)
        batch = torch.stack([stream[s:s + SEQ + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_sub_token_mean_init_beats_the_mean_of_all_rows(tiny_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_ds.model import resize_embeddings
    from cpt_ds.pack.extend_vocab import ExtendOptions, extend_vocabulary

    from conftest import TINY_MODEL

    chinese = chinese_documents()
    held_out = chinese[::HELD_OUT_EVERY]
    train_zh = [t for i, t in enumerate(chinese) if i % HELD_OUT_EVERY]
    domain = tmp_path / "zh_train.jsonl"
    domain.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in train_zh), encoding="utf-8")
    extended = tmp_path / "extended"
    extend_vocabulary(tiny_dir, [domain], extended, ExtendOptions(num_new_tokens=200, eval_fraction=0.0))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is shared; one thread is as fast for this size
    try:
        torch.manual_seed(0)
        shape = {k: v for k, v in TINY_MODEL.items() if k != "architectures"}
        model = LlamaForCausalLM(LlamaConfig(**{**shape, "vocab_size": 1024, "bos_token_id": 1022,
                                                "eos_token_id": 1023}))
        pretrain(model, encode_documents(tiny_dir, train_zh + english_documents(40)), bos=1022, eos=1023, steps=300)
        base = tmp_path / "base"
        model.save_pretrained(base)

        original = bits_per_char(model, encode_documents(tiny_dir, held_out), held_out, bos=1022)
        new_ids = encode_documents(extended, held_out)
        assert max(max(ids) for ids in new_ids) >= 1024  # the held-out text uses new tokens
        results = {}
        for init, tokenizer_path in (("sub_token_mean", extended), ("mean_of_all", None)):
            grown = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
            assert resize_embeddings(grown, 1024 + 200, tokenizer_path=tokenizer_path, model_path=base) == 1024
            results[init] = bits_per_char(grown, new_ids, held_out, bos=1022)
    finally:
        torch.set_num_threads(threads)
    print(f"bits per character at step 0: original {original:.3f}, sub-token mean {results['sub_token_mean']:.3f}, "
          f"mean of all rows {results['mean_of_all']:.3f}")
    assert results["sub_token_mean"] < results["mean_of_all"], (original, results)
