"""`TrainConfig`: one frozen, versioned description of a DreamBooth + LoRA run, validated on construction.

Every field is read by the trainer (engine/train/loop.py, engine/train/checkpoints.py); a GUI setting that the trainer
ignores is a bug, and tests/test_train_config.py checks it. Messages say how to fix the input.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.core.config import ConfigError, _check, _coerce, from_dict, load_toml, save_toml
from engine.core.trigger import TRIGGER_CANDIDATES, check_trigger_token, is_common_word, suggest_trigger_token

__all__ = ["ConfigError", "TrainConfig", "presets", "demo_settings", "suggest_trigger_token", "check_trigger_token",
           "is_common_word", "config_hash", "load_train_config",
           "save_train_config", "PRESETS", "LR_SCHEDULERS", "METHODS", "TRIGGER_CANDIDATES"]

PRESETS = ("subject", "style")
# "lora": LoRA adapters on a frozen model (train_dreambooth_lora.py). "full": every UNet (and, with
# train_text_encoder, text-encoder) weight trained, VAE frozen, as diffusers' reference train_dreambooth.py does;
# the result is a diffusers model folder plus a LoRA extracted from it by SVD (engine/train/extract.py).
METHODS = ("lora", "full")
LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
PRIOR_TARGETS = ("images", "base")  # see TrainConfig.prior_target
REPORT_TO = ("tensorboard", "wandb", "none")
# Fields that do not change the trained weights: changing them must not block a resume.
_NON_TRAINING_FIELDS = {"validation_prompts", "validation_steps", "checkpointing_steps", "checkpoints_total_limit",
                        "report_to", "output_name", "eval_seeds", "eval_prompts", "eval_model", "eval_fidelity_floor",
                        "extract_rank", "extract_energy"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class TrainConfig:
    """A DreamBooth + LoRA training run (Ruiz et al. 2023; LoRA, Hu et al. 2021). See `presets()` for defaults."""

    instance_images: tuple[str, ...]  # the artist's images (already ingested, see engine.core.images.ingest_dataset)
    instance_prompt: str  # must contain trigger_token, e.g. "a photo of olis shape"
    # One caption per instance image, in the same order (kohya-style .txt sidecars, see engine.core.images.read_captions);
    # empty: every image is trained on `instance_prompt`. Captions that name what varies between the images (colours,
    # background, pose) leave the trigger token to mean only what they share, so prompts can recombine it.
    instance_captions: tuple[str, ...] = ()
    trigger_token: str = "olis"
    # e.g. "a photo of shape"; needed for prior preservation. Several prompts, one per line ("a photo of a dog",
    # "a photo of a puppy", ...), spread the class images over the class's variety; see `class_prompts`.
    class_prompt: str = ""
    preset: str = "subject"
    method: str = "lora"  # see METHODS; "full" ignores lora_rank/lora_alpha/*_target_modules
    # Full fine-tuning only: the LoRA published to the library is the SVD of (tuned - base) per layer, truncated to
    # at most `extract_rank`; with `extract_energy` > 0 each layer keeps the fewest singular values holding that
    # fraction of its squared Frobenius norm (still at most extract_rank).
    extract_rank: int = 16
    extract_energy: float = 0.0
    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    # What a class image's prediction is pulled to: "images" = the noise that noised it (DreamBooth, Ruiz et al.
    # 2023 eq. 2); "base" = the frozen base model's own prediction for the same noisy latent and class prompt
    # (LoRA only). The base prediction is what eq. 2's prior term converges to over infinitely many class images,
    # so it is the same target without the sampling noise of a few dozen images (engine.train.loop).
    prior_target: str = "images"
    num_class_images: int = 100
    resolution: int = 0  # 0: the base model's native size
    center_crop: bool = True
    random_flip: bool = False
    train_text_encoder: bool = True
    text_encoder_lr: float = 5e-5
    text_encoder_stop_fraction: float = 1.0  # stop training the text encoder after this fraction of the steps
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 400
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    lora_rank: int = 4
    lora_alpha: int = 4
    unet_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    snr_gamma: float = 0.0  # min-SNR weighting gamma (Hang et al. 2023); 0 = off, 5 is the paper's value
    noise_offset: float = 0.0
    # The timesteps a step may draw, [min_timestep, max_timestep) of the scheduler's 1000 (kohya sd-scripts'
    # --min_timestep/--max_timestep). Why: the noise level decides what a step teaches. High noise fixes the
    # composition (which shape, where: with 4 images, it learns those 4 layouts by heart); low noise fixes the
    # detail drawn inside them (a texture, brush strokes). A style that must reach new subjects can skip the top.
    min_timestep: int = 0
    max_timestep: int = 1000
    # Probability that an instance image trains on `instance_prompt` ("a photo of olis shape") instead of its own
    # caption. Why: with a handful of captioned images the trigger can mean "the subject *given this exact
    # caption*"; trained sometimes on the trigger alone it must carry the concept whatever else the prompt says
    # (kohya sd-scripts' caption_dropout_rate drops to "" instead, which trains the unconditional branch).
    caption_dropout: float = 0.0
    # Weight of an extra loss that keeps the LoRA's prediction for the empty prompt equal to the base model's, at
    # the same noisy latents and timesteps (0 = off; LoRA only). Why: generation uses classifier-free guidance
    # (Ho & Salimans 2022, eq. 6: e = e_u + w (e_c - e_u), e_u the empty prompt's prediction). A style LoRA that
    # also changes e_u cancels itself in e_c - e_u, and guidance then amplifies the base model's look instead;
    # with e_u held to the base model's, the style lives in e_c - e_u and guidance amplifies it. ~1.8x per step.
    uncond_preservation_weight: float = 0.0
    # Weight of a prior term on the LoRA model's *own* sampling states of the class prompts (0 = off; LoRA, needs
    # prior preservation's class prompts): every 50 steps 8 class prompts are sampled with the current LoRA, and the
    # middle steps' latents are held to the base model's prediction (engine/train/onpolicy.py; DAgger, Ross et al.
    # 2011). Why: a subject LoRA leaks into other prompts in the middle of sampling, on half-drawn shapes that noised
    # class images never show. About 2.3x the forward passes per step (rollouts included).
    onpolicy_prior_weight: float = 0.0
    max_nonfinite_steps: int = 3  # stop after this many consecutive NaN/Inf steps
    seed: int = 0
    checkpointing_steps: int = 100
    checkpoints_total_limit: int = 2
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 100  # 0: no previews during training
    report_to: str = "tensorboard"
    # Evaluation at every checkpoint (engine/train/evaluate.py): a grid of the eval prompts x `eval_seeds` fixed
    # seeds (0: no evaluation), scored for likeness and prompt fidelity; the best checkpoint keeps prompt fidelity
    # >= eval_fidelity_floor x the base model's. `eval_model`: a local CLIP folder or a hub id ("" = the demo
    # checker on the demo model, no scores on other models). `eval_prompts` empty: built-in ones.
    eval_seeds: int = 2
    eval_prompts: tuple[str, ...] = ()
    eval_model: str = ""
    eval_fidelity_floor: float = 0.9
    cache_latents: bool = False
    base_model: str = ""  # "" = the bundled demo model
    output_name: str = "lora"
    schema_version: int = 1

    def __post_init__(self) -> None:
        _coerce(self)  # every field's type, from its annotation; TOML and JSON lists become tuples
        _check(self.schema_version == 1, f"unsupported schema_version {self.schema_version}; this app reads 1")
        self._check_prompts()
        self._check_numbers()
        self._check_choices()

    def _check_prompts(self) -> None:
        _check(len(self.instance_images) > 0, "`instance_images` is empty: add at least one training image "
                                              "(3-20 images work best)")
        tok = self.trigger_token
        _check(bool(re.fullmatch(r"[A-Za-z0-9]{2,16}", tok or "")),
               f"`trigger_token` must be one short word of letters/digits (2-16 chars) but is {tok!r}; "
               f"try {TRIGGER_CANDIDATES[0]!r}")
        check_trigger_token(tok)  # the embedded word list; training start repeats it with the model's tokenizer
        word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(tok)}(?![A-Za-z0-9])")
        _check(bool(word.search(self.instance_prompt)),
               f"`instance_prompt` {self.instance_prompt!r} must contain the trigger token {tok!r} as a word, "
               f"e.g. 'a photo of {tok} shape'")
        caps = self.instance_captions
        _check(not caps or len(caps) == len(self.instance_images),
               f"`instance_captions` has {len(caps)} captions for {len(self.instance_images)} images: give one per "
               "image (in the same order), or none to use `instance_prompt` for all")
        for i, cap in enumerate(caps):
            _check(bool(word.search(cap)),
                   f"caption {i + 1} ({Path(self.instance_images[i]).name}: {cap!r}) must contain the trigger token "
                   f"{tok!r} as a word, e.g. 'a photo of {tok} shape in red on a blue background'")
        _check(not word.search(self.class_prompt),
               f"`class_prompt` must not contain the trigger token {tok!r}: it describes the general class, "
               f"e.g. 'a photo of shape'")
        _check(not self.with_prior_preservation or self.class_prompt.strip() != "",
               "`class_prompt` is empty but `with_prior_preservation` is on: describe the class, e.g. "
               "'a photo of shape', or turn prior preservation off")
        for name in ("validation_prompts", "eval_prompts"):
            for p in getattr(self, name):
                _check(p.strip() != "", f"`{name}` contains an empty prompt; remove it")

    @property
    def class_prompts(self) -> list[str]:
        """The class prompt's non-empty lines (class images are made from each in turn)."""
        return [ln.strip() for ln in self.class_prompt.splitlines() if ln.strip()]

    def _check_numbers(self) -> None:
        def between(name, lo, hi):
            v = getattr(self, name)
            _check(lo <= v <= hi, f"`{name}` must be between {lo} and {hi} but is {v}")

        between("max_train_steps", 1, 1_000_000)
        between("train_batch_size", 1, 256)
        between("gradient_accumulation_steps", 1, 1024)
        between("num_class_images", 1, 100_000)
        between("prior_loss_weight", 0.0, 100.0)
        between("lora_rank", 1, 1024)
        between("lora_alpha", 1, 4096)
        between("extract_rank", 1, 1024)
        between("extract_energy", 0.0, 1.0)
        between("text_encoder_stop_fraction", 0.0, 1.0)
        between("snr_gamma", 0.0, 100.0)
        between("noise_offset", 0.0, 1.0)
        between("caption_dropout", 0.0, 1.0)
        between("uncond_preservation_weight", 0.0, 100.0)
        between("onpolicy_prior_weight", 0.0, 100.0)
        between("max_grad_norm", 0.0, 1e6)
        between("min_timestep", 0, 999)
        between("max_timestep", 1, 1000)
        _check(self.min_timestep < self.max_timestep,
               f"`min_timestep` ({self.min_timestep}) must be below `max_timestep` ({self.max_timestep}); the full "
               "range is 0 and 1000")
        _check(self.prior_target == "images" or self.method == "lora" or not self.with_prior_preservation,
               "`prior_target` 'base' compares with the base model underneath the LoRA, which full fine-tuning "
               "does not keep: use 'images' or method 'lora'")
        _check(self.uncond_preservation_weight == 0 or self.method == "lora",
               "`uncond_preservation_weight` compares the LoRA with the base model underneath it, which full "
               "fine-tuning does not keep: set it to 0 or use method 'lora'")
        _check(self.onpolicy_prior_weight == 0 or (self.method == "lora" and self.with_prior_preservation),
               "`onpolicy_prior_weight` holds the LoRA to the base model underneath it on samples of the class "
               "prompts: it needs method 'lora' and `with_prior_preservation` on (with a class prompt); or set it to 0")
        between("max_nonfinite_steps", 1, 1000)
        between("seed", 0, 2**32 - 1)
        between("checkpointing_steps", 0, 1_000_000)
        between("checkpoints_total_limit", 1, 1000)
        between("validation_steps", 0, 1_000_000)
        between("eval_seeds", 0, 64)
        between("eval_fidelity_floor", 0.0, 1.0)
        _check(0 <= self.lr_warmup_steps < self.max_train_steps,
               f"`lr_warmup_steps` must be below `max_train_steps` ({self.max_train_steps}) but is "
               f"{self.lr_warmup_steps}")
        for name in ("learning_rate", "text_encoder_lr"):
            v = getattr(self, name)
            _check(0 < v <= 1e-2, f"`{name}` must be above 0 and at most 0.01 but is {v}; LoRA uses ~1e-4, "
                                  "full fine-tuning ~5e-6 on Stable Diffusion")
        _check(self.resolution == 0 or (8 <= self.resolution <= 2048 and self.resolution % 8 == 0),
               f"`resolution` must be 0 (the model's size) or divisible by 8 (8..2048) but is {self.resolution}; "
               f"try {max(8, round(self.resolution / 8) * 8)}")

    def _check_choices(self) -> None:
        def one_of(name, options):
            v = getattr(self, name)
            _check(v in options, f"`{name}` must be one of {', '.join(options)} but is {v!r}")

        one_of("preset", PRESETS)
        one_of("method", METHODS)
        one_of("prior_target", PRIOR_TARGETS)
        one_of("lr_scheduler", LR_SCHEDULERS)
        one_of("mixed_precision", MIXED_PRECISION)
        one_of("report_to", REPORT_TO)
        _check(self.report_to != "wandb" or importlib.util.find_spec("wandb") is not None,
               "`report_to` is 'wandb' but wandb is not installed: pip install wandb, or use 'tensorboard'")
        _check(len(self.unet_target_modules) > 0, "`unet_target_modules` is empty; use to_q, to_k, to_v, to_out.0")
        _check(not self.train_text_encoder or len(self.text_encoder_target_modules) > 0,
               "`text_encoder_target_modules` is empty; use q_proj, k_proj, v_proj, out_proj")
        _check(bool(_SAFE_NAME.match(self.output_name)),
               f"`output_name` must be a plain file name (letters, digits, . _ -) but is {self.output_name!r}")
        # Random crops change the pixels every epoch, so a latent computed once would be wrong afterwards.
        _check(not self.cache_latents or self.center_crop,
               "`cache_latents` needs `center_crop` on (random crops change the image every epoch)")


# LoRA on the attention projections alone moves what the UNet attends to, but barely how it draws: on the demo
# model, 4 heart images taught "olis shape" hearts 0-25% of the time that way; adding the transformer blocks' in/out
# projections, feed-forward layers and the ResNet convolutions (LoCon, as kohya/LyCORIS do) made it 87.5%.
UNET_TARGETS_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TARGETS = UNET_TARGETS_ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2")


def presets(kind: str, *, token: str = TRIGGER_CANDIDATES[0], class_noun: str = "shape",
            captions: tuple[str, ...] | list[str] = (), class_members: tuple[str, ...] | list[str] = ()
            ) -> dict[str, Any]:
    """Good defaults for a *subject* or a *style*: every TrainConfig field except the images and captions.

    Given the instance `captions`, the class prompt becomes "a photo of a {class}" plus up to 24 automatic class
    prompts: the captions with the trigger replaced by `class_members` (default: the class noun itself), see
    engine.core.captions.class_prompts_from_captions, and num_class_images 4 per prompt; the class images' target
    is the base model's prediction (`prior_target` "base"). On the demo model (heart, 3 sets of 48 non-token
    prompts, with the demo subject settings) that kept 110-120 of the base's 130 right shapes over five training
    seeds where 12 prompts x 8 images with DreamBooth's noise target kept 107 (docs/learning-log.md "Prior
    preservation").

    Subject: "a photo of {token} {class}", LoRA on attention, feed-forward and convolutions (the shape of a thing
    lives in the convolutions). Class-prior preservation (Ruiz et al. 2023) is offered but off: a LoRA leaves the
    base model untouched whenever the style is not applied, and priors protect only what their class prompts
    cover. Measured on the demo model (tests/test_learning.py): with "a photo of a shape" priors that prompt never
    turned into the subject (100% without), but other prompts with the LoRA on kept only 38% of their shapes right
    (25% without); class prompts that mirror the captions ("a photo of a circle in red on ...") raised it to 83%.
    Style: "a {token} style {class}", the same layers, no prior (a style spans many classes), flips allowed. The demo world's class noun is "shape"; for paintings use
    e.g. class_noun="painting".
    """
    _check(kind in PRESETS, f"unknown preset {kind!r}; choose one of: {', '.join(PRESETS)}")
    common = dict(trigger_token=token, preset=kind, method="lora", extract_rank=16, extract_energy=0.0,
                  resolution=0, center_crop=True, train_text_encoder=True,
                  text_encoder_lr=5e-5, lr_scheduler="constant", lr_warmup_steps=0, train_batch_size=1,
                  gradient_accumulation_steps=1, max_grad_norm=1.0, mixed_precision="no",
                  gradient_checkpointing=False, use_8bit_adam=False, snr_gamma=5.0, min_timestep=0, max_timestep=1000,
                  caption_dropout=0.0, uncond_preservation_weight=0.0, prior_target="base",
                  onpolicy_prior_weight=0.0,
                  max_nonfinite_steps=3, seed=0,
                  checkpointing_steps=100, checkpoints_total_limit=2, validation_steps=100, report_to="tensorboard",
                  eval_seeds=2, eval_prompts=(), eval_model="", eval_fidelity_floor=0.9,
                  cache_latents=False, base_model="", output_name="lora",
                  unet_target_modules=UNET_TARGETS,
                  text_encoder_target_modules=("q_proj", "k_proj", "v_proj", "out_proj"))
    if captions:
        from engine.core.captions import class_prompts_from_captions

        derived = class_prompts_from_captions(captions, token, class_members or (class_noun,), class_noun=class_noun,
                                              n=24)
        first = f"a photo of a {class_noun}" if kind == "subject" else f"a {class_noun}"
        prompts = [first] + [p for p in derived if p != first]
        common.update(class_prompt="\n".join(prompts), num_class_images=4 * len(prompts))
    if kind == "subject":
        return dict(dict(class_prompt=f"a photo of {class_noun}", num_class_images=100), **common,
                    instance_prompt=f"a photo of {token} {class_noun}",
                    with_prior_preservation=False, prior_loss_weight=1.0, random_flip=False,
                    text_encoder_stop_fraction=0.6, learning_rate=1e-4, max_train_steps=400, lora_rank=4,
                    lora_alpha=4, noise_offset=0.0,
                    validation_prompts=(f"a photo of {token} {class_noun}", f"a photo of a red {token} {class_noun}"))
    return dict(dict(class_prompt=f"a {class_noun}", num_class_images=100), **common,
                instance_prompt=f"a {token} style {class_noun}",
                with_prior_preservation=False, prior_loss_weight=1.0, random_flip=True,
                text_encoder_stop_fraction=1.0, learning_rate=1e-4, max_train_steps=800, lora_rank=8, lora_alpha=8,
                noise_offset=0.05,  # Guttenberg 2023: lets a style reach very dark/light images
                validation_prompts=(f"a {token} style {class_noun}", f"a {token} style circle"))


def demo_settings(kind: str, prior: bool = False) -> dict[str, Any]:
    """What the bundled demo model needs on top of `presets(kind)`: a tiny model from scratch learns at a learning
    rate that would overcook Stable Diffusion (measured with tests/test_learning.py). Min-SNR is off because it
    down-weights the high-noise steps where a v-prediction model decides the shape. `prior`: the subject trained
    with prior preservation also holds the empty prompt to the base model's (below)."""
    _check(kind in PRESETS, f"unknown preset {kind!r}; choose one of: {', '.join(PRESETS)}")
    common = dict(text_encoder_lr=2e-4, text_encoder_stop_fraction=1.0, snr_gamma=0.0, cache_latents=True)
    if kind == "subject":
        # Issue 14, measured with scripts/learning_table.py on the tune set (recognised star / arrow / bolt):
        # as before 0.56 / 0.75 / 0.62; text encoder frozen 0.62 / 0.81 / 0.69; steps from t >= 300 only (the
        # high-noise end decides the shape; the low-noise end is left to the base model) with the encoder frozen
        # 0.62 / 0.94 / 0.75. A frozen text encoder also stops the LoRA from re-encoding prompts that do not
        # use the trigger: with prior preservation, non-token shape accuracy 38 -> 40 of 48
        # (tests/test_prior_learning.py::test_prior_preservation_protects_the_class). The examples' colours moved star
        # most (scripts/make_examples.py SUBJECT_SCENES). Star / arrow still failed on the report and fresh sets at
        # 300 steps, rank 8 (0.66 / 0.72, 0.69 / 0.78); 500 steps at rank 16, tune / report / fresh: star 1.00 /
        # 0.94 / 0.78, arrow 0.91 / 0.97 / 0.88, bolt still ~0.77 (docs/learning-log.md). ~1.5x the CPU.
        # With prior preservation, non-token prompts (3 x 48, README) kept 111 of the base's 130 right shapes
        # (training seed 0; seed 1: 89) and 120 / 110 / 115 / 116 / 118 (seeds 0-4, scripts/prior_seeds.py) once the
        # empty prompt's prediction was held to the base model's too: classifier-free guidance multiplies any drift
        # of e_c - e_u by 5.
        # 2026-11-29 (scripts/sweeps/2026-11-29-cpu-subjects.json): timesteps from 100 instead of 300 lift the two
        # subjects that failed, star 1.00 / 0.94 / 0.97 and bolt 0.91 / 0.88 / 0.94 (colours 1.00 / 0.94 / 1.00),
        # chosen on the tune set among 8 levers; with priors it leaks (non-token prompts 105 of 144 against 120 at
        # 300, training seed 0), so prior preservation keeps 300.
        return dict(common, learning_rate=1e-3, max_train_steps=500, lora_rank=16, lora_alpha=16,
                    train_text_encoder=False, min_timestep=300 if prior else 100,
                    uncond_preservation_weight=5.0 if prior else 0.0)
    # Style (scripts/learning_table.py, tune set, 900 steps, textured checkered / tiled / polka;
    # docs/learning-log.md): learning rate 2e-3 with timesteps from 300 gave 0.81 / 0.31 / 0.00, but at
    # guidance 1 the same LoRAs textured 0.62 (tiled) / 0.50 (polka): the LoRA learned the texture into the
    # empty prompt's prediction too, and classifier-free guidance (e_u + w (e_c - e_u)) cancelled it. Holding the
    # empty prompt's prediction to the base model's (uncond_preservation_weight 5; 1: 0.31 tiled, 20: 0.25) and
    # training on every timestep again: 1.00 / 0.38 / 0.38, better on all three, still short of 0.70 on two
    # (report set, once: 0.94 / 0.69 / 0.44). It costs ~1.8x per step (a batched UNet pass and a base pass).
    # Those numbers are the texture *anywhere*, read by the first (phase-blind) checker; against "styled" (the
    # texture on the prompted shape, background plain; 2026-11-28, 32 images) these settings give 0.16 / 0.38 /
    # 0.25 with the old example colours, 0.44 / 0.50 / 0.25 with the colour-cycle examples; no setting beat them
    # by more than the noise (prior preservation costs styles); a base model that knows a family of textures did
    # (scripts/texture_family_base.py: checkered 0.62, tiled 0.53 with these settings; docs/learning-log.md).
    return dict(common, learning_rate=2e-3, max_train_steps=900, lora_rank=8, lora_alpha=8, min_timestep=0,
                uncond_preservation_weight=5.0)


# Weight-changing fields added after checkpoints already existed, with the value that means "as before": at that
# value they stay out of the hash, so a run checkpointed by an older version still resumes after an upgrade.
_ADDED_LATER = {"min_timestep": 0, "max_timestep": 1000, "caption_dropout": 0.0, "uncond_preservation_weight": 0.0,
                "prior_target": "images", "onpolicy_prior_weight": 0.0}


def config_hash(cfg: TrainConfig) -> str:
    """sha256 of the fields that change the trained weights; checkpoints refuse to resume under another hash."""
    data = {k: v for k, v in asdict(cfg).items()
            if k not in _NON_TRAINING_FIELDS and not (k in _ADDED_LATER and v == _ADDED_LATER[k])}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a run.toml; unknown keys are an error that names them; relative image paths are taken from its folder."""
    cfg = load_toml(TrainConfig, path)
    base = Path(path).resolve().parent
    images = tuple(str(p if Path(p).is_absolute() else base / p) for p in cfg.instance_images)
    return from_dict(TrainConfig, dict(asdict(cfg), instance_images=images))


def save_train_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write a run.toml atomically."""
    save_toml(cfg, path)


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


# Full fine-tuning's learning rates (UNet, text encoder). LoRA trains small added matrices (~1e-4 on Stable
# Diffusion: kohya, diffusers' train_dreambooth_lora.py; 10x more on the tiny demo model, see demo_settings); full
# fine-tuning moves every weight, and DreamBooth's reference script uses 5e-6 (2e-6 with the text encoder). The demo
# model: 3e-5 (scripts/compare_full_vs_lora.py: 1e-4 cost prompt fidelity, 3e-4 the colours too).
FULL_FT_RATES = {"sd": (5e-6, 2e-6), "demo": (3e-5, 3e-5)}


def lora_rates(kind: str, model: str) -> tuple[float, float]:
    """The LoRA learning rates (UNet, text encoder) of a preset on Stable Diffusion ("sd") or the demo model."""
    p = presets(kind) if model == "sd" else {**presets(kind), **demo_settings(kind)}
    return p["learning_rate"], p["text_encoder_lr"]


def rates_for_method(method: str, kind: str, learning_rate: float, text_encoder_lr: float) -> dict[str, float] | None:
    """The learning rates to use after switching to `method`, when the current ones are the other method's defaults
    for this preset (on Stable Diffusion or on the demo model); None when they are the user's own, which are kept."""
    _check(method in METHODS, f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    _check(kind in PRESETS, f"unknown preset {kind!r}; choose one of: {', '.join(PRESETS)}")
    for model, full in FULL_FT_RATES.items():
        old, new = (lora_rates(kind, model), full) if method == "full" else (full, lora_rates(kind, model))
        if (learning_rate, text_encoder_lr) == old:
            return {"learning_rate": new[0], "text_encoder_lr": new[1]}
    return None
