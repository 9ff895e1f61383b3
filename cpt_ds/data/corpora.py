"""The run's data: training components (one stream, or a weighted blend) and named validation sets.

Every training sample carries ``corpus``, the index of the component it came from, so per-corpus
loss sums can be kept exactly like the global ones (cpt_ds/metrics.py). Global sample ids number the
components' samples back to back (component ``c`` owns ids ``[offset[c], offset[c+1])``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpt_ds.data import DataError
from cpt_ds.data.blend import BlendSchedule, PhaseBlend
from cpt_ds.data.loader import SampleOrder
from cpt_ds.data.phased import PhasedOrder
from cpt_ds.data.windows import PackedSamples, TokenStream, split_documents
from cpt_ds.token_file import IndexedTokenFile


@dataclass
class Corpus:
    """A named set of samples: one training component or one validation set."""

    name: str
    files: list[IndexedTokenFile]
    stream: TokenStream
    samples: PackedSamples


class ConcatSamples:
    """The samples of several corpora under one id space; each sample says which corpus it is from."""

    def __init__(self, corpora: Sequence[Corpus]):
        self.corpora = list(corpora)
        self.block_size = self.corpora[0].samples.block_size
        self.offsets = np.concatenate([[0], np.cumsum([len(c.samples) for c in self.corpora])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        corpus = int(np.searchsorted(self.offsets, index, side="right")) - 1
        sample = self.corpora[corpus].samples[index - int(self.offsets[corpus])]
        return {**sample, "corpus": np.int64(corpus)}


class BlendOrder:
    """Global position -> global sample id for a weighted blend.

    The blend schedule picks the component of each position; inside a component, positions follow
    that component's own seeded permutation per its own epoch (a small replay corpus repeats in a new
    order each epoch, a large one is sub-sampled).
    """

    def __init__(self, weights: Sequence[float], sizes: Sequence[int], seed: int):
        self.schedule = BlendSchedule(weights)
        self.sizes = [int(size) for size in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.orders = [SampleOrder(size, seed, stream=index + 1) for index, size in enumerate(self.sizes)]

    def ids(self, start: int, stop: int) -> np.ndarray:
        component, _ = self.schedule.assign(start, stop)
        # A component's positions inside [start, stop) are consecutive in its own order.
        first, last = self.schedule.counts(start), self.schedule.counts(stop)
        out = np.empty(stop - start, dtype=np.int64)
        for index, order in enumerate(self.orders):
            if last[index] > first[index]:
                out[component == index] = self.offsets[index] + order.ids(int(first[index]), int(last[index]))
        return out

    def epochs(self, consumed_samples: int) -> list[float]:
        return [count / size for count, size in zip(self.schedule.counts(consumed_samples), self.sizes, strict=True)]


@dataclass
class RunData:
    train: list[Corpus]
    weights: list[float] | None
    """Normalized blend weights, or None for one unweighted stream."""
    eval_sets: list[Corpus]
    seed: int
    phases: list[PhaseBlend] | None = None
    """A campaign's phases (cpt_ds/data/phased.py), or None for one unnamed phase (one stream or one blend)."""
    global_batch_size: int = 0
    """Samples per optimizer step: where the phases' positions begin (phases only)."""

    def __post_init__(self) -> None:
        self.samples = ConcatSamples(self.train)
        sizes = [len(c.samples) for c in self.train]
        self.order: SampleOrder | BlendOrder | PhasedOrder = (
            PhasedOrder(self.phases, sizes, self.seed, self.global_batch_size) if self.phases
            else SampleOrder(len(self.samples), self.seed) if self.weights is None
            else BlendOrder(self.weights, sizes, self.seed))

    @property
    def names(self) -> list[str]:
        return [corpus.name for corpus in self.train]

    def epochs(self, consumed_samples: int) -> dict[str, float]:
        """How many passes over its samples each component has made after ``consumed_samples`` (in a
        campaign: each component of the phases begun so far)."""
        if isinstance(self.order, PhasedOrder):
            epochs = self.order.epochs(consumed_samples)
            return {self.names[index]: epochs[index] for index in self.order.active(consumed_samples)}
        if isinstance(self.order, BlendOrder):
            return dict(zip(self.names, self.order.epochs(consumed_samples), strict=True))
        return {self.train[0].name: consumed_samples / len(self.samples)}

    def phase(self, step: int) -> str | None:
        """The name of step ``step``'s phase; None for a run without phases."""
        return self.order.phase_name(step) if isinstance(self.order, PhasedOrder) else None

    def blend_fingerprint(self) -> list[dict[str, Any]]:
        """What a resume must find unchanged: components (name, samples) and their weights."""
        return [{"name": corpus.name, "weight": None if self.weights is None else self.weights[index],
                 "num_samples": len(corpus.samples)} for index, corpus in enumerate(self.train)]

    def split_fingerprint(self) -> dict[str, Any]:
        return {"train": {c.name: c.stream.fingerprint() for c in self.train},
                "eval": {c.name: c.stream.fingerprint() for c in self.eval_sets}}


def build_run_data(
    components: Sequence[tuple[str, float | None, list[IndexedTokenFile]]],
    eval_sets: Sequence[tuple[str, list[IndexedTokenFile]]],
    *,
    block_size: int,
    validation_split_percentage: float,
    max_train_samples: int | None,
    max_eval_samples: int | None,
    seed: int,
    phases: list[PhaseBlend] | None = None,
    global_batch_size: int = 0,
) -> RunData:
    """Cut each component into samples; hold out documents per component when there are no eval sets.

    ``max_train_samples`` applies to each component, ``max_eval_samples`` to each validation set.
    """
    train, held_out = [], []
    for name, _, files in components:
        if eval_sets or validation_split_percentage <= 0:
            stream = TokenStream.whole(files)
        else:
            train_segments, eval_segments = split_documents(files, validation_split_percentage, seed)
            stream = TokenStream(files, train_segments)
            held = TokenStream(files, eval_segments)
            held_out.append(Corpus(name, files, held, PackedSamples(held, block_size, max_eval_samples)))
        train.append(Corpus(name, files, stream, PackedSamples(stream, block_size, max_train_samples)))
    empty = [f"{c.name} ({c.stream.num_tokens} tokens)" for c in train if len(c.samples) == 0]
    if empty:
        raise DataError(f"data_path: {', '.join(empty)} hold fewer training tokens than one block_size "
                         f"{block_size} sample; pack more text or lower block_size")
    validation = [Corpus(name, files, TokenStream.whole(files), PackedSamples(TokenStream.whole(files), block_size,
                                                                             max_eval_samples))
                  for name, files in eval_sets] or held_out
    small = [f"{c.name} ({c.stream.num_tokens} tokens)" for c in validation if len(c.samples) == 0]
    if small:
        source = "eval_data_path" if eval_sets else "the held-out documents of"
        raise DataError(f"{source} {', '.join(small)} hold fewer tokens than one block_size {block_size} sample; "
                         "raise validation_split_percentage, lower block_size or pass a larger eval_data_path")
    weights = None if components[0][1] is None else [weight for _, weight, _ in components]
    return RunData(train=train, weights=weights, eval_sets=validation, seed=seed, phases=phases,
                   global_batch_size=global_batch_size)
