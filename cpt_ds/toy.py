"""Toy data and shapes shared by the quick start, the tests and the benchmarks.

Real text that ships with Python and cpt-ds (no download), two tiny LLaMA-3 shapes, and the plain
torch loop that pretrains and scores a tiny model in bits per character (the vocabulary-extension
test and benchmark). Nothing here is used by training itself.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"

# LLaMA-3-8B's shape ratios at toy size: GQA 4:1 heads, SwiGLU at 3.5x, RoPE theta 500k, untied head.
TINY_LLAMA3: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 448,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

# The tests' smaller LLaMA-3 shape (GQA 2:1, SwiGLU, RoPE theta 500k); dropout is switched on per test.
TINY_MODEL: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 512,
}

HELD_OUT_EVERY = 5
"""Every 5th Chinese document is held out (whole documents) by the bits-per-character runs."""


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


def chinese_documents() -> list[str]:
    """55 real Chinese documents (classics and modern sentences), see cpt_ds/assets/README.md."""
    lines = (ASSETS / "zh_sample.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


def english_documents(count: int = 40) -> list[str]:
    """Real English prose: topics of Python's reference manual, shipped with every CPython."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)[:count]]


def tokenizer_training_texts() -> list[str]:
    return chinese_documents() + english_documents(200)


def python_corpus_documents() -> dict[str, list[str]]:
    """Real text that ships with CPython: {file name: documents}."""
    from pydoc_data.topics import topics

    english = [paragraph.strip() for key in sorted(topics) for paragraph in topics[key].split("\n\n")
               if len(paragraph.strip()) >= 80]
    corpus = {"python_reference.jsonl": english}
    cjk_dir = Path(sysconfig.get_path("stdlib")) / "test" / "cjkencodings"
    cjk = []
    for name in ("gb18030-utf8.txt", "gb2312-utf8.txt", "big5-utf8.txt", "euc_jp-utf8.txt"):
        file = cjk_dir / name
        if file.is_file():
            cjk += [block.strip() for block in file.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    if cjk:
        corpus["cjk_samples.jsonl"] = cjk
    return corpus


def python_corpus_texts() -> list[str]:
    """Every document of :func:`python_corpus_documents`, in one list."""
    return [text for documents in python_corpus_documents().values() for text in documents]


def cpt_corpora() -> dict[str, list[str]]:
    """The two languages of the continued-pretraining demo: {"en": documents, "zh": documents}.

    English: Python's reference manual. Chinese: the classics shipped in cpt_ds/assets plus the Chinese
    sample texts of CPython's codec tests where the install has them.
    """
    corpora = python_corpus_documents()
    chinese = chinese_documents() + [text for text in corpora.get("cjk_samples.jsonl", []) if not _mostly_kana(text)]
    return {"en": corpora["python_reference.jsonl"], "zh": chinese}


def _mostly_kana(text: str) -> bool:
    kana = sum(1 for char in text if "\u3040" <= char <= "\u30ff")
    return kana > 0.1 * len(text)


def held_out_split(documents: list[str], *, every: int = HELD_OUT_EVERY,
                   offset: int = 0) -> tuple[list[str], list[str]]:
    """``(training, held out)``: the documents at positions ``offset``, ``offset + every``, ... are held out
    (by position, so the split is fixed and whole documents stay on one side)."""
    return ([d for i, d in enumerate(documents) if i % every != offset],
            [d for i, d in enumerate(documents) if i % every == offset])


def write_jsonl_texts(path: Path, texts: list[str]) -> Path:
    """One ``{"text": ...}`` record per line, UTF-8 kept readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts),
                    encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# A plain torch loop for tiny models: pretrain, score in bits per character
# --------------------------------------------------------------------------------------------------


def encode_documents(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def bits_per_char(model, documents: list[list[int]], texts: list[str], bos: int, window: int = 128) -> float:
    """Sum of next-token losses / ln 2 / characters; windows overlap by one token, so every token
    after BOS is predicted exactly once."""
    import torch

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


def pretrain(model, documents: list[list[int]], *, bos: int, eos: int, steps: int, seed: int = 0,
             seq: int = 64) -> None:
    """AdamW at 3e-3 (20 warm-up steps, then linear decay to 10%) on random windows of the documents."""
    import torch

    stream = torch.tensor([t for ids in documents for t in [bos, *ids, eos]])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        starts = torch.randint(0, stream.numel() - seq - 1, (16,), generator=generator)
        batch = torch.stack([stream[s:s + seq + 1] for s in starts.tolist()])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts the labels itself
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# The quick start's precision
# --------------------------------------------------------------------------------------------------


def choose_precision() -> tuple[str, str, str]:
    """``(device, precision, DeepSpeed JSON name in ds_configs/)``: bf16 on GPUs that have it, fp32 on every CPU.

    Many CPUs emulate bf16 (~100x slower than fp32, cpt_ds/hardware.py), and even where it is native
    the quick start's tiny matmuls gain nothing from it, so CPUs always train in fp32.
    """
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported():
            return f"cuda ({name})", "bf16", "zero2.json"
        return f"cuda ({name})", "fp32", "zero2_fp32.json"
    from cpt_ds.hardware import cpu_capability

    return f"cpu (PyTorch {cpu_capability()})", "fp32", "zero2_fp32.json"
