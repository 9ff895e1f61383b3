"""Counting the pre-tokenizer pieces of the domain text (step 1 of ``cpt_ds/pack/extend_vocab.py``).

Every document is read once, held out or not by a hash of its text, and cut by the base tokenizer's
own pre-tokenizer into pieces; only the piece counts are kept, so memory grows with the distinct
pieces, not with the corpus. The held-out counts give the report's tokens per character.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from cpt_ds.pack.chunks import RawChunk, iter_raw_chunks
from cpt_ds.pack.documents import chunk_documents
from cpt_ds.pack.sources import discover_inputs
from cpt_ds.pack.workers import worker_start_method

if TYPE_CHECKING:
    from cpt_ds.pack.extend_vocab import ExtendOptions

CHUNK_BYTES = 4 << 20


def is_cjk_dominant(text: str) -> bool:
    """At least half of the non-space characters are Han, kana or Hangul (Chinese/Japanese/Korean)."""
    num_cjk = num_other = 0
    for char in text:
        if char.isspace():
            continue
        if _is_cjk(char):
            num_cjk += 1
        else:
            num_other += 1
    return num_cjk > 0 and num_cjk >= num_other


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x3134F
            or 0xF900 <= code <= 0xFAFF or 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7AF
            or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F or 0x31F0 <= code <= 0x31FF)


def is_held_out(text: str, fraction: float) -> bool:
    """Whether document ``text`` is held out: by a hash of its text, so neither chunking, workers, file
    names nor order matter, and copies of one document always fall on the same side."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


@dataclass
class PieceCounts:
    """Piece frequencies of the training documents and of the held-out ones (all, and CJK-dominant)."""

    train: Counter[str] = field(default_factory=Counter)
    eval_all: Counter[str] = field(default_factory=Counter)
    eval_cjk: Counter[str] = field(default_factory=Counter)
    num_train_documents: int = 0
    num_train_chars: int = 0
    num_eval_documents: int = 0
    num_eval_chars: int = 0
    num_eval_cjk_documents: int = 0
    num_eval_cjk_chars: int = 0
    num_empty: int = 0
    num_raw_bytes: int = 0

    def add(self, other: PieceCounts) -> None:
        for name, value in vars(other).items():
            if isinstance(value, Counter):
                getattr(self, name).update(value)
            else:
                setattr(self, name, getattr(self, name) + value)


_pre_tokenizer: Any = None
_worker_options: ExtendOptions | None = None


def _init_counter(tokenizer_json: str, options: ExtendOptions) -> None:
    global _pre_tokenizer, _worker_options
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _pre_tokenizer = Tokenizer.from_str(tokenizer_json).pre_tokenizer
    _worker_options = options


def _count_chunk(chunk: RawChunk) -> PieceCounts:
    assert _pre_tokenizer is not None and _worker_options is not None, "worker not initialised"
    options = _worker_options
    documents = chunk_documents(chunk, json_key=options.json_key, encoding_errors=options.encoding_errors)
    counts = PieceCounts(num_empty=documents.num_empty, num_raw_bytes=chunk.num_raw_bytes)
    split = _pre_tokenizer.pre_tokenize_str
    for text in documents.texts:
        pieces = [piece for piece, _ in split(text)]
        if is_held_out(text, options.eval_fraction):
            counts.num_eval_documents += 1
            counts.num_eval_chars += len(text)
            counts.eval_all.update(pieces)
            if is_cjk_dominant(text):
                counts.num_eval_cjk_documents += 1
                counts.num_eval_cjk_chars += len(text)
                counts.eval_cjk.update(pieces)
        else:
            counts.num_train_documents += 1
            counts.num_train_chars += len(text)
            counts.train.update(pieces)
    return counts


def count_pieces(inputs: Sequence[str | os.PathLike], tokenizer_json: str, options: ExtendOptions, *,
                 workers: int = 1, progress: bool = False, pre_tokenizer: Any = None) -> PieceCounts:
    """Read every document of ``inputs`` once and count its pre-tokenizer pieces.

    ``pre_tokenizer``: the pre-tokenizer of ``tokenizer_json``, built already, for ``workers`` 1.
    """
    sources = discover_inputs(inputs)
    total = PieceCounts()
    bar = progress_bar(sum(s.num_bytes for s in sources), "counting", "B", progress)
    try:
        chunks = (chunk for index, source in enumerate(sources)
                  for chunk in iter_raw_chunks(index, source, txt_unit=options.txt_unit, json_key=options.json_key,
                                               chunk_bytes=CHUNK_BYTES))
        for counts in _map_in_order(chunks, tokenizer_json, options, workers, worker_start_method(), pre_tokenizer):
            total.add(counts)
            if bar is not None:
                bar.update(counts.num_raw_bytes)
    finally:
        if bar is not None:
            bar.close()
    return total


def _map_in_order(chunks: Iterable[RawChunk], tokenizer_json: str, options: ExtendOptions, workers: int,
                  start_method: str, pre_tokenizer: Any) -> Iterator[PieceCounts]:
    global _pre_tokenizer, _worker_options
    if workers <= 1:
        if pre_tokenizer is None:
            _init_counter(tokenizer_json, options)
        else:
            _pre_tokenizer, _worker_options = pre_tokenizer, options
        yield from map(_count_chunk, chunks)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context(start_method), initializer=_init_counter,
                             initargs=(tokenizer_json, options)) as executor:
        pending: deque[Future[PieceCounts]] = deque()
        try:
            for chunk in chunks:
                pending.append(executor.submit(_count_chunk, chunk))
                if len(pending) >= 2 * workers + 2:  # bounded read-ahead: memory stays flat
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _piece_lengths(model: Any, counts: Counter[str]) -> int:
    return sum(count * len(model.tokenize(piece)) for piece, count in counts.items())


def measure(before_model: Any, after_model: Any, counts: PieceCounts) -> dict[str, Any]:
    """Tokens per character of the held-out documents before and after (exact: BPE works piece by piece)."""
    result: dict[str, Any] = {}
    for name, pieces, num_documents, num_chars in (
            ("all", counts.eval_all, counts.num_eval_documents, counts.num_eval_chars),
            ("cjk_dominant", counts.eval_cjk, counts.num_eval_cjk_documents, counts.num_eval_cjk_chars)):
        if num_chars == 0:
            result[name] = {"num_documents": 0, "num_chars": 0}
            continue
        before, after = _piece_lengths(before_model, pieces), _piece_lengths(after_model, pieces)
        result[name] = {"num_documents": num_documents, "num_chars": num_chars, "tokens_before": before,
                        "tokens_after": after, "tokens_per_char_before": before / num_chars,
                        "tokens_per_char_after": after / num_chars, "token_reduction": 1 - after / before}
    return result


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar, or None when ``enabled`` is false (tqdm is then not imported)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True)
