"""Run a Python script as ``__main__`` and, when it exits, write this process's peak resident set.

    python benchmarks/_peak_rss.py --out 'DIR/label.rank{rank}.json' -- SCRIPT ARGS...

Used by benchmarks/train_memory.py to measure both sides the same way: the kernel's high-water mark
of the whole rank process (``VmHWM``, start-up included), written from an atexit handler (train.py
ends through ``exit_process``, which runs atexit handlers before skipping finalization).
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; the probe needs Linux")


def main() -> None:
    argv = sys.argv[1:]
    separator = argv.index("--")
    out = argv[argv.index("--out") + 1]
    script, args = argv[separator + 1], argv[separator + 2:]
    rank = os.environ.get("RANK", "0")

    def write() -> None:
        Path(out.format(rank=rank)).write_text(json.dumps({"rank": int(rank), "peak_rss_kib": status_kib("VmHWM")}))

    atexit.register(write)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code not in (0, None):
            raise


if __name__ == "__main__":
    main()
