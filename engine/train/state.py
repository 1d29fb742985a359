"""A training run's state, in pieces that each have one owner (engine/train/loop.py's steps make them):
`Setup` (what the run is), `Models` (steps 1-2), `Data` (step 4), `Trainable` (the prepared modules, optimizer and
LR schedule) and `Counters` (step 5's step, losses and back-off; checkpoints save and restore them). `Run` bundles
them; it is frozen, so no piece is ever swapped behind its owner's back.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.core.events import TrainEvent
from engine.core.train_config import TrainConfig
from engine.train.data import DreamBoothData, EpochSampler


@dataclass
class Counters:
    """The loop's own state (owner: engine.train.loop's step 5), saved in state.json and restored exactly."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0  # steps whose update was skipped for a NaN/Inf loss or gradient
    bad_in_a_row: int = 0
    micro_batch: int = 1  # halves on out-of-memory; the effective batch stays (gradient accumulation grows)
    last_ckpt: int | None = None

    def to_json(self) -> dict:
        return {"step": self.step, "losses": list(self.losses), "skipped": self.skipped,
                "bad_in_a_row": self.bad_in_a_row, "micro_batch": self.micro_batch}

    @classmethod
    def from_json(cls, state: dict) -> "Counters":
        return cls(int(state["step"]), [float(x) for x in state["losses"]], int(state["skipped"]),
                   int(state["bad_in_a_row"]), int(state["micro_batch"]), last_ckpt=int(state["step"]))


@dataclass(frozen=True)
class Setup:
    """What the run is; fixed for its lifetime."""

    cfg: TrainConfig
    run_dir: Path
    acc: object  # accelerate.Accelerator
    emit: Callable[[TrainEvent], None]
    stop: threading.Event | None  # a job's cancel token (engine.jobs.cancel) or a signal handler's event

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


@dataclass(frozen=True)
class Models:
    """The base model with its frozen weights (step 1; step 2 adds LoRA layers into the same modules)."""

    base: object  # engine.models.loading.LoadedModel
    noise_scheduler: object
    weight_dtype: torch.dtype
    resolution: int

    @property
    def components(self):
        return self.base.components


@dataclass(frozen=True)
class Data:
    """Dataset, deterministic sampler and the one training generator (step 4)."""

    data: DreamBoothData
    sampler: EpochSampler
    gen: torch.Generator  # noise, timesteps, latents, crops, flips: one stream, saved in checkpoints
    images: list  # name + sha256 of each training image
    dataset_hash: str
    # Outputs of the frozen text encoder by the batch's token ids (owner: loop.encode_text). Keyed by the whole
    # batch, not per row, so a cached value is bit-identical to computing it again (a batched matmul may round
    # a row differently from the same row alone).
    text_cache: dict = field(default_factory=dict, compare=False, repr=False)
    # With `uncond_preservation_weight` or `onpolicy_prior_weight`: the empty prompt's token ids, and its encoding
    # by the base text encoder (adapters off), made once in step 4 (owner: loop.step4_data; used by the loss).
    empty_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)
    base_empty: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # With `onpolicy_prior_weight`: the pool of the LoRA model's own sampling states (owner: engine.train.onpolicy;
    # saved in checkpoints).
    onpolicy: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Trainable:
    """The prepared (DDP-wrapped under several processes) modules, the optimizer and the LR schedule."""

    unet: torch.nn.Module
    te: torch.nn.Module
    optimizer: object
    lr_scheduler: object


@dataclass(frozen=True)
class Run:
    setup: Setup
    models: Models
    data: Data
    trainable: Trainable
    counters: Counters

    def te_active(self, step: int) -> bool:
        """Train the text encoder only for the first `text_encoder_stop_fraction` of the steps (it overfits fast)."""
        cfg = self.setup.cfg
        return cfg.train_text_encoder and step < math.ceil(cfg.text_encoder_stop_fraction * cfg.max_train_steps)

    def lora_params(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters: the LoRA ones, or with method="full" every UNet (and text-encoder) weight."""
        return trainable_params(self.setup.cfg, self.setup.acc, self.trainable.unet, self.trainable.te)


def lora_params(acc, unet, te) -> dict[str, torch.nn.Parameter]:
    """Every LoRA parameter by a stable name ("unet." / "text_encoder." + peft name)."""
    out = {}
    for prefix, m in (("unet", unet), ("text_encoder", te)):
        for n, p in acc.unwrap_model(m).named_parameters():
            if "lora_" in n:
                out[f"{prefix}.{n}"] = p
    return out


def full_params(acc, unet, te, with_te: bool) -> dict[str, torch.nn.Parameter]:
    """Full fine-tuning: every UNet parameter, and every text-encoder one when it trains (same naming)."""
    out = {f"unet.{n}": p for n, p in acc.unwrap_model(unet).named_parameters()}
    if with_te:
        out.update({f"text_encoder.{n}": p for n, p in acc.unwrap_model(te).named_parameters()})
    return out


def trainable_params(cfg: TrainConfig, acc, unet, te) -> dict[str, torch.nn.Parameter]:
    if cfg.method == "full":
        return full_params(acc, unet, te, cfg.train_text_encoder)
    return lora_params(acc, unet, te)


def enter_train_mode(cfg: TrainConfig, components) -> None:
    """What trains goes to fp32 (the rest stays in the weight dtype), gradient checkpointing if asked, train mode;
    the text encoder trains only when `train_text_encoder` (LoRA and full fine-tuning alike)."""
    from diffusers.training_utils import cast_training_params

    c = components
    cast_training_params([c.unet, c.text_encoder], torch.float32)
    if cfg.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            c.text_encoder.gradient_checkpointing_enable()
    c.unet.train()
    c.text_encoder.train(cfg.train_text_encoder)


@contextmanager
def adapters_off(module: torch.nn.Module):
    """Run `module` as the base model: every peft LoRA layer in it bypassed, then switched back on (a module
    without LoRA layers is unchanged). Only for passes under torch.no_grad(): it flips the layers' bypass flag (what
    peft's LoRA forward reads) and not, as BaseTunerLayer.enable_adapters does, every adapter weight's requires_grad,
    which walks each layer's modules and cost ~8 ms a call, 2-4 calls a step (~9% of a prior-preservation run on CPU,
    profiled 2026-11-29); it also leaves a frozen adapter frozen. The flag is peft's private `_disable_adapters`
    (peft pinned to 0.21.2; tests/test_training.py checks the bypass is exact)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if torch.is_grad_enabled():
        raise RuntimeError("adapters_off is for base-model passes under torch.no_grad()")
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m._disable_adapters]
    for m in layers:
        m._disable_adapters = True
    try:
        yield module
    finally:
        for m in layers:
            m._disable_adapters = False
