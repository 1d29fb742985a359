"""`Engine`: the one facade that the UI and the CLI call.

It owns the loaded base model, one lock around all model work (one GPU, one queue), the registry of jobs with a
cancel token each (Cancel stops one job within one step, not the others), and the data directory. Methods take frozen request dataclasses and return
typed results; progress is reported through typed events.
"""
from __future__ import annotations

import contextlib
import io
import datetime as dt
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.core.batch_config import BatchRequest
from engine.core.blend_config import BakeRequest, BlendStripRequest
from engine.core.config import ConfigError, GenerateRequest, Settings, from_dict
from engine.core.errors import Cancelled
from engine.core.events import (BakeResult, BatchResult, BlendStripResult, GeneratedImage, GenerateResult, Progress,
                                ResumableRun, TrainJobResult, TrainResult)
from engine.core.train_config import TrainConfig
from engine.generate import recipes
from engine.generate.batch import Grid, run_batch
from engine.generate.sampler import decode, sample, to_pil
from engine.jobs.cancel import Job, JobRegistry
from engine.jobs.fair import FairScheduler
from engine.models.loading import DEMO_MODEL, LoadedModel, load_base_model
from engine.styles.adapters import AdapterCache
from engine.styles.blend import check_same_base
from engine.styles.interop import ExportResult, ImportResult, export_style, import_file
from engine.styles.library import Library, LibraryStyle, base_model_mismatch
from engine.styles.store import StyleInfo, apply_trigger

APP_VERSION = "0.1.0"


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
                 dtype: torch.dtype | None = None, fallback_to_demo: bool = False, fuse_styles: bool = True):
        self.settings = settings or Settings()
        self.data_dir = Path(self.settings.data_dir).expanduser() if self.settings.data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        auto_device, auto_dtype = pick_device()
        self.device, self.dtype = device or auto_device, dtype or auto_dtype
        self._lock = threading.RLock()  # held by every piece of model work
        self.jobs = JobRegistry()  # queued and running jobs, each with its own cancel token
        self.fair = FairScheduler()  # whose job runs next on the one GPU: round-robin across users
        self._model: LoadedModel | None = None
        self._adapters: AdapterCache | None = None
        # `fallback_to_demo` (the app): a configured model that fails to load is replaced by the demo model, and
        # `load_error` says why, so a bad model cannot brick the app: the user sees the message in the UI and picks
        # another one there. Off for scripts (CLI, benches), which must not quietly run on another model.
        self.fallback_to_demo = fallback_to_demo
        self.load_error: str | None = None
        self._library: Library | None = None
        self._library_lock = threading.Lock()
        # Fold the active styles into the base weights while they stay selected: LoRA layers cost ~33% throughput
        # on the demo model with one style, fused ~0% (bench/generate.py); a change of styles unfuses first (exactly).
        self.fuse_styles = fuse_styles
        self._ip_adapters: dict[str, object] = {}  # IP-Adapter folder -> loaded IPAdapter (instant styles)
        self._ip_hook = None  # attaches the IP-Adapter to the current UNet while an instant style is in use

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
            self._ip_adapters, self._ip_hook = {}, None
            return new.describe()

    # ---- jobs and cancel -----------------------------------------------------------------------------------
    def cancel(self, job_id: str | None = None, *, kind: str | None = None, user: str | None = None) -> int:
        """Ask the matching queued or running jobs to stop (see JobRegistry.cancel); a generation stops within one
        denoising step, a training run at the next step after saving a checkpoint. Returns how many were asked."""
        return self.jobs.cancel(job_id, kind=kind, user=user)

    def wait_for_jobs(self, *, kind: str | None = None, user: str | None = None, timeout: float = 30.0) -> bool:
        """Wait until the matching jobs have stopped (after `cancel`); False if some still run after `timeout` s."""
        return self.jobs.wait_until_done(kind=kind, user=user, timeout=timeout)

    def queue_position(self, job_id: str) -> int | None:
        """0 while the job runs, k when k jobs run before it (round-robin across users), None when unknown."""
        return self.fair.position(job_id)

    @contextlib.contextmanager
    def _job(self, kind: str, user: str, job_id: str | None) -> Iterator[Job]:
        """Register the job (cancellable from now on), wait for its fair turn and the model, and run it.

        A job cancelled while it waits leaves the line at once; its body sees the set token before it touches the
        model and reports itself cancelled."""
        job = self.jobs.start(kind, user, job_id)
        try:
            with self.fair.turn(user, job.id, cancelled=job.token):
                if job.token.is_set():
                    yield job
                else:
                    with self._lock:
                        yield job
        finally:
            self.jobs.finish(job)

    # ---- generate ------------------------------------------------------------------------------------------
    def generate(self, req: GenerateRequest, on_progress: Callable[[Progress], None] | None = None,
                 *, user: str = "local", job_id: str | None = None) -> GenerateResult:
        """Run a GenerateRequest; images are saved as PNGs with their recipe under outputs/<user>/<date>/."""
        t0 = time.perf_counter()
        with self._job("generate", user, job_id) as job:
            if job.token.is_set():  # cancelled while it waited: no model work at all
                return GenerateResult([], cancelled=True, seconds=time.perf_counter() - t0)
            m = self.model
            c = m.components
            styles = self._activate_styles(req.active_styles)
            instant, image_embeds = self._activate_instant(req.instant_style, req.instant_strength,
                                                           req.instant_style_only)
            prompts = [_with_triggers(p, styles) for p in req.prompts]
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
                        job.token.check()
                        if on_progress:
                            preview = None
                            if (i + 1) % preview_every == 0 and i + 1 < n:
                                preview = to_pil(decode(c, latents[:1]))[0]
                            on_progress(Progress(b * n + i + 1, total,
                                                 f"batch {b + 1}/{req.batch_count}, step {i + 1}/{n}", preview))

                    imgs = sample(c, self._adapters.expand_prompts(prompts) if self._adapters else prompts,
                                  [req.negative_prompt] * n, seeds,
                                  num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                                  guidance_rescale=req.guidance_rescale, scheduler=req.scheduler, height=height,
                                  width=width, callback=cb, image_embeds=image_embeds)
                    for seed, prompt, img in zip(seeds, prompts, to_pil(imgs)):
                        recipe = self._recipe(req, seed, width, height, prompt, styles, instant)
                        path = out_dir / f"{int(time.time() * 1000)}-{seed}.png"
                        done.append(GeneratedImage(img, recipe, recipes.save_png(img, recipe, path)))
            except Cancelled:
                return GenerateResult(done, cancelled=True, seconds=time.perf_counter() - t0)
            return GenerateResult(done, seconds=time.perf_counter() - t0)

    def generate_iter(self, req: GenerateRequest, *, user: str = "local",
                      job_id: str | None = None) -> Iterator[Progress | GenerateResult]:
        """Run `generate` in a worker thread and yield its Progress events, then the GenerateResult.

        For UIs that render while the job runs (a Gradio generator). Errors are re-raised here.
        """
        return _iterate(lambda emit: self.generate(req, emit, user=user, job_id=job_id), GenerateResult)

    def read_recipe(self, path: str | Path) -> dict | None:
        """The recipe a dropped PNG carries (ours or A1111's), or None; see engine.generate.recipes."""
        return recipes.read_recipe(path)

    @staticmethod
    def example_prompts() -> list[str]:
        """Prompts that show what the bundled demo model can draw."""
        from engine.demo.world import prompt_for

        return [prompt_for("circle", "red", "blue"), prompt_for("square", "yellow", "purple"),
                prompt_for("triangle", "white", "black", texture="striped"), prompt_for("ring", "green", "white")]

    # ---- train ---------------------------------------------------------------------------------------------
    def train(self, cfg: TrainConfig, name: str, on_event: Callable | None = None, *, run_dir: Path | None = None,
              user: str = "local", job_id: str | None = None, into_style: str | None = None) -> TrainJobResult:
        """Ingest images, make priors, train a LoRA and publish it as a style (engine/train/job.py).

        Holds the model lock for the whole run: training and generation share one queue.
        """
        from engine.train.job import run_training

        with self._job("train", user, job_id) as job:
            if job.token.is_set():  # cancelled while it waited: nothing ran, nothing to resume
                return TrainJobResult(run_dir, TrainResult(None, None, 0, [], True, None, 0, cfg.train_batch_size, 1),
                                      None, [], [])
            if self._adapters is not None:  # prior images come from the base model, not the last style used
                self._adapters.activate_many([])
            self._detach_instant()
            return run_training(self.model, self.data_dir, cfg, name, run_dir=run_dir, on_event=on_event,
                                stop_event=job.token, style_id=into_style)

    def train_iter(self, cfg: TrainConfig, name: str, *, run_dir: Path | None = None, user: str = "local",
                   job_id: str | None = None, into_style: str | None = None) -> Iterator:
        """`train` in a worker thread: yields the trainer's events, then the TrainJobResult."""
        return _iterate(lambda emit: self.train(cfg, name, emit, run_dir=run_dir, user=user, job_id=job_id,
                                                into_style=into_style), TrainJobResult)

    def resumable_runs(self) -> list[ResumableRun]:
        """Runs to offer "resume?": interrupted (their worker died: power cut, kill) and cancelled after a step."""
        from engine.train.job import resumable_runs

        return resumable_runs(self.data_dir / "runs")

    def resume_iter(self, run_id: str, *, user: str = "local", job_id: str | None = None) -> Iterator:
        """Resume a run from `resumable_runs()` (by its id, never a path) from its newest valid checkpoint, exactly."""
        run = next((r for r in self.resumable_runs() if r.run_id == run_id), None)
        if run is None:
            raise ConfigError("that run is no longer resumable (finished, or resumed already); refresh the list")
        cfg = from_dict(TrainConfig, run.config)
        return self.train_iter(cfg, run.name, run_dir=self.data_dir / "runs" / run.run_id, user=user, job_id=job_id)

    # ---- styles and the library ------------------------------------------------------------------------------
    @property
    def library(self) -> Library:
        """The style library (<data_dir>/stylebooth.db); opened, migrated and adopting old folders on first use."""
        with self._library_lock:
            if self._library is None:
                self._library = Library(self.data_dir)
            return self._library

    def list_styles(self) -> list[StyleInfo]:
        """The newest version of every style that is neither archived nor in the trash, newest first (the
        Generate tab's picker; its labels carry id and version, so styles that share a name stay apart)."""
        return self.library.active()

    def library_list(self, query: str = "", *, tag: str | None = None, preset: str | None = None,
                     archived: bool | None = False, trashed: bool = False) -> list[LibraryStyle]:
        """Search the library: `query` matches name, id, tags, trigger words, description; filters by tag, preset
        ("subject"/"style"), archived (False: hide, True: only archived, None: both); `trashed` lists the trash."""
        return self.library.list(query, tag=tag, preset=preset, archived=archived, trashed=trashed)

    def get_style(self, style_id: str) -> LibraryStyle:
        """One style with all its versions (oldest first)."""
        return self.library.get(style_id)

    def style_versions(self, style_id: str) -> list[StyleInfo]:
        """Every version of a style, oldest first."""
        return self.library.versions(style_id)

    def rename_style(self, style_id: str, name: str) -> LibraryStyle:
        """Rename a style (names need not be unique; labels show the id)."""
        return self.library.rename(style_id, name)

    def tag_style(self, style_id: str, tags: str | list[str]) -> LibraryStyle:
        """Replace a style's tags ("a, b" or a list); tags are lower-cased and de-duplicated."""
        return self.library.set_tags(style_id, tags)

    def describe_style(self, style_id: str, description: str) -> LibraryStyle:
        """Set a style's description."""
        return self.library.describe(style_id, description)

    def set_style_trigger(self, style_id: str, version: int, words: str | list[str]) -> StyleInfo:
        """Edit a version's trigger words ("a, b" or a list; the first is put into prompts)."""
        return self.library.set_trigger(style_id, version, words)

    def archive_style(self, style_id: str, archived: bool = True) -> LibraryStyle:
        """Hide a style from the picker and the default list (False brings it back)."""
        return self.library.archive(style_id, archived)

    def delete_style(self, style_id: str) -> LibraryStyle:
        """Move a style to the trash (undo with `undo_delete` until `empty_trash`)."""
        return self.library.delete(style_id)

    def undo_delete(self, style_id: str) -> LibraryStyle:
        """Restore a style from the trash with all its versions."""
        return self.library.undo_delete(style_id)

    def empty_trash(self) -> int:
        """Delete the styles in the trash for good (rows and folders); returns how many."""
        with self._lock:  # adapters of the removed styles are unloaded too
            gone = {s.id for s in self.library.list(trashed=True, archived=None)}
            n = self.library.empty_trash()
            if self._adapters is not None and gone:
                self._adapters.forget(gone)
            return n

    def import_lora(self, path: str | Path, *, name: str = "", trigger: str = "", preset: str = "style",
                    tags: str | list[str] = ()) -> ImportResult:
        """Import an uploaded .safetensors LoRA (diffusers/PEFT or kohya/A1111 keys, LoCon included) or textual-
        inversion embedding as a new library style, matched against the loaded base model.

        `path` is the file Gradio's upload handed the UI. Pickles are refused by content; a file that matches 0 of
        its N layers is refused ("0 of N layers matched"); a partial match imports with a warning in the result.
        The trigger word comes from `trigger`, else the file's metadata or name (editable: `set_style_trigger`).
        """
        with self._lock:  # reads the loaded model's layers; a model switch must not happen halfway
            m = self.model
            return import_file(self.library, path, m.components, model_fingerprint=m.fingerprint,
                               model_name=m.name, name=name, trigger=trigger, preset=preset, tags=tags)

    def export_style(self, style_id: str, fmt: str = "a1111", *, version: int | None = None,
                     out_dir: str | Path | None = None) -> ExportResult:
        """Write a style version as one .safetensors: fmt "a1111" (kohya keys for A1111/ComfyUI, named like the
        "Lora:" entry in our PNGs) or "diffusers" (PEFT keys). Metadata (trigger words, tags, base model, ss_*
        training settings) goes in the header. Written to `out_dir`, default <data_dir>/exports/<style id>/
        (inside the data dir, which Gradio does not serve: the UI copies the file to its upload folder)."""
        out = Path(out_dir) if out_dir else self.data_dir / "exports" / self.library.get(style_id).id
        return export_style(self.library, style_id, fmt, out, version=version)

    def style_warning(self, style_id: str) -> str | None:
        """"trained on X; you are on Y" when the style's newest version was made on another base model."""
        m = self.model
        return base_model_mismatch(self.library.find_version(style_id), m.fingerprint, m.name)

    # ---- instant styles (IP-Adapter) ---------------------------------------------------------------------------
    def _is_demo(self) -> bool:
        try:
            return Path(self.model.source).resolve() == DEMO_MODEL.resolve()
        except OSError:
            return False

    def _ip_adapter(self):
        """The IP-Adapter for the loaded model (the demo one, or `settings.ip_adapter`), loaded once."""
        from engine.styles.instant import load_adapter, resolve_adapter

        folder = resolve_adapter(self.settings.ip_adapter, demo=self._is_demo())
        key = str(folder)
        if key not in self._ip_adapters:
            c = self.model.components
            self._ip_adapters[key] = load_adapter(folder, device=c.device, dtype=c.dtype)
        return self._ip_adapters[key]

    def create_instant_style(self, name: str, reference_image_paths, *, style_only: bool = True,
                             strength: float = 1.0) -> StyleInfo:
        """A style from 1-8 reference images, ready at once (no training): the images go through the image intake
        (IM checks), are stored by content hash with their cached image embeddings as v1 of a new library entry
        of kind "instant". Generate with it through GenerateRequest.instant_style."""
        from engine.core.images import load_image
        from engine.styles.instant import (EMBEDS_FILE, MAX_REFERENCES, preview_strip, reference_pngs)
        from engine.styles.records import clean_name
        from engine.styles.store import publish_files

        name = clean_name(name)
        paths = [p for p in (reference_image_paths or []) if p]
        if not 1 <= len(paths) <= MAX_REFERENCES:
            raise ConfigError(f"give 1 to {MAX_REFERENCES} reference images; {len(paths)} were given")
        if not 0.0 <= float(strength) <= 2.0:
            raise ConfigError(f"`strength` must be between 0 and 2 but is {strength}")
        images = [load_image(p)[0] for p in paths]
        refs = reference_pngs(images)
        with self._lock:
            adapter = self._ip_adapter()
            embeds = adapter.embed(images)
            m = self.model
        from safetensors.torch import save as save_tensors

        files = {f"ref-{h[:16]}.png": data for _, h, data in refs}
        keep = [i for i, _, _ in refs]  # one embedding per stored reference
        files[EMBEDS_FILE] = save_tensors({"image_embeds": embeds[keep].contiguous()},
                                          metadata={"adapter": adapter.fingerprint})
        buf = io.BytesIO()
        preview_strip(images).save(buf, format="PNG")
        files["preview.png"] = buf.getvalue()
        meta = {"kind": "instant", "preset": "style", "trigger_token": "instant", "weights_file": EMBEDS_FILE,
                "source": "instant", "base_model_fingerprint": m.fingerprint, "base_model": m.name,
                "recommended_strength": float(strength),
                "instant": {"references": [f"ref-{h[:16]}.png" for _, h, _ in refs], "sha256": [h for _, h, _ in refs],
                            "adapter": adapter.folder.name, "adapter_fingerprint": adapter.fingerprint,
                            "strength": float(strength), "style_only": bool(style_only), "combine": "mean"}}
        return publish_files(self.data_dir, name, files, meta)

    def instant_references(self, style_id: str) -> list[Path]:
        """The reference images of an instant style's newest instant version (for its library card)."""
        import json

        v = next((v for v in reversed(self.library.versions(style_id)) if v.kind == "instant"), None)
        if v is None:
            return []
        meta = json.loads((v.folder / "style.json").read_text("utf-8"))
        return [v.folder / f for f in meta.get("instant", {}).get("references", []) if (v.folder / f).is_file()]

    def _instant_embeds(self, v: StyleInfo, adapter) -> "torch.Tensor":
        """The version's cached embeddings, recomputed from its references if made with another adapter."""
        from PIL import Image
        from safetensors import safe_open

        from engine.styles.instant import combine_embeds

        with safe_open(str(v.lora), framework="pt") as f:
            cached = f.metadata().get("adapter") == adapter.fingerprint
            embeds = f.get_tensor("image_embeds") if cached else None
        if embeds is None:
            refs = [v.folder / p.name for p in self.instant_references(v.id)]
            embeds = adapter.embed([Image.open(p).convert("RGB") for p in refs])
        return combine_embeds(embeds)

    def _activate_instant(self, style_id: str, strength: float, style_only: bool):
        """Attach the IP-Adapter with InstantStyle block scales and return (version, [1, D] embedding), or detach
        it and return (None, None). Call under the model lock."""
        from engine.styles.instant import IPAdapterHook, style_blocks_for

        if not style_id:
            self._detach_instant()
            return None, None
        v = self.library.find_version(style_id)
        if v.kind != "instant":
            v = next((x for x in reversed(self.library.versions(v.id)) if x.kind == "instant"), None)
            if v is None:
                raise ConfigError(f"style {style_id!r} is not an instant style; pick it among the LoRA styles")
        check_same_base([v], self.model.fingerprint, self.model.name)
        adapter = self._ip_adapter()
        embeds = self._instant_embeds(v, adapter)
        unet = self.model.components.unet
        if self._ip_hook is None or self._ip_hook.unet is not unet:
            self._ip_hook = IPAdapterHook(unet)
        self._ip_hook.attach(adapter)
        self._ip_hook.set_scale(strength, style_blocks_for(self._is_demo()) if style_only else None)
        return v, embeds

    def _detach_instant(self) -> None:
        if self._ip_hook is not None:
            self._ip_hook.detach()

    def train_from_instant(self, style_id: str, *, max_train_steps: int | None = None, user: str = "local",
                           job_id: str | None = None) -> Iterator:
        """"Train it properly": a DreamBooth run (the style preset) on an instant style's reference images; the
        result is published as the next version of the same library entry. Yields the trainer's events, then the
        TrainJobResult (see `train_iter`)."""
        from engine.core.train_config import demo_settings, presets, suggest_trigger_token

        refs = self.instant_references(style_id)
        if not refs:
            raise ConfigError(f"style {style_id!r} has no instant version with reference images to train on")
        style = self.get_style(style_id)
        token = suggest_trigger_token(self.model.components.tokenizer)
        values = presets("style", token=token)
        if self._is_demo():
            values.update(demo_settings("style"))
        if max_train_steps:
            values["max_train_steps"] = int(max_train_steps)
        cfg = TrainConfig(instance_images=tuple(str(p) for p in refs), **values)
        return self.train_iter(cfg, style.name, user=user, job_id=job_id, into_style=style.id)

    def _activate_styles(self, weighted) -> list[tuple[StyleInfo, float, float]]:
        """Activate exactly these styles ((id, strength) or (id, UNet weight, text-encoder weight)), loading each
        LoRA once (then cached) and setting all weights in one set_adapters call; none switches LoRA off.
        A style at weight 0 is off (no adapter, no trigger word; its w * dW is zero anyway), so a blend at 1/0
        is the first style alone, bit for bit. Returns every style given, for the recipe.
        Styles are looked up in the library by id (never a path); one made on another base model is refused.
        Call under the model lock: adapter changes must not interleave with another job's denoising (MU-6)."""
        out = []
        for item in weighted:
            sid, wu, wt = (item[0], item[1], item[1]) if len(item) == 2 else item
            out.append((self.library.find_version(sid), float(wu), float(wt)))
            if out[-1][0].kind == "instant":
                raise ConfigError(f"{out[-1][0].name!r} is an instant style (reference images, no LoRA): pick it "
                                  "as the instant style, or train it first")
        check_same_base([s for s, _, _ in out], self.model.fingerprint, self.model.name)
        if not out and self._adapters is None:
            return out
        if self._adapters is None:
            self._adapters = AdapterCache(self.model.components, fuse=self.fuse_styles)
        self._adapters.activate_many([(s, wu if wu == wt else {"unet": wu, "text_encoder": wt})
                                      for s, wu, wt in out if (wu, wt) != (0.0, 0.0)])
        return out

    def _recipe(self, req: GenerateRequest, seed: int, width: int, height: int, prompt: str,
                styles: list[tuple[StyleInfo, float, float]], instant: StyleInfo | None = None) -> dict:
        """Everything that remakes the image; `styles` lists every applied style (recipe schema 2); an instant style
        is recorded by id@version with its strength and style-only switch (the request's own field names)."""
        m = self._model
        listed = [{"id": s.id, "version": s.version, "name": s.name, "strength": wu, "trigger_token": s.trigger_token,
                   **({"text_encoder_strength": wt} if wt != wu else {})} for s, wu, wt in styles]
        return {"prompt": prompt, "negative_prompt": req.negative_prompt,
                "num_inference_steps": req.num_inference_steps, "guidance_scale": req.guidance_scale,
                "guidance_rescale": req.guidance_rescale, "width": width, "height": height, "seed": seed,
                "scheduler": req.scheduler, "model": m.name, "model_fingerprint": m.fingerprint,
                "prediction_type": m.prediction_type, "styles": listed,
                **({"instant_style": instant.id, "instant_style_version": instant.version,
                    "instant_strength": req.instant_strength,
                    "instant_style_only": req.instant_style_only} if instant else {}),
                "app": f"Stylebooth {APP_VERSION}",
                "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def _out_dir(self, user: str) -> Path:
        return self.data_dir / "outputs" / user / dt.date.today().isoformat()

    # ---- blends --------------------------------------------------------------------------------------------
    def blend_strip(self, req: BlendStripRequest, on_progress: Callable[[Progress], None] | None = None, *,
                    user: str = "local", job_id: str | None = None) -> BlendStripResult:
        """K images of one prompt and seed, weights from all style A to all style B, as one job: both LoRAs are
        loaded once, then only their weights change (set_adapters) between images. Also writes a labelled strip."""
        t0 = time.perf_counter()
        weights = req.weights
        with self._job("blend", user, job_id) as job:
            c = self.model.components
            size = (req.width or c.default_size, req.height or c.default_size)
            steps, total = req.num_inference_steps, req.num_inference_steps * len(weights)
            done: list[GeneratedImage] = []
            stamp = int(time.time() * 1000)
            strip = Grid([req.prompt], [f"A {wa:.2f} / B {wb:.2f}" for wa, wb in weights], size)
            try:
                job.token.check()
                for k, w in enumerate(weights):
                    gen = req.generate_request(w)
                    styles = self._activate_styles(gen.active_styles)
                    prompt = _with_triggers(req.prompt, styles)

                    def cb(i, n, latents, k=k):
                        job.token.check()
                        if on_progress:
                            on_progress(Progress(k * steps + i + 1, total, f"image {k + 1}/{len(weights)}, "
                                                                           f"step {i + 1}/{n}"))

                    img = to_pil(sample(c, [prompt], [req.negative_prompt], [req.seed], num_inference_steps=steps,
                                        guidance_scale=req.guidance_scale, guidance_rescale=req.guidance_rescale,
                                        scheduler=req.scheduler, width=size[0], height=size[1], callback=cb))[0]
                    recipe = self._recipe(gen, req.seed, size[0], size[1], prompt, styles)
                    path = self._out_dir(user) / f"{stamp}-blend-{k:02d}.png"
                    done.append(GeneratedImage(img, recipe, recipes.save_png(img, recipe, path)))
                    strip.paste(_Cell(0, k), img)
            except Cancelled:
                return BlendStripResult(done, weights[:len(done)], None, True, time.perf_counter() - t0)
            strip_path = strip.save(self._out_dir(user) / f"{stamp}-blend-strip.png")
            return BlendStripResult(done, weights, strip_path, False, time.perf_counter() - t0)

    def blend_strip_iter(self, req: BlendStripRequest, *, user: str = "local",
                         job_id: str | None = None) -> Iterator[Progress | BlendStripResult]:
        """`blend_strip` in a worker thread: yields Progress, then the BlendStripResult."""
        return _iterate(lambda emit: self.blend_strip(req, emit, user=user, job_id=job_id), BlendStripResult)

    def bake_blend(self, req: BakeRequest, *, user: str = "local") -> BakeResult:
        """Save a blend as a new style (exact rank concatenation, or truncated SVD to `req.rank`)."""
        from engine.styles.blend import bake_style

        styles = [self.library.find_version(sid) for sid in req.blend.styles]
        with self._job("blend", user, None):
            check_same_base(styles, self.model.fingerprint, self.model.name)
            info, rank, rel = bake_style(self.data_dir, req, styles)
        return BakeResult(info, req.method, rank, rel)

    # ---- batches -------------------------------------------------------------------------------------------
    def generate_batch(self, req: BatchRequest, on_progress: Callable[[Progress], None] | None = None, *,
                       user: str = "local", job_id: str | None = None) -> BatchResult:
        """Prompts x seeds x styles (or strengths) as one job: PNGs with recipes written as they are made, an X/Y
        grid and a zip, under outputs/<user>/<date>/batch-<time>/. Progress counts images over the whole batch."""
        with self._job("batch", user, job_id) as job:
            for sid in set(req.styles) - {""}:
                self.library.find_version(sid)  # an unknown id fails before any image is made

            current: list = []  # the styles of the group being sampled, for its recipes
            instant, image_embeds = self._activate_instant(req.instant_style, req.instant_strength,
                                                           req.instant_style_only)

            def activate(style: str, strength: float):
                current[:] = self._activate_styles(((style, strength),) if style else ())
                styles = list(current)
                return lambda p: _with_triggers(p, styles)

            def recipe(gen, seed, width, height, prompt):
                return self._recipe(gen, seed, width, height, prompt, current, instant)

            out = self._out_dir(user) / f"batch-{dt.datetime.now().strftime('%H%M%S')}-{job.id[:6]}"
            return run_batch(req, self.model.components, out, activate=activate, recipe=recipe,
                             check=job.token.check, on_progress=on_progress, image_embeds=image_embeds)

    def generate_batch_iter(self, req: BatchRequest, *, user: str = "local",
                            job_id: str | None = None) -> Iterator[Progress | BatchResult]:
        """`generate_batch` in a worker thread: yields Progress (images done / total), then the BatchResult."""
        return _iterate(lambda emit: self.generate_batch(req, emit, user=user, job_id=job_id), BatchResult)


def _with_triggers(prompt: str, styles) -> str:
    """The prompt with every applied style's trigger word (each added only where missing; none for weight 0)."""
    for s, wu, wt in styles:
        if (wu, wt) != (0.0, 0.0):
            prompt = apply_trigger(prompt, s)
    return prompt


class _Cell:
    """Where an image goes in a one-row strip (the fields engine.generate.batch.Grid.paste reads)."""

    def __init__(self, row: int, col: int):
        self.row, self.col = row, col


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
