"""The sample order of a campaign: phases in sequence, each a blend of the run's components.

A run with ``phases`` has one set of training components, each corpus once (identified by its
resolved token-file paths), whatever phases use it. Phase ``p`` covers global positions
``[bound[p], bound[p + 1])`` with ``bound[p] = global_batch x (steps of the phases before p)``; inside it
the phase's blend schedule (cpt_ds/data/blend.py) picks each position's component exactly as a
one-phase blend would, counting from the phase's first position.

A component continues where it stopped: its index inside the component at phase ``p``'s first position
is ``start[p][c]``, the sum of what the earlier phases drew from it (each the phase's blend counts at
its full length, O(depth)). So the index of any position is a pure function of the plan and the
position, computed in O(components x phases) once, with nothing sized by the run; a component's
indices run 0, 1, 2, ... across phase boundaries, and its own seeded permutation per epoch (the same
``stream`` in every phase) turns them into sample ids: within an epoch of a component no sample is
seen twice and none is skipped, however the phases cut it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cpt_ds.data.blend import BlendSchedule, PhaseBlend
from cpt_ds.data.loader import SampleOrder


class PhasedOrder:
    """Global position -> global sample id for a sequence of phases (see the module docstring)."""

    def __init__(self, phases: Sequence[PhaseBlend], sizes: Sequence[int], seed: int, global_batch_size: int):
        assert phases and global_batch_size > 0
        self.phases = list(phases)
        self.sizes = [int(size) for size in sizes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.orders = [SampleOrder(size, seed, stream=index + 1) for index, size in enumerate(self.sizes)]
        self.schedules = [None if phase.weights is None else BlendSchedule(phase.weights) for phase in self.phases]
        self.first_steps = np.concatenate([[0], np.cumsum([phase.steps for phase in self.phases])]).astype(np.int64)
        self.bounds = self.first_steps * global_batch_size
        self.starts = np.zeros((len(self.phases), len(self.sizes)), dtype=np.int64)
        drawn = np.zeros(len(self.sizes), dtype=np.int64)
        for index in range(len(self.phases)):
            self.starts[index] = drawn
            drawn = drawn + self._phase_counts(index, int(self.bounds[index + 1] - self.bounds[index]))

    def _phase_counts(self, index: int, num_positions: int) -> np.ndarray:
        """What the first ``num_positions`` positions of phase ``index`` drew from each run component."""
        out = np.zeros(len(self.sizes), dtype=np.int64)
        phase, schedule = self.phases[index], self.schedules[index]
        if schedule is None:
            out[phase.components[0]] = num_positions
        else:
            out[list(phase.components)] += schedule.counts(num_positions)
        return out

    def phase_index(self, position: int) -> int:
        """The phase of global position ``position`` (positions past the plan's end: none exist)."""
        assert 0 <= position < self.bounds[-1], (position, self.bounds[-1])
        return int(np.searchsorted(self.bounds, position, side="right")) - 1

    def counts(self, position: int) -> np.ndarray:
        """How many of the first ``position`` positions each component received (int64[C])."""
        index = self.phase_index(min(position, int(self.bounds[-1]) - 1))
        return self.starts[index] + self._phase_counts(index, position - int(self.bounds[index]))

    def ids(self, start: int, stop: int) -> np.ndarray:
        """Global sample ids at positions ``[start, stop)`` (may cross phase boundaries)."""
        out = np.empty(stop - start, dtype=np.int64)
        position = start
        while position < stop:
            index = self.phase_index(position)
            end = min(stop, int(self.bounds[index + 1]))
            out[position - start:end - start] = self._phase_ids(index, position - int(self.bounds[index]),
                                                                end - int(self.bounds[index]))
            position = end
        return out

    def _phase_ids(self, index: int, first: int, last: int) -> np.ndarray:
        """Sample ids of phase ``index``'s local positions ``[first, last)``."""
        phase, schedule, starts = self.phases[index], self.schedules[index], self.starts[index]
        if schedule is None:
            component = phase.components[0]
            begin = int(starts[component]) + first
            return self.offsets[component] + self.orders[component].ids(begin, begin + last - first)
        local, _ = schedule.assign(first, last)
        before, after = schedule.counts(first), schedule.counts(last)
        out = np.empty(last - first, dtype=np.int64)
        # A component's positions inside [first, last) are consecutive in its own order.
        for slot, component in enumerate(phase.components):
            if after[slot] > before[slot]:
                begin = int(starts[component])
                out[local == slot] = self.offsets[component] + self.orders[component].ids(
                    begin + int(before[slot]), begin + int(after[slot]))
        return out

    def epochs(self, consumed_samples: int) -> list[float]:
        return [count / size for count, size in zip(self.counts(consumed_samples), self.sizes, strict=True)]

    def active(self, consumed_samples: int) -> list[int]:
        """The components of the phases begun by ``consumed_samples`` (the first phase's from the start):
        what a record lists, so records never depend on phases still to come."""
        begun = [phase for phase, bound in zip(self.phases, self.bounds) if bound < max(consumed_samples, 1)]
        return sorted({component for phase in begun for component in phase.components})

    def phase_name(self, step: int) -> str:
        """The phase of optimizer step ``step`` (1-based: it consumed the positions of 0-based step - 1)."""
        return self.phases[int(np.searchsorted(self.first_steps, step - 1, side="right")) - 1].name
