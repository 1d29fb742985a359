"""Load a single-file Stable Diffusion checkpoint (`.safetensors`, CompVis/LDM key layout) fully offline.

A1111/Civitai checkpoints hold only weights. diffusers' `from_single_file` needs the diffusers configs that go with
them, and by default fetches those from the Hugging Face hub; here they come from `assets/configs/sd15` and
`assets/configs/sd21`, shipped in the repo, so loading never touches the network. The family (SD 1.x or 2.x) is
read from the tensors themselves, and files that are not a full checkpoint (a LoRA, a VAE, an embedding, SDXL...)
are refused with a message saying what the file seems to be. Only the safetensors header is read before that
decision, and nothing here ever unpickles (no torch.load): the file must be safetensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.errors import SingleFileError, NotACheckpointError, UnsupportedCheckpointError  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
CONFIG_ROOT = ROOT / "assets" / "configs"
# family -> (shipped config dir, default prediction type). SD 2.x defaults to v-prediction because the flagship
# SD 2.0/2.1 checkpoints are the 768-v models; the 512-base ones need prediction_type="epsilon".
FAMILIES = {"sd1": ("sd15", "epsilon"), "sd2": ("sd21", "v_prediction")}
PREDICTION_TYPES = ("epsilon", "v_prediction")

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TE_CLIP, TE_OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
CONV_IN = UNET + "input_blocks.0.0.weight"
EXPECTS = "a full Stable Diffusion 1.x or 2.x checkpoint (UNet, VAE and text encoder in one .safetensors file)"


@dataclass(frozen=True)
class CheckpointInfo:
    family: str  # "sd1" | "sd2"
    cross_attention_dim: int
    text_encoder: str  # "clip" (SD 1.x, OpenAI CLIP-L) | "openclip" (SD 2.x, OpenCLIP ViT-H)
    n_tensors: int


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """key -> shape, from the safetensors header only (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise NotACheckpointError(
            f"{path.name} is not a readable .safetensors file ({type(e).__name__}: {e}). Expected {EXPECTS}."
        ) from None


def _is_lora(keys: list[str]) -> bool:
    # kohya/A1111 (lora_unet_, lora_te_, .lora_down.), diffusers (.lora.down., lora_linear_layer), PEFT (lora_A/B)
    # and LyCORIS (hada_, lokr_) all name their tensors this way; no full checkpoint does.
    marks = ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora.down.", ".lora.up.", "lora_linear_layer",
             ".lora_A.", ".lora_B.", ".hada_w", ".lokr_w")
    return any(k.startswith(marks[:2]) or any(m in k for m in marks[2:]) for k in keys)


def _looks_like_embedding(shapes: dict[str, tuple[int, ...]]) -> bool:
    if set(shapes) & {"emb_params", "string_to_param", "clip_l", "clip_g"}:
        return True
    return len(shapes) <= 2 and all(len(s) in (1, 2) and s[-1] in (768, 1024, 1280) for s in shapes.values())


def _what_is_it(shapes: dict[str, tuple[int, ...]]) -> str:
    """A short description of a file that is not a full checkpoint, for the error message."""
    keys = list(shapes)
    if _is_lora(keys):
        return "this looks like a LoRA, not a full checkpoint: load it as a style"
    if _looks_like_embedding(shapes):
        return ("this looks like a textual-inversion embedding, not a full checkpoint: load it as a style "
                "(embedding)")
    vae_keys = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE, "vae.")
    if all(k.startswith(vae_keys) for k in keys):
        return "this looks like a VAE alone, not a full checkpoint"
    if all(k.startswith(("cond_stage_model.", "text_model.", "text_encoder.")) for k in keys):
        return "this looks like a text encoder alone, not a full checkpoint"
    if any(k.startswith(("down_blocks.", "unet.down_blocks.", "mid_block.")) for k in keys):
        return ("this looks like a UNet in diffusers layout, not a single-file checkpoint: pick the diffusers model "
                "folder (the one with model_index.json) instead")
    sample = ", ".join(keys[:3])
    return f"this does not look like a Stable Diffusion checkpoint ({len(keys)} tensors, e.g. {sample})"


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Identify an SD 1.x / 2.x single-file checkpoint from its header; raise SingleFileError for anything else."""
    path = Path(path)
    shapes = _header(path)
    keys = list(shapes)
    if not keys:
        raise NotACheckpointError(f"{path.name} holds no tensors. Expected {EXPECTS}.")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UnsupportedCheckpointError(f"{path.name} is an SDXL checkpoint; Stylebooth loads SD 1.x and 2.x only.")
    if any(k.startswith("control_model.") for k in keys):
        raise UnsupportedCheckpointError(f"{path.name} is a ControlNet, not a base model.")
    if not any(k.startswith(UNET) for k in keys):
        raise NotACheckpointError(f"{path.name}: {_what_is_it(shapes)}. Expected {EXPECTS}.")
    if _is_lora(keys):  # a LoRA merged under LDM-like names would still be refused here
        raise NotACheckpointError(f"{path.name}: {_what_is_it(shapes)}. Expected {EXPECTS}.")
    missing = [name for name, prefix in (("VAE", VAE), ("text encoder", "cond_stage_model."))
               if not any(k.startswith(prefix) for k in keys)]
    if missing:
        raise SingleFileError(f"{path.name} has a UNet but no {' and no '.join(missing)} "
                              f"({VAE}* / cond_stage_model.* tensors). Expected {EXPECTS}.")
    in_ch = shapes.get(CONV_IN, (0, 4))[1]
    if in_ch != 4:
        kind = {9: "an inpainting model", 8: "an InstructPix2Pix model"}.get(in_ch, f"a {in_ch}-channel UNet")
        raise UnsupportedCheckpointError(f"{path.name} is {kind}; Stylebooth needs a text-to-image checkpoint "
                                         "(4 latent input channels).")
    # The cross-attention key projection maps the text encoder's width: 768 (CLIP-L, SD 1.x) or 1024 (OpenCLIP, 2.x).
    xattn = next((s for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if xattn is None:
        raise NotACheckpointError(f"{path.name}: the UNet has no cross-attention layers. Expected {EXPECTS}.")
    te = "openclip" if any(k.startswith(TE_OPENCLIP) for k in keys) else \
        "clip" if any(k.startswith(TE_CLIP) for k in keys) else None
    if te is None:
        raise UnsupportedCheckpointError(f"{path.name}: unknown text encoder layout (expected {TE_CLIP}* for SD 1.x "
                                         f"or {TE_OPENCLIP}* for SD 2.x).")
    return CheckpointInfo("sd2" if te == "openclip" else "sd1", xattn[-1], te, len(keys))


def _check_family(path: Path, info: CheckpointInfo, config_dir: Path, custom: bool) -> None:
    """The UNet config must match the file's cross-attention width, else loading fails with a shape error."""
    unet_cfg = json.loads((config_dir / "unet" / "config.json").read_text("utf-8"))
    want = unet_cfg.get("cross_attention_dim")
    if not custom and (info.family, info.cross_attention_dim) not in (("sd1", 768), ("sd2", 1024)):
        raise UnsupportedCheckpointError(
            f"{path.name}: cross-attention width {info.cross_attention_dim} with a {info.text_encoder} text "
            "encoder matches neither SD 1.x (768, CLIP) nor SD 2.x (1024, OpenCLIP).")
    if want != info.cross_attention_dim:
        raise SingleFileError(f"{path.name}: cross-attention width {info.cross_attention_dim} does not match the "
                              f"config in {config_dir} ({want}).")


def _check_config_dir(config_dir: Path) -> None:
    need = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json"]
    missing = [n for n in need if not (config_dir / n).is_file()]
    if missing:
        raise SingleFileError(f"config folder {config_dir} is incomplete; missing: {', '.join(missing)}")


def _check_loaded(path: Path, pipe) -> None:
    """diffusers loads into empty (meta) modules and silently leaves tensors missing from the file on `meta`."""
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            raise SingleFileError(f"{path.name} is incomplete: the {name} lacks {len(left)} tensors "
                                  f"(e.g. {', '.join(left[:3])}). The file may be truncated or pruned.")


def load_single_file(path: str | Path, *, prediction_type: str | None = None,
                     config_dir: str | Path | None = None):
    """Load an SD 1.x / 2.x single-file `.safetensors` checkpoint as a fp32 CPU `StableDiffusionPipeline`, offline.

    The family is detected from the tensors (cross-attention width 768 + CLIP text encoder: SD 1.x; 1024 + OpenCLIP:
    SD 2.x) and the matching config folder under `assets/configs/` is used; no config is ever downloaded.

    prediction_type: what the UNet predicts; None means the family default. SD 1.x defaults to "epsilon".
    **SD 2.x defaults to "v_prediction"** (the 768-v models: SD 2.0-v, SD 2.1 and most fine-tunes of them); pass
    "epsilon" for 512-base SD 2.x models (stable-diffusion-2-base, 2-1-base), which also sets the default image
    size to 512. The tensors cannot tell the two apart, so a wrong choice gives noisy or washed-out images.

    config_dir: a diffusers config folder (model_index.json, component configs, tokenizer) to use instead of the
    shipped one, e.g. for a tiny test model; weights in it are never read.

    Raises NotACheckpointError (LoRA, VAE, embedding, random tensors...), UnsupportedCheckpointError (SDXL,
    inpainting...) or SingleFileError (incomplete file or config); all are ValueError subclasses.
    """
    import diffusers
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path).expanduser()
    if not path.is_file():
        raise SingleFileError(f"checkpoint {path} not found")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES} or None, not {prediction_type!r}")
    info = inspect_checkpoint(path)  # header only; raises for anything that is not a full SD 1.x/2.x checkpoint
    # diffusers picks its reader from the extension and would torch.load (unpickle) anything not named
    # exactly *.safetensors, so the name is checked after the header proved the content is safetensors.
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path.name} is a safetensors file with another extension; rename it to "
                              f"{path.stem}.safetensors")
    sub, default_pt = FAMILIES[info.family]
    custom = config_dir is not None
    config_dir = Path(config_dir) if custom else CONFIG_ROOT / sub
    _check_config_dir(config_dir)
    _check_family(path, info, config_dir, custom)
    pt = prediction_type or default_pt

    # The scheduler is built here rather than through from_single_file's legacy `prediction_type` kwarg, which
    # would switch it to guessing components from the checkpoint.
    sched_cfg = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg, prediction_type=pt)
    level = diffusers.utils.logging.get_verbosity()
    # The fp32 cast logs a misleading "set torch_dtype in from_pretrained()" line per model; nothing is kept in fp16.
    diffusers.utils.logging.set_verbosity_error()
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, dtype=torch.float32, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (KeyError, IndexError, RuntimeError, ValueError, SingleFileComponentError) as e:
        # diffusers' converters fail with bare KeyErrors / shape errors on truncated or odd files: say which file.
        if "meta tensor" in str(e):  # a tensor missing from the file was left empty, then cast to fp32
            raise SingleFileError(f"{path.name} is incomplete: some UNet or VAE tensors are missing. The file may "
                                  "be truncated or pruned.") from e
        raise SingleFileError(f"{path.name} looks like an SD {info.family[-1]}.x checkpoint but could not be "
                              f"loaded ({type(e).__name__}: {str(e)[:300]})") from e
    finally:
        diffusers.utils.logging.set_verbosity(level)
    _check_loaded(path, pipe)
    if info.family == "sd2" and pt == "epsilon" and not custom:
        # SD 2.x epsilon checkpoints are the 512-base family: default to 512 px (64 latents) rather than 768.
        pipe.unet.register_to_config(sample_size=64)
        pipe.vae.register_to_config(sample_size=512)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


__all__ = ["load_single_file", "inspect_checkpoint", "CheckpointInfo", "SingleFileError", "NotACheckpointError",
           "UnsupportedCheckpointError", "CONFIG_ROOT", "FAMILIES"]
