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

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cpt_ds import __version__
from cpt_ds.fileio import sha256_file
from cpt_ds.pack.chunks import RawChunk, chunk_end, iter_raw_chunks
from cpt_ds.pack.encoders import EncoderSpec, select_encoder
from cpt_ds.pack.partial import PartialPack, Position, fault, pending_publish
from cpt_ds.pack.sources import (
    ENCODING_ERRORS,
    TXT_UNITS,
    EncodingErrors,
    InputFile,
    PackError,
    TxtUnit,
    discover_inputs,
    select_shard,
)
from cpt_ds.pack.workers import EncodedChunk, WorkerConfig, Workers, default_workers
from cpt_ds.token_file import check_output_prefix, paths_for, shard_plan, shard_prefix, token_dtype_for_vocab
from cpt_ds.tokenizer import read_tokenizer, tokenizer_files

logger = logging.getLogger(__name__)

BosPolicy = Literal["auto", "always", "never"]
EncoderChoice = Literal["auto", "hf"]
BOS_POLICIES: tuple[BosPolicy, ...] = ("auto", "always", "never")
ENCODER_CHOICES: tuple[EncoderChoice, ...] = ("auto", "hf")

DEFAULT_CHUNK_BYTES = 2 << 20
# How often the resumable state is committed (fsync + a small JSON): a crash redoes at most this much work.
DEFAULT_CHECKPOINT_SECONDS = 10.0
MIN_CHUNK_BYTES = 1 << 10


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

    def add(self, encoded: EncodedChunk) -> None:
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
    _check_settings(workers, chunk_bytes, checkpoint_seconds)
    sources, output, plan = _inputs_and_output(inputs, output, shard, overwrite)
    tokenizer_files(tokenizer)  # a missing tokenizer folder is reported before any worker starts
    with Workers(workers, tokenizer) as pool:
        tokenization = _prepare_tokenization(tokenizer, options)
        logger.info("%d input files, %.1f MB; tokenizer %s (%d ids, BOS %s, EOS %d); %s tokens; %d workers",
                    len(sources), sum(source.num_bytes for source in sources) / 1e6, tokenizer,
                    tokenization.vocab_size, tokenization.bos_id if tokenization.add_bos else "not added",
                    tokenization.eos_id, tokenization.dtype.name, workers)
        pool.configure(WorkerConfig(tokenization.encoder, options,
                                    tokenization.bos_id if tokenization.add_bos else None, tokenization.eos_id,
                                    tokenization.dtype.name))
        input_hashes = [sha256_file(source.path) for source in sources]
        identities = [{"path": source.path.as_posix(), "bytes": source.num_bytes, "sha256": digest}
                      for source, digest in zip(sources, input_hashes, strict=True)]

        encode_start = time.perf_counter()
        with _removing_new_folders(output), \
                PartialPack(output, dtype=tokenization.dtype, key=_resume_key(tokenization, options),
                            inputs=identities, resume=resume) as partial:
            num_resumed = partial.committed.num_documents
            totals = _write(sources, options, partial, pool, chunk_bytes=chunk_bytes, progress=progress,
                            checkpoint_seconds=checkpoint_seconds,
                            sidecar=lambda totals: _sidecar(sources, input_hashes, totals, tokenization, options,
                                                            shard, plan))
    now = time.perf_counter()
    summary = _summary(output, sources, totals, tokenization, seconds=now - start,
                       encode_seconds=now - encode_start, num_resumed=num_resumed)
    logger.info("packed %d documents, %d tokens in %.2f s; encoded in %.2f s (%.2f M tokens/s) after %.2f s of set-up",
                summary.num_documents, summary.num_tokens, summary.seconds, summary.encode_seconds,
                summary.num_tokens / max(summary.encode_seconds, 1e-9) / 1e6, summary.seconds - summary.encode_seconds)
    return summary


@contextlib.contextmanager
def _removing_new_folders(output: str | os.PathLike) -> Iterator[None]:
    """On failure, remove the output's folders this pack created while they are empty (deepest first): a
    pack that fails before its first commit leaves nothing, one that committed keeps its partial state."""
    created = [folder for folder in paths_for(output)[0].parents if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _check_settings(workers: int, chunk_bytes: int, checkpoint_seconds: float) -> None:
    """One ``PackError`` naming every setting out of range."""
    problems = []
    if workers < 1:
        problems.append(f"workers must be at least 1, got {workers}")
    if chunk_bytes < MIN_CHUNK_BYTES:
        problems.append(f"chunk size must be at least {MIN_CHUNK_BYTES} bytes, got {chunk_bytes}")
    if checkpoint_seconds < 0:
        problems.append(f"checkpoint interval must be at least 0 seconds, got {checkpoint_seconds}")
    if problems:
        raise PackError("invalid pack settings: " + "; ".join(problems))


def _inputs_and_output(inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
                       shard: tuple[int, int] | None, overwrite: bool
                       ) -> tuple[list[InputFile], str | os.PathLike, dict[str, Any] | None]:
    """The input files to pack (one shard's, with ``shard``), the output prefix, checked to be free, and
    the shard plan (what decided the cut, recorded in every shard's sidecar)."""
    check_output_prefix(output, "--output")
    for spec in inputs:
        if Path(spec).is_dir() and Path(output).resolve().is_relative_to(Path(spec).resolve()):
            raise PackError(f"--output {output} lies inside the input folder {spec}, so its token files and "
                            "PREFIX.partial/ would be read as inputs by the next run; write the output elsewhere")
    sources = discover_inputs(inputs)
    plan = None
    if shard is not None:
        plan = shard_plan([(source.path.as_posix(), source.num_bytes) for source in sources], shard[1])
        sources = select_shard(sources, *shard)
        output = shard_prefix(output, *shard)
    existing = [str(p) for p in paths_for(output) if p.exists()]
    # A .bin/.json without .idx beside a publishing state: this pack's own, half renamed when it was killed.
    if existing and not overwrite and not pending_publish(output):
        raise PackError(f"output already exists ({', '.join(existing)}); choose another --output or pass --overwrite")
    return sources, output, plan


def _summary(output: str | os.PathLike, sources: list[InputFile], totals: _Totals, tokenization: _Tokenization, *,
             seconds: float, encode_seconds: float, num_resumed: int) -> PackSummary:
    return PackSummary(
        output_prefix=str(paths_for(output)[0])[: -len(".bin")],
        num_documents=totals.num_documents,
        num_tokens=totals.num_tokens,
        num_empty_skipped=totals.num_empty,
        num_input_files=len(sources),
        num_input_bytes=sum(source.num_bytes for source in sources),
        num_bytes_written=sum(p.stat().st_size for p in paths_for(output)),
        seconds=seconds,
        encode_seconds=encode_seconds,
        encoder=tokenization.encoder.name,
        dtype=tokenization.dtype.name,
        num_identity_checked_documents=totals.num_checked_documents,
        num_identity_checked_tokens=totals.num_checked_tokens,
        num_resumed_documents=num_resumed,
    )


def _resume_key(tokenization: _Tokenization, options: PackOptions) -> dict[str, Any]:
    """What decides the tokens besides the inputs: a partial pack written under another key is discarded."""
    return {"tool_version": __version__, "tokenizer_fingerprint": tokenization.fingerprint,
            "vocab_size": tokenization.vocab_size, "dtype": tokenization.dtype.name,
            "bos_id": tokenization.bos_id if tokenization.add_bos else None, "eos_id": tokenization.eos_id,
            "options": asdict(options)}


def _write(sources: list[InputFile], options: PackOptions, partial: PartialPack, pool: Workers, *,
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


def _sidecar(sources: list[InputFile], input_hashes: list[str], totals: _Totals, tokenization: _Tokenization,
             options: PackOptions, shard: tuple[int, int] | None = None,
             plan: dict[str, Any] | None = None) -> dict[str, Any]:
    # Only what the inputs and options determine: no time, host, worker count or temp path, so a
    # rerun writes a byte-identical sidecar.
    extra = {} if shard is None else {"shard": {"index": shard[0], "count": shard[1], "plan": plan}}
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
