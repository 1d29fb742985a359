"""The Train tab's form: TrainConfig <-> component values by field name, presets, examples, the method switch, and
run.toml download/upload (`FormHandlers`, the part of ui.train_handlers.TrainHandlers that fills and reads the
form). Uploaded files are used only if Gradio received them in this upload (`_own_uploads`)."""
from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from engine.core.captions import read_captions
from engine.core.config import ConfigError, load_toml
from engine.core.train_config import (TRIGGER_CANDIDATES, TrainConfig, demo_settings, field_names, lora_rates,
                                      presets, rates_for_method, save_train_config)

from .forms import whole_numbers

# TrainConfig fields with no component, and where their value comes from instead.
DERIVED = {"instance_images": "the uploaded images", "schema_version": "the file format",
           "instance_captions": "the uploaded .txt caption files (one per image, same name)",
           # The engine trains the model it has loaded (priors and fingerprint come from it): "" means that one.
           "base_model": "the model loaded under Model",
           # A path or hub id the server would open: set where the app starts (settings.toml `eval_model`), never
           # by a form (client strings are hostile).
           "eval_model": "the app's evaluation model (settings.toml eval_model)"}
FIELD_NAMES = tuple(n for n in field_names() if n not in DERIVED)
# The form shows every int field with a Number box, which may send floats (build_train_tab checks this).
INT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type == "int" and f.name in FIELD_NAMES)
LIST_FIELDS = {"unet_target_modules": ",", "text_encoder_target_modules": ",", "validation_prompts": "\n",
               "eval_prompts": "\n"}
PROMPT_FIELDS = ("instance_prompt", "class_prompt", "validation_prompts")
MIN_IMAGES, MAX_IMAGES = 3, 20
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLES = {"heart": ("subject", "shape"), "checkered": ("style", "shape")}  # folder: (preset, class noun)

def to_form(cfg: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig values (dict) → component values: lists become comma- or line-separated text."""
    return {k: (LIST_FIELDS[k] + (" " if LIST_FIELDS[k] == "," else "")).join(v) if k in LIST_FIELDS else v
            for k, v in cfg.items() if k in FIELD_NAMES}


def default_values(kind: str = "subject", token: str = TRIGGER_CANDIDATES[0], noun: str = "shape") -> dict:
    return to_form(presets(kind, token=token, class_noun=noun))


def class_noun_of(class_prompt: str) -> str:
    words = re.findall(r"[A-Za-z]+", (class_prompt.strip().splitlines() or [""])[0])
    return words[-1] if words else "shape"


def _upload_dir() -> Path:
    """A fresh folder in Gradio's upload folder: the only place every launch setting lets Gradio serve files from
    (the data dir is blocked). Gradio's delete_cache does not cover it; the OS temp cleaner does."""
    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="stylebooth-train-", dir=get_upload_folder()))


def _upload_copy(paths: list[Path]) -> list[str]:
    folder, out = _upload_dir(), []
    for i, p in enumerate(paths):
        dst = folder / (p.name if p.name not in {Path(o).name for o in out} else f"{i}-{p.name}")
        shutil.copyfile(p, dst)
        out.append(str(dst))
    return out


def _own_uploads(files: list[str]) -> list[Path]:
    """The files Gradio received in this upload: regular files inside its upload folder, nothing else.

    Gradio already refuses a client's path outside its upload folder; this repeats the check where the files are
    opened, so a wiring mistake or a direct call cannot make the handler read a server path or follow a symlink.
    """
    root = Path(get_upload_folder()).resolve()
    out = []
    for f in files:
        p = Path(str(f))
        if p.is_symlink() or not p.is_file() or not p.resolve().is_relative_to(root):
            raise gr.Error(f"{p.name}: not a file of this upload; pick the files again")
        out.append(p)
    return out


def _base_name(entry: str) -> str:
    """The file name of a TOML's image entry, whichever system wrote it ("C:\\art\\a.png" and "~/a.png": "a.png")."""
    return re.split(r"[\\/]", entry)[-1]


def split_uploads(files: list[str] | None) -> tuple[list[str], list[str]]:
    """(images, caption .txt files) from the upload box, which takes both."""
    files = [str(f) for f in files or ()]
    texts = [f for f in files if Path(f).suffix.lower() == ".txt"]
    return [f for f in files if f not in texts], texts


# What full fine-tuning cannot keep (it has no base model under a LoRA to compare with): field -> (its value
# then, what the status says).
LORA_ONLY = {"uncond_preservation_weight": (0.0, "\"Keep the empty prompt's prediction\" set to 0: it needs the "
                                                 "base model under a LoRA."),
             "onpolicy_prior_weight": (0.0, "\"Prior on the LoRA's own samples\" set to 0: it needs a LoRA."),
             "prior_target": ("images", "Prior target set to the class images: \"base\" needs a LoRA.")}


class FormHandlers:
    """Filling and reading the form; needs `self.engine` and `self.user` (TrainHandlers sets them)."""

    def config(self, values: dict[str, Any], images: list[str] | None) -> TrainConfig:
        """Build the TrainConfig by field name; a bad value becomes a gr.Error with the engine's message."""
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:  # a wiring bug, not a user error: fail loudly
            raise KeyError(f"not TrainConfig form fields: {unknown}")
        clean = {k: v for k, v in values.items() if v is not None}  # an emptied box falls back to the default
        clean = whole_numbers(clean, INT_FIELDS)
        for k, sep in LIST_FIELDS.items():
            if isinstance(clean.get(k), str):
                clean[k] = tuple(s.strip() for s in clean[k].split(sep) if s.strip())
        images, texts = split_uploads(images)
        try:
            token = clean.get("trigger_token") or TRIGGER_CANDIDATES[0]
            captions, notices = read_captions(images, token, clean.get("instance_prompt", ""), texts)
            for n in notices:
                gr.Warning(n)
            return TrainConfig(instance_images=tuple(images), instance_captions=captions, **clean)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        except TypeError as e:  # a direct API call sent e.g. a list where a number belongs
            raise gr.Error(f"invalid value in the form: {e}") from None

    @staticmethod
    def preset(kind: str, token: str, noun: str) -> dict[str, Any]:
        """Every form field from `presets(kind)`, keeping the trigger and class noun the user chose."""
        try:
            return default_values(kind, (token or "").strip() or TRIGGER_CANDIDATES[0], (noun or "").strip() or "shape")
        except ConfigError as e:
            raise gr.Error(str(e)) from None

    @staticmethod
    def method(method: str, kind: str, learning_rate: float, text_encoder_lr: float,
               uncond_preservation_weight: float = 0.0, prior_target: str = "images",
               onpolicy_prior_weight: float = 0.0) -> dict[str, Any]:
        """Switching LoRA <-> full fine-tuning: the other method's default learning rates become this one's (a LoRA
        rate would wreck a full fine-tune); rates the user typed are kept, with a note. Full fine-tuning keeps no
        base model to compare with, so it turns `uncond_preservation_weight` and `onpolicy_prior_weight` off and the
        prior target back to the class images, and says so."""
        try:
            rates = rates_for_method(method, kind, float(learning_rate or 0), float(text_encoder_lr or 0))
            on = {"uncond_preservation_weight": float(uncond_preservation_weight or 0) > 0,
                  "onpolicy_prior_weight": float(onpolicy_prior_weight or 0) > 0,
                  "prior_target": prior_target == "base"} if method == "full" else {}
        except (ConfigError, TypeError, ValueError) as e:
            raise gr.Error(str(e)) from None
        name = "full fine-tuning" if method == "full" else "LoRA"
        turned = [k for k, v in on.items() if v]
        off = {k: LORA_ONLY[k][0] for k in turned}
        note = "".join(f" {LORA_ONLY[k][1]}" for k in turned)
        if rates is None:
            return {**off, "status": f"Method: {name}. Your learning rates are kept; check they suit {name} (full "
                                     f"fine-tuning wants about 20x less than LoRA).{note}"}
        return {**rates, **off, "status": f"Method: {name}. Learning rates set to {rates['learning_rate']:g} (UNet) "
                                          f"and {rates['text_encoder_lr']:g} (text encoder), what {name} needs on "
                                          f"this model.{note}"}

    @staticmethod
    def prior(on: bool, kind: str, learning_rate: float, text_encoder_lr: float,
              uncond_preservation_weight: float, min_timestep: int) -> dict[str, Any]:
        """Ticking Prior preservation with the demo model's settings (the example buttons) also sets what makes it
        work there: with priors the demo subject holds the empty prompt to the base model's and trains from
        timestep 300, without them from 100 (demo_settings(kind, prior=...), measured in README "What training
        learns" and "Every held-out concept"). Other settings are the user's own and stay as they are."""
        if kind not in ("subject", "style"):
            raise gr.Error(f"unknown preset {kind!r}; choose subject or style")
        if kind == "style":  # the demo style has the same settings with or without priors
            return {}
        try:
            is_demo = (float(learning_rate), float(text_encoder_lr)) == lora_rates(kind, "demo")
            now = {"uncond_preservation_weight": float(uncond_preservation_weight or 0),
                   "min_timestep": int(min_timestep or 0)}
        except (TypeError, ValueError) as e:
            raise gr.Error(f"invalid value in the form: {e}") from None
        want = {k: v for k, v in demo_settings(kind, prior=bool(on)).items() if k in now}
        changed = {k: v for k, v in want.items() if now[k] != v}
        if not is_demo or not changed:
            return {}
        labels = {"uncond_preservation_weight": "\"Keep the empty prompt's prediction\"",
                  "min_timestep": "\"Min timestep\""}
        said = " and ".join(f"{labels[k]} to {v:g}" for k, v in changed.items())
        why = ("on the demo model prior preservation keeps other prompts' shapes better with them" if on else
               "the demo subject's settings without priors")
        return {**changed, "status": f"Set {said}: {why} (README)."}

    def prompts(self, kind: str, token: str, noun: str) -> dict[str, Any]:
        """Rebuild the prompts from the preset's templates after the trigger or class noun changed."""
        return {k: v for k, v in self.preset(kind, token, noun).items() if k in PROMPT_FIELDS}

    def suggest_token(self, current: str, kind: str, noun: str, user: str | None = None) -> dict[str, Any]:
        """The next rare trigger not used by a style in the library (two styles with one trigger cannot be mixed).

        engine.core.train_config.suggest_trigger_token needs the model's tokenizer, which ui/ cannot reach without
        the engine exposing it; the candidates were chosen as single CLIP tokens already.
        """
        used = ({s.trigger_token for s in self.engine.list_styles(user=user or self.user)}
                if self.engine is not None else set())
        free = [t for t in TRIGGER_CANDIDATES if t not in used and t != current]
        token = (free or [t for t in TRIGGER_CANDIDATES if t != current])[0]
        return {"trigger_token": token, **self.prompts(kind, token, noun)}

    def example(self, which: str) -> dict[str, Any]:
        """One-click example: its images in the upload box, the right preset, a name."""
        kind, noun = EXAMPLES[which]
        files = _upload_copy(sorted((EXAMPLES_DIR / which).glob("*.png")) + sorted((EXAMPLES_DIR / which).glob("*.txt")))
        images, texts = split_uploads(files)
        values = {**default_values(kind, noun=noun), **to_form(demo_settings(kind))}
        return {**values, "images": files, "style_name": f"{which} example", "class_noun": noun,
                "status": f"Example loaded: {len(images)} {which} images with {len(texts)} captions, {kind} preset "
                          f"with the demo model's settings ({values['max_train_steps']} steps). Press Train."}

    def save_config(self, values: dict[str, Any], images: list[str] | None) -> dict[str, Any]:
        """The form's TrainConfig as a downloadable run.toml (written with save_train_config)."""
        cfg = self.config(values, images)
        path = _upload_dir() / "run.toml"
        save_train_config(cfg, path)
        return {"config_file": str(path), "status": "Config saved: download run.toml below."}

    def load_config(self, files: list[str] | str | None) -> dict[str, Any]:
        """Form values, images and class noun from a run.toml uploaded together with its images (and captions).

        The TOML's `instance_images` are matched by file name against the files uploaded with it, and nothing else
        is read: a path in the file ("/etc/passwd", "~/.ssh/id_rsa", "../../x", a symlink) never makes the server
        open it, so an uploaded TOML cannot turn this event into a file download (issue 8, GR-2/GR-5).
        """
        if not files:
            return {}
        uploads = _own_uploads([files] if isinstance(files, str) else files)
        tomls = [p for p in uploads if p.suffix.lower() == ".toml"]
        if len(tomls) != 1:
            raise gr.Error(f"pick one run.toml (you picked {len(tomls)}), together with the images it names and "
                           "their .txt captions")
        try:
            cfg = load_toml(TrainConfig, tomls[0])
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise gr.Error(f"could not read that file ({type(e).__name__}); pick a .toml file") from None
        by_name = {p.name: p for p in uploads if p not in tomls and p.suffix.lower() != ".txt"}
        texts = {p.stem: p for p in uploads if p.suffix.lower() == ".txt"}
        captions = dict(zip(cfg.instance_images, cfg.instance_captions))
        images: list[str] = []
        sidecars: list[str] = []
        missing: list[str] = []
        folder = None
        for entry in cfg.instance_images:
            name = _base_name(entry)
            img = by_name.get(name)
            if img is None:
                missing.append(name)
                continue
            images.append(str(img))
            if entry in captions:  # the TOML's caption wins; it travels as a sidecar file, as uploads do
                folder = folder or _upload_dir()
                side = folder / f"{img.stem}.txt"
                side.write_text(captions[entry], "utf-8")
                sidecars.append(str(side))
            elif img.stem in texts:
                sidecars.append(str(texts[img.stem]))
        notes = [f"{len(missing)} image(s) named in it were not uploaded with it ({', '.join(missing[:3])}): pick "
                 "the TOML together with its images"] if missing else []
        if cfg.base_model:
            notes.append(f"it was made for base model {cfg.base_model!r}; training uses the model loaded "
                         "under Model")
        return {**to_form(dataclasses.asdict(cfg)), "images": (images + sidecars) or None,
                "class_noun": class_noun_of(cfg.class_prompt),
                "status": "Config loaded." + "".join(f" Note: {n}." for n in notes)}
