#!/usr/bin/env python
"""Packing at scale: tokens/s and peak memory per process at three input sizes (1x, 4x, 16x), and a
pack killed half way then resumed.

    python benchmarks/pack_scale.py --tokenizer ../shared/llama3-tokenizer --work /tmp/pack_scale \\
        --sizes-mb 64 256 1024 [--workers 2] [--resume-size-mb 256]

The input is the same real text (the Chinese sample of cpt_ds/assets and Python's reference manual,
one document per line) repeated into 64 MB ``.txt`` files until each size is reached, under
``WORK/input_SIZE`` (never in git). Each size is packed by ``tools/pack_corpus.py`` in a fresh
process; while it runs, ``VmHWM`` (peak resident memory) of the packer and of every worker is read
from ``/proc`` four times a second, so the table gives each process's own peak, not a sum.
tokens/s is given three ways: the packer's steady state (tokens / time from the first chunk on, as
it logs it, which still holds the workers' encoder set-up and the final index), and between the
first and the last commit of the resumable state (``PREFIX.partial/state.json``, every 10 s) per
second of wall clock and per CPU-second of the packer's processes (from ``/proc/PID/stat``).

Resume: the pack of ``--resume-size-mb`` is started again and killed with SIGKILL as soon as its
committed state (``PREFIX.partial/state.json``) covers half of the input bytes; the same command then
finishes it. The resumed run's wall clock is compared with the full pack's, and its three output
files with the full pack's, byte for byte.

The machine may be shared: the CPU time other processes used during each run is reported as a
share of all cores (``/proc/stat`` minus this benchmark's own processes), so a slow row can be told
from a loaded machine, and tokens per CPU-second of the packer's own processes (the packer and its
workers, start-up included) is given beside the wall-clock rate: it does not depend on how much of
the machine the pack got.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pack_speed import busy_cpu_seconds, own_cpu_seconds  # noqa: E402

from cpt_ds.toy import chinese_documents, english_documents  # noqa: E402

FILE_MB = 64


def base_text() -> bytes:
    documents = [" ".join(text.split()) for text in chinese_documents() + english_documents(400)]
    return ("\n".join(d for d in documents if d) + "\n").encode("utf-8")


def make_input(folder: Path, size_mb: int) -> Path:
    """``size_mb`` MB of the base text repeated, in 64 MB files (whole lines); reused when present."""
    marker = folder / ".complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    text = base_text()
    per_file = FILE_MB << 20
    remaining = size_mb << 20
    index = 0
    while remaining > 0:
        target = min(per_file, remaining)
        repeats = max(1, target // len(text))
        (folder / f"part-{index:04d}.txt").write_bytes(text * repeats)
        remaining -= repeats * len(text)
        index += 1
    marker.write_text("")
    return folder


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (``/proc/PID/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_pack(inputs: Path, tokenizer: Path, output: Path, workers: int, *, kill_at: float | None = None,
             extra: tuple[str, ...] = ()) -> dict:
    """One pack_corpus.py run, watched; ``kill_at``: SIGKILL once the committed share of input bytes reaches it."""
    command = [sys.executable, str(REPO / "tools" / "pack_corpus.py"), "--input", str(inputs), "--tokenizer",
               str(tokenizer), "--output", str(output), "--workers", str(workers), "--no-progress", *extra]
    files = sorted(inputs.glob("*.txt"))
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    state_path = Path(f"{output}.partial") / "state.json"
    busy, own, started = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = output.parent / f"{output.name}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ},
                                   start_new_session=True)
        peaks: dict[int, float] = {}
        commits: list[tuple[float, int, float]] = []  # (time, committed tokens, CPU time of the packer's processes)
        killed_at = None
        while process.poll() is None:
            tree = process_tree(process.pid)
            for pid in tree:
                value = peak_rss_mb(pid)
                if value is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), value)
            try:
                committed = json.loads(state_path.read_text())["num_tokens"]
            except (OSError, ValueError, KeyError):
                committed = None
            if committed is not None and (not commits or committed != commits[-1][1]):
                commits.append((time.perf_counter(), committed, sum(cpu_seconds(pid) for pid in tree)))
            if kill_at is not None and state_path.exists():
                try:
                    state = json.loads(state_path.read_text())
                    position = state["position"]
                    done = sum(sizes[: position["file_index"]]) + position["byte"]
                except (OSError, ValueError, KeyError):
                    done = 0
                if done >= kill_at * total:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    killed_at = done / total
                    break
            time.sleep(0.25)
    wall = time.perf_counter() - started
    others = busy_cpu_seconds() - busy - (own_cpu_seconds() - own)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the packer and its workers (it waits for them)
    pack_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    text = log.read_text()
    if killed_at is None and process.returncode != 0:
        raise SystemExit(f"pack_scale: pack_corpus failed ({process.returncode}):\n{text[-3000:]}")
    result = {"wall": wall, "pack_cpu_s": pack_cpu, "others_share": others / (wall * os.cpu_count()),
              "killed_at": killed_at,
              "main_rss_mb": peaks.get(process.pid, 0.0),
              "worker_rss_mb": max((v for p, v in peaks.items() if p != process.pid), default=0.0)}
    if len(commits) >= 2:
        # Between the first and the last commit seen: no start-up, no final index and renames.
        (t0, n0, c0), (t1, n1, c1) = commits[0], commits[-1]
        result.update(window_s=t1 - t0, window_tokens_per_s=(n1 - n0) / (t1 - t0),
                      window_tokens_per_cpu_s=(n1 - n0) / max(c1 - c0, 1e-9))
    logged = re.search(r"packed (\d+) documents, (\d+) tokens in ([0-9.]+) s; encoded in ([0-9.]+) s", text)
    if logged:
        result.update(documents=int(logged.group(1)), tokens=int(logged.group(2)),
                      steady_tokens_per_s=int(logged.group(2)) / float(logged.group(4)),
                      tokens_per_cpu_s=int(logged.group(2)) / max(pack_cpu, 1e-9))
    return result


def digest(prefix: Path) -> dict[str, str]:
    return {s: hashlib.sha256(Path(f"{prefix}{s}").read_bytes()).hexdigest() for s in (".bin", ".idx", ".json")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "llama3-tokenizer")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pack_scale"))
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--resume-size-mb", type=int, default=None, help="default: the second size")
    parser.add_argument("--checkpoint-seconds", type=float, default=None,
                        help="pack_corpus.py --checkpoint-seconds (default: the packer's own)")
    args = parser.parse_args()
    resume_size = args.resume_size_mb or args.sizes_mb[min(1, len(args.sizes_mb) - 1)]
    rows, full = [], {}
    checkpoint = () if args.checkpoint_seconds is None else ("--checkpoint-seconds", str(args.checkpoint_seconds))
    for size in args.sizes_mb:
        inputs = make_input(args.work / f"input_{size}", size)
        output = args.work / "out" / f"full_{size}"
        output.parent.mkdir(parents=True, exist_ok=True)
        result = run_pack(inputs, args.tokenizer, output, args.workers, extra=("--overwrite",))
        result["size_mb"] = size
        rows.append(result)
        full[size] = (output, result)
        print(json.dumps(result), file=sys.stderr, flush=True)

    inputs = args.work / f"input_{resume_size}"
    output = args.work / "out" / f"resumed_{resume_size}"
    for suffix in (".bin", ".idx", ".json"):
        Path(f"{output}{suffix}").unlink(missing_ok=True)
    killed = run_pack(inputs, args.tokenizer, output, args.workers, kill_at=0.5, extra=("--no-resume", *checkpoint))
    if killed["killed_at"] is None:
        raise SystemExit("pack_scale: the pack finished before its state reached half of the input; use a larger "
                         "--resume-size-mb or a smaller --checkpoint-seconds")
    resumed = run_pack(inputs, args.tokenizer, output, args.workers, extra=checkpoint)
    print(json.dumps({"killed": killed, "resumed": resumed}), file=sys.stderr, flush=True)
    full_output, full_result = full[resume_size]
    identical = digest(output) == digest(full_output)

    print(f"\n{args.workers} workers, tokenizer {args.tokenizer}, {os.cpu_count()} cores\n")
    print("| input | documents | tokens | wall s | tokens/s (steady) | tokens/s (between commits) "
          "| tokens per CPU-s (between commits) | peak RSS main | peak RSS worker (max) | others' CPU share |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size_mb']:,} MB | {row.get('documents', 0):,} | {row.get('tokens', 0):,} | {row['wall']:.1f} "
              f"| {row.get('steady_tokens_per_s', 0) / 1e6:.2f} M | {row.get('window_tokens_per_s', 0) / 1e6:.2f} M "
              f"| {row.get('window_tokens_per_cpu_s', 0) / 1e6:.2f} M | {row['main_rss_mb']:.0f} MB "
              f"| {row['worker_rss_mb']:.0f} MB | {100 * row['others_share']:.0f}% |")
    base = rows[0]
    # Rates between the first and the last commit leave out the fixed start-up and the final index; on a
    # shared machine the wall-clock rate also follows the CPU share the pack got, tokens per CPU-second not.
    rate_spread = max(abs(r.get("window_tokens_per_s", 0) / base.get("window_tokens_per_s", 1) - 1) for r in rows)
    cpu_spread = max(abs(r.get("window_tokens_per_cpu_s", 0) / base.get("window_tokens_per_cpu_s", 1) - 1)
                     for r in rows)
    rss = [max(r["main_rss_mb"], r["worker_rss_mb"]) for r in rows]
    rss_spread = max(abs(r["main_rss_mb"] / base["main_rss_mb"] - 1) for r in rows)
    worker_spread = max(abs(r["worker_rss_mb"] / base["worker_rss_mb"] - 1) for r in rows)
    ratio = resumed["wall"] / full_result["wall"]
    print(f"\nresume at {resume_size:,} MB: killed at {100 * killed['killed_at']:.0f}% of the input bytes "
          f"(after {killed['wall']:.1f} s); the same command then took {resumed['wall']:.1f} s = {ratio:.2f}x the "
          f"full pack's {full_result['wall']:.1f} s; output {'byte-identical' if identical else 'DIFFERENT'} "
          "(.bin, .idx, .json)")
    checks = [
        (f"tokens/s flat within 10% (largest deviation {100 * rate_spread:.1f}%)", rate_spread <= 0.10),
        (f"tokens per CPU-second flat within 10% (largest deviation {100 * cpu_spread:.1f}%)", cpu_spread <= 0.10),
        (f"peak RSS flat within 10% (main {100 * rss_spread:.1f}%, workers {100 * worker_spread:.1f}%)",
         rss_spread <= 0.10 and worker_spread <= 0.10),
        (f"every process under 2 GB (largest {max(rss):.0f} MB)", max(rss) < 2048),
        (f"resumed pack at most 0.6x of a full pack ({ratio:.2f}x)", ratio <= 0.6),
        ("resumed output byte-identical", identical),
    ]
    print()
    for what, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'}: {what}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
