"""Trained styles on disk, and applying one to the loaded base model.

A style lives in `styles/<style-id>/v<N>/` (lora.safetensors, style.json, preview.png). Publishing writes the
version folder under a temporary name and renames it, so a reader never sees half a style (TR-10). The full
library (tags, import/export, blending) builds on these folders.
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

from .config import ConfigError

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)
# style.json fields the library reads: (type, required). Anything else in the file is provenance, kept unread.
_FIELDS = {"id": (str, True), "trigger_token": (str, True), "name": (str, False), "version": (int, False),
           "preset": (str, False), "base_model_fingerprint": (str, False), "created": (str, False),
           "training_config": (dict, False)}


class StyleFileError(ValueError):
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

    @property
    def lora(self) -> Path:
        return self.folder / "lora.safetensors"

    @property
    def preview(self) -> Path | None:
        p = self.folder / "preview.png"
        return p if p.is_file() else None

    @property
    def adapter_name(self) -> str:
        return f"{self.id}-v{self.version}"

    @property
    def label(self) -> str:
        return f"{self.name} (v{self.version}, {self.preset}, trigger '{self.trigger_token}')"


def _slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    return s or "style"


def _class_noun(style: dict) -> str:
    prompt = (style.get("training_config", {}).get("class_prompt", "").strip().splitlines() or [""])[0]
    words = re.findall(r"[a-z]+", prompt.lower())
    return words[-1] if words else ""


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(data_dir: Path, name: str, lora_path: Path, style_json: Path, preview: Path | None = None) -> StyleInfo:
    """Copy a training result into the library as a new style (version 1), atomically."""
    styles = data_dir / "styles"
    styles.mkdir(parents=True, exist_ok=True)
    style_id = f"{_slug(name)}-{uuid.uuid4().hex[:6]}"
    final = styles / style_id / "v1"
    tmp = styles / style_id / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        meta = json.loads(Path(style_json).read_text("utf-8"))
        meta.update(name=name, id=style_id, version=1, schema_version=SCHEMA_VERSION)
        _validate(meta)  # before the rename: a published folder that the library would skip helps nobody
        shutil.copyfile(lora_path, tmp / "lora.safetensors")
        if preview and Path(preview).is_file():
            shutil.copyfile(preview, tmp / "preview.png")
        (tmp / "style.json").write_text(json.dumps(meta, indent=1), "utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _read(final)


def _show(v) -> str:
    """A short rendering of a JSON value for a message (containers by type: they may be nested arbitrarily)."""
    return json.dumps(v)[:60] if v is None or isinstance(v, (str, int, float)) else f"a {type(v).__name__}"


def _validate(m) -> None:
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
    for key in ("id", "trigger_token"):
        if not m[key].strip():
            raise StyleFileError(f"{key!r} is empty")
    if m.get("version", 1) < 1:
        raise StyleFileError(f"'version' must be 1 or more but is {m['version']}")
    if m.get("preset", "style") not in ("subject", "style"):
        raise StyleFileError(f"'preset' must be 'subject' or 'style' but is {m['preset']!r}")
    class_prompt = m.get("training_config", {}).get("class_prompt", "")
    if not isinstance(class_prompt, str):
        raise StyleFileError(f"'training_config.class_prompt' must be a string but is {_show(class_prompt)}")


def _read(folder: Path) -> StyleInfo:
    try:
        m = json.loads((folder / "style.json").read_text("utf-8"))
    except RecursionError:  # deeply nested JSON: a ValueError like any other unreadable file
        raise StyleFileError("style.json is nested too deeply") from None
    _validate(m)
    return StyleInfo(id=m["id"], name=m.get("name", m["id"]), version=int(m.get("version", 1)),
                     trigger_token=m["trigger_token"], preset=m.get("preset", "style"), class_noun=_class_noun(m),
                     base_model_fingerprint=m.get("base_model_fingerprint", ""), created=m.get("created", ""),
                     folder=folder)


def list_styles(data_dir: Path) -> list[StyleInfo]:
    """Every published style version, newest first; an unreadable or malformed folder is skipped with a warning
    (one bad style.json must not empty the style picker)."""
    out = []
    for f in (data_dir / "styles").glob("*/v*/style.json"):
        try:
            out.append(_read(f.parent))
        except (OSError, ValueError, RecursionError) as e:  # ValueError: invalid JSON, bad UTF-8, StyleFileError
            log.warning("skipped style folder %s: %s. Fix or remove its style.json to list it again.", f.parent, e)
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


class AdapterCache:
    """LoRA adapters loaded into the base model's modules, kept loaded so switching back is quick.

    It wraps the same UNet/text-encoder objects in a diffusers pipeline only to use its LoRA loader and
    `set_adapters`; call it under the engine's lock (adapter changes and denoising must not interleave, MU-6).
    """

    def __init__(self, components):
        from diffusers import StableDiffusionPipeline

        c = components
        self.pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                            unet=c.unet, scheduler=c.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        self.loaded: set[str] = set()

    def activate(self, style: StyleInfo | None, strength: float = 1.0) -> None:
        if style is None:
            if self.loaded:
                self.pipe.disable_lora()
            return
        if style.adapter_name not in self.loaded:
            from .safety import check_model_file

            check_model_file(style.lora)
            self.pipe.load_lora_weights(str(style.lora), adapter_name=style.adapter_name, use_safetensors=True)
            self.loaded.add(style.adapter_name)
        self.pipe.enable_lora()
        self.pipe.set_adapters([style.adapter_name], adapter_weights=[strength])
