"""The pack pipeline: corpus files -> one MMIDIDX token file (``PREFIX.bin/.idx/.json``).

Shape of the pipeline::

    main process                      worker processes                        main process
    read + decompress, cut chunks --> decode, split, parse, tokenize, check --> write in input order

The main process only does I/O; at most ``2 * workers + 2`` chunks are in flight, so memory stays
flat however large the corpus is (``Pool.imap`` would read the whole corpus ahead). Results are
written in submission order, and what a document becomes depends only on its text, so the output is
byte-identical whatever the worker count or chunk size.

Start-up is kept short (it once took 3-4 s, longer than encoding 14 M LLaMA-3 tokens): the
workers are started first, so that their Python start, imports and HF ``tokenizers`` load overlap
the main process reading the tokenizer (without transformers for a plain ``tokenizer.json`` folder,
see ``read_tokenizer``) and hashing the inputs; each worker then builds its encoders once, from a
config file the main process writes when it knows them (a started pool takes no new arguments).

Resumable: the output is written into ``PREFIX.partial/`` and committed every few seconds, so a
killed or failed pack run again continues from its last commit and writes the same bytes
(``cpt_ds/pack/partial.py``). ``shard=(K, N)`` packs one of N parts of the inputs for N machines;
``cpt_ds/pack/merge.py`` joins token files.

Each document is ``[BOS] + ids(text) + [EOS]``: EOS always (documents never run into each other
unmarked), BOS by the ``bos`` policy. Special-token strings inside a text are encoded as plain text.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cpt_ds import __version__
from cpt_ds.token_file import paths_for, shard_prefix, token_dtype_for_vocab
from cpt_ds.pack.partial import PartialPack, Position, fault, pending_publish
from cpt_ds.pack.chunks import RawChunk, chunk_end, iter_raw_chunks
from cpt_ds.pack.documents import chunk_documents, describe_location
from cpt_ds.pack.sources import (
    ENCODING_ERRORS, TXT_UNITS, EncodingErrors, InputFile, PackError, TxtUnit, discover_inputs, select_shard,
)
from cpt_ds.pack.encoders import EncoderSpec, HFEncoder, TokenEncoder, check_identity, select_encoder
from cpt_ds.tokenizer import read_tokenizer, tokenizer_files
from cpt_ds.fileio import sha256_file

logger = logging.getLogger(__name__)

BosPolicy = Literal["auto", "always", "never"]
EncoderChoice = Literal["auto", "hf"]
BOS_POLICIES: tuple[BosPolicy, ...] = ("auto", "always", "never")
ENCODER_CHOICES: tuple[EncoderChoice, ...] = ("auto", "hf")

DEFAULT_CHUNK_BYTES = 2 << 20
# How often the resumable state is committed (fsync + a small JSON): a crash redoes at most this much work.
DEFAULT_CHECKPOINT_SECONDS = 10.0
MIN_CHUNK_BYTES = 1 << 10
# Share of each chunk's text (at least one document) on which the fast encoder's ids are checked
# against HF tokenizers while packing; HF being ~3x slower, this costs ~3% of the encoding time.
IDENTITY_SAMPLE_FRACTION = 0.01


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """Everything that decides the packed tokens; recorded in the sidecar's ``options``."""

    txt_unit: TxtUnit = "line"
    """What a document is in a ``.txt`` file: a line, a blank-line separated paragraph, or the file."""
    json_key: str = "text"
    """The text field of ``.jsonl`` records and the text column of ``.parquet`` files."""
    bos: BosPolicy = "auto"
    """``auto``: prepend BOS when the tokenizer has one distinct from EOS (LLaMA-3: yes); ``always``; ``never``."""
    encoding_errors: EncodingErrors = "strict"
    """``strict``: invalid UTF-8 is an error naming file and byte offset; ``replace``: U+FFFD instead."""
    encoder: EncoderChoice = "auto"
    """``auto``: the exact tiktoken encoder when the tokenizer allows it, else HF; ``hf``: always HF."""

    def __post_init__(self) -> None:
        problems = []
        if self.txt_unit not in TXT_UNITS:
            problems.append(f"txt_unit must be one of {', '.join(TXT_UNITS)}, got {self.txt_unit!r}")
        if not self.json_key:
            problems.append("json_key must not be empty")
        if self.bos not in BOS_POLICIES:
            problems.append(f"bos must be one of {', '.join(BOS_POLICIES)}, got {self.bos!r}")
        if self.encoding_errors not in ENCODING_ERRORS:
            problems.append(f"encoding_errors must be one of {', '.join(ENCODING_ERRORS)}, "
                            f"got {self.encoding_errors!r}")
        if self.encoder not in ENCODER_CHOICES:
            problems.append(f"encoder must be one of {', '.join(ENCODER_CHOICES)}, got {self.encoder!r}")
        if problems:
            raise PackError("invalid pack options: " + "; ".join(problems))


@dataclass(frozen=True)
class PackSummary:
    output_prefix: str
    num_documents: int
    num_tokens: int
    num_empty_skipped: int
    num_input_files: int
    num_input_bytes: int
    num_bytes_written: int
    seconds: float
    encode_seconds: float  # from the first chunk to the published output, without the set-up
    encoder: str
    dtype: str
    num_identity_checked_documents: int
    num_identity_checked_tokens: int
    num_resumed_documents: int = 0  # documents taken from the partial state of an earlier, interrupted run

    def format(self) -> str:
        """The end-of-run summary printed by ``tools/pack_corpus.py``."""
        rate = self.num_tokens / max(self.seconds, 1e-9)
        lines = [
            f"packed {self.output_prefix}.bin/.idx/.json",
            f"  documents       {self.num_documents:,}",
            f"  tokens          {self.num_tokens:,} ({self.dtype})",
            f"  empty skipped   {self.num_empty_skipped:,}",
            f"  inputs          {self.num_input_files:,} files, {self.num_input_bytes / 1e6:,.1f} MB",
            f"  bytes written   {self.num_bytes_written:,}",
            f"  seconds         {self.seconds:,.1f} ({rate / 1e6:,.2f} M tokens/s; set-up "
            f"{self.seconds - self.encode_seconds:,.1f}, encoding {self.encode_seconds:,.1f})",
            f"  encoder         {self.encoder}",
        ]
        if self.num_resumed_documents:
            lines.append(f"  resumed         {self.num_resumed_documents:,} documents were packed by an earlier run")
        if self.encoder == "tiktoken":
            lines.append(f"  identity check  {self.num_identity_checked_documents:,} documents, "
                         f"{self.num_identity_checked_tokens:,} tokens identical to HF tokenizers")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WorkerConfig:
    encoder: EncoderSpec
    options: PackOptions
    bos_id: int | None  # None: no BOS
    eos_id: int
    dtype: str


@dataclass
class _EncodedChunk:
    file_index: int
    tokens: np.ndarray
    lengths: np.ndarray
    num_empty: int
    num_raw_bytes: int
    num_checked_documents: int
    num_checked_tokens: int


@dataclass
class _WorkerState:
    config_path: str | None  # where a pool worker finds the run's _WorkerConfig; None in the main process
    config: _WorkerConfig | None = None
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


def _encode_chunk(chunk: RawChunk) -> _EncodedChunk:
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
    return _EncodedChunk(chunk.file_index, tokens, lengths, documents.num_empty, chunk.num_raw_bytes,
                         num_checked_documents, num_checked_tokens)


# --------------------------------------------------------------------------------------------------
# Main process
# --------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """All cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Tokenization:
    """The tokenizer facts the pack needs, resolved once in the main process."""

    path: str
    fingerprint: str
    class_name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    add_bos: bool
    dtype: np.dtype
    encoder: EncoderSpec


def _prepare_tokenization(folder: str | os.PathLike, options: PackOptions) -> _Tokenization:
    info = read_tokenizer(folder)
    eos_id, bos_id = info.eos_id, info.bos_id
    if eos_id is None:
        raise PackError(f"tokenizer {folder} defines no eos_token, so documents cannot be separated; "
                        "set eos_token in its tokenizer_config.json")
    if options.bos == "always" and bos_id is None:
        raise PackError(f"tokenizer {folder} defines no bos_token but --bos always was given; "
                        "pass --bos never or auto")
    add_bos = bos_id is not None and (options.bos == "always" or (options.bos == "auto" and bos_id != eos_id))
    return _Tokenization(str(folder), info.fingerprint, info.class_name, info.vocab_size, bos_id, eos_id, add_bos,
                         token_dtype_for_vocab(info.vocab_size), select_encoder(info, options.encoder))


@dataclass
class _FileStats:
    num_documents: int = 0
    num_tokens: int = 0
    num_empty_skipped: int = 0


@dataclass
class _Totals:
    num_documents: int = 0
    num_tokens: int = 0
    num_empty: int = 0
    num_checked_documents: int = 0
    num_checked_tokens: int = 0
    files: list[_FileStats] = field(default_factory=list)

    @classmethod
    def restored(cls, files: list[list[int]]) -> _Totals:
        """The totals of the documents a partial pack already holds (``files``: per input
        ``[num_documents, num_tokens, num_empty_skipped]``)."""
        stats = [_FileStats(*row) for row in files]
        return cls(num_documents=sum(f.num_documents for f in stats), num_tokens=sum(f.num_tokens for f in stats),
                   num_empty=sum(f.num_empty_skipped for f in stats), files=stats)

    def file_rows(self) -> list[list[int]]:
        return [[f.num_documents, f.num_tokens, f.num_empty_skipped] for f in self.files]

    def add(self, encoded: _EncodedChunk) -> None:
        num_documents, num_tokens = int(encoded.lengths.size), int(encoded.tokens.size)
        stats = self.files[encoded.file_index]
        stats.num_documents += num_documents
        stats.num_tokens += num_tokens
        stats.num_empty_skipped += encoded.num_empty
        self.num_documents += num_documents
        self.num_tokens += num_tokens
        self.num_empty += encoded.num_empty
        self.num_checked_documents += encoded.num_checked_documents
        self.num_checked_tokens += encoded.num_checked_tokens


def pack_corpus(
    inputs: Sequence[str | os.PathLike],
    tokenizer: str | os.PathLike,
    output: str | os.PathLike,
    options: PackOptions | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
    resume: bool = True,
    shard: tuple[int, int] | None = None,
    checkpoint_seconds: float = DEFAULT_CHECKPOINT_SECONDS,
) -> PackSummary:
    """Tokenize ``inputs`` with the tokenizer folder ``tokenizer`` into ``output``.bin/.idx/.json.

    ``workers`` (default: all cores), ``chunk_bytes`` and ``checkpoint_seconds`` change only the
    speed, never the output. User errors raise ``PackError`` / ``TokenizerError`` (both
    ``ValueError``) before anything is published; the output appears only when complete.

    An interrupted pack leaves its state in ``output.partial/`` (see ``cpt_ds.pack.partial``); the
    same call continues from its last commit and writes the same bytes; ``resume=False`` starts
    over. ``shard=(K, N)`` packs only the K-th (1-based) of N byte-balanced, contiguous parts of the
    sorted input files into ``output-0000K-of-0000N``.
    """
    start = time.perf_counter()
    options = options or PackOptions()
    workers = default_workers() if workers is None else workers
    problems = []
    if workers < 1:
        problems.append(f"workers must be at least 1, got {workers}")
    if chunk_bytes < MIN_CHUNK_BYTES:
        problems.append(f"chunk size must be at least {MIN_CHUNK_BYTES} bytes, got {chunk_bytes}")
    if checkpoint_seconds < 0:
        problems.append(f"checkpoint interval must be at least 0 seconds, got {checkpoint_seconds}")
    if problems:
        raise PackError("invalid pack settings: " + "; ".join(problems))
    sources = discover_inputs(inputs)
    if shard is not None:
        sources = select_shard(sources, *shard)
        output = shard_prefix(output, *shard)
    existing = [str(p) for p in paths_for(output) if p.exists()]
    # A .bin/.json without .idx beside a publishing state: this pack's own, half renamed when it was killed.
    if existing and not overwrite and not pending_publish(output):
        raise PackError(f"output already exists ({', '.join(existing)}); choose another --output or pass --overwrite")
    tokenizer_files(tokenizer)  # a missing tokenizer folder is reported before any worker starts
    with _Workers(workers, tokenizer) as pool:
        tokenization = _prepare_tokenization(tokenizer, options)
        num_input_bytes = sum(source.num_bytes for source in sources)
        logger.info("%d input files, %.1f MB; tokenizer %s (%d ids, BOS %s, EOS %d); %s tokens; %d workers",
                    len(sources), num_input_bytes / 1e6, tokenizer, tokenization.vocab_size,
                    tokenization.bos_id if tokenization.add_bos else "not added", tokenization.eos_id,
                    tokenization.dtype.name, workers)
        pool.configure(_WorkerConfig(tokenization.encoder, options,
                                     tokenization.bos_id if tokenization.add_bos else None, tokenization.eos_id,
                                     tokenization.dtype.name))
        input_hashes = [sha256_file(source.path) for source in sources]
        identities = [{"path": source.path.as_posix(), "bytes": source.num_bytes, "sha256": digest}
                      for source, digest in zip(sources, input_hashes, strict=True)]

        encode_start = time.perf_counter()
        with PartialPack(output, dtype=tokenization.dtype, key=_resume_key(tokenization, options), inputs=identities,
                         resume=resume) as partial:
            num_resumed = partial.committed.num_documents
            totals = _write(sources, options, partial, pool, chunk_bytes=chunk_bytes, progress=progress,
                            checkpoint_seconds=checkpoint_seconds,
                            sidecar=lambda totals: _sidecar(sources, input_hashes, totals, tokenization, options,
                                                            shard))
    now = time.perf_counter()
    summary = PackSummary(
        output_prefix=str(paths_for(output)[0])[: -len(".bin")],
        num_documents=totals.num_documents,
        num_tokens=totals.num_tokens,
        num_empty_skipped=totals.num_empty,
        num_input_files=len(sources),
        num_input_bytes=num_input_bytes,
        num_bytes_written=sum(p.stat().st_size for p in paths_for(output)),
        seconds=now - start,
        encode_seconds=now - encode_start,
        encoder=tokenization.encoder.name,
        dtype=tokenization.dtype.name,
        num_identity_checked_documents=totals.num_checked_documents,
        num_identity_checked_tokens=totals.num_checked_tokens,
        num_resumed_documents=num_resumed,
    )
    logger.info("packed %d documents, %d tokens in %.2f s; encoded in %.2f s (%.2f M tokens/s) after %.2f s of set-up",
                summary.num_documents, summary.num_tokens, summary.seconds, summary.encode_seconds,
                summary.num_tokens / max(summary.encode_seconds, 1e-9) / 1e6, summary.seconds - summary.encode_seconds)
    return summary


def _resume_key(tokenization: _Tokenization, options: PackOptions) -> dict[str, Any]:
    """What decides the tokens besides the inputs: a partial pack written under another key is discarded."""
    return {"tool_version": __version__, "tokenizer_fingerprint": tokenization.fingerprint,
            "vocab_size": tokenization.vocab_size, "dtype": tokenization.dtype.name,
            "bos_id": tokenization.bos_id if tokenization.add_bos else None, "eos_id": tokenization.eos_id,
            "options": asdict(options)}


def _write(sources: list[InputFile], options: PackOptions, partial: PartialPack, pool: _Workers, *,
           chunk_bytes: int, progress: bool, checkpoint_seconds: float,
           sidecar: Callable[[_Totals], dict[str, Any]]) -> _Totals:
    """Encode every chunk after the partial pack's last commit, write it in input order, commit now
    and then, and publish the output only when all went well."""
    committed = partial.committed
    totals = _Totals.restored(committed.files or [[0, 0, 0] for _ in sources])
    position = committed.position or Position()
    if partial.publish_pending:  # killed between the final renames: only those remain
        partial.finalize(sidecar(totals), position, totals.file_rows())
        return totals
    first_file = position.file_index + position.done
    # Where each chunk in flight ends, in submission order (= the order results come back).
    ends: deque[Position] = deque()

    def chunks() -> Iterator[RawChunk]:
        for index in range(first_file, len(sources)):
            here = index == position.file_index and not position.done
            for chunk in iter_raw_chunks(index, sources[index], txt_unit=options.txt_unit, json_key=options.json_key,
                                         chunk_bytes=chunk_bytes, start_byte=position.byte if here else 0,
                                         start_line=position.line if here else None):
                ends.append(Position(index, *chunk_end(chunk)))
                yield chunk

    num_input_bytes = sum(source.num_bytes for source in sources)
    num_chunks = 0
    last_commit = time.monotonic()
    with _Progress(num_input_bytes, progress) as bar:
        bar.advance(sum(source.num_bytes for source in sources[:first_file]), totals)
        try:
            for encoded in pool.encode_in_order(chunks()):
                num_chunks += 1
                partial.add(encoded.tokens, encoded.lengths, num_chunks)
                totals.add(encoded)
                position = ends.popleft()
                bar.advance(encoded.num_raw_bytes, totals)
                if time.monotonic() - last_commit >= checkpoint_seconds:
                    partial.commit(position, totals.file_rows())
                    last_commit = time.monotonic()
                fault("after-chunk", num_chunks)
        except BaseException:
            # A bad file hours in, or Ctrl-C: keep every chunk written so far for the next run.
            if num_chunks:
                partial.commit(position, totals.file_rows())
            raise
        bar.advance(num_input_bytes - bar.num_bytes, totals)  # inputs without documents report no chunk
        partial.finalize(sidecar(totals), position, totals.file_rows())
    return totals


class _Workers:
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

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._executor is not None:
            # On an error or interrupt drop queued chunks instead of tokenizing the rest of the backlog.
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._config_dir is not None:
            self._config_dir.cleanup()

    def configure(self, config: _WorkerConfig) -> None:
        """Give the workers the run's config (encoder, options, BOS/EOS); before the first chunk."""
        global _state
        if self._executor is None:
            _state = _WorkerState(None, config)
            return
        # The encoder spec holds tokenizer.json and tiktoken's ranks (~11 MB for LLaMA-3): written once,
        # read by each worker, instead of pickled into every chunk's task.
        self._config_path.write_bytes(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL))

    def encode_in_order(self, chunks: Iterable[RawChunk]) -> Iterator[_EncodedChunk]:
        """Encode ``chunks``, yielding results in input order with a bounded backlog."""
        if self._executor is None:
            yield from map(_encode_chunk, chunks)
            return
        max_in_flight = 2 * self.num_workers + 2
        pending: deque[Future[_EncodedChunk]] = deque()
        for chunk in chunks:
            pending.append(self._executor.submit(_encode_chunk, chunk))
            if len(pending) >= max_in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _sidecar(sources: list[InputFile], input_hashes: list[str], totals: _Totals, tokenization: _Tokenization,
             options: PackOptions, shard: tuple[int, int] | None = None) -> dict[str, Any]:
    # Only what the inputs and options determine: no time, host, worker count or temp path, so a
    # rerun writes a byte-identical sidecar.
    extra = {} if shard is None else {"shard": {"index": shard[0], "count": shard[1]}}
    return {
        **extra,
        "tool": "cpt-ds tools/pack_corpus.py",
        "tool_version": __version__,
        "tokenizer": {"path": tokenization.path, "fingerprint": tokenization.fingerprint,
                      "class": tokenization.class_name},
        "vocab_size": tokenization.vocab_size,
        "bos_id": tokenization.bos_id,
        "eos_id": tokenization.eos_id,
        "add_bos": tokenization.add_bos,
        "encoder": tokenization.encoder.name,
        "options": asdict(options),
        "num_empty_documents_skipped": totals.num_empty,
        "inputs": [
            {"path": source.path.as_posix(), "bytes": source.num_bytes, "sha256": digest,
             "num_documents": stats.num_documents, "num_tokens": stats.num_tokens,
             "num_empty_skipped": stats.num_empty_skipped}
            for source, digest, stats in zip(sources, input_hashes, totals.files, strict=True)
        ],
    }


class _Progress:
    """tqdm bar over input bytes with documents/s and tokens/s; does nothing when disabled."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.num_bytes = 0
        self._start = time.perf_counter()
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="packing", dynamic_ncols=True)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def advance(self, num_bytes: int, totals: _Totals) -> None:
        self.num_bytes += num_bytes
        if self._bar is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{totals.num_documents / elapsed:,.0f} docs/s, "
                                  f"{totals.num_tokens / elapsed / 1e6:,.2f} M tok/s", refresh=False)
        self._bar.update(num_bytes)
