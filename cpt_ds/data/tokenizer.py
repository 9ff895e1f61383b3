"""Tokenizer folders: loading, and the fingerprint that ties a token file to its tokenizer."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Files that define how text becomes ids. Weights and model configs in the same folder are left out,
# so a checkpoint folder and a tokenizer-only folder with the same tokenizer files agree.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.tiktoken",
)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer-defining files present in folder ``path``, sorted by name."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"tokenizer folder {folder} does not exist or is not a folder; "
                         "pass the folder holding tokenizer.json or tokenizer.model")
    files = sorted(folder / name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file())
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")
               for f in files):
        raise ValueError(f"tokenizer folder {folder} holds no tokenizer.json, tokenizer.model or vocab file; "
                         "pass a Hugging Face tokenizer folder")
    return files


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the names and contents of the tokenizer-defining files in ``path``."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        digest.update(file.name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()
