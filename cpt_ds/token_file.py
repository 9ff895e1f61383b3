"""The binary indexed token file: Megatron-LM's MMIDIDX format plus a JSON sidecar.

Layout (see ../shared/docs/ANCHORS.md and Megatron's ``megatron/core/datasets/indexed_dataset.py``)::

    PREFIX.bin   raw tokens of every sequence, back to back, no header
    PREFIX.idx   magic b"MMIDIDX\\x00\\x00" | <Q version=1 | <B dtype code | <Q sequence count S
                 | <Q document count D (= documents + 1) | int32[S] sequence lengths
                 | int64[S] byte offsets into .bin | int64[D] document indices
    PREFIX.json  what Megatron's index lacks (tokenizer fingerprint, vocab, checksums, inputs...)

We write one sequence per document (document indices = 0..S), which is what Megatron's
``preprocess_data.py`` writes without ``--split-sentences``; the reader also accepts Megatron files
whose documents span several sequences.

Crash safety: the writer streams tokens to temporary files and renames them into place only when
everything is written; ``.idx`` is renamed last, so it is the commit point. A reader needs ``.idx``,
hence an interrupted write never leaves a readable output.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
# Token dtypes a language model can use; the float codes exist in Megatron's table for other data.
INTEGER_TOKEN_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.uint16)}

# Megatron's own threshold (``DType.optimal_dtype``): uint16 below 65,500 entries, else int32.
UINT16_VOCAB_LIMIT = 65500

SIDECAR_FORMAT = "cpt-ds-token-file"
SIDECAR_FORMAT_VERSION = 1


class TokenFileError(ValueError):
    """A token file is missing, malformed or inconsistent; the message names the file and the fix."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest dtype Megatron would pick for ``vocab_size`` ids (int32 for LLaMA-3's 128,256)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size < UINT16_VOCAB_LIMIT:
        return np.dtype(np.uint16)
    if vocab_size > np.iinfo(np.int32).max:
        raise ValueError(f"vocab_size {vocab_size} does not fit int32 token ids")
    return np.dtype(np.int32)


def paths_for(prefix: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(PREFIX.bin, PREFIX.idx, PREFIX.json)`` for a prefix (a trailing ``.bin``/``.idx`` is dropped)."""
    prefix = str(prefix)
    for suffix in (".bin", ".idx", ".json"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
            break
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".json")


# --------------------------------------------------------------------------------------------------
# data_path entries: a prefix, a glob or a folder of token files
# --------------------------------------------------------------------------------------------------

PARTIAL_SUFFIX = ".partial"  # the resumable state of an unfinished pack (cpt_ds.pack.partial)
_SHARD_NAME = re.compile(r"^(?P<base>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def shard_prefix(prefix: str | os.PathLike, index: int, count: int) -> str:
    """Token-file prefix of shard ``index`` (1-based) of ``count``: ``PREFIX-00003-of-00016``.

    Zero-padded, so that sorted order is shard order and ``PREFIX-*`` names all the shards.
    """
    return f"{str(paths_for(prefix)[0])[: -len('.bin')]}-{index:05d}-of-{count:05d}"


def resolve_token_prefixes(entry: str) -> list[str]:
    """The token-file prefixes a ``data_path`` entry names, in sorted order.

    An entry is a prefix (returned as is; opening it reports a missing file), a glob such as
    ``data/zh/part-*`` or a folder: every ``X.bin``/``X.idx`` it matches or holds gives prefix ``X``.
    An unfinished pack (``X.partial``) among them, a shard set with a missing part
    (``X-00002-of-00004`` without ``X-00003-of-00004``) or no token file at all is an error, so a
    run never trains on part of a corpus without saying so.
    """
    text = str(entry)
    path = Path(text)
    if path.is_dir():
        names = [p for p in path.iterdir() if not p.name.startswith(".")]
        what = f"folder {text}"
    elif any(c in text for c in "*?["):
        names = [Path(p) for p in glob.glob(text)]
        what = f"pattern {text!r}"
    else:
        return [text]
    prefixes: set[str] = set()
    for name in names:
        if name.name.endswith(PARTIAL_SUFFIX):
            raise TokenFileError(f"{what} includes the unfinished pack {name}; run its pack_corpus.py command "
                                 "again to finish it (it resumes), or remove it")
        if name.suffix in (".bin", ".idx") and name.is_file():
            prefixes.add(str(name)[: -len(name.suffix)])
    if not prefixes:
        raise TokenFileError(f"{what} matches no token file (PREFIX.bin/.idx); check the data_path entry or pack "
                             "the corpus with tools/pack_corpus.py")
    found = sorted(prefixes)
    _check_shard_sets(what, found)
    return found


def _check_shard_sets(what: str, prefixes: list[str]) -> None:
    sets: dict[tuple[str, int], set[int]] = {}
    for prefix in prefixes:
        match = _SHARD_NAME.match(prefix)
        if match:
            sets.setdefault((match["base"], int(match["count"])), set()).add(int(match["index"]))
    for (base, count), indices in sets.items():
        missing = sorted(set(range(1, count + 1)) - indices)
        if missing:
            names = ", ".join(f"{base}-{k:05d}-of-{count:05d}" for k in missing[:5])
            raise TokenFileError(f"{what} holds {len(indices)} of the {count} shards of {base} (missing: {names}"
                                 f"{', ...' if len(missing) > 5 else ''}); pack the missing shards with "
                                 f"pack_corpus.py --shard K/{count}")


def check_output_prefix(prefix: str | os.PathLike, flag: str) -> None:
    """Refuse an output prefix that is a folder or whose file name is empty or hidden (``out/`` would
    write ``out/.bin``, which a ``data_path`` folder entry skips as a hidden file)."""
    text = str(prefix)
    stem = str(paths_for(text)[0])[: -len(".bin")]
    name = os.path.basename(stem)  # "" for "out/", unlike Path("out/").name
    if not name or name.startswith(".") or Path(stem).is_dir():
        example = Path(text.rstrip("/" + os.sep) or ".") / "corpus"
        raise TokenFileError(f"{flag} {text} is a folder or ends in a hidden name, so the token files would be "
                             f"hidden (.bin, .idx, .json); pass a file prefix such as {flag} {example}, which writes "
                             f"{example}.bin/.idx/.json")


# --------------------------------------------------------------------------------------------------
# Shard plans: the parts of one --shard K/N pack belong together
# --------------------------------------------------------------------------------------------------


def shard_plan(inputs: Sequence[tuple[str, int]], count: int) -> dict[str, Any]:
    """What decides the cut of a ``--shard K/N`` pack: the sorted input list (paths as given, sizes) and N;
    recorded in every shard's sidecar with a sha256 over it, so parts cut from different lists are caught."""
    listing = [{"path": path, "bytes": size} for path, size in inputs]
    digest = hashlib.sha256(json.dumps([count, listing], sort_keys=True).encode()).hexdigest()
    return {"count": count, "inputs": listing, "sha256": digest}


def check_shard_plans(what: str, files: Sequence[Any], *, complete: bool, ordered: bool = False) -> None:
    """Shards (sidecars with a ``shard`` record) among ``files``, per set (file name base and N): all cut by
    one plan, each part once, with ``complete`` every part present, with ``ordered`` in shard order.

    Sidecars written before plans were recorded have none: their parts are checked by name only.
    """
    groups: dict[tuple[str, int], list[tuple[Any, int]]] = {}
    for file in files:
        shard = (file.meta or {}).get("shard")
        if isinstance(shard, dict):
            match = _SHARD_NAME.match(Path(file.prefix).name)
            base = match["base"] if match else Path(file.prefix).name
            groups.setdefault((base, int(shard["count"])), []).append((file, int(shard["index"])))
    for (base, count), parts in groups.items():
        plans: dict[str, tuple[Any, dict[str, Any]]] = {}
        for file, _ in parts:
            plan = file.meta["shard"].get("plan")
            if isinstance(plan, dict):
                plans.setdefault(str(plan.get("sha256")), (file, plan))
        if len(plans) > 1:
            (first, plan_a), (second, plan_b) = list(plans.values())[:2]
            raise TokenFileError(f"{what}: shards {first.prefix} and {second.prefix} were cut from different input "
                                 f"lists ({_plan_difference(plan_a, plan_b)}); pack every shard of a corpus from the "
                                 "same --input list (the same paths and sizes)")
        seen: dict[int, Any] = {}
        for file, index in parts:
            if index in seen:
                raise TokenFileError(f"{what}: shard {index} of {count} of {base} is named twice ({seen[index].prefix} "
                                     f"and {file.prefix}); name each part once")
            seen[index] = file
        missing = sorted(set(range(1, count + 1)) - set(seen))
        if complete and missing:
            names = ", ".join(f"{base}-{k:05d}-of-{count:05d}" for k in missing[:5])
            raise TokenFileError(f"{what}: {len(missing)} of the {count} shards of {base} are missing ({names}"
                                 f"{', ...' if len(missing) > 5 else ''}); pack them with pack_corpus.py --shard "
                                 f"K/{count} and pass every part")
        positions = [position for position, file in enumerate(files) if any(file is part for part, _ in parts)]
        indices = [index for _, index in parts]
        if ordered and (indices != sorted(indices) or positions != list(range(positions[0], positions[-1] + 1))):
            raise TokenFileError(f"{what}: the shards of {base} are not given in shard order, one after another "
                                 f"(shards {', '.join(map(str, indices))}); pass them as PREFIX-* (sorted) so the "
                                 "result equals one pack")


def _plan_difference(first: dict[str, Any], second: dict[str, Any]) -> str:
    """The first way two shard plans differ, in words."""
    a = {entry["path"]: entry["bytes"] for entry in first.get("inputs", [])}
    b = {entry["path"]: entry["bytes"] for entry in second.get("inputs", [])}
    counts = f"{len(a)} vs {len(b)} input files"
    for path in a:
        if path not in b:
            return f"{counts}; {path} is in the first list only"
        if a[path] != b[path]:
            return f"{counts}; {path} is {a[path]:,} vs {b[path]:,} bytes"
    for path in b:
        if path not in a:
            return f"{counts}; {path} is in the second list only"
    return f"{counts}; N {first.get('count')} vs {second.get('count')}"


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


class IndexedTokenFile:
    """A memory-mapped, validated token file: O(1) access to any document or token range.

    Opening checks the index header (magic, version, dtype code), that the counts agree with the
    index's size, that offsets are consistent with lengths, and that ``.bin`` is exactly as large as
    the index says. ``verify()`` additionally checks the ``.bin`` checksum and every id < vocab.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.bin_path, self.idx_path, self.json_path = paths_for(prefix)
        self.prefix = str(self.bin_path)[: -len(".bin")]
        if not self.idx_path.exists():
            hint = " (a .bin without .idx is an interrupted write: pack again)" if self.bin_path.exists() else ""
            raise TokenFileError(f"{self.idx_path}: token file index not found{hint}; check the prefix")
        if not self.bin_path.exists():
            raise TokenFileError(f"{self.bin_path}: token data not found next to its index; copy the .bin too")
        self._index = np.memmap(self.idx_path, dtype=np.uint8, mode="r") if self.idx_path.stat().st_size else None
        self._parse_index()
        self.meta: dict[str, Any] | None = self._read_sidecar()
        self._check_bin_size()
        self._bin = (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r")
            if self.num_tokens
            else np.zeros(0, dtype=self.dtype)
        )

    # ---- validation at open ----------------------------------------------------------------------

    def _fail(self, path: Path, problem: str, fix: str) -> TokenFileError:
        return TokenFileError(f"{path}: {problem}; {fix}")

    def _parse_header(self) -> tuple[int, int, int]:
        """Check the index header and set ``dtype``; returns the index size and the two counts in the header."""
        size = self.idx_path.stat().st_size
        if size < HEADER_SIZE:
            raise self._fail(self.idx_path, f"index is {size} bytes, shorter than the {HEADER_SIZE}-byte header",
                             "the file is empty or truncated: pack the corpus again")
        header = bytes(self._index[:HEADER_SIZE])
        if header[:9] != MAGIC:
            raise self._fail(self.idx_path, f"bad magic {header[:9]!r} (expected {MAGIC!r})",
                             "this is not a Megatron MMIDIDX index: pass the prefix of a file written by "
                             "tools/pack_corpus.py or Megatron's preprocess_data.py")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise self._fail(self.idx_path, f"unsupported index version {version} (this reader knows {VERSION})",
                             "re-pack the corpus with tools/pack_corpus.py")
        code = header[17]
        if code not in DTYPE_BY_CODE:
            raise self._fail(self.idx_path, f"unknown dtype code {code} (known: {sorted(DTYPE_BY_CODE)})",
                             "the index is corrupt: pack the corpus again")
        self.dtype = DTYPE_BY_CODE[code]
        if self.dtype not in INTEGER_TOKEN_DTYPES:
            raise self._fail(self.idx_path, f"dtype code {code} ({self.dtype}) is not an integer token type",
                             "token files must hold integer ids: pack the corpus again")
        num_sequences, num_document_indices = struct.unpack("<QQ", header[18:34])
        return size, num_sequences, num_document_indices

    def _parse_index(self) -> None:
        size, num_sequences, num_document_indices = self._parse_header()
        expected = HEADER_SIZE + 4 * num_sequences + 8 * num_sequences + 8 * num_document_indices
        if size != expected:
            raise self._fail(self.idx_path,
                             f"index is {size} bytes but its header ({num_sequences} sequences, "
                             f"{num_document_indices} document indices) implies {expected}",
                             "the index is truncated or corrupt: pack the corpus again")
        if num_document_indices < 1:
            raise self._fail(self.idx_path, "document index is empty (it must start with 0)",
                             "the index is corrupt: pack the corpus again")
        start = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._index, dtype=np.int32, count=num_sequences, offset=start)
        start += 4 * num_sequences
        self.sequence_pointers = np.frombuffer(self._index, dtype=np.int64, count=num_sequences, offset=start)
        start += 8 * num_sequences
        self.document_indices = np.frombuffer(self._index, dtype=np.int64, count=num_document_indices, offset=start)
        self.num_sequences = int(num_sequences)

        if num_sequences and int(self.sequence_lengths.min()) < 0:
            raise self._fail(self.idx_path, "negative sequence length in the index",
                             "the index is corrupt: pack the corpus again")
        itemsize = self.dtype.itemsize
        token_offsets = np.zeros(num_sequences, dtype=np.int64)
        if num_sequences > 1:
            np.cumsum(self.sequence_lengths[:-1], dtype=np.int64, out=token_offsets[1:])
        if not np.array_equal(token_offsets * itemsize, self.sequence_pointers):
            raise self._fail(self.idx_path, "sequence byte offsets disagree with the sequence lengths",
                             "the index is corrupt or not contiguous: pack the corpus again")
        self.sequence_token_offsets = token_offsets
        di = self.document_indices
        if int(di[0]) != 0 or int(di[-1]) != num_sequences or (di.size > 1 and bool(np.any(np.diff(di) < 0))):
            raise self._fail(self.idx_path,
                             f"document indices must rise from 0 to the sequence count {num_sequences}",
                             "the index is corrupt: pack the corpus again")
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        self.num_documents = int(di.size - 1)
        # Token offset of each document start plus the end sentinel: document i = [starts[i], starts[i+1]).
        sequence_starts = np.append(token_offsets, np.int64(self.num_tokens))
        self.document_token_offsets = sequence_starts[di]

    def _read_sidecar(self) -> dict[str, Any] | None:
        if not self.json_path.exists():
            return None  # a plain Megatron file: readable, but without our provenance
        try:
            with open(self.json_path, encoding="utf-8") as handle:
                meta = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise self._fail(self.json_path, f"sidecar is not valid JSON ({error})",
                             "restore it or delete it to read the file as a plain Megatron file") from None
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
            raise self._fail(self.json_path, f"sidecar 'format' is not {SIDECAR_FORMAT!r}",
                             "this JSON is not a cpt-ds token file sidecar: move it away")
        if meta.get("format_version") != SIDECAR_FORMAT_VERSION:
            raise self._fail(self.json_path, f"unsupported sidecar format_version {meta.get('format_version')}",
                             "re-pack the corpus with this version of tools/pack_corpus.py")
        problems = []
        if meta.get("num_tokens") != self.num_tokens:
            problems.append(f"num_tokens {meta.get('num_tokens')} != index {self.num_tokens}")
        if meta.get("num_documents") != self.num_documents:
            problems.append(f"num_documents {meta.get('num_documents')} != index {self.num_documents}")
        if meta.get("dtype") != self.dtype.name:
            problems.append(f"dtype {meta.get('dtype')} != index {self.dtype.name}")
        if problems:
            raise self._fail(self.json_path, "sidecar disagrees with the index (" + "; ".join(problems) + ")",
                             "the .idx and .json come from different packs: pack the corpus again")
        return meta

    def _check_bin_size(self) -> None:
        actual = self.bin_path.stat().st_size
        expected = self.num_tokens * self.dtype.itemsize
        if actual != expected:
            state = "truncated" if actual < expected else "longer than its index"
            raise self._fail(self.bin_path,
                             f"token data is {actual} bytes but the index describes {self.num_tokens} "
                             f"{self.dtype.name} tokens = {expected} bytes ({state})",
                             "the .bin and .idx do not belong together or the copy is incomplete: copy or pack again")

    # ---- access ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int | None:
        return None if self.meta is None else self.meta.get("vocab_size")

    @property
    def document_lengths(self) -> np.ndarray:
        return np.diff(self.document_token_offsets)

    def __len__(self) -> int:
        return self.num_documents

    def document(self, index: int) -> np.ndarray:
        """Tokens of document ``index`` (a read-only view into the memory map)."""
        if not -self.num_documents <= index < self.num_documents:
            raise IndexError(f"document {index} out of range for {self.num_documents} documents in {self.bin_path}")
        index %= self.num_documents
        return self._bin[self.document_token_offsets[index] : self.document_token_offsets[index + 1]]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the whole token stream (documents back to back)."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens}] in {self.bin_path}")
        return self._bin[start:stop]

    def iter_chunks(self, chunk_tokens: int = 1 << 24) -> Iterator[np.ndarray]:
        for start in range(0, self.num_tokens, chunk_tokens):
            yield self._bin[start : min(start + chunk_tokens, self.num_tokens)]

    # ---- full check ------------------------------------------------------------------------------

    def verify(self, vocab_size: int | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Full check: ``.bin`` checksum against the sidecar and every id in ``[0, vocab_size)``.

        ``vocab_size`` defaults to the sidecar's; a plain Megatron file without one must be given it.
        ``progress`` is called with the number of bytes checked per chunk.
        """
        vocab = vocab_size if vocab_size is not None else self.vocab_size
        if vocab is None:
            raise TokenFileError(f"{self.json_path}: no sidecar, so the vocabulary size is unknown; "
                                 "pass the vocabulary size to verify against")
        digest = hashlib.sha256()
        first_bad = None  # (position, document, id): reported after the checksum, which tells rot from a wrong tokenizer
        for chunk_index, chunk in enumerate(self.iter_chunks()):
            digest.update(chunk.tobytes())
            if chunk.size and first_bad is None:
                low, high = int(chunk.min()), int(chunk.max())
                if low < 0 or high >= vocab:
                    bad = int(np.flatnonzero((chunk < 0) | (chunk >= vocab))[0])
                    position = chunk_index * (1 << 24) + bad
                    document = int(np.searchsorted(self.document_token_offsets, position, side="right") - 1)
                    first_bad = position, document, int(chunk[bad])
            if progress is not None:
                progress(chunk.nbytes)
        where = "" if first_bad is None else (f"token {first_bad[0]} (document {first_bad[1]}) has id {first_bad[2]}, "
                                              f"outside the vocabulary [0, {vocab})")
        if self.meta is not None and self.meta.get("bin_sha256") != digest.hexdigest():
            raise TokenFileError(f"{self.bin_path}: sha256 {digest.hexdigest()} does not match the sidecar's "
                                 f"{self.meta.get('bin_sha256')}{f' ({where})' if where else ''}; the token data is "
                                 "corrupt: copy or pack it again")
        if first_bad is not None:
            raise TokenFileError(f"{self.bin_path}: {where}; the file was packed with another tokenizer or is corrupt: "
                                 "pack it again with the model's tokenizer")
