"""The weighted average of exported Hugging Face model folders (several anneals of one stable checkpoint,
OLMo 2's "model soup"), one safetensors shard in memory at a time.

Every input is checked before anything is written: the same config.json (up to keys that name the
folder or the library, not the model), the same tensors (names, shapes, dtypes, floating point), the
same tokenizer (fingerprint of its files). Then, shard by shard of the first input's layout, each
output tensor is ``cast(sum_i w_i x float32(t_i))`` accumulated in input order, with ``w`` the given
weights divided by their sum, and written in the inputs' dtype. Peak memory is one output shard, one
float32 tensor and one input tensor, whatever the number of inputs: a 70B model averages in the
memory of one shard. The output is written to a temporary folder beside it and renamed when complete,
so an error leaves nothing half-written; it has the first input's shard layout and index, its
config.json, generation_config.json and tokenizer files, and a ``cpt_ds_export.json`` of kind
``average`` (the inputs and weights) by which ``--overwrite`` recognises it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cpt_ds.cli import UsageError
from cpt_ds.export import EXPORT_INFO
from cpt_ds.fileio import fsync_path, replace_folder
from cpt_ds.tokenizer import TokenizerError, tokenizer_files, tokenizer_fingerprint

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# config.json keys that say where or with what a folder was written, not what the model is; the dtype is
# compared per tensor instead, where a mismatch names the tensor.
IGNORED_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype"})
COPIED_FILES = ("config.json", "generation_config.json", INDEX_FILE)
FLOATING_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
AVERAGE_KIND = "average"


class AverageError(UsageError):
    """The inputs cannot be averaged, or the output cannot be written; the message names the folder and the fix."""


@dataclass(frozen=True)
class ModelFolder:
    """An input folder's weights as its headers describe them (no tensor data read)."""

    path: Path
    config: dict[str, Any]
    shards: dict[str, list[str]]
    """Shard file name -> the tensor names it holds, in the folder's own order."""
    tensors: dict[str, tuple[str, tuple[int, ...], str]]
    """Tensor name -> (shard file name, shape, safetensors dtype such as ``BF16``)."""
    tokenizer_fingerprint: str


# --------------------------------------------------------------------------------------------------
# Checks (nothing is written before all of them pass)
# --------------------------------------------------------------------------------------------------


def normalized_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """``weights`` divided by their sum (equal weights when None); refuses a wrong count, negative or
    non-finite values and a zero sum."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise AverageError(f"--weights gives {len(weights)} weight(s) for {count} input folders: give one per input")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise AverageError(f"--weights must be finite and >= 0, got {', '.join(map(str, bad))}")
    total = math.fsum(weights)
    if total <= 0:
        raise AverageError("--weights sum to 0: give at least one positive weight")
    return [w / total for w in weights]


def read_folder(path: Path) -> ModelFolder:
    """The config, tensor layout and tokenizer fingerprint of one exported model folder."""
    from safetensors import safe_open

    if not path.is_dir():
        raise AverageError(f"input {path} is not a folder; pass Hugging Face model folders (tools/export_hf.py)")
    if (path / "adapter_config.json").is_file():
        raise AverageError(f"input {path} is a LoRA adapter; export the merged model first "
                           "(tools/export_hf.py --merge_lora) and average those")
    if not (path / "config.json").is_file():
        raise AverageError(f"input {path} has no config.json; pass a Hugging Face model folder (tools/export_hf.py)")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    shards = _shard_names(path)
    tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for shard, names in shards.items():
        with safe_open(path / shard, framework="pt") as handle:
            held = set(handle.keys())
            missing = [name for name in names if name not in held]
            if missing:
                raise AverageError(f"{path / INDEX_FILE} places {missing[0]} in {shard}, which lacks it; the folder "
                                   "is damaged: export it again")
            for name in names:
                view = handle.get_slice(name)
                tensors[name] = (shard, tuple(view.get_shape()), view.get_dtype())
    try:
        fingerprint = tokenizer_fingerprint(path)
    except TokenizerError:
        raise AverageError(f"input {path} holds no tokenizer files; export it with tools/export_hf.py, which "
                           "copies the tokenizer") from None
    return ModelFolder(path=path, config=config, shards=shards, tensors=tensors, tokenizer_fingerprint=fingerprint)


def _shard_names(path: Path) -> dict[str, list[str]]:
    """Shard file -> tensor names: from the index when there is one, else the single file's header."""
    from safetensors import safe_open

    if (path / INDEX_FILE).is_file():
        weight_map: dict[str, str] = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        absent = sorted(shard for shard in shards if not (path / shard).is_file())
        if absent:
            raise AverageError(f"{path / INDEX_FILE} names {absent[0]}, which is not in {path}; export it again")
        return dict(sorted(shards.items()))
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as handle:
            return {SINGLE_FILE: list(handle.keys())}
    raise AverageError(f"input {path} has no {SINGLE_FILE} or {INDEX_FILE}; average safetensors exports "
                       "(tools/export_hf.py)")


def mismatch(first: ModelFolder, other: ModelFolder) -> str | None:
    """The first way ``other`` differs from ``first`` that forbids averaging them, as one sentence, or None."""
    ours = {k: v for k, v in first.config.items() if k not in IGNORED_CONFIG_KEYS}
    theirs = {k: v for k, v in other.config.items() if k not in IGNORED_CONFIG_KEYS}
    keys = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if keys:
        shown = ", ".join(f"{k} ({ours.get(k)!r} vs {theirs.get(k)!r})" for k in keys[:3])
        return (f"{other.path}/config.json differs from {first.path}/config.json in {shown}"
                f"{' and more' if len(keys) > 3 else ''}: average only models of one architecture")
    missing = sorted(first.tensors.keys() - other.tensors.keys())
    extra = sorted(other.tensors.keys() - first.tensors.keys())
    if missing or extra:
        name, where = (missing[0], f"is in {first.path} but not in {other.path}") if missing else \
            (extra[0], f"is in {other.path} but not in {first.path}")
        return f"tensor {name} {where}: average only models with the same weights"
    for name, (_, shape, dtype) in first.tensors.items():
        _, other_shape, other_dtype = other.tensors[name]
        if other_shape != shape:
            return (f"tensor {name} has shape {list(shape)} in {first.path} but {list(other_shape)} in {other.path}: "
                    "average only models of one shape")
        if other_dtype != dtype:
            return (f"tensor {name} is {dtype} in {first.path} but {other_dtype} in {other.path}: export every input "
                    "with the same --dtype")
    if other.tokenizer_fingerprint != first.tokenizer_fingerprint:
        return (f"{other.path} holds another tokenizer than {first.path} (fingerprint "
                f"{other.tokenizer_fingerprint[:12]} vs {first.tokenizer_fingerprint[:12]}): average only models "
                "trained with one tokenizer")
    return None


def check_output(output: Path, inputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse an output that is, holds or lies inside an input, or that exists and is not an earlier average
    (or is one, without ``overwrite``)."""
    target = output.resolve()
    for path in inputs:
        source = path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            relation = "is" if target == source else "lies inside" if target.is_relative_to(source) else "holds"
            raise AverageError(f"--output {output} {relation} input {path}; write the average to a folder of its own")
    if not output.exists() and not output.is_symlink():
        return
    if not overwrite:
        raise AverageError(f"--output {output} already exists; choose another folder or pass --overwrite")
    info = output / EXPORT_INFO
    kind = json.loads(info.read_text(encoding="utf-8")).get("kind") if info.is_file() else None
    if not output.is_dir() or output.is_symlink() or kind != AVERAGE_KIND:
        raise AverageError(f"--output {output} exists and is not an average written by tools/average_models.py; "
                           "--overwrite replaces only those: choose another folder")


# --------------------------------------------------------------------------------------------------
# Averaging
# --------------------------------------------------------------------------------------------------


def average_models(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                   weights: Sequence[float] | None = None, overwrite: bool = False,
                   progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> Path:
    """Write the weighted average of the model folders ``inputs`` to ``output`` (see the module docstring)."""
    paths, output = [Path(path) for path in inputs], Path(output)
    if len(paths) < 2:
        raise AverageError(f"averaging needs at least two input folders, got {len(paths)}")
    normalized = normalized_weights(weights, len(paths))
    check_output(output, paths, overwrite=overwrite)
    folders = [read_folder(path) for path in paths]
    for other in folders[1:]:
        problem = mismatch(folders[0], other)
        if problem:
            raise AverageError(problem)
    not_float = sorted(name for name, (_, _, dtype) in folders[0].tensors.items() if dtype not in FLOATING_DTYPES)
    if not_float:
        raise AverageError(f"tensor {not_float[0]} of {paths[0]} is {folders[0].tensors[not_float[0]][2]}, not "
                           "floating point: only floating-point weights can be averaged")

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        _write_average(folders, normalized, temporary, progress)
        replace_folder(temporary, output, output.with_name(f".{output.name}.old-{os.getpid()}"))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    progress(f"averaged {len(paths)} models with weights {', '.join(f'{w:.6g}' for w in normalized)} -> {output}")
    return output


def _write_average(folders: list[ModelFolder], weights: list[float], folder: Path,
                   progress: Callable[[str], None]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    def read(index: int, name: str) -> torch.Tensor:
        # One open per tensor: safe_open maps the whole shard, and pages it read stay resident (and count as
        # this process's memory) while it is open, so a handle kept per input would hold one shard per input.
        with safe_open(folders[index].path / folders[index].tensors[name][0], framework="pt") as handle:
            return handle.get_tensor(name)

    first = folders[0]
    for number, (shard, names) in enumerate(first.shards.items(), 1):
        averaged: dict[str, torch.Tensor] = {}
        for name in names:
            value = read(0, name)
            dtype, total = value.dtype, value.float().mul_(weights[0])  # float() of float32: the read tensor itself
            del value
            for index in range(1, len(folders)):
                total += read(index, name).float().mul_(weights[index])
            averaged[name] = total.to(dtype)  # the inputs' dtype (checked equal)
            del total
        with safe_open(first.path / shard, framework="pt") as handle:
            metadata = handle.metadata()
        save_file(averaged, folder / shard, metadata=metadata)
        fsync_path(folder / shard)
        size = sum(t.numel() * t.element_size() for t in averaged.values())
        del averaged
        progress(f"average: shard {number}/{len(first.shards)} {shard}: {len(names)} tensors, {size / 2**20:.1f} MiB")
    _copy_side_files(folders, weights, folder)


def _copy_side_files(folders: list[ModelFolder], weights: list[float], folder: Path) -> None:
    """The first input's config, generation config, index and tokenizer files, and the average's record."""
    first = folders[0].path
    for file in [*(first / name for name in COPIED_FILES if (first / name).is_file()), *tokenizer_files(first)]:
        shutil.copy2(file, folder / file.name)
    trained_with = {_export_info(f.path).get("document_attention") for f in folders}
    record = {"kind": AVERAGE_KIND, "dtype": folders[0].config.get("dtype", folders[0].config.get("torch_dtype")),
              "inputs": [str(f.path.resolve()) for f in folders], "weights": weights,
              # What tools/evaluate.py defaults to: the inputs' setting when they agree, else unknown.
              "document_attention": trained_with.pop() if len(trained_with) == 1 else None}
    (folder / EXPORT_INFO).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    fsync_path(folder)


def _export_info(path: Path) -> dict[str, Any]:
    info = path / EXPORT_INFO
    return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}
