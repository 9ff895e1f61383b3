"""Test driver for the rank pool itself: what one job leaves behind must not reach the next.

    deepspeed ... tests/drivers/pool_probe.py MODE

Modes: ``report`` prints this rank's view (environment probe, folder, warnings shown), ``fail-rank-1``
exits 3 on rank 1 while rank 0 waits in a barrier rank 1 never joins, ``crash-rank-1`` kills rank 1's
process outright.
"""

import os
import sys
import warnings

import torch.distributed as dist

from cpt_ds.distributed import exit_process, init_distributed


def main() -> int:
    mode = sys.argv[-1]
    rank, _, _ = init_distributed()
    if mode == "report":
        # One write per line: both ranks share the launcher's stdout, and print()'s separate write of the
        # newline let the other rank's line land in between (seen with the suite on two workers).
        sys.stdout.write(f"rank {rank}: probe={os.environ.get('CPT_DS_POOL_PROBE', '-')} "
                         f"leftover={os.environ.get('CPT_DS_POOL_PROBE_LEFTOVER', '-')} cwd={os.getcwd()}\n")
        sys.stdout.flush()
        os.environ["CPT_DS_POOL_PROBE_LEFTOVER"] = "set by an earlier job"
        # "once" warnings are remembered process-wide; a fresh launch shows this one every time.
        warnings.filterwarnings("once", message="pool probe warning")
        warnings.warn("pool probe warning", UserWarning)
        return 0
    if mode == "fail-rank-1":
        if rank == 1:
            print("rank 1 fails", flush=True)
            return 3
        dist.barrier()
        return 0
    if mode == "crash-rank-1":
        if rank == 1:
            os._exit(9)
        dist.barrier()
        return 0
    raise ValueError(mode)


if __name__ == "__main__":
    exit_process(main())
