"""Typed events and results of long jobs. Plain dataclasses with no torch import, so ui/ can match on them."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class TrainProgress:
    step: int
    total: int
    loss: float
    lr: float
    eta_s: float


@dataclass(frozen=True)
class TrainPreview:
    step: int
    images: list  # PIL images, one per validation prompt


@dataclass(frozen=True)
class TrainCheckpoint:
    step: int
    path: Path


@dataclass(frozen=True)
class TrainLog:
    message: str
    level: str = "info"  # "info" | "warning" | "error"


@dataclass(frozen=True)
class TrainEvaluation:
    """A checkpoint's evaluation (engine/train/evaluate.py): its fixed-seed grid and every score so far."""

    step: int
    scores: tuple  # ((step, likeness, prompt fidelity), ...) per evaluated checkpoint, oldest first; None: n/a
    best_step: int | None  # by `rule`; None until a checkpoint after step 0 has scores
    warning: str  # the over-training warning with the suggested step, or ""
    metric: str  # what the scores are ("demo checker: ...", "CLIP (...): ...", "not available: why")
    images: list  # PIL images of this step's grid, prompt by prompt ([] when re-shown after a resume)
    run_id: str  # the run folder's name: publish a checkpoint with Engine.publish_checkpoint(run_id, step)
    rule: str = ""  # the best-checkpoint rule in words


TrainEvent = TrainProgress | TrainPreview | TrainCheckpoint | TrainLog | TrainEvaluation


@dataclass(frozen=True)
class TrainResult:
    lora_path: Path | None  # None when cancelled
    style_json_path: Path | None
    steps: int
    losses: list[float]
    cancelled: bool
    resumed_from: int | None
    skipped_steps: int = 0  # updates skipped for NaN/Inf
    micro_batch_size: int = 0  # after any out-of-memory back-off
    gradient_accumulation: int = 0


@dataclass(frozen=True)
class TrainJobResult:
    run_dir: Path
    result: TrainResult
    style: object | None  # engine.styles.store.StyleInfo; None when cancelled
    rejected: list[tuple[str, str]]
    notices: list[str]


@dataclass(frozen=True)
class ResumableRun:
    """A training run that can continue from its newest checkpoint: its worker died, or it was cancelled."""

    run_id: str  # the run folder's name; the engine resumes runs by id, never by a path from a client
    name: str  # the style name it will publish
    state: str  # "interrupted" | "cancelled"
    step: int
    total: int
    last_checkpoint: int | None
    config: dict  # the TrainConfig as a dict

    @property
    def label(self) -> str:
        return f"{self.name} · {self.state} at step {self.step}/{self.total}"


# ---- generation ----

@dataclass(frozen=True)
class Progress:
    """A step of a long job: `done`/`total` steps, an optional preview image and a line for humans."""

    done: int
    total: int
    message: str
    preview: Image.Image | None = None


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    recipe: dict
    path: Path


@dataclass(frozen=True)
class GenerateResult:
    images: list[GeneratedImage] = field(default_factory=list)
    cancelled: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class BatchResult:
    """A batch's files: one PNG (with recipe) per image, in plan order; the X/Y grid and the zip when made.

    Holds paths, never the images, so a batch of hundreds costs no memory after each image is written.
    """

    paths: list[Path]
    grid_path: Path | None
    zip_path: Path | None
    total: int  # images planned
    cancelled: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class BlendStripResult:
    """K images of one prompt and seed from style A to style B; `weights[k]` = (w_A, w_B) of image k."""

    images: list[GeneratedImage]
    weights: list[tuple[float, float]]
    strip_path: Path | None  # the K images side by side, labelled with their weights
    cancelled: bool = False
    seconds: float = 0.0


@dataclass(frozen=True)
class BakeResult:
    """A blend saved as a new style. `relative_error` = ||dW - dW_baked||_F / ||dW||_F over all layers (0 for an
    exact bake up to float rounding); `rank` is the baked LoRA's rank."""

    style: object  # engine.styles.store.StyleInfo
    method: str
    rank: int
    relative_error: float


@dataclass(frozen=True)
class Queued:
    """A job waits for its turn on the GPU: `ahead` jobs run before it (round-robin across users)."""

    ahead: int

    @property
    def message(self) -> str:
        return f"Waiting in the queue: {self.ahead} job(s) before yours."
