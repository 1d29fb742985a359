"""Small pieces of a library record: validated names and tags, file hashes, style.json reading, base-model flags."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from engine.core.errors import LibraryError
from engine.styles.store import SCHEMA_VERSION, StyleInfo, _slug, validate_style_json

MAX_NAME, MAX_TAG, MAX_TAGS, MAX_DESCRIPTION = 120, 40, 32, 4000


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_style_id(name: str) -> str:
    return f"{_slug(name)}-{uuid.uuid4().hex[:6]}"


def base_model_mismatch(style: StyleInfo, fingerprint: str, model_name: str) -> str | None:
    """"trained on X; you are on Y" when the style was made on another base model, else None."""
    if not style.base_model_fingerprint or style.base_model_fingerprint == fingerprint:
        return None
    made_on = style.base_model or f"a model with fingerprint {style.base_model_fingerprint[:10]}"
    verb = "imported for" if style.source == "imported" else "trained on"
    return f"{verb} {made_on}; you are on {model_name}"


def clean_name(name: str) -> str:
    name = " ".join(str(name).split())
    if not name:
        raise LibraryError("give the style a name, e.g. 'my heart shape'")
    if len(name) > MAX_NAME:
        raise LibraryError(f"the name is {len(name)} characters long; keep it to {MAX_NAME}")
    return name


def clean_tags(tags) -> tuple[str, ...]:
    """Tags are lower-case words; commas separate them when one string is given."""
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    out: list[str] = []
    for t in items:
        t = " ".join(str(t).lower().split())
        if not t or t in out:
            continue
        if len(t) > MAX_TAG:
            raise LibraryError(f"the tag {t[:20]!r}… is {len(t)} characters long; keep tags to {MAX_TAG}")
        out.append(t)
    if len(out) > MAX_TAGS:
        raise LibraryError(f"{len(out)} tags given; keep it to {MAX_TAGS}")
    return tuple(sorted(out))


def read_style_json(folder: Path) -> dict:
    """A version folder's style.json, checked against its schema (store.validate_style_json): a hand-edited or
    half-synced file is a LibraryError naming the problem, never a crash of the whole list."""
    try:
        meta = json.loads((folder / "style.json").read_text("utf-8"))
    except RecursionError:  # deeply nested JSON
        raise LibraryError("style.json is nested too deeply") from None
    except (OSError, ValueError) as e:
        raise LibraryError(f"style.json cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(meta, dict) and isinstance(meta.get("schema_version", 1), int) \
            and meta.get("schema_version", 1) > SCHEMA_VERSION:
        raise LibraryError(f"style.json has schema {meta.get('schema_version')}, newer than this Stylebooth's "
                           f"{SCHEMA_VERSION}; update Stylebooth")
    validate_style_json(meta)
    words = meta.get("trigger_words") or [meta.get("trigger_token")]
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise LibraryError("style.json has no trigger_token")
    return meta
