"""Full fine-tuning, beside LoRA: every UNet weight (and every text-encoder weight with `train_text_encoder`)
trains, the VAE stays frozen, as diffusers' reference `examples/dreambooth/train_dreambooth.py` does (Ruiz et al.
2023 trained the whole model too). engine/train/loop.py runs the same steps 0, 1, 3, 4, 5 for both methods; this
module holds what differs: step 2 (make the weights trainable) and step 6 (save).

The result is two things: a diffusers model folder (`output/model/`, safetensors, loads with
`StableDiffusionPipeline.from_pretrained`) and a LoRA extracted from it by truncated SVD (engine/train/extract.py),
which is what the library publishes, so a fully fine-tuned concept is used like any style. How much of the change
the LoRA keeps (relative Frobenius error per layer and overall) goes into style.json and the log.
"""
from __future__ import annotations

import copy
import shutil
import uuid
from pathlib import Path

import torch

from engine.core.errors import TrainingDiverged, TrainingError
from engine.core.events import TrainLog
from engine.core.files import atomic_dir, atomic_path
from engine.models.safety import validate_safetensors
from engine.styles.lora_format import LoraModule, Resolved, to_peft
from engine.train import checkpoints as ck
from engine.train.extract import Extraction, extract_module, merge
from engine.train.output import step6_save
from engine.train.state import Models, Run, Setup, enter_train_mode

MODEL_DIR = "model"


def step2_full(setup: Setup, models: Models) -> None:
    """All UNet (+ text-encoder) parameters trainable in fp32 (master weights under mixed precision); VAE frozen."""
    from accelerate.utils import set_seed

    cfg, c = setup.cfg, models.components
    set_seed(cfg.seed)  # same as the LoRA path: nothing random is drawn here, but the global state starts equal
    c.unet.requires_grad_(True)
    c.text_encoder.requires_grad_(cfg.train_text_encoder)
    enter_train_mode(cfg, c)


def checkpoint_bytes(params: dict[str, torch.Tensor], limit: int) -> int:
    """Disk for training (TR-8): `limit`+1 checkpoints of fp32 weights and AdamW's two moments each, plus the best
    one kept outside the limit (it is published from its weights), then the model folder (weights once more) and
    the extracted LoRA (smaller than the weights)."""
    weights = sum(p.numel() * 4 for p in params.values())
    return weights * (3 * (limit + 2) + 2)


def save_model_folder(run: Run, folder: Path) -> Path:
    """The fine-tuned pipeline (trained UNet/text encoder, frozen VAE, scheduler, tokenizer) as safetensors, in
    one rename; an older folder from an earlier save of this run is replaced only after the new one is complete."""
    from diffusers import StableDiffusionPipeline

    acc, c = run.setup.acc, run.models.components
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=acc.unwrap_model(run.trainable.te), tokenizer=c.tokenizer,
                                   unet=acc.unwrap_model(run.trainable.unet), scheduler=c.scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    sizes = sum(ck.tensor_bytes(m.state_dict()) for m in (pipe.unet, pipe.text_encoder, pipe.vae))
    ck.check_free_space(folder.parent, sizes, "the fine-tuned model folder")
    old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
    staged = folder.with_name(f".{folder.name}.new-{uuid.uuid4().hex[:8]}")
    try:
        with atomic_dir(staged) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            folder.rename(old)
        staged.rename(folder)
    except OSError as e:
        raise ck.DiskFullError(f"could not save the fine-tuned model ({e}); the checkpoints are kept, resume to "
                               "retry") from e
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # only once the new folder is in place
    return folder


def extract(run: Run) -> Extraction:
    """The trained weights against the base model's, reloaded from its files (no copy held during training)."""
    from engine.models.loading import load_base_model

    cfg, acc = run.setup.cfg, run.setup.acc
    base = load_base_model(cfg.base_model or None, device="cpu", dtype=torch.float32)
    if base.fingerprint != run.models.base.fingerprint:
        raise TrainingError(f"the base model's files changed during training ({cfg.base_model or 'demo'}); the "
                               "fine-tuned model folder is saved but no LoRA can be extracted against other weights")
    tuned = {"unet": acc.unwrap_model(run.trainable.unet)}
    if cfg.train_text_encoder:
        tuned["text_encoder"] = acc.unwrap_model(run.trainable.te)
    return extract_all(base.components, tuned, cfg.extract_rank, cfg.extract_energy, acc.device)  # GPU SVD if any


def extract_all(base_components, tuned: dict[str, torch.nn.Module], rank: int, energy: float,
                device="cpu") -> Extraction:
    """Every tuned component ("unet", "text_encoder") against the base model's same component."""
    return merge(*(extract_module(name, getattr(base_components, name), module, rank=rank, energy=energy,
                                  device=device) for name, module in tuned.items()))


def lora_file(extraction: Extraction) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our stored LoRA format (PEFT keys, per-module rank and alpha in the metadata; alpha = rank, scale 1)."""
    modules = [Resolved(x.component, x.path, LoraModule(x.component, x.path, x.down, x.up, None))
               for x in extraction.layers]
    return to_peft(modules)


def write_lora_file(extraction: Extraction, path: Path) -> None:
    import safetensors.torch as st

    sd, meta = lora_file(extraction)
    if not all(bool(torch.isfinite(t).all()) for t in sd.values()):
        raise TrainingDiverged("the extracted LoRA contains NaN/Inf values and was not saved; lower the learning "
                               "rate and resume from the last checkpoint")
    ck.check_free_space(path.parent, ck.tensor_bytes(sd), "the extracted LoRA")
    try:
        with atomic_path(path) as tmp:
            st.save_file(sd, str(tmp), metadata=meta)
            validate_safetensors(tmp, check_values=True)
    except OSError as e:
        raise ck.DiskFullError(f"could not save the LoRA ({e}); the checkpoints are kept, resume to retry") from e


# ---- a checkpoint published later: the export is completed from the checkpoint's weights ------------------------

PENDING = "when published"  # style.json "extraction" of a checkpoint export whose LoRA is not extracted yet


def write_deferred_export(run: Run, folder: Path, grid: Path) -> None:
    """A full fine-tuning checkpoint's export (engine/train/evaluate.py): style.json and the grid now; the LoRA is
    extracted from the checkpoint's weights by `complete_export` if and when the user publishes this step."""
    step6_save(run, out=folder, grid_path=grid, write_lora=lambda _run, _path: None,
               extra_style={"method": "full", "extraction": PENDING})


def complete_export(run_dir: Path, step: int, folder: Path) -> None:
    """Extract the LoRA of checkpoint `step` of a full fine-tuning run into its export `folder` (SVD against the
    base model, as at the end of training) and record the extraction in style.json; raises ConfigError when the
    checkpoint's weights are gone (pruned) or no longer match the base model."""
    import json

    from engine.core.config import ConfigError
    from engine.core.files import atomic_write_bytes
    from engine.models.loading import load_base_model

    style_path = folder / "style.json"
    style = json.loads(style_path.read_text("utf-8"))
    cfg = style["training_config"]
    ckpt = Path(run_dir) / "checkpoints" / f"checkpoint-{int(step)}"
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint {step}'s weights are no longer on disk: a full fine-tuning run keeps its "
                          f"last {cfg['checkpoints_total_limit']} checkpoints and its best one. Publish one of "
                          "those, or the final model; raise checkpoints_total_limit to keep more next time")
    try:
        ck.verify_checkpoint(ckpt)
    except ck.CheckpointError as e:
        raise ConfigError(f"checkpoint {step} cannot be published: {e}") from None
    base = load_base_model(cfg["base_model"] or None, device="cpu", dtype=torch.float32)
    if base.fingerprint != style["base_model_fingerprint"]:
        raise ConfigError(f"checkpoint {step} was trained on other base-model weights than the ones on disk now; "
                          "it cannot be extracted against them")
    saved = ck.read_tensors(ckpt / "weights.safetensors")
    tuned = {}
    for component in ("unet", "text_encoder"):
        weights = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(component + ".")}
        if weights:  # none for the text encoder when it did not train
            tuned[component] = copy.deepcopy(getattr(base.components, component))
            tuned[component].load_state_dict(weights, strict=True)
    extraction = extract_all(base.components, tuned, cfg["extract_rank"], cfg["extract_energy"])
    write_lora_file(extraction, folder / style["lora_file"])
    style["extraction"] = {"max_rank": cfg["extract_rank"], "energy": cfg["extract_energy"], **extraction.report()}
    atomic_write_bytes(style_path, json.dumps(style, indent=1).encode())


def step6_save_full(run: Run) -> tuple[Path, Path]:
    """Model folder, extracted LoRA, preview grid and style.json (which records the extraction's errors)."""
    for name, p in run.lora_params().items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"the trained weights contain NaN/Inf ({name}); nothing was saved. Lower the "
                                   "learning rate and resume from the last checkpoint")
    cfg, out = run.setup.cfg, run.setup.run_dir / "output"
    out.mkdir(parents=True, exist_ok=True)
    folder = save_model_folder(run, out / MODEL_DIR)
    extraction = extract(run)
    report = extraction.report()
    ranks = list(report["ranks"].values())
    run.setup.emit(TrainLog(
        f"LoRA extracted by SVD from the fine-tuned model: {report['layers']} layers, rank {min(ranks, default=0)}"
        f"-{max(ranks, default=0)}, relative error {report['rel_error']:.4f} (Frobenius, over the extracted layers); "
        f"{report['unrepresented_share']:.4f} of the change is in weights a LoRA cannot hold (biases, norms, "
        "embeddings). The full model is in output/model."))
    return step6_save(run, write_lora=lambda _run, path: write_lora_file(extraction, path),
                      extra_style={"method": "full", "full_model": str(folder.resolve()),
                                   "extraction": {"max_rank": cfg.extract_rank, "energy": cfg.extract_energy,
                                                  **report}})
