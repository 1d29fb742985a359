"""What the queue stores about a job's request and result: plain JSON, names and relative paths, never images."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from engine.core.errors import Cancelled


def request_record(req, *extra) -> dict:
    """A request dataclass as JSON-able fields (enough to show it and run it again), plus positional extras a
    job method takes after it (a training run's style name)."""
    out = dataclasses.asdict(req) if dataclasses.is_dataclass(req) and not isinstance(req, type) else {}
    out["request_type"] = type(req).__name__
    if extra and isinstance(extra[0], str):
        out["name"] = extra[0]
    return out


def _style(style) -> str | None:
    return f"{style.id}@v{style.version}" if style is not None and hasattr(style, "id") else None


def result_record(result, relative: Callable[[Path], str]) -> tuple[str, dict]:
    """(final state, result fields) of a job method's return value; `relative` maps an output path for storage."""
    cancelled = bool(getattr(result, "cancelled", False) or getattr(getattr(result, "result", None), "cancelled",
                                                                      False))
    out: dict = {}
    files: list[Path] = [img.path for img in getattr(result, "images", None) or () if getattr(img, "path", None)]
    files += list(getattr(result, "paths", None) or ())
    for name in ("strip_path", "grid_path", "zip_path"):
        if getattr(result, name, None) is not None:
            files.append(getattr(result, name))
            out[name.removesuffix("_path")] = len(files) - 1  # its index in `files`
    if files:
        out["files"] = [relative(p) for p in files]
    if getattr(result, "run_dir", None) is not None:
        out["run_id"] = Path(result.run_dir).name
    style = _style(getattr(result, "style", None))
    if style:
        out["style"] = style
        out["style_name"] = getattr(result.style, "name", "")
    for name in ("seconds", "steps"):
        v = getattr(result, name, None) if hasattr(result, name) else getattr(getattr(result, "result", None),
                                                                                name, None)
        if isinstance(v, (int, float)):
            out[name] = v
    return ("cancelled" if cancelled else "done"), out


def error_state(e: BaseException) -> tuple[str, str]:
    """(final state, message) of a job that raised."""
    if isinstance(e, Cancelled):
        return "cancelled", ""
    return "failed", (str(e) or type(e).__name__)[:2000]
