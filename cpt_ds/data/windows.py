"""Training samples: fixed-size windows over the document stream of one or more token files.

The stream is the chosen documents of every token file back to back, in ``data_path`` order. Each
document already ends with EOS (tools/pack_corpus.py appends it), so a window that spans two
documents sees the boundary token. Sample ``i`` is stream tokens ``[i*L, i*L + L + 1)``:

    input_ids[t] = stream[i*L + t]        labels[t] = stream[i*L + t + 1]    (t = 0 .. L-1)

i.e. the label at position ``t`` is the *next* token, so every stream token except the first is a
label exactly once and consecutive samples share one boundary token (as in Megatron's GPTDataset).
The model's logits are scored against ``labels`` directly, without a further shift.

Document-aware attention: every sample also carries ``position_ids`` that restart at 0 at the
window start and at every document start inside the window (``TokenStream.document_starts``). A
document's EOS is the last token of the document it closes, so the EOS position keeps its document's
count and the next token is position 0; labels are untouched (the label at an EOS is still the next
document's first token). cpt_ds/model.py turns these position ids into the attention mask; with
``document_attention`` off they are ignored and the model counts positions 0 .. L-1 as before.

Extension point, kept explicit so later work does not rewrite this path:
- weighted blending: a blend is another ``SampleSource`` (``__len__`` + ``__getitem__``) mapping its
  sample ids onto several ``PackedSamples``; the sampler only sees sample ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cpt_ds.token_file import IndexedTokenFile


class SampleSource(Protocol):
    """What the sampler and loaders need from a set of samples."""

    block_size: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Segment:
    """A run of whole, consecutive documents of one token file: tokens ``[start, stop)`` of that file."""

    file_index: int
    start: int
    stop: int


class TokenStream:
    """Runs of documents from several token files, addressed as one token sequence."""

    def __init__(self, files: Sequence[IndexedTokenFile], segments: Sequence[Segment]):
        self.files = list(files)
        self.segments = [segment for segment in segments if segment.stop > segment.start]
        lengths = np.array([segment.stop - segment.start for segment in self.segments], dtype=np.int64)
        # segment_offsets[k] = stream position where segment k begins; the last entry is the total.
        self.segment_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_tokens = int(self.segment_offsets[-1])
        self._segment_file = np.array([segment.file_index for segment in self.segments], dtype=np.int64)
        self._segment_start = np.array([segment.start for segment in self.segments], dtype=np.int64)

    @classmethod
    def whole(cls, files: Sequence[IndexedTokenFile]) -> TokenStream:
        return cls(files, [Segment(index, 0, file.num_tokens) for index, file in enumerate(files)])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Stream tokens ``[start, stop)`` as int64 (copied out of the memory maps)."""
        assert 0 <= start <= stop <= self.num_tokens, (start, stop, self.num_tokens)
        out = np.empty(stop - start, dtype=np.int64)
        first = int(np.searchsorted(self.segment_offsets, start, side="right")) - 1
        position, written, segment = start, 0, first
        while position < stop:
            offset = position - int(self.segment_offsets[segment])
            take = min(stop - position, int(self.segment_offsets[segment + 1]) - position)
            file_start = int(self._segment_start[segment]) + offset
            out[written : written + take] = self.files[int(self._segment_file[segment])].tokens(
                file_start, file_start + take)
            position += take
            written += take
            segment += 1
        return out

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Positions (relative to ``start``) in ``[start, stop)`` where a document begins."""
        found = []
        first = int(np.searchsorted(self.segment_offsets, start, side="right")) - 1
        for segment in range(first, len(self.segments)):
            base = int(self.segment_offsets[segment])
            if base >= stop:
                break
            file = self.files[int(self._segment_file[segment])]
            seg = self.segments[segment]
            offsets = file.document_token_offsets
            lo = np.searchsorted(offsets, seg.start, side="left")
            hi = np.searchsorted(offsets, seg.stop, side="left")
            stream_starts = offsets[lo:hi] - seg.start + base
            found.append(stream_starts[(stream_starts >= start) & (stream_starts < stop)] - start)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def fingerprint(self) -> str:
        """Identifies the exact token content and order (files' checksums or sizes, and the segments)."""
        digest = hashlib.sha256()
        for file in self.files:
            checksum = (file.meta or {}).get("bin_sha256") or f"{file.num_tokens}:{file.num_documents}"
            digest.update(checksum.encode() + b"\n")
        digest.update(np.array([[s.file_index, s.start, s.stop] for s in self.segments], dtype=np.int64).tobytes())
        return digest.hexdigest()


class PackedSamples:
    """``block_size`` windows over a token stream (see the module docstring for the label layout)."""

    def __init__(self, stream: TokenStream, block_size: int, max_samples: int | None = None):
        self.stream = stream
        self.block_size = block_size
        available = max(0, (stream.num_tokens - 1) // block_size)
        self.num_samples = available if max_samples is None else min(available, max_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} out of range for {self.num_samples} samples")
        start = index * self.block_size
        window = self.stream.read(start, start + self.block_size + 1)
        starts = self.stream.document_starts(start, start + self.block_size)
        return {"input_ids": window[:-1], "labels": window[1:],
                "position_ids": document_positions(starts, self.block_size)}


def document_positions(document_starts: np.ndarray, length: int) -> np.ndarray:
    """Position of each of ``length`` tokens inside its document, counting from the window start for
    the document the window cuts: ``document_starts`` [0, 3] and length 5 give [0, 1, 2, 0, 1]."""
    starts = np.union1d(np.zeros(1, dtype=np.int64), document_starts.astype(np.int64))
    tokens = np.arange(length, dtype=np.int64)
    return tokens - starts[np.searchsorted(starts, tokens, side="right") - 1]


def split_documents(
    files: Sequence[IndexedTokenFile], fraction: float, seed: int
) -> tuple[list[Segment], list[Segment]]:
    """Hold out ``fraction`` of all documents for validation, chosen by ``seed`` alone.

    Returns ``(train_segments, eval_segments)``; each is a list of runs of consecutive documents, so
    the train stream keeps the corpus order minus the held-out documents. At least one document is
    held out when ``fraction > 0``.
    """
    counts = [file.num_documents for file in files]
    total = sum(counts)
    if fraction <= 0 or total == 0:
        return [Segment(i, 0, f.num_tokens) for i, f in enumerate(files)], []
    num_held = min(total, max(1, round(total * fraction)))
    # A dedicated generator keyed by the seed, so the split never depends on any other random draw.
    held = np.zeros(total, dtype=bool)
    held[np.random.default_rng([seed, 0x5E1D]).choice(total, size=num_held, replace=False)] = True
    train: list[Segment] = []
    held_out: list[Segment] = []
    first = 0
    for file_index, (file, count) in enumerate(zip(files, counts, strict=True)):
        mask = held[first : first + count]
        first += count
        offsets = file.document_token_offsets
        # Boundaries where the held-out flag changes delimit maximal runs of documents.
        changes = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
        run_starts = np.concatenate([[0], changes])
        run_stops = np.concatenate([changes, [count]])
        for run_start, run_stop in zip(run_starts, run_stops, strict=True):
            if run_stop <= run_start:
                continue
            segment = Segment(file_index, int(offsets[run_start]), int(offsets[run_stop]))
            (held_out if mask[run_start] else train).append(segment)
    return train, held_out
