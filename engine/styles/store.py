"""Trained styles on disk: publish, list, look up, and put a style's trigger into a prompt.

A style lives in `styles/<style-id>/v<N>/` (lora.safetensors, style.json, preview.png). Publishing writes the
version folder under a temporary name and renames it, so a reader never sees half a style (TR-10). The full
library (tags, import/export, blending) builds on these folders.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine.core.config import ConfigError
from engine.core.files import fsync_dir

SCHEMA_VERSION = 1


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
    kind: str = "lora"  # "lora" | "embedding" (textual inversion); "instant" and "blend" come later
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


def publish(data_dir: Path, name: str, lora_path: Path, style_json: Path, preview: Path | None = None) -> StyleInfo:
    """Copy a training result into the library as a new style (version 1), atomically.

    The folder is complete under a temporary name, renamed into place, and only then registered in the library
    database (TR-10); a crash in between leaves a folder that the library adopts when it next opens.
    """
    styles = data_dir / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    style_id = f"{_slug(name)}-{uuid.uuid4().hex[:6]}"
    final = styles / style_id / "v1"
    tmp = styles / style_id / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        meta = json.loads(Path(style_json).read_text("utf-8"))
        meta.update(name=name, id=style_id, version=1, schema_version=SCHEMA_VERSION)
        shutil.copyfile(lora_path, tmp / "lora.safetensors")
        if preview and Path(preview).is_file():
            shutil.copyfile(preview, tmp / "preview.png")
        (tmp / "style.json").write_text(json.dumps(meta, indent=1), "utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from engine.styles.library import Library  # late: the library builds on this module

    lib = Library(data_dir)
    try:
        return lib.register_folder(final)
    finally:
        lib.close()


def _read(folder: Path) -> StyleInfo:
    m = json.loads((folder / "style.json").read_text("utf-8"))
    return StyleInfo(id=m["id"], name=m.get("name", m["id"]), version=int(m.get("version", 1)),
                     trigger_token=m["trigger_token"], preset=m.get("preset", "style"), class_noun=_class_noun(m),
                     base_model_fingerprint=m.get("base_model_fingerprint", ""), created=m.get("created", ""),
                     folder=folder)


def list_styles(data_dir: Path) -> list[StyleInfo]:
    """Every published style version, newest first; unreadable folders are skipped."""
    out = []
    for f in (data_dir / "styles").glob("*/v*/style.json"):
        try:
            out.append(_read(f.parent))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(out, key=lambda s: (s.created, s.version), reverse=True)


def find_style(data_dir: Path, style_id: str) -> StyleInfo:
    """Resolve an id (or "id@vN") through the library, never by building a path from the client's string."""
    for s in list_styles(data_dir):
        if style_id in (s.id, f"{s.id}@v{s.version}", s.adapter_name):
            return s
    raise ConfigError(f"unknown style {style_id!r}; pick one from the list of trained styles")


def apply_trigger(prompt: str, style: StyleInfo) -> str:
    """Insert the trigger token where the prompt lacks it: before the class noun for a subject, else as a style."""
    if re.search(rf"\b{re.escape(style.trigger_token)}\b", prompt):
        return prompt
    if style.preset == "subject":
        if style.class_noun and re.search(rf"\b{style.class_noun}\b", prompt):
            return re.sub(rf"\b{style.class_noun}\b", f"{style.trigger_token} {style.class_noun}", prompt, count=1)
        return f"{style.trigger_token} {prompt}"
    return f"{prompt}, {style.trigger_token} style"
