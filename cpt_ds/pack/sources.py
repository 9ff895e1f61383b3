"""Corpus inputs: finding the files, cutting them into work chunks, and turning chunks into documents.

The work is split so that the packer's main process only does I/O: ``iter_raw_chunks`` reads (and
decompresses) a file and cuts it into chunks of about ``chunk_bytes`` at document boundaries;
``chunk_documents`` runs in a worker and does the heavy part (UTF-8 decoding, line and paragraph
splitting, JSON parsing). Chunking never changes which documents come out, only who reads them.

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
only whitespace (or a JSON/parquet null) is skipped and counted.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import zstandard

Format = Literal["txt", "jsonl", "parquet", "arrow"]
Compression = Literal["gz", "zst"]
TxtUnit = Literal["line", "paragraph", "file"]
EncodingErrors = Literal["strict", "replace"]
ChunkKind = Literal["line", "paragraph", "file", "jsonl", "parquet", "arrow"]

FORMATS: tuple[Format, ...] = ("txt", "jsonl", "parquet", "arrow")
COMPRESSIONS: tuple[Compression, ...] = ("gz", "zst")
TXT_UNITS: tuple[TxtUnit, ...] = ("line", "paragraph", "file")
ENCODING_ERRORS: tuple[EncodingErrors, ...] = ("strict", "replace")

_BLANK = b" \t\r\f\v"


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


# --------------------------------------------------------------------------------------------------
# Main process: raw chunks
# --------------------------------------------------------------------------------------------------


ROW_FORMATS: tuple[Format, ...] = ("parquet", "arrow")


@dataclass(frozen=True)
class RawChunk:
    """A piece of one input file, cut at a document boundary, as the main process read it."""

    file_index: int
    path: str
    compressed: bool
    kind: ChunkKind
    data: Any  # bytes, or a pyarrow string array for parquet and arrow
    first_line: int  # 1-based line of the data's start (text formats) or 0-based row (parquet, arrow)
    first_byte: int  # offset of the data's start in the (decompressed) file
    num_raw_bytes: int  # bytes of the file on disk this chunk accounts for (progress only)


def chunk_end(chunk: RawChunk) -> tuple[int, int | None, bool]:
    """``(byte, line, done)`` just after ``chunk``: where reading continues (``iter_raw_chunks``'s
    ``start_byte``/``start_line``); ``done``: the file is finished (a whole-file document)."""
    if chunk.kind == "file":
        return 0, None, True
    if chunk.kind in ROW_FORMATS:
        return 0, chunk.first_line + len(chunk.data), False
    return chunk.first_byte + len(chunk.data), chunk.first_line + chunk.data.count(b"\n"), False


def iter_raw_chunks(file_index: int, source: InputFile, *, txt_unit: TxtUnit, json_key: str,
                    chunk_bytes: int, start_byte: int = 0, start_line: int | None = None) -> Iterator[RawChunk]:
    """Read ``source`` and yield chunks of about ``chunk_bytes`` that end at document boundaries.

    ``start_byte``/``start_line``: continue from a document boundary a previous run reached (see
    ``chunk_end``): byte offset of the decompressed data and its 1-based line, or for parquet and
    arrow files the 0-based row (``start_line``). What a document becomes does not depend on where
    reading started, so a resumed pack writes the same bytes.
    """
    if source.format in ROW_FORMATS:
        rows = _parquet_chunks if source.format == "parquet" else _arrow_chunks
        yield from rows(file_index, source, json_key=json_key, chunk_bytes=chunk_bytes, start_row=start_line or 0)
        return
    kind: ChunkKind = "jsonl" if source.format == "jsonl" else txt_unit
    compressed = source.compression is not None
    with _open_stream(source) as (stream, raw_position):
        if kind == "file":
            yield RawChunk(file_index, str(source.path), compressed, kind, _read(stream, -1, source), 1, 0,
                           raw_position())
            return
        buffer = bytearray()
        offset, line = start_byte, start_line or 1
        if start_byte and not compressed:
            stream.seek(start_byte)
        else:
            to_skip = start_byte  # a compressed stream cannot seek: decompress and drop (fast next to tokenizing)
            while to_skip:
                skipped = len(_read(stream, min(to_skip, 16 << 20), source))
                if not skipped:
                    raise PackError(f"{source.path}: shorter than when a previous run read it; run with --no-resume")
                to_skip -= skipped
        raw_done = raw_position()
        while True:
            block = _read(stream, chunk_bytes, source)
            searched_from = len(buffer)
            buffer += block
            if block:
                cut = (_paragraph_cut(buffer, searched_from) if kind == "paragraph"
                       else buffer.rfind(b"\n", searched_from) + 1)
                if cut == 0:
                    continue  # no document boundary yet: a document is longer than a chunk, read on
            elif buffer:
                cut = len(buffer)  # end of file: the rest is the last chunk
            else:
                return
            data = bytes(buffer[:cut])
            del buffer[:cut]
            raw_now = raw_position()
            yield RawChunk(file_index, str(source.path), compressed, kind, data, line, offset, raw_now - raw_done)
            raw_done = raw_now
            line += data.count(b"\n")
            offset += len(data)


def _paragraph_cut(buffer: bytearray, searched_from: int) -> int:
    """Position just after the last blank line whose end lies at or after ``searched_from``, or 0.

    Only ASCII-blank lines are found here; lines of other whitespace (U+3000...) also separate
    paragraphs in ``chunk_documents``, but cutting at some separators, not all, is enough.
    """
    end = len(buffer)
    while True:
        newline = buffer.rfind(b"\n", 0, end)
        # Lines ending before searched_from were examined when the previous block arrived.
        if newline < searched_from:
            return 0
        start = buffer.rfind(b"\n", 0, newline) + 1
        if not buffer[start:newline].strip(_BLANK):
            return newline + 1
        end = newline


@contextmanager
def _open_stream(source: InputFile) -> Iterator[tuple[BinaryIO, Any]]:
    """The decompressed byte stream of ``source`` and a function giving the bytes read from disk."""
    try:
        raw = open(source.path, "rb")
    except OSError as error:
        raise PackError(f"{source.path}: cannot be read ({error.strerror}); check its permissions") from None
    with raw:
        if source.compression == "gz":
            stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        elif source.compression == "zst":
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        with stream:
            yield stream, raw.tell


def _read(stream: BinaryIO, size: int, source: InputFile) -> bytes:
    try:
        return stream.read(size)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as error:
        kind = {"gz": "gzip ", "zst": "zstd "}.get(source.compression or "", "")
        raise PackError(f"{source.path}: cannot be read ({type(error).__name__}: {error}); the {kind}file is "
                        "corrupt or truncated: replace it or leave it out of --input") from None


def _check_text_column(source: InputFile, schema: Any, json_key: str) -> None:
    import pyarrow as pa

    if json_key not in schema.names:
        raise PackError(f"{source.path}: no column {json_key!r} (columns: {', '.join(schema.names)}); "
                        "pass --json-key with the name of the text column")
    column_type = schema.field(json_key).type
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise PackError(f"{source.path}: column {json_key!r} holds {column_type}, not strings; "
                        "pass --json-key with the name of the text column")


def _arrow_chunks(file_index: int, source: InputFile, *, json_key: str, chunk_bytes: int,
                  start_row: int = 0) -> Iterator[RawChunk]:
    """An Arrow IPC file (stream format, as ``datasets`` writes, or file format) read one record
    batch at a time with plain reads, not a memory map, so resident memory stays at a few chunks."""
    import pyarrow as pa

    path = str(source.path)
    try:
        handle = pa.OSFile(path, "rb")
    except (pa.ArrowException, OSError) as error:
        raise PackError(f"{source.path}: cannot be read ({error}); check its permissions") from None
    with handle:
        row = 0
        try:
            is_file_format = handle.read(6) == b"ARROW1"
            handle.seek(0)
            if is_file_format:
                reader = pa.ipc.open_file(handle)
                num_batches = reader.num_record_batches
                batches = (reader.get_batch(i) for i in range(num_batches))
            else:
                reader = pa.ipc.open_stream(handle)
                batches = iter(reader)
            _check_text_column(source, reader.schema, json_key)
            column_index = reader.schema.get_field_index(json_key)
            pending: list[Any] = []
            pending_bytes = 0
            pending_row = start_row
            raw_done = 0

            def flush() -> RawChunk:
                nonlocal pending, pending_bytes, raw_done
                column = pending[0] if len(pending) == 1 else pa.concat_arrays(pending)
                raw_now = handle.tell()
                chunk = RawChunk(file_index, path, False, "arrow", column, pending_row, 0, raw_now - raw_done)
                raw_done = raw_now
                pending, pending_bytes = [], 0
                return chunk

            for batch in batches:
                column = batch.column(column_index)
                if row + len(column) <= start_row:
                    row += len(column)
                    continue
                if row < start_row:
                    column = column.slice(start_row - row)
                    row = start_row
                if pa.types.is_dictionary(column.type):
                    column = column.dictionary_decode()
                bytes_per_row = max(1, column.nbytes // max(1, len(column)))
                offset = 0
                while offset < len(column):
                    take = max(1, min(len(column) - offset, (chunk_bytes - pending_bytes) // bytes_per_row))
                    pending.append(column.slice(offset, take))
                    pending_bytes += take * bytes_per_row
                    offset += take
                    row += take
                    if pending_bytes >= chunk_bytes:
                        chunk = flush()
                        yield chunk
                        pending_row = row
            if pending:
                yield flush()
        except (pa.ArrowException, OSError) as error:
            raise PackError(f"{source.path}: cannot be read at row {row} ({error}); not an Arrow IPC file or "
                            "corrupt: replace it or leave it out of --input") from None


def _parquet_chunks(file_index: int, source: InputFile, *, json_key: str, chunk_bytes: int,
                    start_row: int = 0) -> Iterator[RawChunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _parquet_source(source) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as error:
            raise PackError(f"{source.path}: not a readable parquet file ({error}); replace it or leave it out "
                            "of --input") from None
        schema = parquet.schema_arrow
        _check_text_column(source, schema, json_key)
        metadata = parquet.metadata
        num_rows = metadata.num_rows
        column_index = schema.get_field_index(json_key)
        text_bytes = sum(metadata.row_group(g).column(column_index).total_uncompressed_size
                         for g in range(metadata.num_row_groups))
        rows_per_batch = max(1, chunk_bytes * max(1, num_rows) // max(1, text_bytes))
        # Resuming: start at the row group holding start_row, and drop its rows before start_row.
        group_starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        first_group = max(0, int(np.searchsorted(group_starts, start_row, side="right")) - 1)
        row = int(group_starts[first_group]) if metadata.num_row_groups else 0
        try:
            for batch in parquet.iter_batches(batch_size=rows_per_batch, columns=[json_key], use_threads=False,
                                              row_groups=range(first_group, metadata.num_row_groups)):
                column = batch.column(0)
                if row + len(column) <= start_row:
                    row += len(column)
                    continue
                if row < start_row:
                    column = column.slice(start_row - row)
                    row = start_row
                if pa.types.is_dictionary(column.type):
                    column = column.dictionary_decode()
                raw = source.num_bytes * len(column) // max(1, num_rows)  # progress only: spread evenly
                yield RawChunk(file_index, str(source.path), source.compression is not None, "parquet", column,
                               row, 0, raw)
                row += len(column)
        except (pa.ArrowException, OSError) as error:
            raise PackError(f"{source.path}: cannot be read at row {row} ({error}); the parquet file is corrupt: "
                            "replace it or leave it out of --input") from None


@contextmanager
def _parquet_source(source: InputFile) -> Iterator[Any]:
    """A seekable handle on the parquet data: the file itself, or its decompressed copy in a temp file."""
    if source.compression is None:
        yield str(source.path)
        return
    # Parquet needs random access, so a .parquet.gz/.zst is decompressed into an anonymous temp file.
    with _open_stream(source) as (stream, _), tempfile.TemporaryFile() as copy:
        while block := _read(stream, 16 << 20, source):
            copy.write(block)
        copy.seek(0)
        yield copy


# --------------------------------------------------------------------------------------------------
# Worker: documents of a chunk
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkDocuments:
    texts: list[str]
    locations: list[int]  # line (text formats) or row (parquet) where each document starts
    num_empty: int


def chunk_documents(chunk: RawChunk, *, json_key: str, encoding_errors: EncodingErrors) -> ChunkDocuments:
    """Split a raw chunk into the texts of its non-empty documents."""
    if chunk.kind in ROW_FORMATS:
        return _parquet_documents(chunk, encoding_errors)
    data: bytes = chunk.data
    start = len(codecs.BOM_UTF8) if chunk.first_byte == 0 and data.startswith(codecs.BOM_UTF8) else 0
    text = _decode(chunk, data, start, encoding_errors)
    texts: list[str] = []
    locations: list[int] = []
    num_empty = 0
    if chunk.kind == "file":
        if text.strip():
            texts.append(text)
            locations.append(1)
        else:
            num_empty += 1
        return ChunkDocuments(texts, locations, num_empty)

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ended with a line break, not with an empty last line
    if chunk.kind == "line":
        for number, line in enumerate(lines, chunk.first_line):
            line = line[:-1] if line.endswith("\r") else line
            if line.strip():
                texts.append(line)
                locations.append(number)
            else:
                num_empty += 1
    elif chunk.kind == "paragraph":
        paragraph: list[str] = []
        for number, line in enumerate(lines + [""], chunk.first_line):
            if line.strip():
                if not paragraph:
                    locations.append(number)
                paragraph.append(line[:-1] if line.endswith("\r") else line)
            elif paragraph:
                texts.append("\n".join(paragraph))
                paragraph = []
    else:
        for number, line in enumerate(lines, chunk.first_line):
            if not line.strip():
                continue
            value = _json_text(chunk, line, number, json_key, encoding_errors)
            if value is not None and value.strip():
                texts.append(value)
                locations.append(number)
            else:
                num_empty += 1
    return ChunkDocuments(texts, locations, num_empty)


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


def _parquet_documents(chunk: RawChunk, encoding_errors: EncodingErrors) -> ChunkDocuments:
    try:
        values = chunk.data.to_pylist()
    except UnicodeDecodeError:
        # Parquet readers do not validate UTF-8; decode row by row to name the bad row.
        import pyarrow as pa

        values = [None if raw is None else _decode_parquet_value(chunk, row, raw, encoding_errors)
                  for row, raw in enumerate(chunk.data.cast(pa.large_binary()).to_pylist(), chunk.first_line)]
    texts, locations, num_empty = [], [], 0
    for row, value in enumerate(values, chunk.first_line):
        if value is not None and value.strip():
            texts.append(value)
            locations.append(row)
        else:
            num_empty += 1
    return ChunkDocuments(texts, locations, num_empty)


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

