"""Frozen, versioned request and settings dataclasses, validated on construction.

Field names follow diffusers' argument names so that forms, TOML files and recipes all speak the same words.
Every error message says how to fix the input (in the style of diffusers' `check_inputs`).
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from engine.core.errors import ConfigError  # noqa: F401

SCHEDULERS = ("dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "ddim", "unipc")
SCHEDULER_LABELS = {
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "euler": "Euler",
    "euler_a": "Euler ancestral",
    "ddim": "DDIM",
    "unipc": "UniPC",
}
MAX_PROMPT_CHARS = 2000
MAX_STYLES = 8
STRENGTH_RANGE = (-2.0, 2.0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# What each annotation accepts, and how a wrong value is described to the user.
_KINDS = {"bool": "true or false (a TOML boolean, without quotes)", "int": "a whole number (e.g. 20)",
          "float": "a number (e.g. 0.5)", "str": "text in quotes", "tuple[str, ...]": "a list of texts in quotes",
          "tuple[float, ...]": "a list of numbers (e.g. [0.5, 1.0])"}


def _coerce(obj) -> None:
    """Check every field against its annotation, the same way for TOML, JSON, recipes and direct API calls.

    Nothing is guessed: the string "false" is not false (Python's bool("false") is True, which once bound the app
    to 0.0.0.0), True is not the number 1, and 20.0 is not the whole number 20 (the UI converts its sliders' floats
    where it knows the component, ui/forms.py). The only widening is int -> float, which loses nothing. Lists
    become tuples so the dataclass stays hashable.
    """
    for f in fields(obj):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        v = getattr(obj, f.name)
        if kind == "bool":
            ok = isinstance(v, bool)
        elif kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif kind == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok and not isinstance(v, float):
                object.__setattr__(obj, f.name, float(v))
        elif kind == "str":
            ok = isinstance(v, str)
        elif kind == "tuple[str, ...]":
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)
            if ok:
                object.__setattr__(obj, f.name, tuple(v))
        elif kind == "tuple[float, ...]":
            ok = isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                      for x in v)
            if ok:
                object.__setattr__(obj, f.name, tuple(float(x) for x in v))
        elif kind == "tuple[tuple[str, float], ...]":  # (style id, strength) pairs: their own checks and messages
            object.__setattr__(obj, f.name, style_pairs(v, f.name))
            continue
        elif dataclasses.is_dataclass(v) and type(v).__name__ == kind:  # a nested request, validated when made
            continue
        else:  # a new annotation must be taught here, or its values would go unchecked
            _check(kind[:1].isupper() is False, f"`{f.name}` must be a {kind} but is {type(v).__name__}")
            raise TypeError(f"{type(obj).__name__}.{f.name}: no type check for annotation {kind!r}")
        _check(ok, f"`{f.name}` must be {_KINDS[kind]} but is {v!r} ({type(v).__name__}); fix that value")


def real_number(v, what: str) -> float:
    """A typed number: int or float, never a bool or a string (a quoted "0.5" from a form is a wiring bug)."""
    _check(isinstance(v, (int, float)) and not isinstance(v, bool),
           f"{what} must be a number but is {v!r} ({type(v).__name__})")
    _check(math.isfinite(v), f"{what} must be finite but is {v}")
    return float(v)


def style_pairs(value, field: str = "styles") -> tuple[tuple[str, float], ...]:
    """Normalise (id, strength) pairs: tuples or lists [id, strength] (TOML/JSON), or recipe dicts
    {"id": .., "strength": ..} (extra keys such as name/version are descriptive and ignored)."""
    _check(isinstance(value, (tuple, list)), f"`{field}` must be a list of (style id, strength) pairs but is "
                                             f"{value!r:.60} ({type(value).__name__})")
    out = []
    for k, item in enumerate(value):
        if isinstance(item, dict):
            _check("id" in item, f"`{field}[{k}]` has no 'id'; give {{'id': <style id>, 'strength': 1.0}}")
            item = (item["id"], item.get("strength", 1.0))
        _check(isinstance(item, (tuple, list)) and len(item) == 2,
               f"`{field}[{k}]` must be a (style id, strength) pair but is {item!r}")
        sid, w = item
        _check(isinstance(sid, str) and 0 < len(sid) <= 200, f"`{field}[{k}]`: the style id must be a non-empty "
                                                             "string from the list of styles")
        w = real_number(w, f"`{field}[{k}]` strength")
        lo, hi = STRENGTH_RANGE
        _check(lo <= w <= hi, f"`{field}[{k}]` strength must be between {lo:g} and {hi:g} but is {w}")
        out.append((sid, w))
    return tuple(out)


def check_instant(req) -> None:
    """The instant-style fields shared by GenerateRequest and BatchRequest."""
    _check(isinstance(req.instant_style, str) and len(req.instant_style) <= 200,
           "`instant_style` must be an instant style's id from the library (\"\" for none)")
    _check(0.0 <= req.instant_strength <= 2.0,
           f"`instant_strength` must be between 0 and 2 but is {req.instant_strength}")
    _check(isinstance(req.instant_style_only, bool),
           f"`instant_style_only` must be true or false, not {req.instant_style_only!r}")


@dataclass(frozen=True)
class GenerateRequest:
    """One press of Generate: `batch_count` batches of `batch_size` images; image k uses seed `seed + k`."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    guidance_rescale: float = 0.0
    width: int = 0  # 0: the model's native size
    height: int = 0
    seed: int = 0
    batch_size: int = 1
    batch_count: int = 1
    scheduler: str = "dpmpp_2m"
    style: str = ""  # a trained style's id ("" = none); its trigger token is added to the prompt if missing
    style_strength: float = 1.0
    # More styles at once, after `style`: (style id, strength) pairs. Their LoRA updates add up, each times its
    # strength (diffusers' set_adapters with weights). A recipe's list of {"id": .., "strength": ..} dicts and
    # JSON/TOML lists of [id, strength] are accepted and stored as a tuple of pairs.
    styles: tuple[tuple[str, float], ...] = ()
    # Each non-empty line of `prompt` is its own prompt, all in one batch (batch_size images per line): a list of
    # prompts costs one sampling loop instead of one per prompt.
    prompt_per_line: bool = False
    # An instant style (library version of kind "instant": reference images through the IP-Adapter), "" = none.
    # Its strength is the IP-Adapter scale; style-only injects the image only into the style blocks (InstantStyle).
    instant_style: str = ""
    instant_strength: float = 1.0
    instant_style_only: bool = True
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)
        check_instant(self)
        _check(isinstance(self.prompt, str) and self.prompt.strip() != "",
               "`prompt` is empty: describe the image you want, e.g. 'a red circle on a blue background'")
        _check(len(self.prompt) <= MAX_PROMPT_CHARS and len(self.negative_prompt) <= MAX_PROMPT_CHARS,
               f"prompts are limited to {MAX_PROMPT_CHARS} characters; shorten the prompt")
        _check(1 <= self.num_inference_steps <= 150,
               f"`num_inference_steps` must be between 1 and 150 but is {self.num_inference_steps}")
        _check(0.0 <= self.guidance_scale <= 30.0,
               f"`guidance_scale` must be between 0 and 30 but is {self.guidance_scale}")
        _check(0.0 <= self.guidance_rescale <= 1.0,
               f"`guidance_rescale` must be between 0 and 1 but is {self.guidance_rescale}")
        for name in ("width", "height"):
            v = getattr(self, name)
            _check(v == 0 or (8 <= v <= 2048 and v % 8 == 0),
                   f"`{name}` must be divisible by 8 (between 8 and 2048) but is {v}; try {max(8, round(v / 8) * 8)}")
        _check(0 <= self.seed < 2**32, f"`seed` must be between 0 and {2**32 - 1} but is {self.seed}")
        _check(1 <= self.batch_size <= 64, f"`batch_size` must be between 1 and 64 but is {self.batch_size}")
        _check(1 <= self.batch_count <= 100, f"`batch_count` must be between 1 and 100 but is {self.batch_count}")
        _check(self.scheduler in SCHEDULERS,
               f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        _check(-2.0 <= self.style_strength <= 2.0,
               f"`style_strength` must be between -2 and 2 but is {self.style_strength}")
        _check(isinstance(self.style, str) and len(self.style) <= 200, "`style` must be a style id from the list")
        object.__setattr__(self, "styles", style_pairs(self.styles, "styles"))
        ids = [sid for sid, _ in self.active_styles]
        _check(len(set(ids)) == len(ids), f"a style is listed twice ({', '.join(ids)}); give each style once, "
                                          "with one strength")
        _check(len(ids) <= MAX_STYLES, f"at most {MAX_STYLES} styles at once but {len(ids)} were given")
        _check(self.schema_version == 1, f"unsupported schema_version {self.schema_version}; this app reads 1")
        _check(len(self.prompts) <= 64, f"one batch holds at most 64 images but {len(self.lines)} prompt lines x "
                                        f"{self.batch_size} images per line make {len(self.prompts)}; use fewer "
                                        "lines or fewer images per batch")

    @property
    def active_styles(self) -> tuple[tuple[str, float], ...]:
        """Every style this request applies, as (id, strength): `style` first (when set), then `styles`."""
        return (((self.style, self.style_strength),) if self.style else ()) + self.styles

    @property
    def lines(self) -> list[str]:
        """The prompts of this request: every non-empty line with `prompt_per_line`, else the whole prompt."""
        if not self.prompt_per_line:
            return [self.prompt]
        return [ln.strip() for ln in self.prompt.splitlines() if ln.strip()]

    @property
    def prompts(self) -> list[str]:
        """One batch's prompts, image by image: each line `batch_size` times."""
        return [ln for ln in self.lines for _ in range(self.batch_size)]

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.batch_count


@dataclass(frozen=True)
class Settings:
    """What the launcher passes to the Engine. `model` empty means the bundled demo model."""

    model: str = ""
    data_dir: str = ""
    port: int = 7860
    listen: bool = False
    open_browser: bool = True
    # While the app is open to the network (--listen, --share), the Model box loads only these sources (plus the
    # demo model and `model`): a remote user must not make the server open arbitrary paths (ui.app.AppHandlers).
    allowed_models: tuple[str, ...] = ()
    # The IP-Adapter for instant styles on a real model: a local folder (h94/IP-Adapter layout or ours) or a hub id
    # when online; "" = the bundled demo IP-Adapter (demo model only).
    ip_adapter: str = ""
    # The CLIP model that scores training checkpoints (engine/train/evaluate.py): a local folder or a hub id when
    # online; "" = the demo checker on the demo model, no scores on other models. Set here, never by a form.
    eval_model: str = ""
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)
        _check(1 <= self.port <= 65535, f"`port` must be between 1 and 65535 but is {self.port}")


def from_dict(cls, data: dict[str, Any]):
    """Build a dataclass from a mapping; unknown keys are an error that names them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"unknown key(s) for {cls.__name__}: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{cls.__name__}: {e}") from None


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def save_toml(obj, path: str | Path) -> None:
    """Write a dataclass as TOML, atomically."""
    from engine.core.files import atomic_write_bytes

    atomic_write_bytes(Path(path), tomli_w.dumps(to_dict(obj)).encode("utf-8"))


def load_toml(cls, path: str | Path):
    try:
        data = tomllib.loads(Path(path).read_text("utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return from_dict(cls, data)
