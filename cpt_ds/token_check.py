"""Token files checked before anything reads their tokens: the data matches its sidecar, every id fits the model.

Opening a token file (``cpt_ds/token_file.py``) checks only its index and sizes; a ``.bin`` whose
bytes rotted, was half copied or replaced after packing, or a Megatron file packed with a larger
tokenizer would otherwise train until an out-of-range id is drawn (an ``IndexError`` hours in) or
silently train on garbage. So before training (and ``tools/evaluate.py``) reads a file:

* a sidecar's ``max_token_id`` is compared with the model's vocabulary (free);
* the ``.bin`` is read once: its sha256 (when a sidecar records one) and its smallest and largest
  id, vectorized over the memory map in chunks. The facts are cached, keyed by the ``.bin``'s
  resolved path, size, mtime, ctime and inode, beside the file (``PREFIX.bin.checked``) when its
  folder is writable, else under ``$CPT_DS_CACHE_DIR/token_checks/``; a later run, or another rank
  on the same machine, reads the cache instead of the data. Only facts of a file that passed are
  cached, so a refused file leaves nothing behind.

Ranks of one machine share the work: each takes the files in its own rotation and holds an
exclusive ``flock`` on a ``.bin`` while it reads it, so a file is read once per machine (per
cluster when the cache lies beside the file on a shared file system) and the others wait for its
verdict without a process-group collective. Measured costs are in docs/packing.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_ds.fileio import atomic_write_text, cache_dir
from cpt_ds.token_file import IndexedTokenFile, TokenFileError

logger = logging.getLogger(__name__)

CHECK_SUFFIX = ".checked"
CHECK_VERSION = 1
CHUNK_TOKENS = 1 << 20  # 4 MB of int32: the min/max pass finds the chunk the hash just read still in cache
_PROGRESS_BYTES = 1 << 30  # files at least this large log their progress


@dataclass(frozen=True)
class BinFacts:
    """What one read of a ``.bin`` established (``sha256`` is None when it was not computed)."""

    sha256: str | None
    min_id: int | None
    max_id: int | None
    """None for a file without tokens."""


def check_ids(file: IndexedTokenFile, vocab_size: int, *,
              progress: Callable[[int], None] | None = None) -> None:
    """Raise ``TokenFileError`` unless ``file``'s data matches its sidecar's sha256 and every id lies in
    ``[0, vocab_size)``; the message names the file, the first bad position and ``inspect_corpus.py --verify``.

    The ``.bin`` is read at most once per machine (see the module docstring); ``progress`` is called
    with the bytes read per chunk when it is read.
    """
    problem = _cheap_problem(file, vocab_size) or _full_problem(file, vocab_size, progress)
    if problem is not None:
        raise TokenFileError(problem)


def token_id_problems(files: Sequence[IndexedTokenFile], vocab_size: int, *, full: bool, rank: int = 0) -> list[str]:
    """One problem per file that fails ``check_ids``, in ``files`` order; only the free sidecar check unless
    ``full``. ``rank`` rotates the order the files are read in, so the ranks of a machine share the reading."""
    problems: dict[int, str] = {}
    for index, file in enumerate(files):
        problem = _cheap_problem(file, vocab_size)
        if problem is not None:
            problems[index] = problem
    if full and files:
        shift = rank % len(files)
        for index in [*range(shift, len(files)), *range(shift)]:
            if index not in problems:
                problem = _full_problem(files[index], vocab_size, None)
                if problem is not None:
                    problems[index] = problem
    return [problems[index] for index in sorted(problems)]


def _cheap_problem(file: IndexedTokenFile, vocab_size: int) -> str | None:
    largest = (file.meta or {}).get("max_token_id")
    if isinstance(largest, int) and largest >= vocab_size:
        return _id_problem(file, vocab_size)
    return None


def _full_problem(file: IndexedTokenFile, vocab_size: int, progress: Callable[[int], None] | None) -> str | None:
    meta = file.meta or {}
    expected = meta.get("bin_sha256")
    # A sidecar's max_token_id (checked for free) holds for the data once the data matches its sha256.
    find_range = expected is None or not isinstance(meta.get("max_token_id"), int)
    facts = bin_facts(file, hash_data=expected is not None, find_range=find_range, progress=progress,
                      keep=lambda facts: _verdict(file, facts, vocab_size, expected) is None)
    return _verdict(file, facts, vocab_size, expected)


def _verdict(file: IndexedTokenFile, facts: BinFacts, vocab_size: int, expected: str | None) -> str | None:
    ids_bad = facts.max_id is not None and (facts.max_id >= vocab_size or (facts.min_id or 0) < 0)
    if expected is not None and facts.sha256 != expected:
        found = first_bad_id(file, vocab_size)
        where = f" ({_first_bad_text(file, vocab_size, found)})" if found else ""
        return (f"{file.bin_path}: sha256 {str(facts.sha256)[:16]}... does not match its sidecar's {expected[:16]}..., "
                f"so the token data changed after packing{where}: bit rot, an incomplete copy or a replaced .bin; "
                f"run tools/inspect_corpus.py {file.prefix} --verify and copy or pack it again")
    return _id_problem(file, vocab_size) if ids_bad else None


def _id_problem(file: IndexedTokenFile, vocab_size: int) -> str:
    return (f"{file.bin_path}: {_first_bad_text(file, vocab_size)}; the file was packed with another tokenizer or "
            f"is corrupt: run tools/inspect_corpus.py {file.prefix} --verify --vocab-size {vocab_size} and pack it "
            "again with the model's tokenizer")


def first_bad_id(file: IndexedTokenFile, vocab_size: int) -> tuple[int, int, int, int] | None:
    """``(token position, document, offset in the document, id)`` of the first id outside ``[0, vocab_size)``."""
    for start, chunk in _chunks(file):
        bad = np.flatnonzero((chunk >= vocab_size) | (chunk < 0)) if chunk.dtype.kind == "i" else \
            np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            position = start + int(bad[0])
            document = int(np.searchsorted(file.document_token_offsets, position, side="right") - 1)
            return position, document, position - int(file.document_token_offsets[document]), int(chunk[bad[0]])
    return None


def _first_bad_text(file: IndexedTokenFile, vocab_size: int, found: tuple[int, int, int, int] | None = None) -> str:
    found = found or first_bad_id(file, vocab_size)
    if found is None:  # the sidecar's max_token_id claims more than the data holds
        return (f"its sidecar records token id {(file.meta or {}).get('max_token_id')} but the model's vocabulary "
                f"has {vocab_size} rows")
    position, document, offset, value = found
    return (f"token {position:,} (document {document:,}, offset {offset:,}) has id {value:,}, outside the model's "
            f"vocabulary [0, {vocab_size:,})")


# --------------------------------------------------------------------------------------------------
# The same tokens named twice: aliases of one file, merges next to their parts, eval sets that are training data
# --------------------------------------------------------------------------------------------------

Origin = tuple[str, IndexedTokenFile]
"""A token file and the ``data_path`` / ``eval_data_path`` entry that named it."""


def _same_file_key(file: IndexedTokenFile) -> tuple[int, int]:
    # Device and inode see through every spelling: "..", symlinks and hard links alike.
    stat = file.bin_path.stat()
    return stat.st_dev, stat.st_ino


def _named(origin: Origin) -> str:
    entry, file = origin
    return f"{entry!r}" if file.prefix == entry else f"{file.prefix} (from {entry!r})"


def _sha(file: IndexedTokenFile) -> str | None:
    meta = file.meta or {}
    return meta.get("bin_sha256") if file.num_tokens else None  # every empty file has the same sha256


def _merged_parts(file: IndexedTokenFile) -> list[str]:
    """The sha256 of each part a merged file was made of, in merge order."""
    record = (file.meta or {}).get("merged_from")
    parts = record.get("parts", []) if isinstance(record, dict) else []
    return [part["bin_sha256"] for part in parts if isinstance(part, dict) and part.get("bin_sha256")]


def distinct_files(files: Sequence[IndexedTokenFile]) -> list[IndexedTokenFile]:
    """``files`` without repeats of one file (a training file that is also an eval set is checked once)."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for file in files:
        if _same_file_key(file) not in seen:
            seen.add(_same_file_key(file))
            kept.append(file)
    return kept


def same_file_problems(origins: Sequence[Origin]) -> list[str]:
    """The training files named twice under two spellings, and merged files next to their own parts."""
    problems = []
    by_key: dict[tuple[int, int], Origin] = {}
    by_sha = {_sha(file): (entry, file) for entry, file in origins if _sha(file)}
    for origin in origins:
        file = origin[1]
        first = by_key.setdefault(_same_file_key(file), origin)
        if first is not origin and first[1].prefix != file.prefix:  # one spelling twice: the blend parser reports it
            problems.append(f"data_path: {_named(first)} and {_named(origin)} are the same token file "
                            f"({file.bin_path.resolve()}); name it once")
        inside = [by_sha[sha] for sha in _merged_parts(file) if sha in by_sha and by_sha[sha][1] is not file]
        if inside:
            problems.append(f"data_path: {_named(origin)} is a merge of {_named(inside[0])}, which data_path also "
                            "names, so its tokens would be read twice; keep either the merged file or its parts")
    return problems


def eval_overlap_warnings(train: Sequence[Origin], evaluation: Sequence[Origin]) -> list[str]:
    """One warning per eval-set file that is (or holds, or is part of) a training file: its loss is not held out."""
    by_key = {_same_file_key(file): origin for origin in train for file in [origin[1]]}
    by_sha = {_sha(file): origin for origin in train for file in [origin[1]] if _sha(file)}
    warnings = []
    for origin in evaluation:
        file = origin[1]
        if _same_file_key(file) in by_key:
            how, other = "is the training file", by_key[_same_file_key(file)]
        elif _sha(file) in by_sha:
            how, other = "holds the same tokens (sidecar sha256) as the training file", by_sha[_sha(file)]
        elif any(sha in by_sha for sha in _merged_parts(file)):
            how, other = "holds the training file", next(by_sha[s] for s in _merged_parts(file) if s in by_sha)
        elif any(_sha(file) in _merged_parts(train_file) for _, train_file in train if _sha(file)):
            how, other = "is part of the training file", next(o for o in train if _sha(file) in _merged_parts(o[1]))
        else:
            continue
        warnings.append(f"eval_data_path {_named(origin)} {how} {_named(other)} of data_path: its eval loss is "
                        "measured on training data; pass a held-out token file")
    return warnings


# --------------------------------------------------------------------------------------------------
# Reading a .bin once per machine
# --------------------------------------------------------------------------------------------------


def bin_facts(file: IndexedTokenFile, *, hash_data: bool, find_range: bool = True,
              progress: Callable[[int], None] | None = None,
              keep: Callable[[BinFacts], bool] = lambda facts: True) -> BinFacts:
    """The ``.bin``'s facts from the cache, or read (under an exclusive lock) and cached when ``keep(facts)``."""
    cached = _read_cache(file, hash_data, find_range)
    if cached is not None:
        return cached
    with _locked(file.bin_path):
        cached = _read_cache(file, hash_data, find_range)  # another rank of this machine may just have read it
        if cached is not None:
            return cached
        facts = scan(file, hash_data=hash_data, find_range=find_range, progress=progress)
        if keep(facts):
            _write_cache(file, facts)
    return facts


def scan(file: IndexedTokenFile, *, hash_data: bool, find_range: bool = True,
         progress: Callable[[int], None] | None = None) -> BinFacts:
    """Read the whole ``.bin`` once: its sha256 (when ``hash_data``) and smallest and largest id (when
    ``find_range``)."""
    digest = hashlib.sha256() if hash_data else None
    low: int | None = None
    high: int | None = None
    total = file.num_tokens * file.dtype.itemsize
    start_time, next_report = time.perf_counter(), _PROGRESS_BYTES
    done = 0
    for _, chunk in _chunks(file):
        if digest is not None:
            digest.update(chunk)
        if find_range:
            # Unsigned ids cannot be negative: one pass instead of two.
            chunk_low = int(chunk.min()) if chunk.dtype.kind == "i" else 0
            chunk_high = int(chunk.max())
            low = chunk_low if low is None else min(low, chunk_low)
            high = chunk_high if high is None else max(high, chunk_high)
        done += chunk.nbytes
        if progress is not None:
            progress(chunk.nbytes)
        if done >= next_report and total >= _PROGRESS_BYTES:
            seconds = time.perf_counter() - start_time
            logger.info("checking %s: %.1f of %.1f GB (%.2f GB/s)", file.bin_path, done / 1e9, total / 1e9,
                        done / 1e9 / max(seconds, 1e-9))
            next_report += _PROGRESS_BYTES
    return BinFacts(sha256=digest.hexdigest() if digest is not None else None, min_id=low, max_id=high)


def _chunks(file: IndexedTokenFile) -> Iterator[tuple[int, np.ndarray]]:
    for index, chunk in enumerate(file.iter_chunks(CHUNK_TOKENS)):
        yield index * CHUNK_TOKENS, chunk


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "rb") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError as error:  # some network file systems have no locks: each rank then reads the file
            logger.warning("cannot lock %s (%s); every rank of this machine reads it", path, error.strerror)
        yield  # closing the file releases the lock


def _identity(file: IndexedTokenFile) -> dict[str, Any]:
    stat = file.bin_path.stat()
    # ctime and inode change with any copy (even one keeping mtime, as rsync -a does), so a cache
    # record copied along with the data never vouches for the copy.
    return {"version": CHECK_VERSION, "path": str(file.bin_path.resolve()), "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _cache_paths(file: IndexedTokenFile) -> list[Path]:
    key = hashlib.sha256(str(file.bin_path.resolve()).encode()).hexdigest()[:32]
    return [Path(str(file.bin_path) + CHECK_SUFFIX), cache_dir() / "token_checks" / f"{key}.json"]


def _read_cache(file: IndexedTokenFile, hash_data: bool, find_range: bool) -> BinFacts | None:
    identity = _identity(file)
    for path in _cache_paths(file):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # no record, or a damaged one: the cache only saves time
        if isinstance(record, dict) and record.get("identity") == identity:
            facts = record.get("facts")
            if isinstance(facts, dict) and set(facts) == {"sha256", "min_id", "max_id"} \
                    and (facts["sha256"] is not None or not hash_data) \
                    and (facts["max_id"] is not None or not find_range or not file.num_tokens):
                return BinFacts(**facts)
    return None


def _write_cache(file: IndexedTokenFile, facts: BinFacts) -> None:
    text = json.dumps({"identity": _identity(file), "facts": asdict(facts)}, indent=2, sort_keys=True) + "\n"
    beside, fallback = _cache_paths(file)
    errors = []
    for path in (beside, fallback):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            return
        except OSError as error:
            errors.append(f"{path.parent}: {error.strerror}")
    logger.warning("cannot cache the check of %s (%s); it is read again at the next start", file.bin_path,
                   "; ".join(errors))
