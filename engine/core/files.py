"""Durable file writes (RELIABILITY MF-9, TR-10): everything the engine persists goes through here.

A write lands in a temp file next to its target, is fsynced, renamed over the target, and the folder is fsynced, so
a reader or a crash sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_dir(path: str | os.PathLike) -> None:
    """Persist a folder's entries (new files, renames); not possible (or needed) on Windows."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it, os.replace() it onto `path`, fsync the folder.

    Readers (even ones that memory-mapped the old file, safetensors #764) see either the old or the new file,
    never a half-written one (MF-9). On an exception the temp file is removed and `path` is untouched.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if target.exists():  # keep the old file's permissions; new files stay private (mkstemp's 0600)
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)  # data must be on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)  # persist the rename itself


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def sha256_file(path: str | os.PathLike) -> str:
    """The file's sha256, read in 4 MiB blocks (checkpoint manifests, library file hashes, dataset provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder next to `final`; on success fsync every file in it, rename it to `final` and
    fsync the parent, so readers see the whole folder or none of it (TR-10). On an exception it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
