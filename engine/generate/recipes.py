"""Generated PNGs carry their full recipe: a JSON recipe and the A1111-style `parameters` string.

A1111, ComfyUI and Civitai read `parameters`; Stylebooth reads its own JSON first (exact) and falls back to
parsing `parameters` so that images from those tools refill the form too. No EXIF is ever written (IM-9).
"""
from __future__ import annotations

import json
import re
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
    """The recipe stored in a PNG (ours, or A1111's `parameters`), or None when there is none."""
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    text = getattr(img, "text", None) or img.info
    if RECIPE_KEY in text:
        try:
            data = json.loads(text[RECIPE_KEY])
        except ValueError:
            data = None
        if isinstance(data, dict):
            return migrate(data)
    if "parameters" in text:
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
    kv = dict(m.groups() for m in re.finditer(r"\s*([\w ]+): ([^,]+)", settings_line))
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


def scheduler_label(key: str) -> str:
    return SCHEDULER_LABELS.get(key, key)
