"""Crash-safe checkpoints and exact resume on top of DeepSpeed's engine checkpoints.

DeepSpeed stores module, optimizer and its step counters, but no RNG and no data position, and
writes ``latest`` before the other ranks finish (../shared/docs/RELIABILITY.md). Here a checkpoint
``output_dir/step-NNNNNNNN/`` is:

- DeepSpeed's files (``engine.save_checkpoint(..., save_latest=False)``) with our client state
  (step, consumed_samples, fingerprints, world size, run config);
- ``rng_state_<rank>.pt`` per rank (python, numpy, torch, cuda) as tensors and plain values only, so it
  loads with ``torch.load(weights_only=True)``; written via temp + rename;
- ``cpt_ds_complete.json``, the completeness marker, written last by rank 0 after every rank has
  written and fsynced its files and passed a barrier. It lists every file with size and sha256.

A folder without the marker does not exist for resume and is deleted by the next save. ``latest``
(DeepSpeed's own format, so zero_to_fp32 and friends keep working) moves only after the marker.

Loading (``Checkpointer.load``) also repairs what DeepSpeed's ZeRO-3 universal load gets wrong and checks
that a non-strict (LoRA) load really found every trainable tensor. The rules about which checkpoint a
run may resume from live in cpt_ds/resume.py.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpt_ds import __version__
from cpt_ds.distributed import all_gather_object, barrier, broadcast_object
from cpt_ds.fileio import atomic_write_text, fsync_path, sha256_file

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "cpt_ds_complete.json"
LATEST_FILE = "latest"
UNIVERSAL_DIR = "universal"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
FORMAT_VERSION = 1
"""The completion marker's format."""
CLIENT_FORMAT_VERSION = 1
"""The format of our client state (``client_state["cpt_ds"]`` in DeepSpeed's model-states file)."""
MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # the same under ZeRO-3


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message names it and the fix."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is incomplete (no {COMPLETE_MARKER}: its save was interrupted); "
                              "resume from an earlier checkpoint or use resume_from_checkpoint auto") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / COMPLETE_MARKER} is not valid JSON ({error}); the checkpoint is corrupt") from None


def check_format_version(file: Path, found: Any, supported: int) -> None:
    """Refuse a file written in a format this cpt-ds does not read (a newer cpt-ds, or not ours)."""
    if found != supported:
        raise CheckpointError(f"{file} has format_version {found!r}, but cpt-ds {__version__} reads format_version "
                              f"{supported}; resume or export it with the cpt-ds version that wrote it")


def read_checked_marker(path: Path) -> dict[str, Any]:
    """The completion marker of ``path``, refused unless it is complete and in a format we read."""
    marker = read_marker(path)
    check_format_version(path / COMPLETE_MARKER, marker.get("format_version"), FORMAT_VERSION)
    return marker


def damaged_files(path: Path, marker: dict[str, Any], *, hashed: Callable[[str], bool]) -> list[str]:
    """What differs from the marker's record: each file missing, of another size, or (for the names
    ``hashed`` accepts) of another sha256; one phrase per file, naming it."""
    errors = []
    for name, expected in sorted(marker["files"].items()):
        file = path / name
        if not file.is_file():
            errors.append(f"{file} is missing")
            continue
        size = file.stat().st_size
        if size != expected["bytes"]:
            errors.append(f"{file} is {size} bytes, {expected['bytes']} when saved (truncated or replaced)")
        elif hashed(name) and (digest := sha256_file(file)) != expected["sha256"]:
            errors.append(f"{file} has sha256 {digest[:12]}..., {expected['sha256'][:12]}... when saved (corrupted)")
    return errors


def verified_marker(path: Path) -> dict[str, Any]:
    """The marker of ``path`` after checking every file it lists, sizes and sha256 (one process reads all)."""
    marker = read_checked_marker(path)
    errors = damaged_files(path, marker, hashed=lambda name: True)
    if errors:
        raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(errors)
                              + "; export another checkpoint of the run (or copy this one again)")
    return marker


def client_state_file(path: Path) -> Path:
    """The DeepSpeed file of checkpoint ``path`` that holds the client state (rank 0's model states)."""
    zero3 = path / ZERO3_MODEL_STATES_FILE
    return zero3 if zero3.is_file() else path / MODEL_STATES_FILE


def saved_client_state(path: Path) -> dict[str, Any]:
    """Our client state in checkpoint ``path`` (read without loading DeepSpeed), format checked."""
    file = client_state_file(path)
    if not file.is_file():
        raise CheckpointError(f"{path} has no {MODEL_STATES_FILE} or {ZERO3_MODEL_STATES_FILE}; pass a "
                              "step-NNNNNNNN folder written by train.py")
    # mmap: the file may hold the whole model (ZeRO-0/1/2); only the small client state is read.
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    if "cpt_ds" not in state:
        raise CheckpointError(f"{file} holds no cpt-ds client state; it was not written by train.py")
    check_format_version(file, state["cpt_ds"].get("format_version"), CLIENT_FORMAT_VERSION)
    return state["cpt_ds"]


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All ``step-NNNNNNNN`` folders (complete or not), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _step_of(path: Path) -> int:
    """The step of a ``step-NNNNNNNN`` folder; -1 for a folder named otherwise."""
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def newest_complete(output_dir: Path) -> Path | None:
    complete = [path for _, path in list_checkpoints(output_dir) if is_complete(path)]
    return complete[-1] if complete else None


def _owned_by(name: str, rank: int) -> bool:
    """Whether ``rank`` wrote (and so hashes and verifies) file ``name`` of a DeepSpeed checkpoint.

    DeepSpeed names per-rank files ``..._rank_<r>_...``; everything else (``mp_rank_00_model_states.pt``,
    our marker) belongs to rank 0.
    """
    match = re.search(r"(?:pp_rank|rng_state)_(\d+)", name)
    return int(match.group(1)) == rank if match else rank == 0


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    # numpy's key is a uint32 array; int64 holds it exactly and torch.load(weights_only=True) accepts it.
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    random.setstate(state["python"])
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Checkpoints written before the RNG state was stored as tensors hold numpy's key as a pickled uint32
# array; these are exactly the globals that rebuild one (no code beyond numpy's array constructor).
# numpy 2 moved numpy.core to numpy._core: a file pickled under numpy 1.x names the old module.
_MULTIARRAY = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
_OLD_NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _MULTIARRAY._reconstruct,
                          (_MULTIARRAY._reconstruct, "numpy.core.multiarray._reconstruct")]


def load_rng_file(file: Path) -> dict[str, Any]:
    """An ``rng_state_<rank>.pt``, loaded with ``weights_only=True`` (old files: plus numpy's uint32 array)."""
    try:
        with torch.serialization.safe_globals(_OLD_NUMPY_RNG_GLOBALS):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f"{file} holds objects other than tensors and RNG states ({str(error).splitlines()[-1]}); "
                              "it was not written by cpt-ds: resume from another checkpoint") from None


# --------------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, output_dir: str | os.PathLike, *, rank: int, world_size: int,
                 save_total_limit: int | None = None, fault_delay_seconds: float = 0.0):
        self.output_dir = Path(output_dir)
        self.rank = rank
        self.world_size = world_size
        self.save_total_limit = save_total_limit
        self.fault_delay_seconds = fault_delay_seconds
        self.save_durations: list[float] = []  # seconds per save of this process (the wall-clock stop's reserve)

    # ---- save ------------------------------------------------------------------------------------

    def save(self, engine: Any, step: int, client_state: dict[str, Any], *, exclude_frozen: bool,
             write_extra: Callable[[Path], None] | None = None) -> Path:
        """Save step ``step`` on all ranks; returns the folder once it is complete everywhere.

        ``write_extra(folder)`` runs on rank 0 after DeepSpeed's files, for what export needs beyond
        weights; its files are covered by the marker like every other file.
        """
        name = checkpoint_name(step)
        path = self.output_dir / name
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        already = broadcast_object(is_complete(path) if self.rank == 0 else None)
        if already:
            # Same step, same state (e.g. the run resumed from here and ends here): keep the proven copy.
            logger.info("checkpoint %s is already complete; not saving it again", path)
            return path
        if self.rank == 0 and path.exists():
            logger.warning("removing incomplete checkpoint %s left by an interrupted save", path)
            shutil.rmtree(path)
        barrier()
        started = time.monotonic()
        engine.save_checkpoint(str(self.output_dir), tag=name, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=exclude_frozen)
        if self.rank == 0 and write_extra is not None:
            write_extra(path)
        rng_file = path / f"rng_state_{self.rank}.pt"
        temporary = rng_file.with_name(rng_file.name + ".tmp")
        torch.save(rng_state(), temporary)
        os.replace(temporary, rng_file)
        if self.fault_delay_seconds:
            # Fault injection (tests): a window in which the shards exist but the marker does not.
            logger.warning("save_fault_delay_seconds: sleeping %.1f s before completing %s",
                           self.fault_delay_seconds, path)
            time.sleep(self.fault_delay_seconds)
        barrier()  # every rank's DeepSpeed files exist before any rank lists the folder
        own = {}
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path).as_posix()
            if file.is_file() and _owned_by(relative, self.rank):
                fsync_path(file)
                own[relative] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
        files: dict[str, Any] = {}
        for part in all_gather_object(own):
            files.update(part)
        barrier()
        if self.rank == 0:
            fsync_path(path)
            marker = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                      "consumed_samples": client_state["cpt_ds"]["data"]["consumed_samples"],
                      "fingerprints": client_state["cpt_ds"]["fingerprints"], "files": files}
            atomic_write_text(path / COMPLETE_MARKER, json.dumps(marker, indent=2, sort_keys=True) + "\n")
            atomic_write_text(self.output_dir / LATEST_FILE, name)
            logger.info("saved checkpoint %s (%d files, %.1f s)", path, len(files), time.monotonic() - started)
        barrier()
        if self.rank == 0:
            self._rotate(keep=path)
        barrier()
        self.save_durations.append(time.monotonic() - started)
        return path

    def _rotate(self, keep: Path) -> None:
        """Delete incomplete folders and complete ones beyond ``save_total_limit`` (never ``keep``)."""
        complete = [path for _, path in list_checkpoints(self.output_dir) if is_complete(path)]
        doomed = [path for _, path in list_checkpoints(self.output_dir) if not is_complete(path) and path != keep]
        if self.save_total_limit is not None:
            doomed += [path for path in complete[: -self.save_total_limit] if path != keep]
        for path in doomed:
            try:
                # Marker first: a half-deleted folder must never look complete.
                (path / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(path)
                logger.info("deleted old checkpoint %s", path)
            except OSError as error:  # a failed delete must not kill training; the space is reported
                logger.warning("could not delete %s (%s); delete it by hand", path, error)

    # ---- resume ----------------------------------------------------------------------------------

    def resolve(self, resume_from_checkpoint: str) -> Path | None:
        """The checkpoint to resume from, decided on rank 0 and shared so all ranks agree."""
        decision: Any = None
        if self.rank == 0:
            decision = self._decide(resume_from_checkpoint)
        decision = broadcast_object(decision)
        if isinstance(decision, dict):  # rank 0's error, raised identically everywhere
            raise CheckpointError(decision["error"])
        return None if decision is None else Path(decision)

    def _decide(self, resume_from_checkpoint: str) -> str | dict[str, str] | None:
        if resume_from_checkpoint == "none":
            logger.info("resume_from_checkpoint none: starting fresh")
            return None
        if resume_from_checkpoint == "auto":
            found = newest_complete(self.output_dir)
            if found is None:
                incomplete = [p.name for _, p in list_checkpoints(self.output_dir)]
                extra = f" (ignoring incomplete {', '.join(incomplete)})" if incomplete else ""
                logger.info("no complete checkpoint in %s%s: starting fresh", self.output_dir, extra)
                return None
            logger.info("resuming from %s (newest complete checkpoint in %s)", found, self.output_dir)
            return str(found)
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            return {"error": f"resume_from_checkpoint {path} does not exist; pass a step-NNNNNNNN folder, "
                             "'auto' or 'none'"}
        if not is_complete(path):
            return {"error": f"resume_from_checkpoint {path} is incomplete (no {COMPLETE_MARKER}: its save "
                             "was interrupted); pass an earlier checkpoint or 'auto'"}
        return str(self._branch_progress(path) or path)

    def _branch_progress(self, path: Path) -> Path | None:
        """For a checkpoint of another run (a branch point): this run's own newer complete checkpoint, if
        any, so that relaunching the same command (a requeue after preemption) continues the branch
        instead of starting it over from the branch point."""
        if path.resolve().parent == self.output_dir.resolve():
            return None
        own = newest_complete(self.output_dir)
        if own is None or _step_of(own) <= _step_of(path):
            return None
        logger.info("resuming from %s: this branch of %s has already trained past it (newest complete checkpoint "
                    "in %s)", own, path, self.output_dir)
        return own

    def verify(self, path: Path) -> dict[str, Any]:
        """Check every file listed by the marker (size everywhere, sha256 of this rank's files)."""
        marker = read_checked_marker(path)
        errors = damaged_files(path, marker, hashed=lambda name: _owned_by(name, self.rank))
        everyone = sorted({error for part in all_gather_object(errors) for error in part})
        if everyone:
            raise CheckpointError(f"checkpoint {path} is damaged: " + "; ".join(everyone)
                                  + "; resume from another checkpoint (resume_from_checkpoint PATH)")
        return marker

    def load_rng(self, path: Path, *, fallback_seed: int) -> None:
        """Restore this rank's RNG; a rank that did not exist when saving gets a seeded fresh state."""
        file = path / f"rng_state_{self.rank}.pt"
        if file.is_file():
            set_rng_state(load_rng_file(file))
            return
        logger.warning("no RNG state for rank %d in %s (saved with another world size); seeding it with %d",
                       self.rank, path, fallback_seed)
        random.seed(fallback_seed)
        np.random.seed(fallback_seed % 2**32)
        torch.manual_seed(fallback_seed)

    def universal_path(self, path: Path) -> Path:
        """Where ``universal_checkpoint(path)`` puts its conversion."""
        return self.output_dir / UNIVERSAL_DIR / path.name

    def load(self, engine: Any, load_path: Path, *, universal: bool, is_peft: bool, zero_stage: int) -> dict[str, Any]:
        """Load ``load_path`` into ``engine`` on every rank; returns our client state (step, data position,
        run config). ``universal``: ``load_path`` is a universal conversion (``universal_checkpoint``)."""
        # LoRA checkpoints hold only trainable tensors; the non-strict load is checked below instead.
        loaded, client_state = engine.load_checkpoint(
            str(load_path.parent), tag=load_path.name, load_module_strict=not is_peft,
            load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {load_path}; it reported no checkpoint there")
        if client_state is None or "cpt_ds" not in client_state:
            raise CheckpointError(f"{load_path} holds no cpt-ds client state; it was not written by train.py")
        state = client_state["cpt_ds"]
        check_format_version(client_state_file(load_path), state.get("format_version"), CLIENT_FORMAT_VERSION)
        if universal and zero_stage == 3:
            repair_zero3_universal_load(engine, load_path)
        if is_peft:
            verify_trainable_loaded(engine, load_path)
        return state

    def universal_checkpoint(self, path: Path) -> Path:
        """Convert ``path`` to DeepSpeed's universal format once (rank 0); returns the converted folder.

        Universal checkpoints hold each parameter and its optimizer state whole, so any world size can
        load them (deepspeed.checkpoint.ds_to_universal; loaded with checkpoint.load_universal).
        """
        target = self.universal_path(path)
        if self.rank == 0 and not is_complete(target):
            from deepspeed.checkpoint import ds_to_universal

            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            logger.info("converting %s to a universal checkpoint in %s", path, target)
            args = _universal_args(input_folder=str(path), output_folder=str(target))
            ds_to_universal.main(args)
            for name in list(read_marker(path)["files"]):
                if name.startswith("rng_state_"):
                    shutil.copy2(path / name, target / name)
            shutil.copy2(path / COMPLETE_MARKER, target / (COMPLETE_MARKER + ".source"))
            atomic_write_text(target / COMPLETE_MARKER, json.dumps(
                {"universal_from": str(path), "files": {}}, indent=2) + "\n")
        barrier()
        return target


def repair_zero3_universal_load(engine: Any, universal_path: Path) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``)
    that make a resumed run drift from the uninterrupted one (~1e-3 in the loss within three steps):

    - it copies the first param group's hyperparameters into every group, so the no-decay group
      (norms) would resume with weight decay: put each group's saved values back;
    - it gives every sub-group's Adam state the *same* ``step`` tensor, which torch's AdamW then
      increments once per sub-group per step, so all but the first sub-group use a wrong bias
      correction: give each its own copy.
    """
    file = universal_path / "zero" / "optimizer_state.pt"
    # Not weights_only: ds_to_universal pickles DeepSpeed objects into this file (its ZeroStageEnum among
    # them), and DeepSpeed's own load_checkpoint has just unpickled this very file with
    # weights_only=False, so reading it again trusts nothing new (docs/training.md, what a checkpoint
    # asks you to trust).
    saved = torch.load(file, map_location="cpu", weights_only=False)
    saved_groups = saved["optimizer_state_dict"]["param_groups"]
    inner = engine.optimizer.optimizer
    if len(saved_groups) != len(inner.param_groups):
        raise CheckpointError(f"{universal_path} holds {len(saved_groups)} optimizer param groups, this run has "
                              f"{len(inner.param_groups)}; resume with the configuration it was saved with")
    for group, saved_group in zip(inner.param_groups, saved_groups, strict=True):
        group.update({key: value for key, value in saved_group.items() if key != "params"})
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def verify_trainable_loaded(engine: Any, load_path: Path) -> None:
    """Non-strict loads (needed for LoRA: frozen weights are not saved) could hide a mismatch: check
    that every trainable tensor of the engine's model is in the checkpoint."""
    saved = saved_module_state(load_path)
    if saved is None:
        return  # ZeRO-3: trainable tensors live in the optimizer partitions, loaded strictly by DeepSpeed
    expected = {name for name, parameter in engine.module.named_parameters() if parameter.requires_grad}
    missing = sorted(expected - set(saved))
    if missing:
        raise CheckpointError(f"{load_path} lacks trainable weights {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                              "it was saved with another LoRA configuration")


def saved_module_state(path: Path) -> dict[str, Any] | None:
    """The module state DeepSpeed saved in ``path``, or None when it keeps none there (universal folders)."""
    file = path / MODEL_STATES_FILE
    if not file.is_file():
        return None
    # DeepSpeed's model-states file holds tensors, sizes, dicts and its JSON config: weights_only loads it.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("module")


def _universal_args(*, input_folder: str, output_folder: str) -> Any:
    import argparse

    return argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
