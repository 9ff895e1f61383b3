"""Concatenating token files into one (as Megatron's ``tools/merge_datasets.py`` does for ``.bin/.idx``).

The merged ``.bin`` is the inputs' ``.bin`` files back to back and its index their indexes joined
(sequence lengths appended, byte offsets and document indices shifted), so merging the shards of a
``--shard K/N`` pack gives the ``.bin``/``.idx`` bytes of one pack of all the inputs. The sidecar
is the inputs' sidecars joined: their ``inputs`` lists and counts, with a ``merged_from`` record of
the parts; it equals the one-pack sidecar apart from that record.

Checked first, before anything is written: every part opens as a valid token file, all parts have
the same token dtype, and (when they have sidecars, which they must all have or all lack) the same
tokenizer fingerprint, vocabulary, BOS/EOS, options and packer. Each part's ``.bin`` is checked
against its sidecar's sha256 while it is copied. Memory stays flat: data and indexes are streamed
in blocks. The output appears only when complete (``.idx`` renamed last).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpt_ds import __version__
from cpt_ds.pack.writer import INDEX_BLOCK, publish, write_index_blocks, write_sidecar
from cpt_ds.token_file import (
    IndexedTokenFile,
    TokenFileError,
    check_output_prefix,
    check_shard_plans,
    paths_for,
    resolve_token_prefixes,
)

_COPY_BLOCK = 16 << 20
# Sidecar fields that describe one part only; every other field must agree across the parts.
_PER_PART = {"inputs", "num_empty_documents_skipped", "num_documents", "num_tokens", "max_token_id", "bin_sha256",
             "bin_bytes", "shard", "merged_from", "tokenizer"}
_TOKENIZER_FIELDS = ("fingerprint", "class")  # the tokenizer's path may differ between machines


def expand_parts(specs: Sequence[str]) -> list[str]:
    """Prefixes, globs and folders -> prefixes, each spec's matches in sorted order, specs in the order given."""
    prefixes: list[str] = []
    seen: dict[Path, str] = {}
    for spec in specs:
        for prefix in resolve_token_prefixes(spec):
            resolved = paths_for(prefix)[1].resolve()
            if resolved in seen:
                raise TokenFileError(f"token file {prefix} is named twice (also as {seen[resolved]}); name each "
                                     "part once")
            seen[resolved] = prefix
            prefixes.append(prefix)
    return prefixes


def merge_token_files(output: str | os.PathLike, parts: Sequence[str], *, overwrite: bool = False) -> dict[str, Any]:
    """Write the concatenation of the token files ``parts`` (in this order) to ``output``; returns its sidecar
    (or ``{}`` when the parts have none)."""
    if not parts:
        raise TokenFileError("no token files to merge; pass the parts' prefixes, a glob or a folder")
    check_output_prefix(output, "OUT")
    files = [IndexedTokenFile(prefix) for prefix in parts]
    bin_path, idx_path, json_path = paths_for(output)
    out_prefix = str(bin_path)[: -len(".bin")]
    for file in files:
        if Path(file.prefix).resolve() == Path(out_prefix).resolve():
            raise TokenFileError(f"the output {out_prefix} is also one of the parts; choose another output")
    existing = [str(p) for p in (bin_path, idx_path, json_path) if p.exists()]
    if existing and not overwrite:
        raise TokenFileError(f"output already exists ({', '.join(existing)}); choose another output or pass "
                             "--overwrite")
    dtype = files[0].dtype
    for file in files[1:]:
        if file.dtype != dtype:
            raise TokenFileError(f"{file.idx_path} holds {file.dtype.name} tokens but {files[0].idx_path} holds "
                                 f"{dtype.name}; merge only token files packed with the same tokenizer")
    check_shard_plans("merge_corpus", files, complete=True, ordered=True)
    with_sidecar = [file.meta is not None for file in files]
    if any(with_sidecar) and not all(with_sidecar):
        lacking = files[with_sidecar.index(False)]
        raise TokenFileError(f"{lacking.json_path} is missing while other parts have sidecars; restore it or merge "
                             "only plain Megatron files together")
    sidecar = _merged_sidecar(files) if all(with_sidecar) else None

    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx, tmp_json = (p.with_name(p.name + tag) for p in (bin_path, idx_path, json_path))
    try:
        digest, largest = _copy_data(files, tmp_bin)
        num_sequences = sum(file.num_sequences for file in files)
        num_document_indices = sum(file.num_documents for file in files) + 1
        write_index_blocks(tmp_idx, num_sequences, lambda: _length_blocks(files), dtype,
                           lambda: _document_index_blocks(files), num_document_indices)
        moves = [(tmp_bin, bin_path)]
        if sidecar is not None:
            sidecar = write_sidecar(tmp_json, sidecar, dtype=dtype, num_documents=sum(f.num_documents for f in files),
                                    num_tokens=sum(f.num_tokens for f in files),
                                    max_token_id=largest,
                                    bin_sha256=digest)
            moves.append((tmp_json, json_path))
        elif json_path.exists():
            json_path.unlink()  # an old sidecar would describe other tokens
        publish([*moves, (tmp_idx, idx_path)], idx_path)
    finally:
        for path in (tmp_bin, tmp_idx, tmp_json):
            path.unlink(missing_ok=True)
    return sidecar or {}


def _merged_sidecar(files: list[IndexedTokenFile]) -> dict[str, Any]:
    first = files[0].meta
    assert first is not None
    for file in files[1:]:
        meta = file.meta
        assert meta is not None
        differ = [name for name in sorted((set(first) | set(meta)) - _PER_PART) if first.get(name) != meta.get(name)]
        differ += [f"tokenizer {name}" for name in _TOKENIZER_FIELDS
                   if first.get("tokenizer", {}).get(name) != meta.get("tokenizer", {}).get(name)]
        if differ:
            details = "; ".join(
                f"{name}: {_show(_field(first, name))} in {files[0].json_path} vs {_show(_field(meta, name))}"
                for name in differ)
            raise TokenFileError(f"{file.json_path} was not packed like {files[0].json_path} ({details}); merge only "
                                 "token files packed with the same tokenizer and options (pack the odd one again)")
    merged = {name: value for name, value in first.items() if name not in ("shard", "merged_from")}
    merged["inputs"] = [entry for file in files for entry in (file.meta or {}).get("inputs", [])]
    merged["num_empty_documents_skipped"] = sum((f.meta or {}).get("num_empty_documents_skipped", 0) for f in files)
    merged["merged_from"] = {
        "tool": "cpt-ds tools/merge_corpus.py", "tool_version": __version__,
        "parts": [{"prefix": file.prefix, "bin_sha256": (file.meta or {}).get("bin_sha256"),
                   "num_documents": file.num_documents, "num_tokens": file.num_tokens,
                   **({"shard": file.meta["shard"]} if file.meta and "shard" in file.meta else {})}
                  for file in files],
    }
    return merged


def _field(meta: dict[str, Any], name: str) -> Any:
    if name.startswith("tokenizer "):
        return meta.get("tokenizer", {}).get(name.split(" ", 1)[1])
    return meta.get(name)


def _show(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:16] + "..." if len(text) > 40 else text


def _copy_data(files: list[IndexedTokenFile], destination: Path) -> tuple[str, int]:
    """Append every part's ``.bin`` to ``destination``, checking each against its sidecar; the merged sha256
    and largest id (read from the data: a part's sidecar may predate ``max_token_id``)."""
    merged = hashlib.sha256()
    largest = -1
    with open(destination, "wb") as out:
        for file in files:
            own = hashlib.sha256()
            with open(file.bin_path, "rb") as handle:
                while block := handle.read(_COPY_BLOCK):
                    own.update(block)
                    merged.update(block)
                    out.write(block)
                    largest = max(largest, int(np.frombuffer(block, dtype=file.dtype).max()))
            expected = (file.meta or {}).get("bin_sha256")
            if expected is not None and own.hexdigest() != expected:
                raise TokenFileError(f"{file.bin_path}: sha256 {own.hexdigest()[:16]}... does not match its sidecar's "
                                     f"{expected[:16]}...; the token data is corrupt: copy or pack it again")
        out.flush()
        os.fsync(out.fileno())
    return merged.hexdigest(), largest


def _length_blocks(files: list[IndexedTokenFile]) -> Iterator[np.ndarray]:
    for file in files:
        for start in range(0, file.num_sequences, INDEX_BLOCK):
            yield np.asarray(file.sequence_lengths[start : start + INDEX_BLOCK])


def _document_index_blocks(files: list[IndexedTokenFile]) -> Iterator[np.ndarray]:
    base = 0  # sequences of the parts before this one
    for file in files:
        indices = file.document_indices[:-1]  # each part's closing entry is the next part's first start
        for start in range(0, indices.size, INDEX_BLOCK):
            yield np.asarray(indices[start : start + INDEX_BLOCK]) + base
        base += file.num_sequences
    yield np.array([base], dtype=np.int64)
