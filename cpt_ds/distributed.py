"""Process-group setup, rank helpers and the one logging setup (rank 0 speaks, others warn)."""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int, int]:
    """Join the process group started by the deepspeed launcher (or torchrun); ``(rank, world, local_rank)``.

    A plain ``python train.py`` is a world of one. gloo on CPU, NCCL on CUDA.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size(), local_rank


@dataclass(frozen=True)
class Layout:
    """Where a rank sits. Groups of ``sp_size`` consecutive ranks share each sample (sequence
    parallelism, each holding 1/sp_size of its tokens); the groups are the data-parallel replicas.
    Consecutive ranks, as DeepSpeed's ``parallel_state_sp`` builds its groups."""

    rank: int
    world_size: int
    sp_size: int = 1

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size


def sequence_parallel_groups(sp_size: int) -> Any:
    """DeepSpeed's sequence-parallel state (``parallel_state_sp``, the ``mpu`` deepspeed.initialize takes)
    with groups of ``sp_size`` consecutive ranks; collective: every rank calls it."""
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as state

    # Groups from an earlier run in this process (a test's rank pool) belong to that run.
    state._release_sequence_parallel_groups()
    state.initialize_sequence_parallel(sequence_parallel_size=sp_size)
    return _NoTensorParallel(state)


class _NoTensorParallel:
    """``parallel_state_sp`` reporting tensor-parallel size 1. Its ``get_model_parallel_*`` alias the
    sequence-parallel group, so DeepSpeed 0.19.8 records ``tp_degree`` N in each checkpoint while
    writing one model file, and converting it to the universal format (to resume on another number of
    ranks) fails with "model-state file count 1 does not match pp_degree=1 * tp_degree=2"."""

    def __init__(self, state: Any):
        self._state = state

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_rank(self) -> int:
        return 0


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere, one format; quiets DeepSpeed's per-step chatter."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("cpt_ds").setLevel(level)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that may have joined a process group: every distributed entry point ends here.

    gloo's worker threads drop their references to a collective's tensors after the caller has moved
    on, and DeepSpeed keeps the process group alive past ``destroy_process_group``. A worker that drops
    a Python-owned tensor while the interpreter finalizes cannot take the GIL, is forced to exit, and
    ``std::terminate`` aborts the rank, so the launcher reports -6 instead of the real exit code (seen
    in about one of three error exits right after a checkpoint check). Skipping finalization removes
    the race. What a normal exit does before finalizing still runs: the atexit handlers (logging's
    flush, a DeepSpeed monitor's wandb/comet finish) and the flush of stdout and stderr.
    """
    destroy_process_group()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a no-op in a single process)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def free_port() -> int:
    """A TCP port free on loopback right now, for a launch's --master_port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def remove_shm_buffers(master_port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves 132 MiB of /dev/shm per port, even after a clean exit."""
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{master_port}_*"):
        leftover.unlink(missing_ok=True)
