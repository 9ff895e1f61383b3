#!/usr/bin/env python
"""Peak memory of tools/average_models.py against the size of one shard, on this machine.

    python benchmarks/average_memory.py [--shard_mb 256] [--shards 3] [--inputs 2 4] [--dtype bfloat16]

Writes ``max(--inputs)`` synthetic model folders (``--shards`` safetensors shards of about
``--shard_mb`` MB each, 4096 x 4096 tensors, an index, a config and a placeholder tokenizer) into a
temporary folder under ``--folder``, then averages the first N of them for each N of ``--inputs``,
each in a fresh process, and prints that process's peak resident memory above its resident memory
before averaging (``VmHWM`` - ``VmRSS``, both from /proc, so file pages that safetensors maps count
too). The claim checked: the peak is about one shard plus a few tensors, whatever N.
The folder is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SIDE = 4096

CHILD = """
import sys
sys.path.insert(0, {repo!r})
from cpt_ds.average import average_models

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

before = status("VmRSS")
average_models({inputs!r}, {output!r}, progress=lambda line: None)
print(status("VmHWM") - before)
"""


def write_inputs(root: Path, *, count: int, shards: int, shard_mb: int, dtype_name: str) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    per_shard = max(1, shard_mb * 2**20 // (SIDE * SIDE * dtype.itemsize))
    folders = []
    for index in range(count):
        folder = root / f"input-{index}"
        folder.mkdir()
        weight_map = {}
        generator = torch.Generator().manual_seed(index)
        for shard in range(shards):
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            state = {f"layers.{shard}.w{k}": torch.randn(SIDE, SIDE, generator=generator).to(dtype)
                     for k in range(per_shard)}
            save_file(state, folder / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(state, name))
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps({"model_type": "synthetic", "dtype": dtype_name}))
        (folder / "tokenizer.json").write_text("{}")
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard_mb", type=int, default=256)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--inputs", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--folder", default=tempfile.gettempdir())
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cpt_ds_average_bench_", dir=args.folder))
    try:
        inputs = write_inputs(root, count=max(args.inputs), shards=args.shards, shard_mb=args.shard_mb,
                              dtype_name=args.dtype)
        shard_bytes = max(p.stat().st_size for p in inputs[0].glob("*.safetensors"))
        tensor_bytes = SIDE * SIDE * 4
        print(f"{args.dtype}, shards of {shard_bytes / 2**20:.0f} MiB ({args.shards} per model), one float32 "
              f"tensor {tensor_bytes / 2**20:.0f} MiB")
        for count in args.inputs:
            output = root / f"average-{count}"
            code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]),
                                inputs=[str(p) for p in inputs[:count]], output=str(output))
            peak = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True).stdout.split()[-1])
            print(f"{count} inputs: peak {peak / 2**20:.0f} MiB above the start = {peak / shard_bytes:.2f} shards "
                  f"= 1 shard + {(peak - shard_bytes) / tensor_bytes:.1f} float32 tensors")
            shutil.rmtree(output)
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
