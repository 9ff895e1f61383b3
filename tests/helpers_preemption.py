"""Helpers for the preemption tests: the processes of a real launch, waiting on files, the curve of a run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil

from conftest import Background, metrics


def ranks(job: Background) -> list[psutil.Process]:
    """The training processes of a launch (the launcher passes each its ``--local_rank``)."""
    children = psutil.Process(job.process.pid).children(recursive=True)
    return [child for child in children if any(arg.startswith("--local_rank") for arg in child.cmdline())]


def node_launcher(job: Background) -> psutil.Process:
    """The launcher's per-node process (deepspeed.launcher.launch), the parent of the ranks."""
    children = psutil.Process(job.process.pid).children(recursive=True)
    return next(child for child in children if "deepspeed.launcher.launch" in child.cmdline())


def signal_ranks(job: Background, number: int) -> list[psutil.Process]:
    found = ranks(job)
    assert len(found) == 2, found
    for process in found:
        process.send_signal(number)
    return found


def records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def has_record(output_dir: Path, step: int, key: str) -> bool:
    return any(record["step"] == step and key in record for record in records(output_dir))


def wait_until_gone(pgid: int, timeout: float = 120) -> None:
    """Wait until no process of the launch's session is left (the ranks outlive a killed runner)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"processes of group {pgid} still running after {timeout} s"
        time.sleep(0.05)


def curve(output_dir: Path) -> list[tuple]:
    """Every (step, loss, lr) and (step, eval_loss, accuracy) record in order; preemption records aside."""
    return [(r["step"], r["loss"], r["lr"]) if "loss" in r else (r["step"], r["eval_loss"], r["eval_accuracy"])
            for r in metrics(output_dir) if not r.get("preempted")]


def preempted(output_dir: Path) -> list[dict]:
    return [r for r in metrics(output_dir) if r.get("preempted")]
