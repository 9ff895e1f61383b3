"""Corpus inputs: which files a pack reads, their formats, and the shards of the input list.

Formats (each optionally compressed as ``.gz`` or ``.zst``):

* ``.txt``: ``--txt-unit line`` (default) makes each line a document; ``paragraph`` makes each run
  of non-blank lines one (blank = only whitespace); ``file`` makes the whole file one. Line ends
  are ``\\n``; a ``\\r`` before it (CRLF files) is dropped in the line and
  paragraph units and kept verbatim in the file unit.
* ``.jsonl``: one JSON object per line, the text under ``--json-key``; blank lines are ignored.
* ``.parquet``: the string column named by ``--json-key``.
* ``.arrow`` (not compressed): Arrow IPC files, stream or file format, as Hugging Face ``datasets``
  writes them in its caches and ``save_to_disk``; the string column named by ``--json-key``. A
  ``save_to_disk`` folder (``state.json`` + ``dataset_info.json``) given as an input, or met while
  searching a folder, stands for its ``.arrow`` data files; a ``DatasetDict`` folder
  (``dataset_dict.json``) is refused with its split names: pass one split's folder.

A UTF-8 byte-order mark at the start of a text file is dropped. A document whose text is empty or
only whitespace (or a JSON/parquet null) is skipped and counted. ``cpt_ds/pack/chunks.py`` reads
the files into work chunks, ``cpt_ds/pack/documents.py`` turns a chunk into documents.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Format = Literal["txt", "jsonl", "parquet", "arrow"]
Compression = Literal["gz", "zst"]
TxtUnit = Literal["line", "paragraph", "file"]
EncodingErrors = Literal["strict", "replace"]

FORMATS: tuple[Format, ...] = ("txt", "jsonl", "parquet", "arrow")
COMPRESSIONS: tuple[Compression, ...] = ("gz", "zst")
TXT_UNITS: tuple[TxtUnit, ...] = ("line", "paragraph", "file")
ENCODING_ERRORS: tuple[EncodingErrors, ...] = ("strict", "replace")


class PackError(ValueError):
    """A problem with the corpus or the pack options; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: Format
    compression: Compression | None
    num_bytes: int


def input_format(path: Path) -> tuple[Format, Compression | None]:
    """Format and compression from the file name (``a.jsonl.zst`` -> ``("jsonl", "zst")``)."""
    name = path.name.lower()
    compression: Compression | None = None
    for candidate in COMPRESSIONS:
        if name.endswith("." + candidate):
            compression, name = candidate, name[: -len(candidate) - 1]
    for fmt in FORMATS:
        if name.endswith("." + fmt):
            if fmt == "arrow" and compression is not None:
                raise PackError(f"{path}: compressed .arrow files are not read; decompress it first (arrow files "
                                "are read as a stream, without a temporary copy)")
            return fmt, compression
    raise PackError(f"{path}: unknown file type; inputs must end in .txt, .jsonl, .parquet (optionally followed "
                    "by .gz or .zst) or .arrow: rename the file or leave it out of --input")


def discover_inputs(specs: Sequence[str | os.PathLike]) -> list[InputFile]:
    """Expand files, folders (recursively, hidden entries skipped) and globs into sorted input files."""
    if not specs:
        raise PackError("no input given; pass --input with files, folders or globs")
    named: dict[Path, Path] = {}  # resolved path -> path as found, to refuse a file named twice
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            matches = _hf_dataset_files(path)
            if matches is None:
                matches = _files_under(path)
            if not matches:
                raise PackError(f"input folder {path} holds no files; check --input")
        elif path.is_file():
            matches = [path]
        elif any(c in text for c in "*?["):
            matches = []
            for match in sorted(Path(p) for p in glob.glob(text, recursive=True)):
                matches.extend(_files_under(match) if match.is_dir() else [match])
            if not matches:
                raise PackError(f"input pattern {text!r} matches no file; check --input")
        else:
            raise PackError(f"input {path} does not exist; check --input")
        for match in matches:
            resolved = match.resolve()
            if resolved in named:
                raise PackError(f"input file {match} is named twice (also as {named[resolved]}); "
                                "name each file once in --input")
            named[resolved] = match
    inputs = []
    for path in sorted(named.values(), key=lambda p: p.as_posix()):
        fmt, compression = input_format(path)
        try:
            num_bytes = path.stat().st_size
        except OSError as error:
            raise PackError(f"{path}: cannot be read ({error.strerror}); check its permissions") from None
        inputs.append(InputFile(path, fmt, compression, num_bytes))
    return inputs


def _files_under(folder: Path) -> list[Path]:
    """Files in ``folder`` and its subfolders, except hidden ones (``.git``, ``.DS_Store``...); a
    ``datasets`` ``save_to_disk`` folder among them gives its data files."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dataset_files = _hf_dataset_files(entry)
            found.extend(dataset_files if dataset_files is not None else _files_under(entry))
        elif entry.is_file():
            found.append(entry)
    return sorted(found)


def _hf_dataset_files(folder: Path) -> list[Path] | None:
    """The ``.arrow`` data files of a ``datasets`` ``save_to_disk`` folder in its own order, or None
    when ``folder`` is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []
        raise PackError(f"input folder {folder} is a saved DatasetDict (splits: {', '.join(map(str, splits)) or '?'}); "
                        f"pass one split's folder, e.g. {folder / (str(splits[0]) if splits else 'train')}")
    state_path = folder / "state.json"
    if not (state_path.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        names = [entry["filename"] for entry in json.loads(state_path.read_text(encoding="utf-8"))["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PackError(f"{state_path}: not a readable datasets state file ({type(error).__name__}: {error}); "
                        "save the dataset again with save_to_disk") from None
    files = [folder / name for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise PackError(f"{state_path} lists data files that are missing ({', '.join(missing[:3])}); "
                        "copy the whole save_to_disk folder")
    return files


# --------------------------------------------------------------------------------------------------
# Shards: one of N parts of the input list, for N machines packing one corpus
# --------------------------------------------------------------------------------------------------


def parse_shard(spec: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``."""
    index_text, slash, count_text = spec.partition("/")
    if not slash or not index_text.strip().isdigit() or not count_text.strip().isdigit():
        raise PackError(f"--shard {spec!r} is not K/N; pass e.g. --shard 3/16 for the 3rd of 16 parts (K from 1 to N)")
    index, count = int(index_text), int(count_text)
    if count < 1 or not 1 <= index <= count:
        raise PackError(f"--shard {spec!r}: K must lie in 1..N and N must be at least 1; pass --shard K/N "
                        f"with 1 <= K <= N" + (f" (here 1..{count})" if count >= 1 else ""))
    return index, count


def select_shard(inputs: list[InputFile], index: int, count: int) -> list[InputFile]:
    """Input files of shard ``index`` (1-based) of ``count``: a contiguous run of the sorted list.

    The cuts balance bytes on disk: shard k starts at the first file at which the running total
    reaches (k - 1)/count of all bytes, moved so that every shard holds at least one file. Contiguous
    runs in order make the shards' token files, read back to back, the tokens of one pack of all.
    """
    if count > len(inputs):
        raise PackError(f"--shard {index}/{count}: only {len(inputs)} input files to split into {count} parts; "
                        f"use at most {len(inputs)} shards (a file is never split)")
    before = np.cumsum([0] + [source.num_bytes for source in inputs[:-1]])  # bytes before each file
    total = sum(source.num_bytes for source in inputs)
    cuts = [0]
    for k in range(1, count):
        cut = int(np.searchsorted(before, total * k / count, side="left"))
        cuts.append(min(max(cut, cuts[-1] + 1), len(inputs) - (count - k)))
    cuts.append(len(inputs))
    return inputs[cuts[index - 1] : cuts[index]]

