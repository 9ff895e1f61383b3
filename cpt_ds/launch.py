"""The deepspeed launch command, built in one place for the quick start, the tests and the benchmarks.

Two forms, both seen working on one machine (../shared/docs/CPU_DEEPSPEED.md):

- a hostfile with ``--no_ssh --node_rank K --master_addr ADDR``: the documented form, one launcher
  per node (the launcher would otherwise ssh to every hostfile entry, localhost included);
- ``--num_gpus N``: every visible GPU of this machine, no hostfile.

``python -m deepspeed.launcher.runner`` is the ``deepspeed`` command, without relying on PATH.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


def write_hostfile(path: Path, *, slots: int, num_nodes: int = 1) -> Path:
    """``localhost slots=N``, or for a simulated multi-node job one ``nodeK slots=N`` line per node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f"node{index}" for index in range(num_nodes)] if num_nodes > 1 else ["localhost"]
    lines = [f"{name} slots={slots}" for name in names]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def deepspeed_command(script: Path | str, args: Sequence[str] = (), *, master_port: int,
                      hostfile: Path | None = None, node_rank: int = 0, master_addr: str = LOOPBACK,
                      num_gpus: int | None = None) -> list[str]:
    """argv that runs ``script args`` on every slot of ``hostfile`` (this node: ``node_rank``), or on
    ``num_gpus`` local GPUs; exactly one of ``hostfile`` and ``num_gpus``."""
    if (hostfile is None) == (num_gpus is None):
        raise ValueError("deepspeed_command needs exactly one of hostfile= and num_gpus=")
    if hostfile is not None:
        placement = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                     "--master_addr", master_addr]
    else:
        placement = ["--num_gpus", str(num_gpus)]
    return [sys.executable, "-m", "deepspeed.launcher.runner", *placement, "--master_port", str(master_port),
            str(script), *args]


def local_command(script: Path | str, args: Sequence[str] = (), *, num_ranks: int, master_port: int,
                  folder: Path) -> list[str]:
    """``num_ranks`` ranks on this machine through ``folder/hostfile`` (written here)."""
    hostfile = write_hostfile(folder / "hostfile", slots=num_ranks)
    return deepspeed_command(script, args, master_port=master_port, hostfile=hostfile)
