"""Preemption-safe stop: a notice (SIGTERM or SIGUSR1) or the end of ``max_wall_minutes`` stops every rank
at the same step, after one complete checkpoint of that step, with exit code 3 (docs/preemption.md).

A signal reaches the ranks at different moments: SLURM signals each process of a step separately, and
the deepspeed launcher (``deepspeed/launcher/launch.py``) sends SIGTERM to one rank, waits up to 30 s
for it to exit, then to the next. A rank that stopped on its own flag would leave the others waiting
in a collective, so the flag is agreed: the loop asks ``Stopper.agreed()`` before every step (after the
previous step's evaluation and save, so a notice that arrived during them counts), and that is one
all-reduce of three integers, the same on every rank. Everyone sees the same answer and stops at the
same step.

The handlers only record the notice (a Python signal handler runs between bytecodes of the main
thread, so the step, evaluation or save in progress finishes first) and stay installed until the
process exits: a second notice during the save, or the launcher's SIGTERM to a rank that is already
exiting, changes nothing. A SIGKILL during the save leaves that folder without its completion marker,
so the previous complete checkpoint stays ``latest`` (cpt_ds/checkpoint.py).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import psutil  # a dependency of deepspeed
import torch

from cpt_ds.metrics import all_reduce_stats

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 3
"""Exit code of every rank that stopped for a notice or the wall-clock budget (2: user error, 1: divergence)."""
NOTICE_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FIRST_SAVE_RESERVE = 0.1
"""Before this launch has saved once, the save is assumed to take this fraction of max_wall_minutes."""

_notices: list[tuple[int, float]] = []
"""(signal number, time.monotonic()) of every notice this process received since ``install_handlers``."""


def install_handlers() -> None:
    """Record SIGTERM and SIGUSR1 instead of dying of them (train.py, first thing; kept until exit)."""
    _notices.clear()
    for number in NOTICE_SIGNALS:
        signal.signal(number, _record_notice)


def _record_notice(number: int, frame: Any) -> None:
    # Only an append: the handler interrupts arbitrary code, which may hold the logging lock.
    _notices.append((number, time.monotonic()))


def process_started() -> float:
    """This process's start on the ``time.monotonic()`` clock: the wall-clock budget counts from here."""
    return time.monotonic() - (time.time() - psutil.Process().create_time())


class Preempted(Exception):
    """Every rank stopped at ``step`` for a notice or the wall-clock budget; its checkpoint is complete."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"preempted at step {step} ({reason})")
        self.step = step
        self.reason = reason


class Stopper:
    """Decides, identically on every rank, whether the run stops before its next step.

    Wall-clock rule: stop before the next step when ``elapsed + longest_step + save_reserve`` reaches
    ``max_wall_minutes``, where ``elapsed`` counts from the rank's process start, ``longest_step`` is the
    longest time between two checks of this launch without the saves in it (a step with its record and
    evaluation), and ``save_reserve`` the duration of this launch's last save, or
    ``FIRST_SAVE_RESERVE`` of the budget before its first save. A launch always trains one step first,
    so a relaunch never spins without progress.
    """

    def __init__(self, max_wall_minutes: float | None, *, save_durations: list[float], rank: int):
        self.budget = None if max_wall_minutes is None else 60.0 * max_wall_minutes
        self.save_durations = save_durations
        """The checkpointer's list of save durations (seconds), appended to by every save of this launch."""
        self.rank = rank
        self.started = process_started()
        self.reason: str | None = None
        self.longest_step = 0.0
        self._last_check: float | None = None
        self._saves_seen = 0

    def agreed(self) -> bool:
        """Whether every rank stops now (a collective: all ranks call it at the same point)."""
        received = {number for number, _ in _notices}
        local = torch.tensor([number in received for number in NOTICE_SIGNALS] + [self._out_of_time()],
                             dtype=torch.int64)
        *notices, wall = (int(value) for value in all_reduce_stats(local))
        # The signals any rank received, so rank 0's record names them even when only another rank got one.
        names = [number.name for number, count in zip(NOTICE_SIGNALS, notices) if count]
        if names:
            self.reason = "+".join(names)
        elif wall:
            self.reason = "max_wall_minutes"
        return self.reason is not None

    def _out_of_time(self) -> bool:
        now = time.monotonic()
        saved = sum(self.save_durations[self._saves_seen:])
        self._saves_seen = len(self.save_durations)
        previous, self._last_check = self._last_check, now
        if previous is None:
            return False
        self.longest_step = max(self.longest_step, now - previous - saved)
        if self.budget is None:
            return False
        reserve = self.save_durations[-1] if self.save_durations else FIRST_SAVE_RESERVE * self.budget
        return now - self.started + self.longest_step + reserve >= self.budget

    def finish(self, step: int, total_steps: int, *, save: Callable[[], Any], metrics: Any) -> None:
        """The loop ended before ``total_steps``: for ``stop_at_step`` say so; for a notice or the budget save
        this step (nothing when no step was ever trained), write the record and raise ``Preempted``."""
        if self.reason is None:
            logger.info("stopped at step %d of %d (stop_at_step); relaunch the same command to continue",
                        step, total_steps)
            return
        if step > 0:
            save()  # skipped by the checkpointer when this step's checkpoint is already complete
        now = time.monotonic()
        record = {"step": step, "preempted": True, "reason": self.reason,
                  "seconds_since_start": round(now - self.started, 3)}
        if _notices:
            record["notice_to_saved_seconds"] = round(now - _notices[0][1], 3)
            record["notices"] = len(_notices)
        metrics.write(record)
        if self.rank == 0:
            saved = f"checkpoint step-{step:08d} is complete" if step > 0 else "no step trained, nothing saved"
            logger.warning("preempted at step %d of %d (%s): %s; relaunch the same command to continue (exit "
                           "code %d)", step, total_steps, self.reason, saved, PREEMPTED_EXIT_CODE)
        raise Preempted(step, self.reason)
