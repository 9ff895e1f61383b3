"""Shared data for the token-file, tokenizer and packing tests: real text (cpt_ds/toy.py), edge cases, tiny
tokenizers."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from cpt_ds.pack.tiny_tokenizer import train_tokenizer
from cpt_ds.toy import chinese_documents, english_documents, tokenizer_training_texts

REPO = Path(__file__).resolve().parents[1]
# The real LLaMA-3 tokenizer sits in shared/ next to the repository; tests using it are optional extras.
LLAMA3_TOKENIZER = REPO.parent / "shared" / "llama3-tokenizer"
requires_llama3 = pytest.mark.skipif(not (LLAMA3_TOKENIZER / "tokenizer.json").exists(),
                                     reason=f"real LLaMA-3 tokenizer not found at {LLAMA3_TOKENIZER}")

# Texts on which regex engines and BPE implementations are most likely to disagree.
EDGE_CASES = [
    "😀👍🏽👨‍👩‍👧‍👦🇨🇳 emoji with skin tones, ZWJ families and flags 🎉🎉🎉",
    "中文、日本語、한국어 and English mixed: 我爱Python3和C++！（全角括号）「引号」",
    "long whitespace:" + " " * 300 + "then\t\t\t\ttabs and\n\n\n\n\nnewlines" + "\u3000" * 20 + "end",
    "digits 1 12 123 1234 12345 123456789 3.14159265358979 1,000,000 ١٢٣٤٥ ４５６ ⅫⅣ ²³",
    "scripts: Привет, мир! مرحبا بالعالم שלום עולם नमस्ते दुनिया สวัสดีชาวโลก Ελληνικά ქართული",
    "special literals <|end_of_text|> and <|begin_of_text|> and <s></s><unk> inside a document",
    "contractions: I'M you're WE'LL they'Ve it's O'Neil's rock'n'roll",
    "combining e\u0301 a\u0308, ZWJ \u200d, ZWSP \u200b, BOM \ufeff mid-text, variation \u2764\ufe0f",
    "controls \x00 \x01 \x1b[31m red \x7f, NEL \u0085, LS \u2028, PS \u2029",
    "a" * 3000,
    " leading and trailing spaces ",
    "\n\nstarts with blank lines",
    "private use \ue000, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, CJK extension B 𠀀𠀁𠀂",
    "=" * 100 + "\r\n" + "-" * 77 + "\r\n",
]


def multilingual_documents() -> list[str]:
    return chinese_documents() + english_documents() + EDGE_CASES


def train_tiny_tokenizer(folder: Path, vocab_size: int = 1024) -> Path:
    return train_tokenizer(tokenizer_training_texts(), folder, vocab_size=vocab_size)


def train_sentencepiece_tokenizer(folder: Path, vocab_size: int = 2500) -> Path:
    """A LLaMA-2-style sentencepiece folder: only ``tokenizer.model`` + a config naming LlamaTokenizer."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    lines = [line for text in tokenizer_training_texts() for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_jsonl(path: Path, texts: Sequence[str | None], key: str = "text") -> Path:
    data = "".join(json.dumps({key: text, "id": i}, ensure_ascii=False) + "\n" for i, text in enumerate(texts))
    return write_bytes(path, data.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data``, compressed as the name says (``.gz``, ``.zst``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def output_files(prefix: Path) -> list[Path]:
    """Every file a pack to ``prefix`` may have left, temporaries included."""
    return sorted(prefix.parent.glob(prefix.name + ".*"))


def load_tool(name: str):
    """Import ``tools/NAME.py`` (the tools are scripts, not a package) to call its ``main(argv)``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- bad pack_corpus inputs: shared by test_pack_corpus.py and test_bad_inputs_data.py ----------


def bad_input_cases(tmp: Path, tiny_dir: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (arguments, fragments the error line must contain)."""
    good = write_jsonl(tmp / "good.jsonl", ["fine"])
    broken = tmp / "broken_tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"model": ')
    empty = tmp / "empty_folder"
    empty.mkdir()
    bad_utf8 = write_bytes(tmp / "bad.txt", "ok\nbad \xff here\n".encode("latin-1"))
    bad_utf8_gz = write_bytes(tmp / "bad.txt.gz", b"fine\n" * 3 + b"caf\xe9\n")
    malformed = write_bytes(tmp / "malformed.jsonl", b'{"text": "a"}\n\n{"text": "b"\n')
    no_key = write_bytes(tmp / "nokey.jsonl", b'{"text": "a"}\n{"body": "b"}\n')
    not_string = write_bytes(tmp / "number.jsonl", b'{"text": 42}\n')
    corrupt_gz = write_bytes(tmp / "corrupt.jsonl.gz", b"")
    corrupt_gz.write_bytes(write_jsonl(tmp / "x.jsonl.gz", ["a"] * 100).read_bytes()[:40])
    unknown = write_bytes(tmp / "data.csv", b"a,b\n")
    tok = ["--tokenizer", str(tiny_dir)]
    return {
        "missing tokenizer": (["--input", str(good), "--tokenizer", str(tmp / "nope")],
                              [str(tmp / "nope"), "does not exist"]),
        "unreadable tokenizer": (["--input", str(good), "--tokenizer", str(broken)],
                                 [str(broken / "tokenizer.json"), "not valid JSON"]),
        "no input files": (["--input", str(empty), *tok], [str(empty), "holds no files"]),
        "glob matches nothing": (["--input", str(tmp / "*.nothing"), *tok], ["matches no file"]),
        "missing input": (["--input", str(tmp / "absent.txt"), *tok], [str(tmp / "absent.txt"), "does not exist"]),
        "unknown extension": (["--input", str(unknown), *tok], [str(unknown), "unknown file type"]),
        "invalid utf-8": (["--input", str(bad_utf8), *tok],
                          [str(bad_utf8), "invalid UTF-8 at byte offset 7 (line 2", "--encoding-errors replace"]),
        "invalid utf-8 compressed": (["--input", str(bad_utf8_gz), *tok],
                                     [str(bad_utf8_gz), "byte offset 18 of the decompressed data (line 4"]),
        "malformed jsonl": (["--input", str(malformed), *tok], [f"{malformed}:3:", "malformed JSON"]),
        "missing json key": (["--input", str(no_key), *tok], [f"{no_key}:2:", "no key 'text'", "body", "--json-key"]),
        "json value not a string": (["--input", str(not_string), *tok], [f"{not_string}:1:", "not a string"]),
        "corrupt gzip": (["--input", str(corrupt_gz), *tok], [str(corrupt_gz), "corrupt or truncated"]),
    }


BAD_INPUT_NAMES = ["missing tokenizer", "unreadable tokenizer", "no input files", "glob matches nothing",
                   "missing input", "unknown extension", "invalid utf-8", "invalid utf-8 compressed",
                   "malformed jsonl", "missing json key", "json value not a string", "corrupt gzip"]
