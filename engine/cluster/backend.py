"""`RayBackend`: run the Engine's generation and training jobs as Ray tasks on GPU workers.

The app stays the source of truth: it checks ownership, charges quotas and keeps the fair queue (engine.jobs.fair.FairScheduler, as many
turns at once as the cluster has job slots), and only then hands a job to Ray as one task with `num_gpus=1` (per
job). What a worker needs reaches it by content hash from the store on the app's node (head.py); what it makes
comes back as bytes that the app writes: PNGs with their recipes under outputs/<user>/, a trained style into the
library. A worker that dies (its machine, its process, the network) is Ray's to handle: the task is retried on
another worker (`max_retries`, Ray's own; a job that *fails* with an error is never retried), and a training job
resumes there from the newest checkpoint the app's node holds. Events (progress, previews, training logs) flow
through the store and are passed to the caller's callback while the job runs.
"""
from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from engine.cluster import worker
from engine.cluster.content import Hasher, safe_rel
from engine.jobs.fair import FairScheduler
from engine.cluster.head import HeadStore
from engine.core.errors import TrainingError

DEFAULT_ROOT = "/var/tmp/stylebooth-worker"  # must be the same path on every worker (see worker.py)


class ClusterError(TrainingError):
    """The cluster could not finish a job (every worker that tried it died); the message says what to do."""


class GenerateOutput(NamedTuple):
    images: list  # [(PNG path on this node, recipe)], in order
    cancelled: bool
    node: str  # the Ray node id that made them


class RayBackend:
    """Jobs on a Ray cluster. `address`: "auto" (a cluster started on this machine with `ray start`), HOST:PORT,
    or None to start a local Ray instance (tests). `gpus_per_job`/`cpus_per_job`: what one job reserves on a
    worker (capacity() = how many jobs the cluster can run at once); `root`: the worker-side cache and scratch
    folder, the same path on every worker; `max_retries`: how often Ray reruns a job whose worker died;
    `store_class`: the store actor's class (HeadStore; tests subclass it to hold a worker at a chosen moment)."""

    def __init__(self, address: str | None = "auto", *, gpus_per_job: float = 1, cpus_per_job: float = 1,
                 root: str = DEFAULT_ROOT, max_retries: int = 3, store_class: type = HeadStore, **init_kwargs):
        if not ray.is_initialized():
            init_kwargs.setdefault("include_dashboard", False)
            init_kwargs.setdefault("logging_level", "warning")
            ray.init(address=address, **init_kwargs)
        here = ray.get_runtime_context().get_node_id()
        # The store reads and writes this node's files: it must run here, and takes no worker slot.
        self.store = ray.remote(store_class).options(
            num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
        self.gpus_per_job, self.cpus_per_job = gpus_per_job, cpus_per_job
        self.root, self.max_retries = root, max_retries
        opts = dict(num_gpus=gpus_per_job, num_cpus=cpus_per_job, max_retries=max_retries, retry_exceptions=False)
        self._generate = ray.remote(worker.generate_task).options(**opts)
        self._train = ray.remote(worker.train_task).options(**opts)
        self._hasher = Hasher()
        self._registered: set[str] = set()
        self._capacity = (0.0, 1)  # (when measured, value)
        self._lock = threading.Lock()
        self.history: list[tuple[str, str, list[str]]] = []  # (job id, kind, node id of each attempt), finished jobs

    # ---- capacity and the queue ------------------------------------------------------------------------------
    def capacity(self) -> int:
        """How many jobs the cluster can run at once now (measured at most every 2 s; at least 1, so jobs wait for
        a worker to join rather than fail)."""
        with self._lock:
            when, value = self._capacity
            if time.monotonic() - when > 2.0:
                res = ray.cluster_resources()
                fits = [int(res.get(k, 0.0) // need) for k, need in (("GPU", self.gpus_per_job),
                                                                      ("CPU", self.cpus_per_job)) if need]
                value = max(1, min(fits)) if fits else 1
                self._capacity = (time.monotonic(), value)
            return value

    def scheduler(self) -> FairScheduler:
        """The Engine's fair queue for this cluster: round-robin across users, capacity() jobs at once."""
        return FairScheduler(self.capacity)

    # ---- content ---------------------------------------------------------------------------------------------
    def _register(self, bundle) -> str:
        if bundle.hash not in self._registered:
            ray.get(self.store.add_bundle.remote(bundle))
            self._registered.add(bundle.hash)
        return bundle.hash

    def model_ref(self, source: str | Path) -> dict:
        """{"hash", "entry"} of a base model (a diffusers folder or a .safetensors file) for a spec."""
        bundle, entry = self._hasher.model(Path(source))
        return {"hash": self._register(bundle), "entry": entry}

    def files_ref(self, base: Path, files: list[Path]) -> str:
        """The content hash of these files (relative to `base`) for a spec."""
        return self._register(self._hasher.bundle(Path(base), [Path(f) for f in files]))

    # ---- generation ------------------------------------------------------------------------------------------
    def run_generate(self, spec: dict, *, recipe: Callable[[dict, dict], dict], on_progress: Callable | None = None,
                     cancelled: threading.Event | None = None) -> GenerateOutput:
        """Run a generation spec ({"job_id", "user", "model": model_ref, "request": GenerateRequest as a dict,
        "styles": [{"info": StyleInfo fields, "hash", "unet", "te"}], "out_dir"}) on a worker. Each image is written
        as <out_dir>/<ms>-<seed>.png with `recipe(image facts, model facts)` in it, atomically."""
        spec = {**spec, "root": self.root}
        out = self._run(self._generate, spec, None, on_progress, cancelled)
        from PIL import Image

        from engine.generate import recipes

        done = []
        for im in out["images"]:
            r = recipe(im, out["model"])
            path = Path(spec["out_dir"]) / f"{int(time.time() * 1000)}-{im['seed']}.png"
            recipes.save_png(Image.open(io.BytesIO(im["png"])), r, path)  # atomic, recipe in its text chunks
            done.append((path, r))
        return GenerateOutput(done, bool(out["cancelled"]), out["node"])

    # ---- training --------------------------------------------------------------------------------------------
    def run_train(self, spec: dict, on_event: Callable | None = None, *,
                  cancelled: threading.Event | None = None):
        """Run a training spec ({"job_id", "user", "model": model_ref, "config": TrainConfig as a dict, "name",
        "run_dir" (on this node), "data_dir", "style_id" or None}) on a worker; publish the style here.

        The run folder here gets job.json (so the Train tab can offer "resume?") and every checkpoint the worker
        saves; a run folder that already holds checkpoints resumes from them. Returns a TrainJobResult."""
        from engine.core.events import TrainCheckpoint, TrainJobResult, TrainResult
        from engine.jobs import state as jobs
        from engine.styles.store import publish_files
        from engine.train.checkpoints import latest_step
        from engine.train.job import record_published, write_run_name

        cfg = spec["config"]
        run_dir = Path(spec["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        write_run_name(run_dir, spec["name"])
        images = [Path(p).resolve() for p in cfg["instance_images"]]
        base = Path(_common_parent(images))
        spec = {**spec, "root": self.root, "dataset": self.files_ref(base, images),
                "images": [p.relative_to(base).as_posix() for p in images]}
        jobs.write_job(run_dir, "running", step=0, total=cfg["max_train_steps"], message="", config=cfg)

        def event(e):
            if isinstance(e, TrainCheckpoint):  # held here now: what "resume?" offers if the app stops
                jobs.write_job(run_dir, "checkpointed", step=e.step, checkpoint=Path(e.path).name)
            if on_event is not None:
                on_event(e)

        try:
            out = self._run(self._train, spec, str(run_dir), event, cancelled,
                            keep=int(cfg.get("checkpoints_total_limit", 2)))
        except ClusterError as e:  # every worker died: what the app holds stays resumable
            held = latest_step(run_dir / "checkpoints")
            jobs.write_job(run_dir, "cancelled" if held else "failed", step=held or 0, message=str(e))
            raise
        except BaseException as e:
            jobs.write_job(run_dir, "failed", message=str(e))
            raise
        result = TrainResult(None, None, out["steps"], out["losses"], out["cancelled"], out["resumed_from"],
                             out["skipped"], out["micro_batch"], out["accumulation"])
        rejected = [tuple(r) for r in out["rejected"]]
        if out["cancelled"]:
            jobs.write_job(run_dir, "cancelled", step=out["steps"])
            return TrainJobResult(run_dir, result, None, rejected, out["notices"])
        files = {safe_rel(n): data for n, data in out["files"].items() if "/" not in n}
        if "style.json" not in files:
            raise ClusterError("the worker finished training but sent no style.json back; resume the run")
        meta = json.loads(files.pop("style.json"))
        # The worker's paths mean nothing here: record what the app was given.
        meta["base_model"] = spec.get("model_source") or meta.get("base_model", "")
        meta["training_config"] = {**meta.get("training_config", {}), "instance_images": cfg["instance_images"],
                                   "base_model": meta["base_model"]}
        lora_name = meta.get("lora_file", "lora.safetensors")
        publish = {"lora.safetensors": files[lora_name]}
        if meta.get("preview_grid") in files:
            publish["preview.png"] = files[meta["preview_grid"]]
        out_dir = run_dir / "output"
        out_dir.mkdir(exist_ok=True)
        from engine.core.files import atomic_write_bytes

        for name, data in files.items():  # the run folder here holds the result too, as a local run's does
            atomic_write_bytes(out_dir / name, data)
        atomic_write_bytes(out_dir / "style.json", json.dumps(meta, indent=1).encode())
        style = publish_files(Path(spec["data_dir"]), spec["name"], publish, meta, style_id=spec.get("style_id"))
        record_published(run_dir, style.id)  # a checkpoint published later becomes its next version
        jobs.write_job(run_dir, "done", step=out["steps"], lora=str(out_dir / lora_name))
        result = dataclasses.replace(result, lora_path=out_dir / lora_name, style_json_path=out_dir / "style.json")
        return TrainJobResult(run_dir, result, style, rejected, out["notices"])

    # ---- one task, its events and its end --------------------------------------------------------------------
    def _run(self, fn, spec: dict, run_dir: str | None, on_event, cancelled, keep: int = 2) -> dict:
        job_id = spec["job_id"]
        ray.get(self.store.open_job.remote(job_id, run_dir, keep))
        since, asked = 0, False
        try:
            ref = fn.remote(spec, self.store)
            while True:
                ready, _ = ray.wait([ref], timeout=0.25)  # read after it ended, too: its last events are in
                events = ray.get(self.store.events.remote(job_id, since))
                since += len(events)
                for e in events:
                    if on_event is not None:
                        on_event(e)
                if cancelled is not None and cancelled.is_set() and not asked:
                    self.store.cancel.remote(job_id)
                    asked = True
                if ready:
                    break
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the job's own error, raised as itself (never retried)
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError) as e:
                raise ClusterError(f"every worker that tried this job died ({self.max_retries + 1} tries; last: "
                                   f"{type(e).__name__}). Check the workers (ray status), then run it again"
                                   f"{' or resume it from the Train tab' if run_dir else ''}.") from None
        finally:
            attempts = ray.get(self.store.close_job.remote(job_id))
            self.history.append((job_id, "train" if run_dir else "generate", attempts))

    def shutdown(self) -> None:
        ray.kill(self.store)


def _common_parent(paths: list[Path]) -> Path:
    import os

    if not paths:
        from engine.core.errors import ConfigError

        raise ConfigError("add at least one training image")
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


__all__ = ["RayBackend", "ClusterError", "GenerateOutput"]
