"""The per-step cost of the preemption agreement: ``Stopper.agreed()`` (one all-reduce of three int64)
on 2 CPU ranks (gloo), against the all-reduce of the step's own statistics it sits beside.

    python benchmarks/preemption_agreement.py [--calls 2000]

Launches itself on 2 ranks through the deepspeed launcher; rank 0 prints microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_call_microseconds(call, calls: int) -> float:
    from cpt_ds.distributed import barrier

    for _ in range(50):  # warm-up: gloo's first collectives set up buffers
        call()
    barrier()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return 1e6 * (time.perf_counter() - started) / calls


def rank_main(calls: int) -> None:
    import torch

    from cpt_ds.distributed import destroy_process_group, init_distributed
    from cpt_ds.metrics import all_reduce_stats
    from cpt_ds.preemption import Stopper, install_handlers

    rank, world, _ = init_distributed()
    install_handlers()
    stopper = Stopper(60.0, save_durations=[], rank=rank)
    agreement = per_call_microseconds(stopper.agreed, calls)
    step_stats = torch.zeros(2, 3, dtype=torch.int64)  # a one-corpus step's [loss, correct, tokens] + flags row
    stats = per_call_microseconds(lambda: all_reduce_stats(step_stats), calls)
    if rank == 0:
        print(f"RESULT {world} ranks, {calls} calls: agreement {agreement:.1f} us/step; "
              f"the step's own stats all-reduce {stats:.1f} us", flush=True)
    destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.rank or "LOCAL_RANK" in os.environ:
        rank_main(args.calls)
        return
    from harness import launch

    work = Path(tempfile.mkdtemp(prefix="cpt_ds_agreement_"))
    launch("agreement", Path(__file__).resolve(), ["--rank", "--calls", str(args.calls)], work)
    print(next(line for line in (work / "agreement.log").read_text().splitlines() if "RESULT" in line))


if __name__ == "__main__":
    main()
