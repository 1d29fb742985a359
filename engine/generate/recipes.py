"""Generated PNGs carry their full recipe: a JSON recipe and the A1111-style `parameters` string.

A1111, ComfyUI and Civitai read `parameters`; Stylebooth reads its own JSON first (exact) and falls back to
parsing `parameters` so that images from those tools refill the form too. No EXIF is ever written (IM-9).
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

from PIL import Image, PngImagePlugin

from engine.core.config import SCHEDULER_LABELS
from engine.core.files import atomic_path

RECIPE_KEY = "stylebooth"
# 2: every applied style is in "styles" ([{id, version, name, strength, trigger_token}, ...]); 1 also had the
# request's single "style"/"style_strength" (read_recipe migrates it).
RECIPE_SCHEMA = 2
_A1111_SAMPLERS = {"dpmpp_2m": ("DPM++ 2M", None), "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
                   "euler": ("Euler", None), "euler_a": ("Euler a", None), "ddim": ("DDIM", None),
                   "unipc": ("UniPC", None)}
# A dropped PNG is untrusted. A1111's and our recipe texts are a few KB; 64 KB leaves room for long prompts while
# keeping parsing instant. Pixels are capped from the header (reading the text may decode the image) like uploads.
MAX_RECIPE_TEXT = 64 * 1024
MAX_RECIPE_PIXELS = 40_000_000
MAX_RECIPE_SIDE = 8192
_RECIPE_FORMATS = ["PNG", "JPEG", "WEBP"]


class RecipeError(ValueError):
    """A dropped image whose recipe cannot be read safely; the message says what is wrong and what to do."""


def a1111_parameters(r: dict) -> str:
    """The `parameters` text A1111 writes: prompt, 'Negative prompt:' line, then 'Key: value' pairs."""
    sampler, schedule = _A1111_SAMPLERS[r["scheduler"]]
    pairs = [("Steps", r["num_inference_steps"]), ("Sampler", sampler)]
    if schedule:
        pairs.append(("Schedule type", schedule))
    pairs += [("CFG scale", r["guidance_scale"]), ("Seed", r["seed"]), ("Size", f"{r['width']}x{r['height']}"),
              ("Model hash", r.get("model_fingerprint", "")[:10]), ("Model", r.get("model", ""))]
    if r.get("guidance_rescale"):
        pairs.append(("CFG rescale", r["guidance_rescale"]))
    for s in r.get("styles", []):
        pairs.append(("Lora", f"{s['name']}:{s['strength']}"))
    text = r["prompt"]
    if r.get("negative_prompt"):
        text += f"\nNegative prompt: {r['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in pairs)


def save_png(image: Image.Image, recipe: dict, path: Path, *, embed: bool = True) -> Path:
    """Write the image atomically with its recipe in PNG text chunks (or none when `embed` is False)."""
    info = PngImagePlugin.PngInfo()
    if embed:
        info.add_text(RECIPE_KEY, json.dumps({"schema_version": RECIPE_SCHEMA, **recipe}, sort_keys=True))
        info.add_text("parameters", a1111_parameters(recipe))
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = Image.frombytes(image.mode, image.size, image.tobytes())  # drops any EXIF/info the image carried
    with atomic_path(path) as tmp:
        clean.save(tmp, format="PNG", pnginfo=info)
    return path


def read_recipe(path_or_image) -> dict | None:
    """The recipe stored in a PNG (ours, or A1111's `parameters`), or None when there is none.

    Raises RecipeError for files that are not regular files, images too large to decode, recipe texts over
    MAX_RECIPE_TEXT and JSON nested too deeply; PIL's own errors (UnidentifiedImageError, OSError) pass through.
    The values are not validated here: build a GenerateRequest from them for that.
    """
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    else:
        try:
            mode = os.stat(path_or_image).st_mode
        except OSError as e:
            raise RecipeError(f"cannot read that file ({e.strerror or e}); drop a PNG file") from None
        if not stat.S_ISREG(mode):  # open() on a FIFO would block this request forever
            raise RecipeError("that is not a regular file (a pipe, device or folder); drop a PNG file")
        try:
            img = Image.open(path_or_image, formats=_RECIPE_FORMATS)
        except Image.DecompressionBombError:
            raise RecipeError("that image is too large to read safely; drop the PNG that Stylebooth or A1111 "
                              "saved") from None
        with img:  # close the file we opened, whatever happens
            return _recipe_from(img)
    return _recipe_from(path_or_image)


def _recipe_from(img: Image.Image) -> dict | None:
    w, h = img.size  # from the header: nothing decoded yet
    if w * h > MAX_RECIPE_PIXELS or max(w, h) > MAX_RECIPE_SIDE:
        raise RecipeError(f"that image is {w}x{h} pixels, too large to read safely (at most "
                          f"{MAX_RECIPE_PIXELS // 1_000_000} MP, {MAX_RECIPE_SIDE} px per side); drop the PNG that "
                          "Stylebooth or A1111 saved")
    # Text chunks before the pixel data are in `info` without decoding; `.text` decodes the image to find chunks
    # that come after it (the size is capped above).
    text = img.info
    if RECIPE_KEY not in text and "parameters" not in text:
        text = getattr(img, "text", None) or img.info
    for key in (RECIPE_KEY, "parameters"):
        value = text.get(key)
        if isinstance(value, (str, bytes)) and len(value) > MAX_RECIPE_TEXT:
            raise RecipeError(f"its {key!r} recipe text is {len(value) // 1024} KB, over the "
                              f"{MAX_RECIPE_TEXT // 1024} KB limit (real recipes are a few KB); the form is unchanged")
    if RECIPE_KEY in text:
        try:
            data = json.loads(text[RECIPE_KEY])
        except RecursionError:
            raise RecipeError("its recipe JSON is nested too deeply to be a recipe; the form is unchanged") from None
        except (ValueError, TypeError):
            data = None
        if isinstance(data, dict):
            return migrate(data)
    if isinstance(text.get("parameters"), str):
        return parse_a1111(text["parameters"])
    return None


def migrate(data: dict) -> dict:
    """Bring a stored recipe to RECIPE_SCHEMA, so that its request fields refill a GenerateRequest exactly.

    Schema 1 wrote the single style twice: as the request's `style`/`style_strength` and in `styles`. Schema 2
    lists every style once, in `styles` (GenerateRequest accepts that list of dicts).
    """
    version = data.pop("schema_version", 1)
    if version < 2:
        style, strength = data.pop("style", ""), data.pop("style_strength", 1.0)
        listed = data.get("styles") if isinstance(data.get("styles"), list) else []
        if style and not any(isinstance(s, dict) and s.get("id") == style for s in listed):
            listed = [{"id": style, "strength": strength}] + listed
        data["styles"] = listed
    return data


def parse_a1111(text: str) -> dict:
    """Parse A1111's `parameters` text into our field names (unknown settings are ignored)."""
    lines = text.strip().split("\n")
    settings_line = lines[-1] if re.search(r"\bSteps: \d+", lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    prompt, negative, in_neg = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_neg, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_neg else prompt).append(line)
    kv = _settings(settings_line)
    out: dict = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    conv = {"Steps": ("num_inference_steps", int), "CFG scale": ("guidance_scale", float), "Seed": ("seed", int),
            "CFG rescale": ("guidance_rescale", float)}
    for k, (name, fn) in conv.items():
        if k in kv:
            try:
                out[name] = fn(kv[k].strip())
            except ValueError:
                pass
    if "Size" in kv and re.fullmatch(r"\d+x\d+", kv["Size"].strip()):
        out["width"], out["height"] = map(int, kv["Size"].strip().split("x"))
    sampler, schedule = kv.get("Sampler", "").strip(), kv.get("Schedule type", "").strip()
    for key, (name, sch) in _A1111_SAMPLERS.items():
        if name == sampler and (sch or "") == ("Karras" if schedule == "Karras" else ""):
            out["scheduler"] = key
    return out


def _settings(line: str) -> dict[str, str]:
    """A1111's 'Key: value, Key: "quoted, value", ...' line as a dict, in one linear pass.

    A regex like r"\\s*([\\w ]+): ([^,]+)" backtracks quadratically on a long line without ": " (a crafted 28 KB
    PNG blocked the server for 6.6 s). Every search here is bounded by the next comma or closing quote, so each
    character is looked at a fixed number of times. Quoted values are JSON strings, as A1111 writes them.
    """
    kv: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        comma = line.find(",", i)
        stop = n if comma < 0 else comma
        colon = line.find(":", i, stop)
        if colon < 0:  # a piece without "Key:": skip it
            i = stop + 1
            continue
        key, k = line[i:colon].strip(), colon + 1
        while k < n and line[k] == " ":
            k += 1
        if k < n and line[k] == '"':
            m = k + 1
            while m < n and line[m] != '"':
                m += 2 if line[m] == "\\" else 1
            raw = line[k:m + 1]
            try:
                value = json.loads(raw)
            except ValueError:  # an unterminated or odd quote: keep the text as it is
                value = raw.strip('"')
            comma = line.find(",", m + 1)
            stop = n if comma < 0 else comma
        else:
            value = line[k:stop]
        if key:
            kv[key] = str(value).strip()
        i = stop + 1
    return kv


def scheduler_label(key: str) -> str:
    return SCHEDULER_LABELS.get(key, key)
