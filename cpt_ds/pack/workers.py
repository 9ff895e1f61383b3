"""The packer's encoding processes: each turns raw chunks into token ids (``Workers`` in the main process).

The main process only reads; the workers decode, split and tokenize, and results come back in
submission order with a bounded backlog, so the output is the same whatever the worker count.
Start-up is overlapped: the processes start (and load HF ``tokenizers``) before the tokenizer is
read, then each builds its encoders from a config file the main process writes once it knows them
(a started pool takes no new arguments).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cpt_ds.pack.chunks import RawChunk
from cpt_ds.pack.documents import chunk_documents, describe_location
from cpt_ds.pack.encoders import EncoderSpec, HFEncoder, TokenEncoder, check_identity

if TYPE_CHECKING:
    from cpt_ds.pack.packing import PackOptions

# Share of each chunk's text (at least one document) on which the fast encoder's ids are checked
# against HF tokenizers while packing; HF being ~3x slower, this costs ~3% of the encoding time.
IDENTITY_SAMPLE_FRACTION = 0.01


@dataclass(frozen=True)
class WorkerConfig:
    encoder: EncoderSpec
    options: PackOptions
    bos_id: int | None  # None: no BOS
    eos_id: int
    dtype: str


@dataclass
class EncodedChunk:
    file_index: int
    tokens: np.ndarray
    lengths: np.ndarray
    num_empty: int
    num_raw_bytes: int
    num_checked_documents: int
    num_checked_tokens: int


@dataclass
class _WorkerState:
    config_path: str | None  # where a pool worker finds the run's WorkerConfig; None in the main process
    config: WorkerConfig | None = None
    encoder: TokenEncoder | None = None
    reference: HFEncoder | None = None
    early_hf: tuple[str, HFEncoder] | None = None  # (sha256 of its JSON, HF encoder) built by _start_worker


_state: _WorkerState | None = None


def worker_start_method() -> str:
    """``fork`` on Linux from a single-threaded caller, else ``spawn``; the output is the same either way.

    A forked worker starts in milliseconds with the main process's imports; a spawned one pays a
    fresh interpreter and imports (~0.15 s of CPU each, 12% of a 14 M-token pack on two cores). The
    pack forks before it touches a tokenizer, but a caller's own threads (a notebook kernel, a web
    server embedding ``pack_corpus``) could hold a lock the child would then wait on forever, so
    such callers get spawn. macOS and Windows always spawn (fork is unsafe or missing there).
    """
    return "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "spawn"


def _init_worker(config_path: str, parent_pid: int | None = None) -> None:
    global _state
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    # One process per core already; tokenizers' own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _state = _WorkerState(config_path)


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker end when the packer dies (Linux): a SIGKILLed or OOM-killed packer would
    otherwise leave its workers blocked on the task queue forever, holding memory next to the run
    that resumes the pack."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the packer died before the call above
        os._exit(1)


def _start_worker(tokenizer_json: str | None) -> None:
    """Each worker's first task: submitting it starts the process (the pool starts processes when the
    first task arrives). While the main process reads the tokenizer, it builds the HF encoder from the
    file ``tokenizer_json`` (the slow part of a worker's set-up), which the worker uses if the
    config's tokenizer JSON turns out to be that file. Nothing here is needed: an error (a bad
    tokenizer.json, which the main process reports itself) only leaves the work to the first chunk.
    """
    import tiktoken  # noqa: F401  (imported here, while idle, so the first chunk does not wait for it)

    assert _state is not None, "worker not initialised"
    if tokenizer_json is None or _state.early_hf is not None:
        return
    data = Path(tokenizer_json).read_bytes()
    _state.early_hf = (hashlib.sha256(data).hexdigest(), HFEncoder(data.decode("utf-8")))


def _encode_chunk(chunk: RawChunk) -> EncodedChunk:
    assert _state is not None, "worker not initialised"
    if _state.config is None:
        # The main process writes the config before it submits the first chunk.
        assert _state.config_path is not None
        _state.config = pickle.loads(Path(_state.config_path).read_bytes())
    config = _state.config
    if _state.encoder is None:
        # Built once per process, here rather than in the pool initializer, whose errors (a failed
        # identity probe) would only break the pool instead of reaching the caller.
        early = _state.early_hf
        _state.early_hf = None
        tokenizer_json = config.encoder.tokenizer_json
        same_json = early is not None and early[0] == hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        _state.encoder, _state.reference = config.encoder.build(early[1] if same_json else None)
    documents = chunk_documents(chunk, json_key=config.options.json_key,
                                encoding_errors=config.options.encoding_errors)
    texts = documents.texts
    ids = _state.encoder.encode_batch(texts)
    num_checked_documents = num_checked_tokens = 0
    if _state.reference is not None and texts:
        budget = IDENTITY_SAMPLE_FRACTION * sum(len(text) for text in texts)
        num_chars = 0
        while num_checked_documents < len(texts) and (num_checked_documents == 0 or num_chars < budget):
            num_chars += len(texts[num_checked_documents])
            num_checked_documents += 1
        sample = slice(0, num_checked_documents)
        labels = [describe_location(chunk, location) for location in documents.locations[sample]]
        num_checked_tokens = check_identity(texts[sample], ids[sample], _state.reference, labels)

    dtype = np.dtype(config.dtype)
    eos = np.array([config.eos_id], dtype=dtype)
    if config.bos_id is None:
        pieces = [piece for array in ids for piece in (array, eos)]
    else:
        bos = np.array([config.bos_id], dtype=dtype)
        pieces = [piece for array in ids for piece in (bos, array, eos)]
    tokens = np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype=dtype)
    num_extra = 1 if config.bos_id is None else 2
    lengths = np.fromiter((array.size + num_extra for array in ids), dtype=np.int64, count=len(ids))
    return EncodedChunk(chunk.file_index, tokens, lengths, documents.num_empty, chunk.num_raw_bytes,
                         num_checked_documents, num_checked_tokens)


# --------------------------------------------------------------------------------------------------
# Main process
# --------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1



class Workers:
    """The encoding processes of one pack (``workers == 1``: the main process itself).

    Created before the tokenizer is known, so that the processes start and load HF ``tokenizers``
    (~0.3 s each) while the main process reads the tokenizer; ``configure`` then hands them the
    config, and each builds its encoders from it with its first chunk.
    """

    def __init__(self, workers: int, tokenizer: str | os.PathLike | None = None):
        """``tokenizer``: the tokenizer folder, whose tokenizer.json (if any) the workers load early."""
        self.num_workers = workers
        self._executor: ProcessPoolExecutor | None = None
        self._config_dir: tempfile.TemporaryDirectory[str] | None = None
        if workers == 1:
            return
        self._config_dir = tempfile.TemporaryDirectory(prefix="cpt_ds_pack_")
        self._config_path = Path(self._config_dir.name) / "worker_config.pickle"
        self._executor = ProcessPoolExecutor(workers, mp_context=get_context(worker_start_method()),
                                             initializer=_init_worker,
                                             initargs=(str(self._config_path), os.getpid()))
        tokenizer_json = Path(tokenizer) / "tokenizer.json" if tokenizer is not None else None
        early = str(tokenizer_json) if tokenizer_json is not None and tokenizer_json.is_file() else None
        for _ in range(workers):
            self._executor.submit(_start_worker, early)

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            # On an error or interrupt drop queued chunks instead of tokenizing the rest of the backlog.
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._config_dir is not None:
            self._config_dir.cleanup()

    def configure(self, config: WorkerConfig) -> None:
        """Give the workers the run's config (encoder, options, BOS/EOS); before the first chunk."""
        global _state
        if self._executor is None:
            _state = _WorkerState(None, config)
            return
        # The encoder spec holds tokenizer.json and tiktoken's ranks (~11 MB for LLaMA-3): written once,
        # read by each worker, instead of pickled into every chunk's task.
        self._config_path.write_bytes(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))

    def encode_in_order(self, chunks: Iterable[RawChunk]) -> Iterator[EncodedChunk]:
        """Encode ``chunks``, yielding results in input order with a bounded backlog."""
        if self._executor is None:
            yield from map(_encode_chunk, chunks)
            return
        max_in_flight = 2 * self.num_workers + 2
        pending: deque[Future[EncodedChunk]] = deque()
        for chunk in chunks:
            pending.append(self._executor.submit(_encode_chunk, chunk))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

