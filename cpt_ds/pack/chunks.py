"""Reading corpus files into work chunks (the packer's main process).

The work is split so that the packer's main process only does I/O: ``iter_raw_chunks`` reads (and
decompresses) a file and cuts it into chunks of about ``chunk_bytes`` at document boundaries;
``cpt_ds.pack.documents.chunk_documents`` runs in a worker and does the heavy part (UTF-8
decoding, line and paragraph splitting, JSON parsing). Chunking never changes which documents come
out, only who reads them. The formats are described in ``cpt_ds/pack/sources.py``.
"""

from __future__ import annotations

import gzip
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
import zstandard

from cpt_ds.pack.sources import Format, InputFile, PackError, TxtUnit

ChunkKind = Literal["line", "paragraph", "file", "jsonl", "parquet", "arrow"]
ROW_FORMATS: tuple[Format, ...] = ("parquet", "arrow")
_BLANK = b" \t\r\f\v"


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


class _RowCursor:
    """The next row of a parquet or arrow file, kept outside the reading loop so that an error names it."""

    def __init__(self, row: int, start_row: int):
        self.row = row
        self.start_row = start_row

    def columns(self, columns: Iterable[Any]) -> Iterator[Any]:
        """The text columns of successive batches from ``start_row`` on (dictionary columns decoded).

        The caller advances ``row`` past the rows it takes from each column."""
        import pyarrow as pa

        for column in columns:
            if self.row + len(column) <= self.start_row:
                self.row += len(column)
                continue
            if self.row < self.start_row:
                column = column.slice(self.start_row - self.row)
                self.row = self.start_row
            if pa.types.is_dictionary(column.type):
                column = column.dictionary_decode()
            yield column


def _arrow_batches(handle: Any) -> tuple[Any, Iterator[Any]]:
    """The schema and record batches of an Arrow IPC file in stream format (as ``datasets`` writes) or file format."""
    import pyarrow as pa

    is_file_format = handle.read(6) == b"ARROW1"
    handle.seek(0)
    if is_file_format:
        reader = pa.ipc.open_file(handle)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    reader = pa.ipc.open_stream(handle)
    return reader.schema, iter(reader)


def _arrow_chunks(file_index: int, source: InputFile, *, json_key: str, chunk_bytes: int,
                  start_row: int = 0) -> Iterator[RawChunk]:
    """An Arrow IPC file read one record batch at a time with plain reads, not a memory map, so
    resident memory stays at a few chunks."""
    import pyarrow as pa

    path = str(source.path)
    try:
        handle = pa.OSFile(path, "rb")
    except (pa.ArrowException, OSError) as error:
        raise PackError(f"{source.path}: cannot be read ({error}); check its permissions") from None
    with handle:
        cursor = _RowCursor(0, start_row)
        try:
            schema, batches = _arrow_batches(handle)
            _check_text_column(source, schema, json_key)
            column_index = schema.get_field_index(json_key)
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

            for column in cursor.columns(batch.column(column_index) for batch in batches):
                bytes_per_row = max(1, column.nbytes // max(1, len(column)))
                offset = 0
                while offset < len(column):
                    take = max(1, min(len(column) - offset, (chunk_bytes - pending_bytes) // bytes_per_row))
                    pending.append(column.slice(offset, take))
                    pending_bytes += take * bytes_per_row
                    offset += take
                    cursor.row += take
                    if pending_bytes >= chunk_bytes:
                        chunk = flush()
                        yield chunk
                        pending_row = cursor.row
            if pending:
                yield flush()
        except (pa.ArrowException, OSError) as error:
            raise PackError(f"{source.path}: cannot be read at row {cursor.row} ({error}); not an Arrow IPC file "
                            "or corrupt: replace it or leave it out of --input") from None


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
        cursor = _RowCursor(int(group_starts[first_group]) if metadata.num_row_groups else 0, start_row)
        try:
            batches = parquet.iter_batches(batch_size=rows_per_batch, columns=[json_key], use_threads=False,
                                           row_groups=range(first_group, metadata.num_row_groups))
            for column in cursor.columns(batch.column(0) for batch in batches):
                raw = source.num_bytes * len(column) // max(1, num_rows)  # progress only: spread evenly
                yield RawChunk(file_index, str(source.path), source.compression is not None, "parquet", column,
                               cursor.row, 0, raw)
                cursor.row += len(column)
        except (pa.ArrowException, OSError) as error:
            raise PackError(f"{source.path}: cannot be read at row {cursor.row} ({error}); the parquet file is "
                            "corrupt: replace it or leave it out of --input") from None


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
