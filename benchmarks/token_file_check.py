#!/usr/bin/env python
"""What checking a token file before training costs per GB (cpt_ds/token_check.py), on this machine.

    python benchmarks/token_file_check.py [--gb 1.5] [--dtype int32] [--folder /tmp]

Writes one token file of about ``--gb`` GB of random ids (LLaMA-3's 128,256-id vocabulary for int32,
2,048 for uint16) into a temporary folder under ``--folder``, then times, in seconds per GB of
``.bin``: the sha256 read of a file whose sidecar records its largest id, the sha256 + min/max
read of an older sidecar without it, the min/max-only scan of a plain Megatron file, and the
cached path a later start takes. The page cache is warm after the write,
so the figures are the CPU cost (a cold file adds its disk read time). The file is deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from cpt_ds.pack.writer import IndexedTokenWriter  # noqa: E402
from cpt_ds.token_check import check_ids, scan  # noqa: E402
from cpt_ds.token_file import IndexedTokenFile  # noqa: E402


def write_file(prefix: Path, num_bytes: int, dtype: np.dtype, vocab: int) -> None:
    rng = np.random.default_rng(0)
    per_document = 4096
    block_documents = 1024
    num_tokens = num_bytes // dtype.itemsize
    with IndexedTokenWriter(prefix, dtype=dtype) as writer:
        written = 0
        while written < num_tokens:
            count = min(per_document * block_documents, num_tokens - written)
            tokens = rng.integers(0, vocab, size=count, dtype=np.int64).astype(dtype)
            lengths = np.full(count // per_document, per_document, dtype=np.int64)
            if count % per_document:
                lengths = np.append(lengths, count % per_document)
            writer.add_documents(tokens, lengths)
            written += count
        writer.finalize({"vocab_size": vocab})


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.5)
    parser.add_argument("--dtype", choices=("int32", "uint16"), default="int32")
    parser.add_argument("--folder", default="/tmp")
    args = parser.parse_args()
    dtype = np.dtype(args.dtype)
    vocab = 128256 if dtype == np.int32 else 2048
    with tempfile.TemporaryDirectory(dir=args.folder, prefix="token_check_bench_") as folder:
        prefix = Path(folder) / "corpus"
        write_file(prefix, int(args.gb * 1e9), dtype, vocab)
        file = IndexedTokenFile(prefix)
        gb = file.bin_path.stat().st_size / 1e9
        data = file.iter_chunks(1 << 24)
        raw = timed(lambda: [hashlib.sha256(chunk).digest() for chunk in data])
        sidecar = timed(lambda: scan(file, hash_data=True, find_range=False))
        full = timed(lambda: scan(file, hash_data=True))
        plain = timed(lambda: scan(file, hash_data=False))
        first = timed(lambda: check_ids(IndexedTokenFile(prefix), vocab))
        cached = timed(lambda: check_ids(IndexedTokenFile(prefix), vocab))
        print(f"{gb:.2f} GB {dtype.name} token file (page cache warm), seconds per GB:")
        print(f"  sha256 alone                          {raw / gb:8.3f}")
        print(f"  sha256 via scan (sidecar with max id) {sidecar / gb:8.3f}")
        print(f"  sha256 + min/max (sidecar without)    {full / gb:8.3f}")
        print(f"  min/max scan (plain Megatron file)    {plain / gb:8.3f}")
        print(f"  check_ids, first start (reads, caches) {first / gb:7.3f}")
        print(f"  check_ids, cached (later starts)      {cached / gb:8.5f}  ({cached * 1e3:.2f} ms per file)")


if __name__ == "__main__":
    main()
