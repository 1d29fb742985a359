"""`Engine`: the one facade that the UI and the CLI call.

It owns the loaded base model, one lock around all model work (one GPU, one queue), the stop signal that really
stops a run within one denoising step, and the data directory. Methods take frozen request dataclasses and return
typed results; progress is reported through typed events.
"""
from __future__ import annotations

import datetime as dt
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from . import outputs
from .config import GenerateRequest, Settings
from .models import LoadedModel, load_base_model
from .sampling import Cancelled, decode, sample, to_pil
from .styles import AdapterCache, StyleInfo, apply_trigger, find_style, list_styles

APP_VERSION = "0.1.0"


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


def default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("Stylebooth", appauthor=False))


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA in fp16 when present, else CPU in fp32 (fp16 on CPU is slow and half-supported)."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class Engine:
    """Everything that touches models and files. Thread-safe: model work runs one job at a time."""

    def __init__(self, settings: Settings | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, fallback_to_demo: bool = False):
        self.settings = settings or Settings()
        self.data_dir = Path(self.settings.data_dir).expanduser() if self.settings.data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        auto_device, auto_dtype = pick_device()
        self.device, self.dtype = device or auto_device, dtype or auto_dtype
        self._lock = threading.RLock()  # held by every piece of model work
        self._stop = threading.Event()
        self._model: LoadedModel | None = None
        self._adapters: AdapterCache | None = None
        # `fallback_to_demo` (the app): a configured model that fails to load is replaced by the demo model, and
        # `load_error` says why, so a bad model cannot brick the app: the user sees the message in the UI and picks
        # another one there. Off for scripts (CLI, benches), which must not quietly run on another model.
        self.fallback_to_demo = fallback_to_demo
        self.load_error: str | None = None

    # ---- model ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The loaded base model; loads the configured one (or the bundled demo model) on first use."""
        with self._lock:
            if self._model is None:
                try:
                    self._model = load_base_model(self.settings.model or None, device=self.device,
                                                  dtype=self.dtype, cache_dir=self.data_dir / "cache")
                except (ValueError, OSError) as e:  # ModelLoadError & co.: plain-words messages
                    if not (self.fallback_to_demo and self.settings.model):
                        raise  # a script, or the bundled model itself failed: nothing to fall back to
                    self._model = load_base_model(None, device=self.device, dtype=self.dtype,
                                                  cache_dir=self.data_dir / "cache")
                    self.load_error = f"{e} The bundled demo model was loaded instead."
            return self._model

    def load_model(self, source: str | None) -> dict:
        """Switch base model; the previous one stays if the new one fails to load."""
        with self._lock:
            new = load_base_model(source or None, device=self.device, dtype=self.dtype,
                                  cache_dir=self.data_dir / "cache")
            self._model, self._adapters, self.load_error = new, None, None
            return new.describe()

    # ---- stop ----------------------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the running job to stop; sampling checks this before every denoising step ends."""
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise Cancelled()

    # ---- generate ------------------------------------------------------------------------------------------
    def generate(self, req: GenerateRequest, on_progress: Callable[[Progress], None] | None = None,
                 *, user: str = "local") -> GenerateResult:
        """Run a GenerateRequest; images are saved as PNGs with their recipe under outputs/<user>/<date>/."""
        t0 = time.perf_counter()
        with self._lock:
            self._stop.clear()
            m = self.model
            c = m.components
            style = self._activate_style(req.style, req.style_strength)
            prompts = [apply_trigger(p, style) if style else p for p in req.prompts]
            n = len(prompts)
            width, height = req.width or c.default_size, req.height or c.default_size
            total = req.num_inference_steps * req.batch_count
            preview_every = max(1, req.num_inference_steps // 4)
            out_dir = self.data_dir / "outputs" / user / dt.date.today().isoformat()
            done: list[GeneratedImage] = []
            try:
                for b in range(req.batch_count):
                    seeds = [req.seed + b * n + i for i in range(n)]

                    def cb(i, n, latents, b=b):
                        self._check_stop()
                        if on_progress:
                            preview = None
                            if (i + 1) % preview_every == 0 and i + 1 < n:
                                preview = to_pil(decode(c, latents[:1]))[0]
                            on_progress(Progress(b * n + i + 1, total,
                                                 f"batch {b + 1}/{req.batch_count}, step {i + 1}/{n}", preview))

                    imgs = sample(c, prompts, [req.negative_prompt] * n, seeds,
                                  num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                                  guidance_rescale=req.guidance_rescale, scheduler=req.scheduler, height=height,
                                  width=width, callback=cb)
                    for seed, prompt, img in zip(seeds, prompts, to_pil(imgs)):
                        recipe = self._recipe(req, seed, width, height, prompt, style)
                        path = out_dir / f"{int(time.time() * 1000)}-{seed}.png"
                        done.append(GeneratedImage(img, recipe, outputs.save_png(img, recipe, path)))
            except Cancelled:
                return GenerateResult(done, cancelled=True, seconds=time.perf_counter() - t0)
            finally:
                self._stop.clear()
            return GenerateResult(done, seconds=time.perf_counter() - t0)

    def generate_iter(self, req: GenerateRequest, *, user: str = "local") -> Iterator[Progress | GenerateResult]:
        """Run `generate` in a worker thread and yield its Progress events, then the GenerateResult.

        For UIs that render while the job runs (a Gradio generator). Errors are re-raised here.
        """
        return _iterate(lambda emit: self.generate(req, emit, user=user), GenerateResult)

    # ---- train ---------------------------------------------------------------------------------------------
    def train(self, cfg, name: str, on_event: Callable | None = None, *, run_dir: Path | None = None):
        """Ingest images, make priors, train a LoRA and publish it as a style (engine/train_job.py).

        Holds the model lock for the whole run: training and generation share one queue.
        """
        from .train_job import run_training

        with self._lock:
            self._stop.clear()
            try:
                return run_training(self.model, self.data_dir, cfg, name, run_dir=run_dir, on_event=on_event,
                                    stop_event=self._stop)
            finally:
                self._stop.clear()

    def train_iter(self, cfg, name: str, *, run_dir: Path | None = None) -> Iterator:
        """`train` in a worker thread: yields the trainer's events, then the TrainJobResult."""
        from .events import TrainJobResult

        return _iterate(lambda emit: self.train(cfg, name, emit, run_dir=run_dir), TrainJobResult)

    def interrupted_runs(self) -> list:
        """Runs whose worker died mid-training (power cut, kill): offer "interrupted — resume?"."""
        from .jobs import find_interrupted_runs

        return find_interrupted_runs(self.data_dir / "runs")

    def resume_iter(self, run_dir: Path) -> Iterator:
        """Resume an interrupted run from its newest valid checkpoint, exactly."""
        from .train_config import TrainConfig
        from .train_job import read_run_name

        run = next((r for r in self.interrupted_runs() if r.run_dir == Path(run_dir)), None)
        if run is None:
            from .config import ConfigError
            raise ConfigError(f"no interrupted run at {run_dir}; pick one from the list")
        cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run.config.items()})
        return self.train_iter(cfg, read_run_name(run.run_dir), run_dir=run.run_dir)

    # ---- styles --------------------------------------------------------------------------------------------
    def list_styles(self) -> list[StyleInfo]:
        """Trained styles, newest first."""
        return list_styles(self.data_dir)

    def _activate_style(self, style_id: str, strength: float) -> StyleInfo | None:
        """Load (once, then cached) and activate a style's LoRA, or switch LoRA off; call under the lock."""
        style = find_style(self.data_dir, style_id) if style_id else None
        if style and style.base_model_fingerprint and style.base_model_fingerprint != self.model.fingerprint:
            from .config import ConfigError
            raise ConfigError(f"style {style.name!r} was trained on another base model; load that model first "
                              f"(fingerprint {style.base_model_fingerprint[:10]})")
        if style is None and self._adapters is None:
            return None
        if self._adapters is None:
            self._adapters = AdapterCache(self.model.components)
        self._adapters.activate(style, strength)
        return style

    def _recipe(self, req: GenerateRequest, seed: int, width: int, height: int, prompt: str,
                style: StyleInfo | None) -> dict:
        m = self._model
        styles = [{"id": style.id, "version": style.version, "name": style.name, "strength": req.style_strength,
                   "trigger_token": style.trigger_token}] if style else []
        return {"prompt": prompt, "negative_prompt": req.negative_prompt,
                "num_inference_steps": req.num_inference_steps, "guidance_scale": req.guidance_scale,
                "guidance_rescale": req.guidance_rescale, "width": width, "height": height, "seed": seed,
                "scheduler": req.scheduler, "model": m.name, "model_fingerprint": m.fingerprint,
                "prediction_type": m.prediction_type, "styles": styles,
                "style": req.style, "style_strength": req.style_strength, "app": f"Stylebooth {APP_VERSION}",
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def _iterate(job: Callable[[Callable], object], result_type) -> Iterator:
    """Run `job(emit)` in a worker thread; yield what it emits, then its return value; re-raise its error."""
    events: queue.Queue = queue.Queue()

    def work():
        try:
            events.put(job(events.put))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            events.put(e)

    threading.Thread(target=work, daemon=True, name="stylebooth-job").start()
    while True:
        ev = events.get()
        if isinstance(ev, BaseException):
            raise ev
        yield ev
        if isinstance(ev, result_type):
            return
