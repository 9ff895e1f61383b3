"""The resumable state of an unfinished pack, beside its output: ``PREFIX.partial/``.

::

    PREFIX.partial/tokens.bin    tokens of the committed chunks, then whatever a killed run wrote after
    PREFIX.partial/lengths.i32   int32 document lengths, likewise (the index is built from it at the end)
    PREFIX.partial/state.json    the commit: byte and document counts, where the next document starts,
                                 per-input statistics, and what must not change (inputs, tokenizer, options)
    PREFIX.partial/lock          held (flock) by the running pack; a killed process releases it

A commit flushes and fsyncs the data files, then replaces ``state.json`` atomically; bytes past the
committed counts are cut off when the pack resumes, so a kill at any moment loses at most the work
since the last commit. The pack commits every ``checkpoint_seconds`` (and when it stops on an
error), so the state costs a few fsyncs a minute, not one per chunk.

On resume the state is checked against the new run: a different tokenizer, option, token dtype or
packer version discards it (with a log line saying what changed); an input file that changed,
appeared or vanished at or before the resume point rolls the pack back to the start of that file
(to zero when it is the first), so fixing the bad file a pack stopped on keeps the hours spent on
the files before it. Inputs after the resume point may change freely: nothing of them is written.

Publishing moves ``tokens.bin`` to ``PREFIX.bin`` (no copy of hundreds of GB), then the sidecar,
then the index, the commit point of a token file; ``state.json`` says ``publishing`` first, so a
kill between the renames is finished by the next run. Success removes the folder.

Test hook: ``CPT_DS_PACK_FAULT`` makes the packer kill itself (SIGKILL, no clean-up) or raise at a
fixed point: ``kill-mid-chunk:K`` (half of chunk K's tokens written), ``kill-after-chunk:K``,
``raise-after-chunk:K``, ``kill-before-publish``, ``kill-mid-publish`` (``.bin`` and ``.json`` moved,
``.idx`` not). Chunks count from 1 within one run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpt_ds.fileio import atomic_write_text
from cpt_ds.pack.sources import PackError
from cpt_ds.pack.writer import INDEX_BLOCK, publish, write_index_blocks, write_sidecar
from cpt_ds.token_file import PARTIAL_SUFFIX, paths_for

logger = logging.getLogger(__name__)

STATE_FORMAT = "cpt-ds-partial-pack"
STATE_VERSION = 1
FAULT_ENV = "CPT_DS_PACK_FAULT"
_HASH_BLOCK = 16 << 20


class InjectedFault(RuntimeError):
    """Raised by the ``raise-...`` test hooks (see the module docstring)."""


def fault(point: str, chunk: int | None = None) -> None:
    """The test hook: kill or raise here when ``CPT_DS_PACK_FAULT`` names this point (and chunk)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    action, _, rest = wanted.partition("-")
    name, _, number = rest.partition(":")
    if name != point or (number and chunk != int(number)):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"{FAULT_ENV}={wanted}")


def partial_dir(output: str | os.PathLike) -> Path:
    return Path(str(paths_for(output)[0])[: -len(".bin")] + PARTIAL_SUFFIX)


def pending_publish(output: str | os.PathLike) -> bool:
    """Whether a killed pack left ``output`` half-renamed (its ``.bin``/``.json`` are then that pack's)."""
    try:
        state = json.loads((partial_dir(output) / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("phase") == "publishing"


@dataclass
class Position:
    """Where the next document starts: input ``file_index``, at ``byte`` of its (decompressed) data and
    ``line`` (1-based line of a text file, 0-based row of a parquet/arrow file; ``None``: the file's
    start). ``done``: the file is finished (a whole-file document was written)."""

    file_index: int = 0
    byte: int = 0
    line: int | None = None
    done: bool = False


@dataclass
class Committed:
    """What the committed bytes hold."""

    num_tokens: int = 0
    num_documents: int = 0
    max_token_id: int = -1
    position: Position | None = None
    files: list[list[int]] | None = None  # per input: [num_documents, num_tokens, num_empty_skipped]


class PartialPack:
    """The writer of a resumable pack; a context manager that holds the lock.

    ``key``: what decides the tokens besides the inputs (tokenizer fingerprint, options, dtype, BOS/EOS,
    packer version); ``inputs``: ``{"path", "bytes", "sha256"}`` per input file, in order.
    After ``__enter__``, ``committed`` says where to continue (``position`` None: from the start) and
    ``publish_pending`` whether only the final renames remain.
    """

    def __init__(self, output: str | os.PathLike, *, dtype: np.dtype, key: dict[str, Any],
                 inputs: list[dict[str, Any]], resume: bool = True):
        self.output = output
        self.bin_path, self.idx_path, self.json_path = paths_for(output)
        self.dir = partial_dir(output)
        self.dtype = np.dtype(dtype)
        self.key = key
        self.inputs = inputs
        self.resume = resume
        self.committed = Committed()
        self.publish_pending = False
        self._lock_fd: int | None = None
        self._tokens = self._lengths = None
        self._digest = hashlib.sha256()
        self._num_tokens = self._num_documents = 0
        self._max_token_id = -1
        self._done = False

    # ---- open: lock, validate, truncate ---------------------------------------------------------

    def __enter__(self) -> PartialPack:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise PackError(f"cannot write the output {self.output} ({error.strerror}); choose a writable "
                            "--output") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise PackError(f"another pack is writing {self.output} right now (it holds {self.dir / 'lock'}); "
                            "wait for it to finish or choose another --output") from None
        state = self._read_state()
        if state is not None and not self.resume:
            logger.info("--no-resume: discarding the partial pack in %s", self.dir)
            state = None
        if state is not None:
            state = self._validate(state)
        if state is not None and state["phase"] == "publishing":
            self.publish_pending = True
            self.committed = _committed(state)
            return self
        self._open_data(state)
        return self

    def _read_state(self) -> dict[str, Any] | None:
        path = self.dir / "state.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            logger.warning("discarding the partial pack in %s: its state.json is unreadable (%s)", self.dir, error)
            return None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            logger.warning("discarding the partial pack in %s: written by another packer version", self.dir)
            return None
        return state

    def _validate(self, state: dict[str, Any]) -> dict[str, Any] | None:
        """The state to resume from (possibly rolled back to a file start), or None to start over."""
        old_key, new_key = _flat(state["key"]), _flat(self.key)
        changed = [name for name in sorted(set(old_key) | set(new_key)) if old_key.get(name) != new_key.get(name)]
        if changed:
            what = "; ".join(f"{name} {_short(old_key.get(name))} -> {_short(new_key.get(name))}" for name in changed)
            logger.warning("discarding the partial pack in %s and starting over: changed since it was written: %s",
                           self.dir, what)
            return None
        old_inputs = state["inputs"]
        position = state["position"]
        started = position["done"] or position["byte"] > 0 or position["line"] is not None
        # Publishing: every input was packed, and a file added since must not be left out.
        consumed = (max(len(old_inputs), len(self.inputs)) if state["phase"] == "publishing"
                    else position["file_index"] + started)
        for index in range(consumed):
            old = old_inputs[index] if index < len(old_inputs) else None
            new = self.inputs[index] if index < len(self.inputs) else None
            if old == new:
                continue
            why = (f"input {old['path']} is gone" if new is None else f"input {new['path']} is new" if old is None
                   else f"input {new['path']} is not the file packed before" if old["path"] != new["path"]
                   else f"input {new['path']} changed ({old['bytes']:,} -> {new['bytes']:,} bytes, sha256 "
                        f"{old['sha256'][:12]} -> {new['sha256'][:12]})")
            if index == 0 or state["phase"] == "publishing":
                logger.warning("discarding the partial pack in %s and starting over: %s", self.dir, why)
                return None
            files = state["files"]
            kept = files[:index]
            logger.warning("partial pack in %s: %s; resuming from its start, after the %d unchanged files before it",
                           self.dir, why, index)
            state = dict(state, phase="packing", num_documents=sum(f[0] for f in kept),
                         num_tokens=sum(f[1] for f in kept), max_token_id=None,
                         files=kept + [[0, 0, 0]] * (len(files) - index),
                         position=asdict(Position(file_index=index)))
            break
        if len(state["files"]) != len(self.inputs):
            files = state["files"][: len(self.inputs)]
            state["files"] = files + [[0, 0, 0]] * (len(self.inputs) - len(files))
        return state

    def _open_data(self, state: dict[str, Any] | None) -> None:
        tokens_path, lengths_path = self.dir / "tokens.bin", self.dir / "lengths.i32"
        if state is None:
            for path in self.dir.iterdir():
                if path.name != "lock":
                    path.unlink()
            for path in (tokens_path, lengths_path):
                path.write_bytes(b"")
            self.committed = Committed(files=[[0, 0, 0] for _ in self.inputs])
        else:
            self.committed = _committed(state)
        num_bytes = self.committed.num_tokens * self.dtype.itemsize
        try:
            self._tokens = open(tokens_path, "r+b")
            self._lengths = open(lengths_path, "r+b")
        except FileNotFoundError:
            raise PackError(f"the partial pack in {self.dir} lacks its data files; pass --no-resume to start "
                            "over") from None
        for handle, size in ((self._tokens, num_bytes), (self._lengths, 4 * self.committed.num_documents)):
            if os.fstat(handle.fileno()).st_size < size:
                raise PackError(f"the partial pack in {self.dir} is shorter than its state says (copied "
                                "incompletely?); pass --no-resume to start over")
            handle.truncate(size)  # drop what a killed run wrote after its last commit
            handle.seek(size)
        # The sidecar's checksum covers the whole .bin: read back what earlier runs wrote (disk speed).
        self._tokens.seek(0)
        remaining = num_bytes
        max_token_id = -1
        while remaining:
            block = self._tokens.read(min(_HASH_BLOCK, remaining))
            self._digest.update(block)
            if self.committed.max_token_id is None and block:
                max_token_id = max(max_token_id, int(np.frombuffer(block, dtype=self.dtype).max()))
            remaining -= len(block)
        if self.committed.max_token_id is None:  # rolled back: the largest id of the kept part
            self.committed.max_token_id = max_token_id
        self._tokens.seek(num_bytes)
        self._num_tokens, self._num_documents = self.committed.num_tokens, self.committed.num_documents
        self._max_token_id = self.committed.max_token_id
        if self.committed.position is not None:
            logger.info("resuming the partial pack in %s: %d documents, %d tokens already packed (--no-resume "
                        "starts over)", self.dir, self._num_documents, self._num_tokens)

    # ---- writing ---------------------------------------------------------------------------------

    def add(self, tokens: np.ndarray, lengths: np.ndarray, chunk_number: int) -> None:
        """Append one chunk's documents (``tokens`` already of the file's dtype)."""
        assert self._tokens is not None and self._lengths is not None
        data = tokens.tobytes()
        if os.environ.get(FAULT_ENV):
            self._tokens.write(data[: len(data) // 2])
            self._tokens.flush()
            fault("mid-chunk", chunk_number)
            self._tokens.write(data[len(data) // 2:])
        else:
            self._tokens.write(data)
        self._lengths.write(np.asarray(lengths, dtype=np.int32).tobytes())
        self._digest.update(data)
        if tokens.size:
            self._max_token_id = max(self._max_token_id, int(tokens.max()))
        self._num_tokens += int(tokens.size)
        self._num_documents += int(lengths.size)

    def commit(self, position: Position, files: list[list[int]]) -> None:
        """Make everything added so far durable and resumable from ``position``."""
        assert self._tokens is not None and self._lengths is not None
        for handle in (self._tokens, self._lengths):
            handle.flush()
            os.fsync(handle.fileno())
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "phase": "packing", "key": self.key, "inputs": self.inputs,
            "num_tokens": self._num_tokens, "num_documents": self._num_documents,
            "max_token_id": self._max_token_id, "position": asdict(position), "files": files,
        }
        atomic_write_text(self.dir / "state.json", json.dumps(state, sort_keys=True) + "\n")
        self.committed = _committed(state)

    @property
    def has_progress(self) -> bool:
        return (self.dir / "state.json").exists()

    # ---- publishing ------------------------------------------------------------------------------

    def finalize(self, meta: dict[str, Any], position: Position, files: list[list[int]]) -> dict[str, Any]:
        """Write the index and the sidecar, then move the output into place; returns the sidecar."""
        tokens_tmp, idx_tmp, json_tmp = self.dir / "tokens.bin", self.dir / "index.idx", self.dir / "sidecar.json"
        if not self.publish_pending:
            assert self._tokens is not None and self._lengths is not None
            self.commit(position, files)
            self._tokens.close()
            self._lengths.close()
            num_documents = self._num_documents
            write_index_blocks(idx_tmp, num_documents, lambda: _length_blocks(self.dir / "lengths.i32", num_documents),
                               self.dtype)
            sidecar = write_sidecar(json_tmp, meta, dtype=self.dtype, num_documents=num_documents,
                                    num_tokens=self._num_tokens, max_token_id=self._max_token_id,
                                    bin_sha256=self._digest.hexdigest())
            state = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
            atomic_write_text(self.dir / "state.json", json.dumps(dict(state, phase="publishing"), sort_keys=True)
                              + "\n")
            fault("before-publish")
        else:
            logger.info("finishing the interrupted publish of %s", self.output)
            sidecar = json.loads(json_tmp.read_text(encoding="utf-8")) if json_tmp.exists() else \
                json.loads(self.json_path.read_text(encoding="utf-8"))
        publish([(tokens_tmp, self.bin_path), (json_tmp, self.json_path), (idx_tmp, self.idx_path)], self.idx_path,
                before_index=lambda: fault("mid-publish"))
        self._remove()
        return sidecar

    # ---- leaving ---------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        for handle in (self._tokens, self._lengths):
            if handle is not None and not handle.closed:
                handle.close()
        if self._done:
            return
        if exc_type is not None and not self.has_progress:
            self._remove()  # failed before the first commit: leave nothing behind
            return
        if exc_type is not None:
            logger.warning("kept the partial pack in %s (%d documents, %d tokens): run the same command again to "
                           "resume, or pass --no-resume to start over", self.dir, self.committed.num_documents,
                           self.committed.num_tokens)
        self._unlock()

    def _remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self._unlock()
        self._done = True

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None


def _length_blocks(path: Path, num_documents: int) -> Iterator[np.ndarray]:
    """The int32 document lengths in ``path`` in blocks of ``INDEX_BLOCK``, so memory stays flat."""
    for start in range(0, num_documents, INDEX_BLOCK):
        yield np.fromfile(path, dtype=np.int32, count=min(INDEX_BLOCK, num_documents - start), offset=4 * start)


def _committed(state: dict[str, Any]) -> Committed:
    return Committed(num_tokens=state["num_tokens"], num_documents=state["num_documents"],
                     max_token_id=state["max_token_id"], position=Position(**state["position"]),
                     files=[list(f) for f in state["files"]])


def _flat(key: dict[str, Any]) -> dict[str, Any]:
    """``{"options": {"bos": ...}}`` -> ``{"options.bos": ...}``, so a message names the one option that changed."""
    flat = {}
    for name, value in key.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{sub}": item for sub, item in value.items()})
        else:
            flat[name] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:12] + "..."
