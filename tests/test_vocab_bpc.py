"""An extended vocabulary on a model that has learned something: bits per character at step 0.

A tiny LLaMA-3-shaped model is first trained (plain fp32 torch loop, a few hundred steps) on Chinese
and English text with the tiny tokenizer; the tokenizer is then extended on the Chinese training
documents, and the model grown by cpt_ds's own ``resize_embeddings``: new rows = the sub-token mean
(the extension record) or the mean of all rows (no record). On held-out Chinese documents the
sub-token-mean init must cost fewer bits per character than the mean-of-all init.
"""

from __future__ import annotations

import torch

from cpt_ds.toy import (
    HELD_OUT_EVERY,
    TINY_MODEL,
    bits_per_char,
    chinese_documents,
    encode_documents,
    english_documents,
    held_out_split,
    pretrain,
    write_jsonl_texts,
)


def test_sub_token_mean_init_beats_the_mean_of_all_rows(tiny_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt_ds.model import resize_embeddings
    from cpt_ds.pack.extend_vocab import ExtendOptions, extend_vocabulary

    train_zh, held_out = held_out_split(chinese_documents(), every=HELD_OUT_EVERY)
    domain = write_jsonl_texts(tmp_path / "zh_train.jsonl", train_zh)
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
