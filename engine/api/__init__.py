"""`Engine`: the one facade that the UI and the CLI call.

It owns the loaded base model, one lock around all model work (one GPU, one queue, fair across users), the
registry of jobs with a cancel token each (Cancel stops one job within one step, not the others), the studio
(callers, quotas) and the data directory. Methods take frozen request dataclasses and return typed results;
progress is reported through typed events. This file holds the model, jobs and generation; training in
training.py, the library methods in library.py, blends and batches in blends.py, the job queue (recording every job, my_jobs,
job_status, reattach) in jobs.py (mixins of this one class), shared pieces in support.py.

May import: every engine subpackage (it is the composition root); nothing imports it but ui/, the launcher,
scripts and benches.
"""
from __future__ import annotations

import datetime as dt
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch

from engine.core.caller import LOCAL, Caller
from engine.core.config import ConfigError, GenerateRequest, Settings
from engine.core.errors import AccessDenied, Cancelled, LibraryError
from engine.core.events import GeneratedImage, GenerateResult, Progress, Queued
from engine.generate import recipes
from engine.generate.sampler import decode, sample, to_pil
from engine.jobs.cancel import JobRegistry
from engine.jobs.fair import FairScheduler
from engine.jobs.runner import LiveJob
from engine.jobs.store import JobStore
from engine.models.loading import LoadedModel, load_base_model
from engine.styles.adapters import AdapterCache, unet_weight
from engine.styles.blend import check_same_base
from engine.styles.library import Library, LibraryStyle
from engine.styles.store import StyleInfo
from engine.api.blends import BlendMethods
from engine.api.cluster import ClusterMethods
from engine.api.feedback import FeedbackMethods
from engine.api.instant import InstantMethods
from engine.api.jobs import JobMethods
from engine.api.library import LibraryMethods
from engine.api.training import TrainingMethods
from engine.api.support import charged, iterate, with_triggers
from engine.studio.service import Studio

APP_VERSION = "0.1.0"
_USER = re.compile(r"[a-z0-9][a-z0-9._-]{0,31}")  # what normalize_username lets through: safe as a folder name


def default_data_dir() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("Stylebooth", appauthor=False))


def pick_device() -> tuple[str, torch.dtype]:
    """CUDA in fp16 when present, else CPU in fp32 (fp16 on CPU is slow and half-supported)."""
    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


class Engine(LibraryMethods, BlendMethods, FeedbackMethods, InstantMethods, ClusterMethods, JobMethods,
             TrainingMethods):
    """Everything that touches models and files. Thread-safe: model work runs one job at a time."""

    def __init__(self, settings: Settings | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None, fallback_to_demo: bool = False, fuse_styles: bool = True,
                 cluster=None):
        self.settings = settings or Settings()
        self.data_dir = Path(self.settings.data_dir).expanduser() if self.settings.data_dir else default_data_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        auto_device, auto_dtype = pick_device()
        self.device, self.dtype = device or auto_device, dtype or auto_dtype
        self._lock = threading.RLock()  # held by every piece of model work
        self.jobs = JobRegistry()  # queued and running jobs, each with its own cancel token
        self._png_writer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stylebooth-png")
        self.fair = FairScheduler()  # whose job runs next on the one GPU: round-robin across users
        # engine/cluster RayBackend: jobs run as Ray tasks on its workers, capacity() at once, no model lock here
        self.cluster = cluster
        if cluster is not None:
            self.fair = cluster.scheduler()
        # The queue's table (GR-12, TR-9): every job's state, progress and result. Jobs that a dead process left
        # queued or running are marked interrupted now, before this process runs any.
        self.job_store = JobStore(self.data_dir / "stylebooth.db")
        self.interrupted_at_start = self.job_store.recover()
        self._live: dict[str, LiveJob] = {}  # jobs running in this process that a page can follow (reattach)
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
        # Studio mode (--listen/--share): accounts, ownership and quotas. None: one local user, who owns everything
        # and pays nothing.
        self.studio: Studio | None = None

    # ---- studio: who is asking -------------------------------------------------------------------------------
    def enable_studio(self, studio: Studio | None = None) -> Studio:
        """Turn on accounts, ownership checks and quotas on <data_dir>/stylebooth.db; reservations left open by a
        process that died are refunded now (no job runs yet)."""
        self.studio = studio or Studio(self.data_dir / "stylebooth.db")
        self.studio.quotas.release_stale()
        return self.studio

    def caller(self, user: str | Caller | None = LOCAL) -> Caller:
        """The Caller behind a username (from Gradio's request, never a form field). Without accounts every call
        is the local user, who may do everything; with accounts the name must be a current account, and its role
        is read from the database on every call (a removed user or a revoked admin loses access at once)."""
        if self.studio is None:
            name = user.name if isinstance(user, Caller) else (user or LOCAL)
            if not isinstance(name, str) or not _USER.fullmatch(name):
                raise AccessDenied(f"not a user name: {str(name)[:40]!r}")
            return Caller(name, admin=True)
        return self.studio.caller(user.name if isinstance(user, Caller) else user)

    def _reserve(self, caller: Caller, kind: str, count: int, request_id: str) -> bool:
        """Hold the price before GPU work; True if something was reserved (studio mode, not an admin)."""
        if self.studio is None or caller.admin:
            return False  # the local user and studio admins are not charged
        return self.studio.quotas.reserve(caller.name, request_id, kind, count)

    def balance(self, user: str | Caller = LOCAL):
        """The caller's free generations left, credits and renewal date (None without accounts or for admins)."""
        caller = self.caller(user)
        if self.studio is None or caller.admin:
            return None
        return self.studio.quotas.balance(caller.name)

    def _style_for(self, caller: Caller, style_id: str, *, change: bool = False) -> LibraryStyle:
        """The style if the caller may see it (or change it); otherwise the same "unknown style" as for an id that
        does not exist, so ids of other users' styles cannot be probed."""
        s = self.library.get(style_id)
        if not caller.can_see(s.owner, s.shared and not s.trashed):
            raise LibraryError(f"unknown style {str(style_id)[:60]!r}; pick one from the library list")
        if change and not caller.can_change(s.owner):
            raise AccessDenied(f"style {s.name!r} is shared by {s.owner}: only its owner or an admin can change it")
        return s

    def _check_style_refs(self, caller: Caller, req) -> None:
        """Every style a generation request names must be one the caller may use."""
        refs = [getattr(req, "style", ""), getattr(req, "style_a", ""), getattr(req, "style_b", "")]
        items = [*(getattr(req, "styles", ()) or ()), *(getattr(req, "active_styles", ()) or ()),
                 *(getattr(getattr(req, "blend", None), "styles", ()) or ())]
        for item in items:  # ids, or (id, strength[, text-encoder strength]) tuples
            refs.append(item if isinstance(item, str) else (item[0] if isinstance(item, (tuple, list)) else ""))
        for ref in filter(None, refs):
            self._style_for(caller, self.library.find_version(str(ref)).id)

    def _own_training(self, caller: Caller, result) -> None:
        """A training run and the style it published belong to whoever started it."""
        run_dir = getattr(result, "run_dir", None)
        if run_dir is not None:
            self.library.set_run_owner(Path(run_dir).name, caller.name)
        style = getattr(result, "style", None)
        if style is not None and self.library.get(style.id).owner == LOCAL and caller.name != LOCAL:
            self.library.set_owner(style.id, caller.name)

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
    def cancel(self, job_id: str | None = None, *, kind: str | None = None, user: str | Caller | None = None) -> int:
        """Ask the matching queued or running jobs to stop (see JobRegistry.cancel); a generation stops within one
        denoising step, a training run at the next step after saving a checkpoint. Returns how many were asked."""
        if user is not None:  # a user cancels only their own jobs
            user = self.caller(user).name
        return self.jobs.cancel(job_id, kind=kind, user=user)

    def wait_for_jobs(self, *, kind: str | None = None, user: str | None = None, timeout: float = 30.0) -> bool:
        """Wait until the matching jobs have stopped (after `cancel`); False if some still run after `timeout` s."""
        return self.jobs.wait_until_done(kind=kind, user=user, timeout=timeout)

    def queue_position(self, job_id: str, *, user: str | Caller = LOCAL) -> int | None:
        """0 while the job runs, k when k jobs run before it (round-robin across users), None when unknown (or
        when the job is another user's)."""
        caller = self.caller(user)
        job = next((j for j in self.jobs.running() if j.id == job_id), None)
        if job is None or not caller.can_see(job.user):
            return None
        return self.fair.position(job_id)

    # ---- generate ------------------------------------------------------------------------------------------
    @charged("generate")
    def generate(self, req: GenerateRequest, on_progress: Callable[[Progress], None] | None = None,
                 *, user: str = "local", job_id: str | None = None, use_feedback: bool = False,
                 feedback_params=None) -> GenerateResult:
        """Run a GenerateRequest; images are saved as PNGs with their recipe under outputs/<user>/<date>/.

        `use_feedback`: steer towards `user`'s liked and away from their disliked images of the first active
        style (any of its versions) (FABRIC, engine/feedback/fabric.py; `feedback_params` a FabricParams, else
        its defaults)."""
        t0 = time.perf_counter()
        with self._job("generate", user, job_id) as job:
            if job.token.is_set():  # cancelled while it waited: no model work at all
                return GenerateResult([], cancelled=True, seconds=time.perf_counter() - t0)
            if self.cluster is not None:
                return self._cluster_generate(req, on_progress, user, job, t0, use_feedback)
            m = self.model
            c = m.components
            styles = self._activate_styles(req.active_styles)
            instant, image_embeds = self._activate_instant(req.instant_style, req.instant_strength,
                                                           req.instant_style_only)
            prompts = [with_triggers(p, styles) for p in req.prompts]
            n = len(prompts)
            width, height = req.width or c.default_size, req.height or c.default_size
            total = req.num_inference_steps * req.batch_count
            preview_every = max(1, req.num_inference_steps // 4)
            out_dir = self.data_dir / "outputs" / user / dt.date.today().isoformat()
            writes: list = []  # (image, recipe, future of its path), in order
            cancelled = False
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

                    with self._feedback(styles, user, use_feedback, feedback_params,
                                        req.guidance_scale > 1.0, req.seed) as hook:
                        imgs = sample(c, self._adapters.expand_prompts(prompts) if self._adapters else prompts,
                                      [req.negative_prompt] * n, seeds,
                                      num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                                      guidance_rescale=req.guidance_rescale, scheduler=req.scheduler, height=height,
                                      width=width, callback=cb, on_step_start=hook, image_embeds=image_embeds)
                    for seed, prompt, img in zip(seeds, prompts, to_pil(imgs)):
                        recipe = self._recipe(req, seed, width, height, prompt, styles, instant)
                        path = out_dir / f"{int(time.time() * 1000)}-{seed}.png"
                        # Written in the background (PNG encoding releases the GIL), so the next batch starts at
                        # once; every file is on disk before this job reports done (see `finally`).
                        writes.append((img, recipe, self._png_writer.submit(recipes.save_png, img, recipe, path)))
            except Cancelled:
                cancelled = True
            finally:
                done = [GeneratedImage(img, recipe, fut.result()) for img, recipe, fut in writes]
            return GenerateResult(done, cancelled=cancelled, seconds=time.perf_counter() - t0)

    def generate_iter(self, req: GenerateRequest, *, user: str = "local", job_id: str | None = None,
                      use_feedback: bool = False) -> Iterator[Progress | GenerateResult]:
        """Run `generate` in a worker thread and yield its Progress events, then the GenerateResult.

        For UIs that render while the job runs (a Gradio generator). Errors are re-raised here.
        """
        job_id = job_id or uuid.uuid4().hex
        extra = {"use_feedback": True} if use_feedback else {}
        return iterate(lambda emit: self.generate(req, emit, user=user, job_id=job_id, **extra), GenerateResult,
                       self._waiting(job_id, user))

    def read_recipe(self, path: str | Path) -> dict | None:
        """The recipe a dropped PNG carries (ours or A1111's), or None; see engine.generate.recipes."""
        return recipes.read_recipe(path)

    @staticmethod
    def example_prompts() -> list[str]:
        """Prompts that show what the bundled demo model can draw."""
        from engine.demo.world import prompt_for

        return [prompt_for("circle", "red", "blue"), prompt_for("square", "yellow", "purple"),
                prompt_for("triangle", "white", "black", texture="striped"), prompt_for("ring", "green", "white")]

    def _waiting(self, job_id: str, user) -> Callable[[], Queued | None]:
        """For iterate: while the job waits for its turn, a Queued event with its place in line."""
        def poll():
            pos = self.fair.position(job_id)
            return Queued(pos) if pos else None
        return poll

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
            info = self.library.find_version(sid)
            if info.kind == "instant":
                raise ConfigError(f"{info.name!r} is an instant style (reference images, no LoRA): pick it as the "
                                  "instant style, or train it first")
            d = self.ratings.defaults(info.id, info.version)  # the version's hand-set defaults (Feedback tab)
            # per-block UNet weights all 0: no UNet update at all, so the UNet weight is 0 (and 0/0 is off)
            unet_on = any(d["blocks"].values())
            out.append((info, float(wu) * d["strength"] * d["unet_weight"] * unet_on,
                        float(wt) * d["strength"] * d["te_weight"]))
        check_same_base([s for s, _, _ in out], self.model.fingerprint, self.model.name)
        if not out and self._adapters is None:
            return out
        if self._adapters is None:
            self._adapters = AdapterCache(self.model.components, fuse=self.fuse_styles)
        active = []
        for s, wu, wt in out:
            if (wu, wt) != (0.0, 0.0):
                wb = unet_weight(wu, self.ratings.defaults(s.id, s.version)["blocks"])
                active.append((s, wu if wb == wu == wt else {"unet": wb, "text_encoder": wt}))
        self._adapters.activate_many(active)
        return out

    def _recipe(self, req: GenerateRequest, seed: int, width: int, height: int, prompt: str,
                styles: list[tuple[StyleInfo, float, float]], instant: StyleInfo | None = None,
                model=None) -> dict:
        """Everything that remakes the image; `styles` lists every applied style (recipe schema 2); an instant style
        is recorded by id@version with its strength and style-only switch (the request's own field names)."""
        m = model or self._model  # a cluster job: the worker's model facts (name, fingerprint, prediction type)
        listed = [{"id": s.id, "version": s.version, "name": s.name, "strength": wu, "trigger_token": s.trigger_token,
                   **({"text_encoder_strength": wt} if wt != wu else {}), **self._block_recipe(s, wu)}
                  for s, wu, wt in styles]
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

    def _block_recipe(self, s: StyleInfo, wu: float) -> dict:
        """{"unet_blocks": {"down", "mid", "up"}} of an applied style whose version has per-block weights (the UNet
        strength above times these per block), else nothing. Read under the model lock, as _activate_styles was."""
        blocks = self.ratings.defaults(s.id, s.version)["blocks"] if wu else None
        return {"unet_blocks": blocks} if blocks and isinstance(unet_weight(1.0, blocks), dict) else {}

    def _out_dir(self, user: str) -> Path:
        return self.data_dir / "outputs" / user / dt.date.today().isoformat()
