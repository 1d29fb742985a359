"""Import LoRA / textual-inversion files into the library, and export styles for diffusers and for A1111/ComfyUI.

Imports are safetensors only, checked by content (pickles refused whatever their name, MF-4), validated (header,
dtypes, offsets, NaN/Inf, MF-7) and matched against the loaded base model: a file none of whose layers exist here
is refused with "0 of N layers matched" (MF-8), never imported as a silent no-op. What lands in the library is our
own format (PEFT keys with every module's rank and alpha), holding only the layers that matched.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import LibraryError
from engine.core.files import atomic_dir, atomic_path, sha256_file
from engine.models.safety import check_model_file
from engine.styles import lora_format as F
from engine.styles.library import Library
from engine.styles.records import clean_name, clean_tags, new_style_id, now
from engine.styles.store import SCHEMA_VERSION, StyleInfo

EXPORT_FORMATS = ("a1111", "diffusers")  # a1111: kohya keys (A1111, ComfyUI, Civitai); diffusers: PEFT keys
MAX_IMPORT_BYTES = 2 * 2**30  # SD 1/2 LoRAs with LoCon at high rank stay well below this
_BAD_FILENAME = re.compile(r'[\x00-\x1f/\\:*?"<>|]')


@dataclass(frozen=True)
class ImportResult:
    style: StyleInfo
    kind: str  # "lora" | "embedding"
    matched: int
    total: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ExportResult:
    path: Path  # the written file; its name is what A1111's `<lora:NAME:1>` and our PNGs' "Lora:" entry use
    fmt: str
    metadata: dict[str, str]


def export_file_name(style_name: str) -> str:
    """The exported file's name: the style name our PNG recipes write as "Lora: <name>:<strength>", so an A1111
    user who drops the file into models/Lora gets the name that the PNG's parameters refer to. Characters that no
    file system allows become "_"."""
    stem = _BAD_FILENAME.sub("_", style_name).strip().lstrip(".") or "style"
    return f"{stem[:120]}.safetensors"


# ---- import ----------------------------------------------------------------------------------------------------

def import_file(lib: Library, path: str | os.PathLike, components, *, model_fingerprint: str, model_name: str,
                name: str = "", trigger: str = "", preset: str = "style", tags=()) -> ImportResult:
    """Check, match and store a LoRA or embedding file as a new library style (version 1)."""
    from safetensors.torch import load_file

    src = Path(path)
    if preset not in ("subject", "style"):
        raise LibraryError(f"preset must be 'subject' or 'style', not {preset!r}")
    metadata = check_model_file(src, "safetensors", check_values=True)  # pickles, truncation, NaN/Inf
    if src.stat().st_size > MAX_IMPORT_BYTES:  # every tensor is read into memory below
        raise LibraryError(f"{src.name} is {src.stat().st_size / 2**30:.1f} GiB; LoRA and embedding files are far "
                           f"smaller (at most {MAX_IMPORT_BYTES // 2**30} GiB). A full model goes in the Model tab")
    sd = load_file(str(src))
    if not sd:
        raise LibraryError(f"{src.name} holds no tensors")
    warnings: list[str] = []
    if F.is_lora(sd):
        modules = F.parse_lora(sd, metadata)
        report = F.match(modules, components.unet, components.text_encoder)
        if not report.matched:
            raise LibraryError(f"{src.name}: 0 of {report.total} layers matched: this LoRA is for another "
                               f"architecture (e.g. SDXL or SD 2 while {model_name} is loaded); "
                               f"first mismatch: {report.unmatched[0][0]}: {report.unmatched[0][1]}")
        if report.unmatched:
            warnings.append(f"{report.summary}: {len(report.unmatched)} layers of {src.name} do not exist in "
                            f"{model_name} and were left out (e.g. {report.unmatched[0][0]}: "
                            f"{report.unmatched[0][1]}); it may have been made for a different model")
        tensors, file_meta = F.to_peft(list(report.matched))
        kind, weights, matched, total = "lora", "lora.safetensors", len(report.matched), report.total
    else:
        file_token, vectors = F.parse_embedding(sd)
        width = components.text_encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise LibraryError(f"{src.name}: 0 of 1 layers matched: this embedding is for another architecture "
                               f"(vectors of width {vectors.shape[1]}; {model_name}'s text encoder takes {width})")
        trigger = trigger or (file_token or "")
        tensors, file_meta = {"emb_params": vectors.contiguous()}, {"format": "pt"}
        kind, weights, matched, total = "embedding", "embedding.safetensors", 1, 1
    trigger_words = _trigger_words(trigger, metadata, src)
    if kind == "embedding":
        trigger_words = _free_token(trigger_words, components.tokenizer)
    info = _suggested_info(metadata)
    name = clean_name(name or info.get("name") or src.stem)
    meta = {"schema_version": SCHEMA_VERSION, "kind": kind, "source": "imported", "name": name,
            "preset": preset, "trigger_token": trigger_words[0], "trigger_words": list(trigger_words),
            "weights_file": weights, "base_model": model_name, "base_model_fingerprint": model_fingerprint,
            "prompt_template": "", "recommended_strength": 1.0, "preview_grid": "",
            "description": info.get("description", ""), "tags": list(clean_tags(tags or info.get("tags", ()))),
            "training_config": info.get("training_config", {}),
            "provenance": [{"imported_from": src.name, "sha256": _sha(src), "matched": matched, "total": total,
                            "imported": now()}],
            "created": now()}
    style = _write_version(lib, name, {weights: (tensors, file_meta)}, meta)
    return ImportResult(style, kind, matched, total, tuple(warnings))


def _trigger_words(given: str, metadata: dict[str, str], src: Path) -> tuple[str, ...]:
    """Given words, else ours, modelspec's trigger phrase, kohya's most frequent caption tag, its output name, or
    the file name (all editable later in the library)."""
    if given.strip():
        return tuple(w.strip() for w in given.split(",") if w.strip())
    ours = _json(metadata.get("stylebooth"))
    if isinstance(ours, dict) and ours.get("trigger_words"):
        return tuple(str(w) for w in ours["trigger_words"])
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if phrase:
        return tuple(w.strip() for w in phrase.split(",") if w.strip())
    freq = _json(metadata.get("ss_tag_frequency"))
    if isinstance(freq, dict):
        counts: dict[str, float] = {}
        for tagset in freq.values():
            for tag, n in (tagset.items() if isinstance(tagset, dict) else ()):
                if isinstance(n, (int, float)):
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + n
        if counts:
            return (max(counts, key=lambda t: (counts[t], t)),)
    stem = metadata.get("ss_output_name", "").strip() or src.stem
    return (re.sub(r"\s+", "_", stem)[:60] or "style",)


def _free_token(words: tuple[str, ...], tokenizer) -> tuple[str, ...]:
    """An embedding's trigger becomes a new token: one the tokenizer already has would be refused by diffusers."""
    first = words[0]
    if first in tokenizer.get_vocab() or " " in first:
        first = f"<{re.sub(r'[^A-Za-z0-9_-]+', '-', first).strip('-') or 'embedding'}>"
    return (first, *words[1:])


def _suggested_info(metadata: dict[str, str]) -> dict:
    ours = _json(metadata.get("stylebooth"))
    if isinstance(ours, dict):
        return {k: ours[k] for k in ("name", "description", "tags", "training_config") if k in ours}
    info = {}
    if metadata.get("modelspec.title"):
        info["name"] = metadata["modelspec.title"]
    if metadata.get("modelspec.description"):
        info["description"] = metadata["modelspec.description"][:4000]
    return info


def _json(text: str | None):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _sha(path: Path) -> str:
    return sha256_file(path)


def _write_version(lib: Library, name: str, files: dict[str, tuple[dict, dict]], meta: dict) -> StyleInfo:
    """A new style folder written whole under a temp name, renamed, then registered (as publish does, TR-10)."""
    from safetensors.torch import save_file

    style_id = new_style_id(name)
    final = lib.styles_dir / style_id / "v1"
    with atomic_dir(final) as tmp:
        for fname, (tensors, file_meta) in files.items():
            save_file(tensors, str(tmp / fname), metadata=file_meta)
            check_model_file(tmp / fname, "safetensors", check_values=False)  # what we wrote parses
        (tmp / "style.json").write_text(json.dumps({**meta, "id": style_id, "version": 1}, indent=1), "utf-8")
    return lib.register_folder(final, name=name, tags=meta.get("tags", ()))


# ---- export ----------------------------------------------------------------------------------------------------

def export_style(lib: Library, style_id: str, fmt: str, out_dir: Path, *, version: int | None = None) -> ExportResult:
    """Write a style version as one .safetensors file in `fmt` with its metadata in the header."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if fmt not in EXPORT_FORMATS:
        raise LibraryError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    style = lib.get(style_id)
    v = style.latest if version is None else next((x for x in style.versions if x.version == int(version)), None)
    if v is None:
        raise LibraryError(f"style {style.name!r} has no version {version}")
    check_model_file(v.lora, "safetensors", check_values=True)
    recorded = lib.file_hashes(style.id, v.version).get(v.lora.name)
    if recorded and recorded != _sha(v.lora):
        raise LibraryError(f"the weights of {style.name!r} v{v.version} changed on disk since they were saved "
                           f"(sha256 differs from the library's record); re-import or retrain the style")
    with safe_open(str(v.lora), framework="pt") as f:
        stored_meta = f.metadata() or {}
    sd = load_file(str(v.lora))
    meta = _export_metadata(style, v)
    if v.kind == "embedding":
        tensors = sd  # one tensor, "emb_params": A1111 and ComfyUI take single-tensor files; diffusers with token=
        file_name = export_file_name(v.trigger_token.strip("<>"))  # A1111 uses the file name as the trigger
    else:
        resolved = F.resolve_own(F.parse_lora(sd, stored_meta))
        if fmt == "a1111":
            tensors = F.to_kohya(resolved)
            ranks = sorted({r.module.rank for r in resolved})
            alphas = sorted({r.module.alpha if r.module.alpha is not None else r.module.rank for r in resolved})
            meta.update(ss_network_dim=str(ranks[-1]), ss_network_alpha=_num(alphas[-1]),
                        ss_network_module="networks.lora")
            if any(r.module.down.ndim == 4 and r.module.down.shape[-1] > 1 for r in resolved):
                meta["ss_network_args"] = json.dumps({"conv_dim": ranks[-1], "conv_alpha": _num(alphas[-1])})
        else:
            tensors = sd
            meta["lora_adapter_metadata"] = stored_meta.get("lora_adapter_metadata", "")
            if not meta["lora_adapter_metadata"]:
                del meta["lora_adapter_metadata"]
        file_name = export_file_name(style.name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **meta})
    return ExportResult(path, fmt, meta)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _export_metadata(style, v: StyleInfo) -> dict[str, str]:
    """kohya's ss_* keys where they apply, modelspec's, and ours (JSON under "stylebooth", with schema_version)."""
    tc = {}
    style_json = v.folder / "style.json"
    try:
        full = json.loads(style_json.read_text("utf-8"))
        tc = full.get("training_config", {}) or {}
        steps = full.get("steps", tc.get("max_train_steps"))
        prediction = full.get("prediction_type", "epsilon")
        images = full.get("training_images", [])
    except (OSError, ValueError):
        steps, prediction, images = None, "epsilon", []
    meta = {"ss_output_name": Path(export_file_name(style.name)).stem,
            "ss_tag_frequency": json.dumps({f"1_{v.trigger_token}": {v.trigger_token: max(1, len(images))}}),
            "ss_base_model_version": "sd_v1" if prediction == "epsilon" else "sd_v2_768_v",
            "ss_v2": "False" if prediction == "epsilon" else "True",
            "ss_sd_model_name": v.base_model, "ss_training_comment": style.description[:1000],
            "modelspec.title": style.name, "modelspec.trigger_phrase": ", ".join(v.trigger_words or (v.trigger_token,)),
            "modelspec.tags": ", ".join(style.tags), "modelspec.description": style.description[:1000],
            "modelspec.architecture": "stable-diffusion-v1/lora" if v.kind == "lora" else "stable-diffusion-v1/textual-inversion",
            "modelspec.date": v.created}
    for key, field in (("ss_steps", None), ("ss_learning_rate", "learning_rate"), ("ss_unet_lr", "learning_rate"),
                       ("ss_text_encoder_lr", "text_encoder_lr"), ("ss_seed", "seed"), ("ss_resolution", "resolution"),
                       ("ss_num_train_images", None), ("ss_lr_scheduler", "lr_scheduler"),
                       ("ss_mixed_precision", "mixed_precision"), ("ss_max_train_steps", "max_train_steps")):
        value = steps if key == "ss_steps" else len(images) if key == "ss_num_train_images" else tc.get(field)
        if value not in (None, "", []):
            meta[key] = str(value)
    meta["stylebooth"] = json.dumps({"schema_version": SCHEMA_VERSION, "style_id": style.id, "version": v.version,
                                     "name": style.name, "description": style.description, "tags": list(style.tags),
                                     "preset": style.preset, "kind": v.kind, "trigger_words": list(v.trigger_words),
                                     "base_model": v.base_model, "base_model_fingerprint": v.base_model_fingerprint,
                                     "recommended_strength": v.recommended_strength, "training_config": tc},
                                    sort_keys=True)
    return meta
