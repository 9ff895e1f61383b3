"""Turning a raw chunk into documents (the packer's workers): decoding, splitting, JSON parsing."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable
from dataclasses import dataclass

from cpt_ds.pack.chunks import ROW_FORMATS, RawChunk
from cpt_ds.pack.sources import EncodingErrors, PackError


@dataclass(frozen=True)
class ChunkDocuments:
    texts: list[str]
    locations: list[int]  # line (text formats) or row (parquet) where each document starts
    num_empty: int


def chunk_documents(chunk: RawChunk, *, json_key: str, encoding_errors: EncodingErrors) -> ChunkDocuments:
    """Split a raw chunk into the texts of its non-empty documents."""
    if chunk.kind in ROW_FORMATS:
        return _non_empty(enumerate(_row_values(chunk, encoding_errors), chunk.first_line))
    data: bytes = chunk.data
    _refuse_nul(chunk, data)
    start = len(codecs.BOM_UTF8) if chunk.first_byte == 0 and data.startswith(codecs.BOM_UTF8) else 0
    text = _decode(chunk, data, start, encoding_errors)
    if chunk.kind == "file":
        return _non_empty([(1, text)])
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ended with a line break, not with an empty last line
    if chunk.kind == "paragraph":
        return _paragraphs(lines, chunk.first_line)
    numbered = enumerate(lines, chunk.first_line)
    if chunk.kind == "line":
        return _non_empty((number, line.removesuffix("\r")) for number, line in numbered)
    # Blank lines between JSON records are not documents, so they are not counted as empty ones.
    return _non_empty((number, _json_text(chunk, line, number, json_key, encoding_errors))
                      for number, line in numbered if line.strip())


def _non_empty(documents: Iterable[tuple[int, str | None]]) -> ChunkDocuments:
    """The ``(location, text)`` documents whose text is not empty or blank; the others (and nulls) are counted."""
    texts: list[str] = []
    locations: list[int] = []
    num_empty = 0
    for location, text in documents:
        if text is not None and text.strip():
            texts.append(text)
            locations.append(location)
        else:
            num_empty += 1
    return ChunkDocuments(texts, locations, num_empty)


def _paragraphs(lines: list[str], first_line: int) -> ChunkDocuments:
    """Runs of non-blank lines joined by ``\\n``; blank lines only separate them and are not counted."""
    texts: list[str] = []
    locations: list[int] = []
    paragraph: list[str] = []
    for number, line in enumerate(lines + [""], first_line):
        if line.strip():
            if not paragraph:
                locations.append(number)
            paragraph.append(line.removesuffix("\r"))
        elif paragraph:
            texts.append("\n".join(paragraph))
            paragraph = []
    return ChunkDocuments(texts, locations, 0)


def _refuse_nul(chunk: RawChunk, data: bytes) -> None:
    # UTF-8 text has no NUL bytes (JSON must escape them as \u0000): one means a binary file, UTF-16
    # text or a corrupt copy, which would otherwise pack as a few long documents of junk tokens.
    position = data.find(b"\x00")
    if position >= 0:
        line = chunk.first_line + data.count(b"\n", 0, position)
        stream = " of the decompressed data" if chunk.compressed else ""
        raise PackError(f"{chunk.path}: NUL byte at byte offset {chunk.first_byte + position}{stream} (line {line}), "
                        "so this is a binary file, not UTF-8 text; leave it out of --input, convert it to UTF-8 "
                        "or strip the NUL bytes (tr -d '\\000')")


def _decode(chunk: RawChunk, data: bytes, start: int, encoding_errors: EncodingErrors) -> str:
    try:
        return data[start:].decode("utf-8", encoding_errors) if start else data.decode("utf-8", encoding_errors)
    except UnicodeDecodeError as error:
        position = start + error.start
        line = chunk.first_line + data.count(b"\n", 0, position)
        stream = " of the decompressed data" if chunk.compressed else ""
        raise PackError(f"{chunk.path}: invalid UTF-8 at byte offset {chunk.first_byte + position}{stream} "
                        f"(line {line}, byte {data[position:position + 1].hex()}); fix the file or pass "
                        "--encoding-errors replace") from None


def _json_text(chunk: RawChunk, line: str, number: int, json_key: str, encoding_errors: EncodingErrors) -> str | None:
    where = f"{chunk.path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise PackError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); fix or remove the "
                        "line (one JSON object per line)") from None
    if not isinstance(record, dict):
        raise PackError(f"{where}: the line is a JSON {type(record).__name__}, not an object; "
                        "write one JSON object per line")
    if json_key not in record:
        keys = ", ".join(list(record)[:10]) or "none"
        raise PackError(f"{where}: no key {json_key!r} (keys: {keys}); pass --json-key with the text field")
    value = record[json_key]
    if value is None:
        return None
    if not isinstance(value, str):
        raise PackError(f"{where}: {json_key!r} holds a JSON {type(value).__name__}, not a string; "
                        "pass --json-key with the text field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A "\ud800"-style escape decodes to a lone surrogate, which is not text any tokenizer accepts.
        if encoding_errors == "strict":
            raise PackError(f"{where}: {json_key!r} holds a lone surrogate escape (\\ud800-\\udfff); fix the line "
                            "or pass --encoding-errors replace") from None
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def _row_values(chunk: RawChunk, encoding_errors: EncodingErrors) -> list[str | None]:
    """The texts of a parquet or arrow chunk's rows (None: a null)."""
    try:
        return chunk.data.to_pylist()
    except UnicodeDecodeError:
        # Parquet readers do not validate UTF-8; decode row by row to name the bad row.
        import pyarrow as pa

        return [None if raw is None else _decode_parquet_value(chunk, row, raw, encoding_errors)
                for row, raw in enumerate(chunk.data.cast(pa.large_binary()).to_pylist(), chunk.first_line)]


def _decode_parquet_value(chunk: RawChunk, row: int, value: bytes, encoding_errors: EncodingErrors) -> str:
    try:
        return value.decode("utf-8", encoding_errors)
    except UnicodeDecodeError as error:
        raise PackError(f"{chunk.path}: invalid UTF-8 in row {row} at byte offset {error.start} of its text; "
                        "fix the file or pass --encoding-errors replace") from None


def describe_location(chunk: RawChunk, location: int) -> str:
    """Human-readable place of a document: ``file:line``, ``file row N`` or the file for whole-file documents."""
    if chunk.kind in ROW_FORMATS:
        return f"{chunk.path} row {location}"
    if chunk.kind == "file":
        return chunk.path
    return f"{chunk.path}:{location}"

