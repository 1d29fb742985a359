"""The style library: styles and their versions indexed in <data_dir>/stylebooth.db, weights under styles/<id>/v<N>/.

Every operation takes ids that the library itself handed out; a client string is looked up in the database and
never turned into a path (paths come from the database's rows and must stay under styles/). Folders written
before the database existed, or left by a crash between a publish's rename and its database commit, are adopted
when the library opens.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engine.core.errors import LibraryError
from engine.core.files import atomic_write_bytes, fsync_dir, sha256_file
from engine.styles.db import DB_NAME, Database
# base_model_mismatch and new_style_id are re-exported: callers know them as part of the library
from engine.styles.records import (MAX_DESCRIPTION, base_model_mismatch, clean_name, clean_tags,  # noqa: F401
                                   new_style_id, now, read_style_json)
from engine.styles.store import StyleInfo, _class_noun

log = logging.getLogger(__name__)

_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,80}")
_VERSION_DIR = re.compile(r"v([1-9][0-9]{0,5})")


@dataclass(frozen=True)
class LibraryStyle:
    """One style with all its versions (oldest first), as the Library tab lists it."""

    id: str
    name: str
    description: str
    tags: tuple[str, ...]
    preset: str
    archived: bool
    deleted_at: str | None  # set while the style is in the trash
    created: str
    versions: tuple[StyleInfo, ...]
    owner: str = "local"  # the account that trained or imported it (studio mode); "local" without accounts
    shared: bool = False  # studio-shared: every user may see and use it; only the owner or an admin changes it

    @property
    def latest(self) -> StyleInfo:
        return self.versions[-1]

    @property
    def trashed(self) -> bool:
        return self.deleted_at is not None

    @property
    def label(self) -> str:
        return self.latest.label


@dataclass(frozen=True)
class AdoptReport:
    adopted: tuple[str, ...]  # "id@vN" of each folder registered
    skipped: tuple[tuple[str, str], ...]  # (folder relative to the data dir, why)


class Library:
    """Styles and versions in SQLite; thread-safe (one connection behind a lock)."""

    def __init__(self, data_dir: Path, *, adopt: bool = True):
        self.data_dir = Path(data_dir)
        self.styles_dir = self.data_dir / "styles"
        self.db = Database(self.data_dir / DB_NAME)
        self.last_adoption = self.adopt() if adopt else AdoptReport((), ())

    def close(self) -> None:
        self.db.close()

    # ---- reading ---------------------------------------------------------------------------------------------
    def list(self, query: str = "", *, tag: str | None = None, preset: str | None = None,
             archived: bool | None = False, trashed: bool = False) -> list[LibraryStyle]:
        """Styles newest first. `query` matches name, id, tags, trigger words and description (substring, any
        case); `archived` False hides archived styles, True shows only them, None both; `trashed` lists the
        whole trash (archived or not)."""
        q = query.strip().lower()
        out = []
        for s in self._load():
            if s.trashed != trashed or (not trashed and archived is not None and s.archived != archived):
                continue
            if tag and tag.strip().lower() not in s.tags:
                continue
            if preset and s.preset != preset:
                continue
            words = [s.name, s.id, s.description, *s.tags, *(w for v in s.versions for w in v.trigger_words)]
            if q and not any(q in w.lower() for w in words):
                continue
            out.append(s)
        return sorted(out, key=lambda s: (s.latest.created, s.created, s.id), reverse=True)

    def get(self, style_id: str) -> LibraryStyle:
        found = self._load(self._check_id(style_id))
        if not found:
            raise LibraryError(f"unknown style {style_id!r}; pick one from the library list (it may have been "
                               "removed when the trash was emptied)")
        return found[0]

    def versions(self, style_id: str) -> list[StyleInfo]:
        """Every version of a style, oldest first."""
        return list(self.get(style_id).versions)

    def active(self) -> list[StyleInfo]:
        """The newest version of every style that is neither archived nor in the trash, newest first."""
        return [s.latest for s in self.list()]

    def find_version(self, ref: str) -> StyleInfo:
        """Resolve "id" (newest version), "id@vN" or an adapter name "id-vN"; refuses styles in the trash."""
        ref = str(ref).strip()
        m = re.fullmatch(r"(.+)@v(\d+)", ref) or re.fullmatch(r"(.+)-v(\d+)", ref)
        candidates = [(m.group(1), int(m.group(2)))] if m else []
        candidates.append((ref, None))
        for style_id, version in candidates:
            if not _ID.fullmatch(style_id):
                continue
            rows = self._load(style_id)
            if not rows:
                continue
            s = rows[0]
            if s.trashed:
                raise LibraryError(f"style {s.name!r} ({s.id}) is in the trash; restore it in the Library tab to "
                                   "use it")
            if version is None:
                return s.latest
            for v in s.versions:
                if v.version == version:
                    return v
            raise LibraryError(f"style {s.name!r} ({s.id}) has no version {version}; it has "
                               f"{', '.join(f'v{v.version}' for v in s.versions)}")
        raise LibraryError(f"unknown style {ref!r}; pick one from the list of styles")

    def file_hashes(self, style_id: str, version: int) -> dict[str, str]:
        rows = self.db.query("SELECT file, sha256 FROM file_hashes WHERE style_id=? AND version=?",
                             (self._check_id(style_id), int(version)))
        return {r["file"]: r["sha256"] for r in rows}

    # ---- editing ---------------------------------------------------------------------------------------------
    def rename(self, style_id: str, name: str) -> LibraryStyle:
        self._update(style_id, "name", clean_name(name))
        return self.get(style_id)

    def describe(self, style_id: str, description: str) -> LibraryStyle:
        text = str(description).strip()
        if len(text) > MAX_DESCRIPTION:
            raise LibraryError(f"the description is {len(text)} characters long; keep it to {MAX_DESCRIPTION}")
        self._update(style_id, "description", text)
        return self.get(style_id)

    def set_tags(self, style_id: str, tags) -> LibraryStyle:
        tags = clean_tags(tags)
        self.get(style_id)
        with self.db.transaction() as con:
            con.execute("DELETE FROM tags WHERE style_id=?", (style_id,))
            con.executemany("INSERT INTO tags (style_id, tag) VALUES (?, ?)", [(style_id, t) for t in tags])
        return self.get(style_id)

    def archive(self, style_id: str, archived: bool = True) -> LibraryStyle:
        self._update(style_id, "archived", int(bool(archived)))
        return self.get(style_id)

    def set_owner(self, style_id: str, owner: str) -> None:
        """Record who owns a style (the engine sets it right after a training run or an import publishes it)."""
        self.get(style_id)
        with self.db.transaction() as con:
            con.execute("UPDATE styles SET owner=? WHERE id=?", (str(owner), style_id))

    def set_shared(self, style_id: str, shared: bool) -> LibraryStyle:
        self.get(style_id)
        with self.db.transaction() as con:
            con.execute("UPDATE styles SET shared=? WHERE id=?", (int(bool(shared)), style_id))
        return self.get(style_id)

    def set_run_owner(self, run_id: str, owner: str) -> None:
        with self.db.transaction() as con:
            con.execute("INSERT OR IGNORE INTO run_owners (run_id, owner) VALUES (?, ?)", (str(run_id), str(owner)))

    def run_owners(self) -> dict[str, str]:
        return {r["run_id"]: r["owner"] for r in self.db.query("SELECT run_id, owner FROM run_owners")}

    def set_trigger(self, style_id: str, version: int, words) -> StyleInfo:
        """Edit a version's trigger words (e.g. an imported LoRA's guess); the first one goes into prompts."""
        items = words.split(",") if isinstance(words, str) else list(words)
        words = tuple(w for w in (" ".join(str(x).split()) for x in items) if w)
        if not words:
            raise LibraryError("give at least one trigger word, e.g. 'olis'")
        v = next((v for v in self.versions(style_id) if v.version == int(version)), None)
        if v is None:
            raise LibraryError(f"style {style_id!r} has no version {version}")
        meta = json.loads((v.folder / "style.json").read_text("utf-8"))
        meta.update(trigger_token=words[0], trigger_words=list(words))
        atomic_write_bytes(v.folder / "style.json", json.dumps(meta, indent=1).encode())
        with self.db.transaction() as con:
            con.execute("UPDATE versions SET trigger_words=? WHERE style_id=? AND version=?",
                        (json.dumps(list(words)), style_id, v.version))
            self._hash_files(con, style_id, v.version, v.folder)
        return self.find_version(f"{style_id}@v{v.version}")

    def delete(self, style_id: str) -> LibraryStyle:
        """Move a style to the trash; `undo_delete` brings it back with every version until `empty_trash`."""
        if self.get(style_id).trashed:
            raise LibraryError("that style is already in the trash")
        self._update(style_id, "deleted_at", now())
        return self.get(style_id)

    def undo_delete(self, style_id: str) -> LibraryStyle:
        if not self.get(style_id).trashed:
            raise LibraryError("that style is not in the trash")
        self._update(style_id, "deleted_at", None)
        return self.get(style_id)

    def empty_trash(self, only: set[str] | None = None) -> int:
        """Remove every style in the trash (or those of it whose ids are in `only`), its rows and its folder.
        Returns how many styles were removed."""
        gone = [s for s in self.list(trashed=True, archived=None) if only is None or s.id in only]
        for s in gone:
            folder = self.styles_dir / s.id
            # Renamed away first: a crash after this leaves a dot-folder adoption ignores, never a half-deleted
            # style whose folder would be adopted again.
            doomed = self.styles_dir / f".deleted-{s.id}-{uuid.uuid4().hex[:6]}"
            if folder.is_dir():
                folder.rename(doomed)
            with self.db.transaction() as con:
                con.execute("DELETE FROM styles WHERE id=?", (s.id,))
            shutil.rmtree(doomed, ignore_errors=True)
        return len(gone)

    # ---- registering folders -----------------------------------------------------------------------------------
    def register_folder(self, folder: Path, *, name: str | None = None, tags=()) -> StyleInfo:
        """Index a complete styles/<id>/v<N>/ folder (publish, import, adoption); idempotent."""
        folder = Path(folder)
        style_id, version = self._folder_ids(folder)
        meta = read_style_json(folder)
        trigger_words = meta.get("trigger_words") or [meta["trigger_token"]]
        created = str(meta.get("created") or now())
        lora_file = str(meta.get("weights_file") or "lora.safetensors")  # the file in this folder
        if not (folder / lora_file).is_file() or "/" in lora_file or lora_file.startswith("."):
            raise LibraryError(f"{folder.name}: its weights file {lora_file!r} is missing")
        with self.db.transaction() as con:
            if not con.execute("SELECT 1 FROM styles WHERE id=?", (style_id,)).fetchone():
                con.execute("INSERT INTO styles (id, name, description, preset, created) VALUES (?, ?, ?, ?, ?)",
                            (style_id, clean_name(name or meta.get("name") or style_id),
                             str(meta.get("description", "")), str(meta.get("preset", "style")), created))
                con.executemany("INSERT OR IGNORE INTO tags (style_id, tag) VALUES (?, ?)",
                                [(style_id, t) for t in clean_tags(tags or meta.get("tags", ()))])
            con.execute(
                "INSERT OR REPLACE INTO versions (style_id, version, kind, folder, lora_file, trigger_words, "
                "base_model_fingerprint, base_model, prompt_template, class_noun, recommended_strength, "
                "training_config, provenance, preview_grid, source, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (style_id, version, str(meta.get("kind", "lora")), folder.relative_to(self.data_dir).as_posix(),
                 lora_file, json.dumps([str(w) for w in trigger_words]),
                 str(meta.get("base_model_fingerprint", "")), str(meta.get("base_model", "")),
                 str(meta.get("instance_prompt", meta.get("prompt_template", ""))), _class_noun(meta),
                 float(meta.get("recommended_strength", 1.0)), json.dumps(meta.get("training_config", {})),
                 json.dumps(meta.get("training_images", meta.get("provenance", []))),
                 str(meta.get("preview_grid", "preview.png")), str(meta.get("source", "trained")), created))
            self._hash_files(con, style_id, version, folder)
        return next(v for v in self._load(style_id)[0].versions if v.version == version)

    def adopt(self) -> AdoptReport:
        """Register styles/<id>/v<N>/ folders the database does not know: v1 folders from before the library, and
        a publish that crashed between its rename and its commit. Malformed folders are skipped with a warning."""
        known = {(r["style_id"], r["version"]) for r in self.db.query("SELECT style_id, version FROM versions")}
        adopted, skipped = [], []
        if not self.styles_dir.is_dir():
            return AdoptReport((), ())
        for doomed in self.styles_dir.glob(".deleted-*"):  # emptied from the trash, but the process died first
            shutil.rmtree(doomed, ignore_errors=True)
        for style_json in sorted(self.styles_dir.glob("*/v*/style.json")):
            folder = style_json.parent
            if folder.parent.name.startswith(".") or not _VERSION_DIR.fullmatch(folder.name):
                continue
            if (folder.parent.name, int(folder.name[1:])) in known:
                continue
            try:
                info = self.register_folder(folder)
                adopted.append(f"{info.id}@v{info.version}")
            except (LibraryError, OSError, ValueError, KeyError, TypeError) as e:
                where = folder.relative_to(self.data_dir).as_posix()
                log.warning("library: skipped %s: %s", where, e)
                skipped.append((where, str(e)))
        return AdoptReport(tuple(adopted), tuple(skipped))

    def add_version(self, style_id: str, parent_version: int, write: Callable[[Path], None]) -> StyleInfo:
        """Make version N+1 of a style: `write(folder)` fills a temporary folder (weights, style.json), which is
        renamed to styles/<id>/v<N+1>/ and registered. Older versions are never touched; a failed write leaves
        nothing behind."""
        self.get(style_id)
        self.find_version(f"{style_id}@v{int(parent_version)}")
        final = self.next_version_folder(style_id)
        tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            write(tmp)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self.register_folder(final)

    def drop_newest_version(self, style_id: str, version: int) -> StyleInfo:
        """Revert: remove `version` if it is the style's newest and not its only one (a refined version the artist
        did not keep); returns the version that is newest again. Older versions are never touched."""
        s = self.get(style_id)
        if len(s.versions) < 2 or s.latest.version != int(version):
            raise LibraryError(f"only the newest version of a style with several versions can be reverted; "
                               f"{s.name!r} has {', '.join(f'v{v.version}' for v in s.versions)}")
        folder = s.latest.folder
        doomed = folder.parent / f".deleted-v{version}-{uuid.uuid4().hex[:6]}"
        if folder.is_dir():
            folder.rename(doomed)
        with self.db.transaction() as con:
            con.execute("DELETE FROM file_hashes WHERE style_id=? AND version=?", (style_id, int(version)))
            con.execute("DELETE FROM versions WHERE style_id=? AND version=?", (style_id, int(version)))
        shutil.rmtree(doomed, ignore_errors=True)
        return self.get(style_id).latest

    def next_version_folder(self, style_id: str) -> Path:
        rows = self.db.query("SELECT MAX(version) AS v FROM versions WHERE style_id=?", (self._check_id(style_id),))
        return self.styles_dir / style_id / f"v{(rows[0]['v'] or 0) + 1}"

    # ---- internals -----------------------------------------------------------------------------------------------
    def _check_id(self, style_id: str) -> str:
        if not isinstance(style_id, str) or not _ID.fullmatch(style_id):
            raise LibraryError(f"unknown style {str(style_id)[:60]!r}; pick one from the library list")
        return style_id

    def _update(self, style_id: str, column: str, value) -> None:
        assert column in ("name", "description", "archived", "deleted_at")  # never a client string
        self.get(style_id)
        with self.db.transaction() as con:
            con.execute(f"UPDATE styles SET {column}=? WHERE id=?", (value, style_id))

    def _folder_ids(self, folder: Path) -> tuple[str, int]:
        folder = folder.resolve()
        if folder.parent.parent != self.styles_dir.resolve():
            raise LibraryError(f"{folder} is not a style version folder under {self.styles_dir}")
        m = _VERSION_DIR.fullmatch(folder.name)
        if not m or not _ID.fullmatch(folder.parent.name):
            raise LibraryError(f"{folder.parent.name}/{folder.name} is not named styles/<id>/v<N>")
        return folder.parent.name, int(m.group(1))

    def _hash_files(self, con, style_id: str, version: int, folder: Path) -> None:
        con.execute("DELETE FROM file_hashes WHERE style_id=? AND version=?", (style_id, version))
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                con.execute("INSERT INTO file_hashes (style_id, version, file, sha256, bytes) VALUES (?, ?, ?, ?, ?)",
                            (style_id, version, f.name, sha256_file(f), f.stat().st_size))

    def _load(self, style_id: str | None = None) -> list[LibraryStyle]:
        where, args = ("WHERE id=?", (style_id,)) if style_id else ("", ())
        styles = self.db.query(f"SELECT * FROM styles {where}", args)
        vwhere = "WHERE style_id=?" if style_id else ""
        versions: dict[str, list] = {}
        for r in self.db.query(f"SELECT * FROM versions {vwhere} ORDER BY version", args):
            versions.setdefault(r["style_id"], []).append(r)
        tags: dict[str, list[str]] = {}
        for r in self.db.query(f"SELECT * FROM tags {vwhere} ORDER BY tag", args):
            tags.setdefault(r["style_id"], []).append(r["tag"])
        out = []
        for s in styles:
            vs = tuple(self._info(s, v) for v in versions.get(s["id"], []))
            if vs:  # a style row without versions cannot be used or shown
                out.append(LibraryStyle(s["id"], s["name"], s["description"], tuple(tags.get(s["id"], ())),
                                        s["preset"], bool(s["archived"]), s["deleted_at"], s["created"], vs,
                                        *((s["owner"], bool(s["shared"])) if "owner" in s.keys() else ())))
        return out

    def _info(self, s, v) -> StyleInfo:
        folder = (self.data_dir / v["folder"]).resolve()
        if not folder.is_relative_to(self.styles_dir.resolve()):  # a tampered row never points outside styles/
            folder = self.styles_dir / s["id"] / f"v{v['version']}"
        words = tuple(json.loads(v["trigger_words"]))
        return StyleInfo(id=s["id"], name=s["name"], version=v["version"], trigger_token=words[0] if words else "",
                         preset=s["preset"], class_noun=v["class_noun"],
                         base_model_fingerprint=v["base_model_fingerprint"], created=v["created"], folder=folder,
                         kind=v["kind"], lora_file=v["lora_file"], base_model=v["base_model"],
                         prompt_template=v["prompt_template"], recommended_strength=v["recommended_strength"],
                         preview_grid=v["preview_grid"], source=v["source"], trigger_words=words)
