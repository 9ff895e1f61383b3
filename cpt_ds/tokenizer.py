"""Tokenizer folders: loading, the fingerprint that ties a token file to its tokenizer, and the
vocabulary-extension record; what training and the packer both read.

The packer reads a tokenizer folder with ``read_tokenizer``, which gives what ``load_tokenizer``
(``transformers.AutoTokenizer``) would report without importing transformers (and torch, ~1.5 s)
when the folder is a plain ``tokenizer.json`` folder such as LLaMA-3's; other folders (sentencepiece
``tokenizer.model``, model-specific tokenizer classes) go through ``AutoTokenizer``.
"""


from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

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
    # Written by tools/extend_vocab.py: the base tokenizer and each new token's sub-tokens, from which
    # the model grows its embeddings (cpt_ds.model.resize_embeddings); part of the fingerprint.
    "cpt_ds_vocab_extension.json",
)
VOCAB_EXTENSION_FILE = "cpt_ds_vocab_extension.json"
EXTENSION_FORMAT = "cpt-ds vocabulary extension"
EXTENSION_VERSION = 1

class TokenizerError(ValueError):
    """A tokenizer folder is missing, unreadable or unsuitable; the message names the folder and the fix."""


# --------------------------------------------------------------------------------------------------
# Tokenizer folders
# --------------------------------------------------------------------------------------------------


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer-defining files present in folder ``path``, sorted by name."""
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist or is not a folder; "
                             "pass the folder holding tokenizer.json or tokenizer.model")
    files = sorted(folder / name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file())
    if not any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer.tiktoken")
               for f in files):
        raise TokenizerError(f"tokenizer folder {folder} holds no tokenizer.json, tokenizer.model or vocab file; "
                             "pass a Hugging Face tokenizer folder")
    return files


def tokenizer_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the names and contents of the tokenizer-defining files in ``path``."""
    return _fingerprint({file.name: hashlib.sha256(file.read_bytes()).hexdigest() for file in tokenizer_files(path)})


def _fingerprint(file_digests: dict[str, str]) -> str:
    """The fingerprint from each tokenizer file's own sha256, taken in name order."""
    digest = hashlib.sha256()
    for name in sorted(file_digests):
        digest.update(name.encode() + b"\0" + file_digests[name].encode() + b"\n")
    return digest.hexdigest()


def _read_json_file(file: Path) -> tuple[bytes, str, Any]:
    """The bytes, text and JSON value of tokenizer file ``file``, or one clear ``TokenizerError``."""
    try:
        data = file.read_bytes()
    except OSError as error:
        raise TokenizerError(f"tokenizer file {file} cannot be read ({error.strerror}); "
                             "check its permissions") from None
    try:
        text = data.decode("utf-8")
        return data, text, json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerError(f"tokenizer file {file} is not valid JSON ({error}); "
                             "restore the tokenizer folder from its source") from None


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the Hugging Face tokenizer in folder ``path`` (offline), or raise one clear ``TokenizerError``.

    The tokenizer must have a ``tokenizers`` backend (every ``AutoTokenizer`` folder has one in
    transformers 5, sentencepiece ``tokenizer.model`` folders included: they are converted on load).
    """
    folder = Path(path)
    files = tokenizer_files(folder)
    # Catch corrupt JSON here: deep inside transformers/tokenizers it surfaces as a bare Exception.
    for file in files:
        if file.suffix == ".json":
            _read_json_file(file)
    names = {file.name for file in files}
    needs_protobuf = "tokenizer.model" in names and "tokenizer.json" not in names
    if needs_protobuf and importlib.util.find_spec("google.protobuf") is None:
        # Without protobuf transformers misreads tokenizer.model as a tiktoken file and fails obscurely.
        raise TokenizerError(f"tokenizer folder {folder} has only a sentencepiece tokenizer.model, whose conversion "
                             "needs the protobuf package; pip install protobuf")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        message = " ".join(str(error).split())
        raise TokenizerError(f"tokenizer folder {folder} could not be loaded by transformers.AutoTokenizer "
                             f"({type(error).__name__}: {message[:300]}); pass a complete Hugging Face "
                             "tokenizer folder") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise TokenizerError(f"tokenizer folder {folder} loads as {type(tokenizer).__name__}, which has no "
                             "Hugging Face `tokenizers` backend; convert it to a tokenizer.json first")
    return tokenizer


@dataclass(frozen=True)
class TokenizerInfo:
    """What the packer needs from a tokenizer folder: the values ``load_tokenizer`` gives for it."""

    path: str
    fingerprint: str
    """``tokenizer_fingerprint(path)``."""
    class_name: str
    """``type(load_tokenizer(path)).__name__``."""
    vocab_size: int
    """``len(load_tokenizer(path))``: the base vocabulary plus added tokens."""
    bos_id: int | None
    eos_id: int | None
    tokenizer_json: str
    """The backend tokenizer's JSON: ``tokenizer.json`` itself, or ``backend_tokenizer.to_str()``."""
    tokenizer_json_sha256: str
    read_with: Literal["tokenizer.json", "AutoTokenizer"]
    """How the values were found (both ways give the same values)."""
    parsed_json: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    """``json.loads(tokenizer_json)`` when it was parsed already (tokenizer.json: ~0.05 s for LLaMA-3)."""


# The tokenizer_config.json keys of a plain tokenizer.json folder: none of them makes transformers 5's
# AutoTokenizer change the tokenizer.json backend, add tokens or pick another class (checked by
# tests/test_tokenizer.py). A folder with any other key goes through AutoTokenizer.
PLAIN_CONFIG_KEYS = frozenset({
    "tokenizer_class", "added_tokens_decoder", "bos_token", "eos_token", "unk_token", "pad_token",
    "clean_up_tokenization_spaces", "model_input_names", "model_max_length", "chat_template",
})
PLAIN_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    """The ``TokenizerInfo`` of folder ``path``, or one clear ``TokenizerError``.

    A plain ``tokenizer.json`` folder (see ``plain_folder_refusal``) is read from its own files, without
    transformers; any other folder is loaded with ``load_tokenizer``. Both give the same values.
    """
    folder = Path(path)
    raw: dict[str, bytes] = {}
    texts: dict[str, str] = {}
    parsed: dict[str, Any] = {}
    for file in tokenizer_files(folder):
        if file.suffix == ".json":
            raw[file.name], texts[file.name], parsed[file.name] = _read_json_file(file)
    refusal = plain_folder_refusal(folder, parsed)
    if refusal is not None:
        logger.info("reading tokenizer %s with transformers.AutoTokenizer (not a plain tokenizer.json folder: %s)",
                    folder, refusal)
        return tokenizer_info(load_tokenizer(folder), folder)
    # A plain folder's tokenizer files are all JSON, so raw holds every file of the fingerprint.
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in raw.items()}
    spec, config = parsed["tokenizer.json"], parsed["tokenizer_config.json"]
    added = {token["content"]: token["id"] for token in spec["added_tokens"]}
    return TokenizerInfo(
        path=str(path),
        fingerprint=_fingerprint(digests),
        class_name="TokenizersBackend",  # what transformers 5 builds for every PLAIN_TOKENIZER_CLASSES name
        # tokenizers counts the distinct token texts of the vocabulary and the added tokens.
        vocab_size=len(spec["model"]["vocab"].keys() | added.keys()),
        bos_id=added[config["bos_token"]] if config.get("bos_token") is not None else None,
        eos_id=added[config["eos_token"]] if config.get("eos_token") is not None else None,
        tokenizer_json=texts["tokenizer.json"],
        tokenizer_json_sha256=digests["tokenizer.json"],
        read_with="tokenizer.json",
        parsed_json=spec,
    )


def tokenizer_info(tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> TokenizerInfo:
    """The ``TokenizerInfo`` of ``tokenizer``, loaded from folder ``path`` by ``load_tokenizer``."""
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    return TokenizerInfo(
        path=str(path),
        fingerprint=tokenizer_fingerprint(path),
        class_name=type(tokenizer).__name__,
        vocab_size=vocab_size(tokenizer),
        bos_id=bos_token_id(tokenizer),
        eos_id=eos_token_id(tokenizer),
        tokenizer_json=tokenizer_json,
        tokenizer_json_sha256=hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        read_with="AutoTokenizer",
    )


def plain_folder_refusal(folder: Path, parsed: dict[str, Any]) -> str | None:
    """Why folder ``folder`` (its tokenizer JSON files parsed in ``parsed``) needs AutoTokenizer, or None.

    A plain folder holds ``tokenizer.json`` (a BPE) and ``tokenizer_config.json`` naming a generic
    tokenizer class with only ``PLAIN_CONFIG_KEYS``, optionally ``special_tokens_map.json``, and nothing
    else that AutoTokenizer reads (no model ``config.json``, which can choose another class). Its
    special tokens are added tokens of ``tokenizer.json`` (AutoTokenizer would add missing ones) and
    both files agree on them. transformers 5 loads it as ``TokenizersBackend`` around the unchanged
    ``tokenizer.json``, so its ids, length and special tokens can be read from the files.
    """
    return (_files_refusal(folder, parsed) or _config_refusal(parsed) or _added_tokens_refusal(parsed)
            or _special_tokens_refusal(parsed) or _transformers_refusal())


def _files_refusal(folder: Path, parsed: dict[str, Any]) -> str | None:
    names = set(parsed) | {name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file()}
    for required in ("tokenizer.json", "tokenizer_config.json"):
        if required not in names:
            return f"no {required}"
    # The vocabulary-extension record is read by cpt-ds only; AutoTokenizer ignores it.
    others = sorted(names - {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             VOCAB_EXTENSION_FILE})
    if others:
        return f"it also holds {', '.join(others)}"
    if (folder / "config.json").exists():
        return "a model config.json can make AutoTokenizer choose a model-specific class"
    return None


def _config_refusal(parsed: dict[str, Any]) -> str | None:
    spec, config = parsed["tokenizer.json"], parsed["tokenizer_config.json"]
    if not isinstance(spec, dict) or not isinstance(config, dict):
        return "a tokenizer file is not a JSON object"
    if config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
        return f"tokenizer_class is {config.get('tokenizer_class')!r}"
    extra = sorted(set(config) - PLAIN_CONFIG_KEYS)
    if extra:
        return f"tokenizer_config.json sets {', '.join(extra)}"
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return "the model is not a BPE with a vocabulary"
    if spec.get("padding") is not None:
        return "tokenizer.json enables padding, whose pad token AutoTokenizer may add"
    return None


def _added_tokens_refusal(parsed: dict[str, Any]) -> str | None:
    spec, config = parsed["tokenizer.json"], parsed["tokenizer_config.json"]
    added = spec.get("added_tokens")
    if not isinstance(added, list) or not all(isinstance(token, dict) and isinstance(token.get("content"), str)
                                              and isinstance(token.get("id"), int) for token in added):
        return "tokenizer.json's added_tokens are not a list of tokens with content and id"
    by_content = {token["content"]: token["id"] for token in added}
    if len(by_content) != len(added) or len(set(by_content.values())) != len(added):
        return "two added tokens share a text or an id"
    vocab = spec["model"]["vocab"]
    if any(vocab.get(content, token_id) != token_id for content, token_id in by_content.items()):
        return "an added token has another id in the vocabulary"
    if "added_tokens_decoder" in config:
        expected = {str(token["id"]): {k: v for k, v in token.items() if k != "id"} for token in added}
        if config["added_tokens_decoder"] != expected:
            return "tokenizer_config.json's added_tokens_decoder differs from tokenizer.json's added_tokens"
    return None


def _special_tokens_refusal(parsed: dict[str, Any]) -> str | None:
    config = parsed["tokenizer_config.json"]
    special_map = parsed.get("special_tokens_map.json")
    if special_map is not None:
        if not isinstance(special_map, dict) or set(special_map) - set(NAMED_SPECIAL_TOKENS):
            return "special_tokens_map.json names other tokens than " + ", ".join(NAMED_SPECIAL_TOKENS)
        for key, value in special_map.items():
            content = value.get("content") if isinstance(value, dict) else value
            if content != config.get(key):
                return f"special_tokens_map.json's {key} differs from tokenizer_config.json's"
    added = {token["content"] for token in parsed["tokenizer.json"]["added_tokens"]}
    for key in NAMED_SPECIAL_TOKENS:
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or value not in added):
            return f"{key} {value!r} is not an added token of tokenizer.json"
    return None


def _transformers_refusal() -> str | None:
    import importlib.metadata  # here: its import (~15 ms) would slow every worker's start

    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "transformers is not installed"
    if version.split(".")[0] != "5":
        # The class recorded in a token file's sidecar is named differently by other versions.
        return f"transformers {version} is not version 5"
    return None


def vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of ids the tokenizer can produce: the base vocabulary plus added tokens (128,256 for LLaMA-3)."""
    return len(tokenizer)


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's beginning-of-sequence id, or None when it defines none."""
    return tokenizer.bos_token_id


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The tokenizer's end-of-sequence id (LLaMA-3: ``<|end_of_text|>`` = 128001), or None."""
    return tokenizer.eos_token_id


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int] | np.ndarray) -> str:
    """Exact text of ``ids`` (special tokens shown, no clean-up of spaces before punctuation)."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------------
# Reading the record (model side)
# --------------------------------------------------------------------------------------------------


def read_extension(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``cpt_ds_vocab_extension.json`` record of tokenizer folder ``folder``, or None when it has none."""
    path = Path(folder) / VOCAB_EXTENSION_FILE
    if not path.is_file():
        return None
    _, _, record = _read_json_file(path)
    if not isinstance(record, dict) or record.get("format") != EXTENSION_FORMAT \
            or record.get("version") != EXTENSION_VERSION:
        raise TokenizerError(f"{path} is not a version-{EXTENSION_VERSION} cpt-ds vocabulary extension record; "
                             "re-create the tokenizer with tools/extend_vocab.py")
    return record
