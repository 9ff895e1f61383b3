"""The order of training samples and how each optimizer step's global batch is cut across ranks.

The whole data position is one integer, ``consumed_samples``: the number of samples all ranks
together have trained on. Global position ``p`` belongs to epoch ``p // N`` and maps to sample id
``perm_epoch[p % N]``, with one seeded permutation per epoch. A step consumes the next
``global_batch = micro * accumulation * world`` positions; micro-batch ``m`` of rank ``r`` takes

    positions consumed + m * (world * micro) + r * micro + [0, micro)

so the data a step sees depends only on ``consumed_samples`` and the batch shape, never on
per-rank iterator state. That is what makes resume exact and lets a run continue on another world
size without replaying or skipping a sample (the positions already consumed stay consumed).

Under sequence parallelism "rank" above is the data-parallel rank: the ``sp_size`` ranks of a group
read the same micro-batches and each keeps its contiguous 1/sp_size of every sample's tokens
(``shard_sequence``). Labels are already the next tokens and position ids already count within each
document of the whole window (cpt_ds/data/windows.py), so cutting a window needs nothing from the
neighbouring shard: a document crossing the cut keeps counting on the next rank.
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


def shard_sequence(batch: dict[str, Any], sp_rank: int, sp_size: int) -> dict[str, Any]:
    """Sequence-parallel rank ``sp_rank``'s contiguous 1/``sp_size`` of every per-token tensor
    (``[B, T]``: input ids, labels, position ids); per-sample keys (the corpus index) are kept whole.
    ``token_offset`` says where the shard starts in the window."""
    if sp_size == 1:
        return batch
    length = batch["input_ids"].shape[1]
    assert length % sp_size == 0, (length, sp_size)  # preflight: block_size divisible by sequence_parallel_size
    shard = length // sp_size
    start = sp_rank * shard
    out = {key: value[:, start:start + shard] if isinstance(value, torch.Tensor) and value.dim() == 2 else value
           for key, value in batch.items()}
    out["token_offset"] = start
    return out


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
        sp_rank: int = 0,
        sp_size: int = 1,
    ):
        """``order`` maps global positions to sample ids (``ids(start, stop)``); default: one seeded
        permutation of ``samples`` per epoch. ``sp_rank`` / ``sp_size``: this rank's share of each sample
        under sequence parallelism (``shard_sequence``)."""
        if len(samples) == 0:
            raise DataError("the training data holds no complete sample: pack more text or lower block_size")
        self.samples = samples
        self.micro_batch_size = micro_batch_size
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.sp_rank = sp_rank
        self.sp_size = sp_size
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
        batches = [shard_sequence(collate([self.samples[int(i)] for i in ids]), self.sp_rank, self.sp_size)
                   for ids in self.step_sample_ids(self.consumed_samples)]
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
    samples: SampleSource, *, micro_batch_size: int, dp_rank: int, dp_world_size: int, sp_rank: int = 0,
    sp_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the eval set in order: sample ``i`` goes to data-parallel rank ``i % world``
    (under sequence parallelism each rank of the group then keeps its part of the tokens).

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
        yield shard_sequence(collate(batch), sp_rank, sp_size)
