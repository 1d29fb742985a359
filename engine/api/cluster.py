"""The Engine's side of running jobs on a Ray cluster (engine/cluster): turn a request into a plain spec, hand it to
the backend, and make the same results a local job makes. Ownership, quotas and the fair queue stay in the Engine
(`charged`, `_job`), around these bodies exactly as around the local ones."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from engine.core.config import ConfigError, GenerateRequest
from engine.core.events import GeneratedImage, GenerateResult
from engine.core.train_config import TrainConfig


CLUSTER_KINDS = ("generate", "train")  # the jobs that run on workers; blends, batches and refines stay here


class ClusterMethods:
    """Mixed into Engine; used when `Engine(cluster=...)` is set."""

    def _model_source(self) -> str:
        """The base model the app would use, as a folder or file here: the one loaded (the UI may have switched
        it), else the configured one; a hub id is its local snapshot."""
        from engine.models.loading import DEMO_MODEL

        return _local(self._model.source if self._model is not None else (self.settings.model or str(DEMO_MODEL)))

    def _resolve_styles(self, weighted) -> list:
        """(StyleInfo, UNet weight, text-encoder weight) for each requested style, as _activate_styles computes
        them (the version's hand-set defaults included), without touching a model: the worker applies them."""
        out = []
        for item in weighted:
            sid, wu, wt = (item[0], item[1], item[1]) if len(item) == 2 else item
            info = self.library.find_version(sid)
            if info.kind != "lora":
                raise ConfigError(f"{info.name!r} is a {info.kind} style: on a cluster only LoRA styles can be used "
                                  "for now; run without --ray-address to use it")
            d = self.ratings.defaults(info.id, info.version)
            out.append((info, float(wu) * d["strength"] * d["unet_weight"], float(wt) * d["strength"] * d["te_weight"]))
        return out

    def _cluster_generate(self, req: GenerateRequest, on_progress: Callable | None, user: str, job,
                          t0: float, use_feedback: bool = False) -> GenerateResult:
        if req.instant_style or use_feedback:
            raise ConfigError("instant styles and feedback steering run only in the app's own process for now; "
                              "start it without --ray-address to use them")
        styles = self._resolve_styles(req.active_styles)
        backend = self.cluster
        spec = {"job_id": job.id, "user": user, "model": backend.model_ref(self._model_source()),
                "request": dataclasses.asdict(dataclasses.replace(req, style="", styles=())),
                "styles": [{"info": {k: v for k, v in dataclasses.asdict(s).items() if k != "folder"},
                            "hash": backend.files_ref(s.folder, _style_files(s.folder)), "unet": wu, "te": wt}
                           for s, wu, wt in styles],
                "out_dir": str(self._out_dir(user)), "fuse_styles": self.fuse_styles}

        def recipe(image: dict, model: dict) -> dict:
            if self._model is not None and self._model.fingerprint == model["fingerprint"]:
                model = {**model, "name": self._model.name}  # a hub model keeps its hub id, as in a local job
            return self._recipe(req, image["seed"], image["width"], image["height"], image["prompt"], styles,
                                model=SimpleNamespace(**model))

        out = backend.run_generate(spec, recipe=recipe, on_progress=on_progress, cancelled=job.token)
        from PIL import Image

        images = [GeneratedImage(Image.open(p), r, p) for p, r in out.images]
        return GenerateResult(images, cancelled=out.cancelled, seconds=time.perf_counter() - t0)

    def _cluster_train(self, cfg: TrainConfig, name: str, on_event: Callable | None, run_dir: Path | None,
                       user: str, job, into_style: str | None):
        from engine.train.job import new_run_dir

        if not name.strip():
            raise ConfigError("give the style a name, e.g. 'my heart shape'")
        run_dir = run_dir or new_run_dir(self.data_dir, name)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._run_started(job.id, run_dir, user)  # owner and queue row know the run before any work, as locally
        source = _local(cfg.base_model) if cfg.base_model else self._model_source()
        backend = self.cluster
        spec = {"job_id": job.id, "user": user, "model": backend.model_ref(source), "model_source": source,
                "config": dataclasses.asdict(cfg), "name": name.strip(), "run_dir": str(run_dir),
                "data_dir": str(self.data_dir), "style_id": into_style}
        return backend.run_train(spec, on_event, cancelled=job.token)


def _local(src: str) -> str:
    """A model folder or file here for `src` (a hub id becomes its local snapshot, downloaded if needed)."""
    from engine.models.loading import download_from_hub

    path = Path(src).expanduser()
    return str(path) if path.exists() else str(download_from_hub(src))


def _style_files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")]
