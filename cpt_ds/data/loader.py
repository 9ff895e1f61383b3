"""The order of training samples and how each optimizer step's global batch is cut across ranks.

The whole data position is one integer, ``consumed_samples``: the number of samples all ranks
together have trained on. Global position ``p`` belongs to epoch ``p // N`` and maps to sample id
``perm_epoch[p % N]``, with one seeded permutation per epoch. A step consumes the next
``global_batch = micro * accumulation * world`` positions; micro-batch ``m`` of rank ``r`` takes

    positions consumed + m * (world * micro) + r * micro + [0, micro)

so the data a step sees depends only on ``consumed_samples`` and the batch shape, never on
per-rank iterator state. That is what makes resume exact and lets a run continue on another world
size without replaying or skipping a sample (the positions already consumed stay consumed).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cpt_ds.data import DataError
from cpt_ds.data.windows import SampleSource

IGNORE_INDEX = -100


class SampleOrder:
    """Global position -> sample id, reshuffled each epoch from ``seed`` alone.

    ``stream`` > 0 gives a blend component its own independent sequence of permutations.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, stream: int = 0):
        assert num_samples > 0
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.stream = stream
        self._cached_epoch = -1
        self._cached_permutation = np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            if self.shuffle:
                key = [self.seed, epoch] if self.stream == 0 else [self.seed, 0xB1E4D, self.stream, epoch]
                self._cached_permutation = np.random.default_rng(key).permutation(self.num_samples)
            else:
                self._cached_permutation = np.arange(self.num_samples, dtype=np.int64)
            self._cached_epoch = epoch
        return self._cached_permutation

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Sample ids at global positions ``[start, stop)`` (may cross epoch boundaries)."""
        out = np.empty(stop - start, dtype=np.int64)
        position = start
        while position < stop:
            epoch, offset = divmod(position, self.num_samples)
            take = min(stop - position, self.num_samples - offset)
            out[position - start : position - start + take] = self._permutation(epoch)[offset : offset + take]
            position += take
        return out


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.stack([sample[key] for sample in samples])).long() for key in samples[0]}


class TrainLoader:
    """Yields this rank's micro-batches for each optimizer step; state is ``consumed_samples`` only."""

    def __init__(
        self,
        samples: SampleSource,
        *,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        dp_rank: int,
        dp_world_size: int,
        seed: int,
        order: Any = None,
    ):
        """``order`` maps global positions to sample ids (``ids(start, stop)``); default: one seeded
        permutation of ``samples`` per epoch."""
        if len(samples) == 0:
            raise DataError("the training data holds no complete sample: pack more text or lower block_size")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.order = order if order is not None else SampleOrder(len(samples), seed)
        self.consumed_samples = 0

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.dp_world_size

    @property
    def epoch(self) -> float:
        return self.consumed_samples / len(self.samples)

    def step_sample_ids(self, consumed_samples: int) -> list[np.ndarray]:
        """This rank's sample ids for each micro-batch of the step starting at ``consumed_samples``."""
        stride = self.dp_world_size * self.micro_batch_size
        ids = []
        for micro_step in range(self.gradient_accumulation_steps):
            first = consumed_samples + micro_step * stride + self.dp_rank * self.micro_batch_size
            ids.append(self.order.ids(first, first + self.micro_batch_size))
        return ids

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step; advances ``consumed_samples`` by a global batch."""
        batches = [collate([self.samples[int(i)] for i in ids]) for ids in self.step_sample_ids(self.consumed_samples)]
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "num_samples": len(self.samples),
                "seed": self.seed, "block_size": self.samples.block_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        problems = []
        if state["num_samples"] != len(self.samples):
            problems.append(f"the checkpoint's data had {state['num_samples']} training samples, now "
                            f"{len(self.samples)} (data_path, block_size, max_train_samples or the split changed)")
        if state["seed"] != self.seed:
            problems.append(f"seed was {state['seed']}, now {self.seed} (it fixes the data order)")
        if state["block_size"] != self.samples.block_size:
            problems.append(f"block_size was {state['block_size']}, now {self.samples.block_size}")
        if problems:
            raise DataError("cannot resume the data position: " + "; ".join(problems)
                             + "; restore the original settings or start a new output_dir")
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(
    samples: SampleSource, *, micro_batch_size: int, dp_rank: int, dp_world_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the eval set in order: sample ``i`` goes to rank ``i % world``.

    Every rank yields the same number of batches (ZeRO-3 forwards are collective); a rank whose
    share runs out pads with copies whose labels are all ``IGNORE_INDEX``, which add nothing to the sums.
    """
    num_samples = len(samples)
    per_round = micro_batch_size * dp_world_size
    num_rounds = -(-num_samples // per_round)
    for round_index in range(num_rounds):
        batch = []
        for slot in range(micro_batch_size):
            index = round_index * per_round + slot * dp_world_size + dp_rank
            if index < num_samples:
                batch.append(samples[index])
            else:
                filler = dict(samples[0])  # every key of a real sample (position ids, ...), no labels
                filler["labels"] = np.full_like(filler["labels"], IGNORE_INDEX)
                batch.append(filler)
        yield collate(batch)
