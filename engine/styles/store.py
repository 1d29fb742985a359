"""Trained styles on disk: publish, list, look up, and put a style's trigger into a prompt.

A style lives in `styles/<style-id>/v<N>/` (lora.safetensors, style.json, preview.png). Publishing writes the
version folder under a temporary name and renames it, so a reader never sees half a style (TR-10). The full
library (tags, import/export, blending) builds on these folders.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import LibraryError
from engine.core.files import atomic_dir

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)
# style.json fields the library reads: (type, required). Anything else in the file is provenance, kept unread.
# The id and version come from the folder (styles/<id>/v<N>/); the file may repeat them.
_FIELDS = {"id": (str, False), "trigger_token": (str, True), "name": (str, False), "version": (int, False),
           "preset": (str, False), "base_model_fingerprint": (str, False), "created": (str, False),
           "training_config": (dict, False)}


class StyleFileError(LibraryError):
    """A style.json that does not match the schema; the message names the problem."""


@dataclass(frozen=True)
class StyleInfo:
    id: str
    name: str
    version: int
    trigger_token: str
    preset: str  # "subject" | "style"
    class_noun: str  # subject preset: the word the trigger goes in front of ("shape", "dog")
    base_model_fingerprint: str
    created: str
    folder: Path
    # Library fields (engine/styles/library.py); defaults keep folder-only readers and older callers working.
    kind: str = "lora"  # "lora" | "embedding" (textual inversion) | "instant" (IP-Adapter references)
    lora_file: str = "lora.safetensors"  # the weights file in `folder` (an embedding's too)
    base_model: str = ""  # the base model's name when it was trained or imported, for "trained on X" messages
    prompt_template: str = ""
    recommended_strength: float = 1.0
    preview_grid: str = "preview.png"
    source: str = "trained"  # "trained" | "imported"
    trigger_words: tuple[str, ...] = ()  # all trigger words; `trigger_token` is the one put into prompts

    @property
    def lora(self) -> Path:
        return self.folder / self.lora_file

    @property
    def preview(self) -> Path | None:
        p = self.folder / self.preview_grid if self.preview_grid else None
        return p if p and p.is_file() else None

    @property
    def adapter_name(self) -> str:
        return f"{self.id}-v{self.version}"

    @property
    def label(self) -> str:
        # Two styles may share a name: the id and version always tell them apart.
        return f"{self.name} ({self.id} v{self.version}, {self.preset}, trigger '{self.trigger_token}')"


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    return s or "style"


def _class_noun(style: dict) -> str:
    prompt = (style.get("training_config", {}).get("class_prompt", "").strip().splitlines() or [""])[0]
    words = re.findall(r"[a-z]+", prompt.lower())
    return words[-1] if words else ""


def publish(data_dir: Path, name: str, lora_path: Path, style_json: Path, preview: Path | None = None, *,
            style_id: str | None = None) -> StyleInfo:
    """Copy a training result into the library as a new style (version 1), or as the next version of `style_id`.

    The folder is complete under a temporary name, renamed into place, and only then registered in the library
    database (TR-10); a crash in between leaves a folder that the library adopts when it next opens.
    """
    files: dict[str, Path | bytes] = {"lora.safetensors": Path(lora_path)}
    if preview and Path(preview).is_file():
        files["preview.png"] = Path(preview)
    return publish_files(data_dir, name, files, json.loads(Path(style_json).read_text("utf-8")), style_id=style_id)


def publish_files(data_dir: Path, name: str, files: dict, meta: dict, *, style_id: str | None = None) -> StyleInfo:
    """Write a version folder from `files` ({relative name: Path or bytes}; "refs/x.png" makes a subfolder) and
    `meta` (style.json): v1 of a new style, or v(N+1) of the existing style `style_id` (its name is kept)."""
    from engine.styles.library import Library  # late: the library builds on this module

    styles = data_dir / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    lib = Library(data_dir)
    try:
        if style_id is None:
            style_id, version = f"{_slug(name)}-{uuid.uuid4().hex[:6]}", 1
        else:
            existing = lib.get(style_id)
            name = existing.name
            version = int(lib.next_version_folder(style_id).name[1:])
        final = styles / style_id / f"v{version}"
        with atomic_dir(final) as tmp:
            meta = dict(meta, name=name, id=style_id, version=version, schema_version=SCHEMA_VERSION)
            validate_style_json(meta)  # before the rename: a published folder the library would skip helps nobody
            for rel, src in files.items():
                if rel.startswith(".") or ".." in rel.split("/"):
                    raise LibraryError(f"bad file name {rel!r} in a style version")
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(src, bytes):
                    dst.write_bytes(src)
                else:
                    shutil.copyfile(src, dst)
            (tmp / "style.json").write_text(json.dumps(meta, indent=1), "utf-8")
        return lib.register_folder(final)
    finally:
        lib.close()


def _show(v) -> str:
    """A short rendering of a JSON value for a message (containers by type: they may be nested arbitrarily)."""
    return json.dumps(v)[:60] if v is None or isinstance(v, (str, int, float)) else f"a {type(v).__name__}"


def validate_style_json(m) -> None:
    """Check a parsed style.json against `_FIELDS`: one hand-edited or half-synced file must not crash the list."""
    if not isinstance(m, dict):
        raise StyleFileError(f"style.json must hold a JSON object, not {type(m).__name__}")
    for key, (kind, required) in _FIELDS.items():
        if key not in m:
            if required:
                raise StyleFileError(f"style.json lacks the required key {key!r}")
            continue
        v = m[key]
        if not isinstance(v, kind) or isinstance(v, bool):  # JSON true is an int to Python
            raise StyleFileError(f"{key!r} must be a {kind.__name__} but is {_show(v)}")
    for key in ("id", "trigger_token"):  # the folder names the id; a style.json that states one must agree
        if key in m and not m[key].strip():
            raise StyleFileError(f"{key!r} is empty")
    if m.get("version", 1) < 1:
        raise StyleFileError(f"'version' must be 1 or more but is {m['version']}")
    if m.get("preset", "style") not in ("subject", "style"):
        raise StyleFileError(f"'preset' must be 'subject' or 'style' but is {m['preset']!r}")
    class_prompt = m.get("training_config", {}).get("class_prompt", "")
    if not isinstance(class_prompt, str):
        raise StyleFileError(f"'training_config.class_prompt' must be a string but is {_show(class_prompt)}")


def apply_trigger(prompt: str, style: StyleInfo) -> str:
    """Insert the trigger token where the prompt lacks it: before the class noun for a subject, else as a style."""
    if re.search(rf"\b{re.escape(style.trigger_token)}\b", prompt):
        return prompt
    if style.preset == "subject":
        if style.class_noun and re.search(rf"\b{style.class_noun}\b", prompt):
            return re.sub(rf"\b{style.class_noun}\b", f"{style.trigger_token} {style.class_noun}", prompt, count=1)
        return f"{style.trigger_token} {prompt}"
    return f"{prompt}, {style.trigger_token} style"
