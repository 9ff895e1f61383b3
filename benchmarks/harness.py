"""What the benchmarks share: launching 1 or 2 CPU ranks, each rank's peak memory, the side-by-side table.

- :func:`launch` runs a script on ranks through cpt_ds/launch.py's deepspeed command (hostfile, no
  ssh, a free port, DeepSpeed's /dev/shm buffers removed afterwards); with ``peak_rss=True`` every
  rank runs under this file, which records the rank's peak resident set (``VmHWM``, the whole
  process, start-up included) from an atexit handler (train.py ends through ``exit_process``, which
  runs atexit handlers before skipping finalization):

      python benchmarks/harness.py --peak_rss_out 'DIR/label.rss.rank{rank}.json' -- SCRIPT ARGS...

- :class:`EvalMemoryProbe`: the peak resident-set growth over a ``with`` block (the eval-memory
  launches' rank scripts import it);
- :func:`print_side_by_side` and :func:`print_targets`: cpt-ds against the baseline with ratios, and
  the targets as met or not.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve()
# Benchmarks import this module first: cpt_ds then comes from this checkout, installed or not.
sys.path.insert(0, str(REPO))


class BenchmarkError(RuntimeError):
    """A launch or a measurement failed; the message says which and where its log is."""


# --------------------------------------------------------------------------------------------------
# Memory of this process, as the kernel counts it
# --------------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now, VmHWM: peak since start or the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchmarkError(f"/proc/self/status has no {field} line; the memory probes need Linux")


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the kernel, so that eval allocations which would otherwise
    reuse memory freed by training show up as resident-set growth (no-op on a libc without it)."""
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc's among them
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


class EvalMemoryProbe:
    """Peak resident-set growth of this process over a ``with`` block, as the kernel counts it.

    Unlike sampling, the kernel's high-water mark cannot miss a short peak; unlike tracemalloc, it sees
    torch's allocations. Resetting it needs Linux >= 4.0 (``echo 5 > /proc/self/clear_refs``).
    """

    def __enter__(self) -> EvalMemoryProbe:
        _release_free_heap()
        Path("/proc/self/clear_refs").write_text("5")
        self.before_kib = status_kib("VmRSS")
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak_kib = status_kib("VmHWM")

    def as_dict(self) -> dict[str, float]:
        return {"rss_before_kib": self.before_kib, "peak_rss_kib": self.peak_kib,
                "growth_kib": self.peak_kib - self.before_kib, "eval_seconds": self.seconds}


def check_probe_supported() -> None:
    """Fail in a second, not after the training launches, where the peak cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        raise BenchmarkError(f"the eval-memory probe resets the peak RSS through /proc/self/clear_refs "
                             f"(Linux >= 4.0), which failed here: {error}") from None


# --------------------------------------------------------------------------------------------------
# Launching ranks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launched:
    seconds: float
    """Wall seconds of the whole launch, start-up included."""
    peak_rss_mib: list[float] | None
    """Each rank's peak resident set (``peak_rss=True`` launches), in rank order."""


def launch(label: str, script: Path, args: list[str], work: Path, *, num_ranks: int = 2, peak_rss: bool = False,
           exact_rss: bool = False, timeout: float = 900) -> Launched:
    """Run ``script args`` on ``num_ranks`` CPU ranks into ``work/label.log``; raises BenchmarkError on failure.

    ``exact_rss`` (eval-memory launches only, both sides alike) fixes glibc's mmap threshold at 64 KiB.
    By default glibc raises that threshold after the first large free, so blocks freed by training stay
    in the heap and later allocations land in whichever of them fits: the resident set then grows with
    every batch that touches another old block (measured here: +1 KB per eval token on *both* sides, with
    constant live memory). With a fixed threshold every tensor-sized block is mmap'd and unmapped on
    free, so the resident set follows live memory. The speed launches keep glibc's defaults.
    """
    from cpt_ds.distributed import free_port, remove_shm_buffers
    from cpt_ds.launch import local_command

    rss_pattern = work / f"{label}.rss.rank{{rank}}.json"
    if peak_rss:
        script, args = HARNESS, ["--peak_rss_out", str(rss_pattern), "--", str(script), *args]
    port = free_port()
    command = local_command(script, args, num_ranks=num_ranks, master_port=port, folder=work)
    env = dict(os.environ, DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank: 2 ranks on 2 cores, the same for both sides
    if exact_rss:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    log = work / f"{label}.log"
    print(f"  {label} ...", end="", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        # Its own session, so that a timeout or Ctrl-C ends the launcher and every rank together.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"{label} did not finish in {timeout:.0f} s; see {log}") from None
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            remove_shm_buffers(port)
    seconds = time.perf_counter() - started
    print(f" {seconds:.0f} s", flush=True)
    if returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BenchmarkError(f"{label} failed with exit {returncode}; last lines of {log}:\n{tail}")
    return Launched(seconds, _read_peaks(rss_pattern, num_ranks) if peak_rss else None)


def _read_peaks(pattern: Path, num_ranks: int) -> list[float]:
    files = [Path(str(pattern).format(rank=rank)) for rank in range(num_ranks)]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise BenchmarkError(f"a rank wrote no peak-RSS file: {', '.join(missing)} missing")
    return [json.loads(file.read_text())["peak_rss_kib"] / 1024 for file in files]


def run_with_peak_rss(argv: list[str]) -> None:
    """The rank side of ``peak_rss=True``: run SCRIPT as ``__main__``, write the peak when the process exits."""
    separator = argv.index("--")
    out = argv[argv.index("--peak_rss_out") + 1]
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


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


Row = tuple[str, str, str, str]
"""``(measure, cpt-ds, baseline, cpt-ds / baseline)`` of the side-by-side table."""


def ratio_text(ours: float, baseline: float) -> str:
    return f"{ours / baseline:.2f}x" if baseline > 0 else "-"


def side_row(name: str, ours: float, baseline: float, fmt: str, *, ratio: bool = True) -> Row:
    """One row, both numbers in format ``fmt``."""
    return name, format(ours, fmt), format(baseline, fmt), ratio_text(ours, baseline) if ratio else ""


def print_side_by_side(rows: list[Row], *, baseline: str = "baseline (HF Trainer)") -> None:
    """The rows as one markdown table."""
    print(f"| measure | cpt-ds | {baseline} | cpt-ds / baseline |")
    print("|---|---:|---:|---:|")
    for name, ours, theirs, ratio in rows:
        print(f"| {name} | {ours} | {theirs} | {ratio} |")


def print_targets(rows: list[tuple[str, str, bool | str]]) -> None:
    """``(target, measured, met)`` rows: a bool prints as yes / NO, a string (a reference row) as it is."""
    print("\n| target | measured | met |")
    print("|---|---:|---|")
    for target, measured, met in rows:
        print(f"| {target} | {measured} | {met if isinstance(met, str) else ('yes' if met else 'NO')} |")


if __name__ == "__main__":
    run_with_peak_rss(sys.argv[1:])
