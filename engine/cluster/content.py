"""Content-addressed bundles: how a model folder, a style version or a training set reaches a Ray worker.

A bundle is a set of files under one base folder, named by their relative paths; its manifest lists each file's
size and sha256 and its hash is the sha256 of that manifest. The app's node serves bundles by hash (head.py); a
worker writes one into `<cache>/<hash>/` in a single rename (core/files.atomic_dir), checking every file against
the manifest as it arrives and the manifest against the hash it asked for, so what a worker runs on is exactly what
the app named, and each bundle crosses the network once per worker machine. Paths in a manifest are relative,
never absolute, never leave the bundle (a tampered manifest cannot write outside the cache).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from engine.core.errors import ConfigError
from engine.core.files import atomic_dir, sha256_file

SCHEMA_VERSION = 1
CHUNK = 16 * 2**20  # bytes per read from the app's node: small enough for Ray's object store, large enough to be quick


class ContentError(ConfigError):
    """A bundle that does not match its hash or manifest (a damaged transfer, or a file changed on the app's node)."""


@dataclass(frozen=True)
class Bundle:
    hash: str
    base: Path  # the folder its relative paths start from, on the app's node
    manifest: dict



def safe_rel(rel: str) -> str:
    """`rel` if it is a plain relative path inside a bundle; ContentError otherwise."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") or part.startswith(".") for part in p.parts) \
            or "\\" in rel:
        raise ContentError(f"bad file name {rel[:80]!r} in a bundle")
    return p.as_posix()


def manifest_hash(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()


def folder_files(folder: Path) -> list[Path]:
    """Every regular file under `folder` (recursively), skipping dot-files and symlinks (never followed out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


class Hasher:
    """Makes bundles, hashing each file once per (path, size, mtime): a 4 GB model is read once per app run."""

    def __init__(self):
        self._seen: dict[tuple[str, int, int], str] = {}

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._seen:
            self._seen[key] = sha256_file(path)
        return self._seen[key]

    def bundle(self, base: Path, files: list[Path]) -> Bundle:
        base = Path(base)
        entries = {}
        for f in files:
            rel = safe_rel(Path(f).relative_to(base).as_posix())
            entries[rel] = {"size": Path(f).stat().st_size, "sha256": self.file_hash(Path(f))}
        manifest = {"schema_version": SCHEMA_VERSION, "files": entries}
        return Bundle(manifest_hash(manifest), base, manifest)

    def model(self, source: Path) -> tuple[Bundle, str]:
        """A model folder (every file in it) or a single .safetensors file; returns the bundle and the entry name
        the worker loads (the folder's or file's own name, so the model keeps its name in recipes)."""
        source = Path(source)
        files = folder_files(source) if source.is_dir() else [source]
        return self.bundle(source.parent, files), source.name


Reader = Callable[[str, int, int], bytes]  # (relative path, offset, size) -> bytes, from the app's node


def materialize(h: str, manifest: dict, read: Reader, cache: Path) -> Path:
    """`<cache>/<h>/` holding the bundle, fetched through `read` unless it is there already; every file is checked
    against its sha256 and size, and the manifest against `h`. Returns the folder."""
    if not isinstance(h, str) or len(h) != 64 or not all(c in "0123456789abcdef" for c in h):
        raise ContentError(f"not a content hash: {str(h)[:80]!r}")
    if manifest_hash(manifest) != h:
        raise ContentError(f"the manifest for {h[:12]} does not match its hash")
    final = Path(cache) / h
    if final.is_dir():  # complete: it appeared in one rename, after every file was checked
        return final
    try:
        with atomic_dir(final) as tmp:
            for rel, info in sorted(manifest["files"].items()):
                dst = tmp / safe_rel(rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                sha, size = hashlib.sha256(), int(info["size"])
                with open(dst, "wb") as f:
                    offset = 0
                    while offset < size:
                        data = read(rel, offset, min(CHUNK, size - offset))
                        if not data:
                            break
                        sha.update(data)
                        f.write(data)
                        offset += len(data)
                if offset != size or sha.hexdigest() != info["sha256"]:
                    raise ContentError(f"{rel} of bundle {h[:12]} arrived damaged or changed on the app's node "
                                       f"({offset} of {size} bytes, sha256 {sha.hexdigest()[:12]}); run the job again")
    except OSError:
        if not final.is_dir():  # another worker process on this machine put the same bundle in place first
            raise
    return final


def read_chunk(base: Path, manifest: dict, rel: str, offset: int, size: int) -> bytes:
    """What the app's node serves: part of a file the manifest lists (and nothing else)."""
    rel = safe_rel(rel)
    if rel not in manifest["files"]:
        raise ContentError(f"{rel!r} is not part of this bundle")
    if not (isinstance(offset, int) and isinstance(size, int) and 0 <= offset and 0 < size <= CHUNK):
        raise ContentError("bad chunk request")
    with open(Path(base) / rel, "rb") as f:
        f.seek(offset)
        return f.read(size)


__all__ = ["Bundle", "ContentError", "Hasher", "materialize", "read_chunk", "safe_rel", "folder_files"]
