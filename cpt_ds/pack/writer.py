"""Writing token files (the packer's side of cpt_ds/token_file.py): streamed, published atomically.

The writer streams tokens to temporary files and renames them into place only when everything is
written; ``.idx`` is renamed last, so it is the commit point. A reader needs ``.idx``, hence an
interrupted write never leaves a readable output.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cpt_ds.fileio import fsync_path
from cpt_ds.token_file import (
    CODE_BY_DTYPE,
    INTEGER_TOKEN_DTYPES,
    MAGIC,
    SIDECAR_FORMAT,
    SIDECAR_FORMAT_VERSION,
    VERSION,
    paths_for,
)

# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


class IndexedTokenWriter:
    """Streams documents into ``PREFIX.bin``/``.idx``/``.json`` with all-or-nothing visibility.

    Use as a context manager: leaving the block with an exception removes the temporary files, and
    ``finalize(meta)`` must be called inside the block to publish the output.
    """

    def __init__(self, prefix: str | os.PathLike, *, dtype: np.dtype | type, overwrite: bool = False):
        self.dtype = np.dtype(dtype)
        if self.dtype not in INTEGER_TOKEN_DTYPES:
            raise ValueError(f"token dtype must be an integer type, got {self.dtype}")
        self.bin_path, self.idx_path, self.json_path = paths_for(prefix)
        existing = [str(p) for p in (self.bin_path, self.idx_path, self.json_path) if p.exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"output already exists: {', '.join(existing)}; choose another --output or pass --overwrite"
            )
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(prefix)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = self.bin_path.with_name(self.bin_path.name + tag)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + tag)
        self._tmp_json = self.json_path.with_name(self.json_path.name + tag)
        self._bin = open(self._tmp_bin, "wb")
        self._bin_digest = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token_id = -1
        self._finalized = False

    def __enter__(self) -> IndexedTokenWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finalized:
            self.abort()

    def add_document(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        self.add_documents(tokens, np.array([tokens.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents: ``tokens`` is their concatenation, ``lengths`` their sizes."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if lengths.size and int(lengths.max()) > np.iinfo(np.int32).max:
            raise ValueError("a document longer than 2**31-1 tokens cannot be indexed (int32 lengths)")
        if tokens.size:
            low, high = int(tokens.min()), int(tokens.max())
            info = np.iinfo(self.dtype)
            if low < 0 or high > info.max:
                raise ValueError(f"token ids must lie in [0, {info.max}] for {self.dtype}, got [{low}, {high}]")
            self.max_token_id = max(self.max_token_id, high)
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._bin_digest.update(data)
        self._lengths.append(lengths.astype(np.int32))
        self.num_documents += int(lengths.size)
        self.num_tokens += int(tokens.size)

    def finalize(self, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write ``.idx`` and ``.json``, flush everything, and rename into place (``.idx`` last).

        ``meta`` holds the caller's sidecar fields (tokenizer, inputs, options, tool version); the
        counts, dtype and ``.bin`` checksum are filled in here. Returns the sidecar dictionary.
        """
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int32)
        write_index(self._tmp_idx, lengths, self.dtype)
        sidecar = write_sidecar(self._tmp_json, meta or {}, dtype=self.dtype, num_documents=self.num_documents,
                                num_tokens=self.num_tokens, max_token_id=self.max_token_id,
                                bin_sha256=self._bin_digest.hexdigest())
        publish([(self._tmp_bin, self.bin_path), (self._tmp_json, self.json_path), (self._tmp_idx, self.idx_path)],
                self.idx_path)
        self._finalized = True
        return sidecar

    def abort(self) -> None:
        """Close and delete the temporary files; the published output (if any) is untouched."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx, self._tmp_json):
            path.unlink(missing_ok=True)
        self._finalized = True


def write_sidecar(path: Path, meta: dict[str, Any], *, dtype: np.dtype, num_documents: int, num_tokens: int,
                  max_token_id: int, bin_sha256: str) -> dict[str, Any]:
    """Write (and fsync) a token file's JSON sidecar: ``meta`` plus the format, dtype, counts and checksum.

    ``meta`` holds the caller's fields (tokenizer, inputs, options, provenance). Keys are sorted and
    nothing depends on the time or the machine, so the same tokens and ``meta`` give the same bytes:
    a resumed pack equals an uninterrupted one, and merged shards equal one pack. Returns the sidecar.
    """
    sidecar = dict(meta)
    sidecar.update(
        format=SIDECAR_FORMAT,
        format_version=SIDECAR_FORMAT_VERSION,
        dtype=dtype.name,
        num_documents=num_documents,
        num_tokens=num_tokens,
        max_token_id=max_token_id,
        bin_sha256=bin_sha256,
        bin_bytes=num_tokens * dtype.itemsize,
    )
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(sidecar, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    return sidecar


def remove_stale_temporaries(prefix: str | os.PathLike) -> list[Path]:
    """Delete ``PREFIX.{bin,idx,json}.tmp-PID`` files left by a killed writer whose process is gone."""
    removed = []
    for final in paths_for(prefix):
        for path in final.parent.glob(final.name + ".tmp-*"):
            pid_text = path.name.rsplit(".tmp-", 1)[1]
            if pid_text.isdigit() and _process_alive(int(pid_text)):
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier writer in this process are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_index(path: str | os.PathLike, lengths: np.ndarray, dtype: np.dtype) -> None:
    """Write an MMIDIDX index for one document per sequence with the given sequence lengths."""
    lengths = np.asarray(lengths, dtype=np.int32)
    write_index_blocks(path, int(lengths.size), lambda: iter([lengths]), dtype)


INDEX_BLOCK = 1 << 22  # entries per block when an index is written from blocks (16-32 MB of memory)


def write_index_blocks(path: str | os.PathLike, num_sequences: int, length_blocks: Callable[[], Iterator[np.ndarray]],
                       dtype: np.dtype,
                       document_index_blocks: Callable[[], Iterator[np.ndarray]] | None = None,
                       num_document_indices: int | None = None) -> None:
    """Write an MMIDIDX index from blocks, so that memory stays flat however many sequences there are.

    ``length_blocks()`` yields the int32 sequence lengths in order; it is called twice (the lengths,
    then the byte offsets computed from them). ``document_index_blocks()`` yields the document
    indices (default: one document per sequence, ``0..num_sequences``). The bytes are the same
    however the blocks are cut.
    """
    itemsize = np.dtype(dtype).itemsize
    if document_index_blocks is None:
        num_document_indices = num_sequences + 1

        def document_index_blocks() -> Iterator[np.ndarray]:
            for start in range(0, num_sequences + 1, INDEX_BLOCK):
                yield np.arange(start, min(start + INDEX_BLOCK, num_sequences + 1), dtype=np.int64)
    assert num_document_indices is not None
    with open(path, "wb") as handle:
        handle.write(MAGIC)
        handle.write(struct.pack("<Q", VERSION))
        handle.write(struct.pack("<B", CODE_BY_DTYPE[np.dtype(dtype)]))
        handle.write(struct.pack("<Q", num_sequences))
        handle.write(struct.pack("<Q", num_document_indices))
        written = 0
        for block in length_blocks():
            handle.write(np.asarray(block, dtype=np.int32).tobytes(order="C"))
            written += len(block)
        assert written == num_sequences, (written, num_sequences)
        next_offset = 0  # byte offset of the next sequence, carried across blocks
        for block in length_blocks():
            ends = np.cumsum(np.asarray(block, dtype=np.int64), dtype=np.int64) * itemsize + next_offset
            if ends.size:
                starts = np.concatenate([[next_offset], ends[:-1]]).astype(np.int64)
                handle.write(starts.tobytes(order="C"))
                next_offset = int(ends[-1])
        written = 0
        for block in document_index_blocks():
            handle.write(np.asarray(block, dtype=np.int64).tobytes(order="C"))
            written += len(block)
        assert written == num_document_indices, (written, num_document_indices)
        handle.flush()
        os.fsync(handle.fileno())


def publish(moves: list[tuple[Path, Path]], idx_path: Path, before_index: Callable[[], None] | None = None) -> None:
    """Rename finished temporaries into place, ``.idx`` last: the commit point of a token file.

    ``moves`` lists ``(temporary, final)`` pairs with the ``.idx`` pair last; a pair whose temporary
    is already gone was moved by an earlier, interrupted publish and is skipped. An old ``.idx`` is
    removed first, so no moment shows a new ``.bin`` under an old index. ``before_index`` runs just
    before the index is renamed (a test hook).
    """
    assert moves and moves[-1][1] == idx_path
    if moves[-1][0].exists():
        idx_path.unlink(missing_ok=True)
    for temporary, final in moves:
        if temporary == moves[-1][0] and before_index is not None:
            before_index()
        if temporary.exists():
            os.replace(temporary, final)
    fsync_path(idx_path.parent)


