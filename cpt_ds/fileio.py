"""Small file helpers for outputs that must be complete or absent: checksums, fsync, atomic writes."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

_HASH_CHUNK_BYTES = 16 << 20


def sha256_file(path: str | os.PathLike, progress: Callable[[int], None] | None = None) -> str:
    """Streaming sha256 of a file; ``progress`` is called with the number of bytes read per chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk (a folder: the names it holds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old content or the whole new one, never a part."""
    temporary = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_path(path.parent)


def cache_dir() -> Path:
    """``$CPT_DS_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/cpt_ds``, by default ``~/.cache/cpt_ds``."""
    if os.environ.get("CPT_DS_CACHE_DIR"):
        return Path(os.environ["CPT_DS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpt_ds"


def replace_folder(temporary: Path, output: Path, aside: Path) -> None:
    """Move the finished folder ``temporary`` to ``output``; a folder already there is moved to ``aside``
    first and deleted last, so at every moment ``output`` is the old folder or the new one."""
    if os.path.lexists(output):
        os.replace(output, aside)
        os.replace(temporary, output)
        shutil.rmtree(aside)
    else:
        os.replace(temporary, output)
    fsync_path(output.parent)

