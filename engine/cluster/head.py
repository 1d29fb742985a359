"""The store on the app's own node that Ray workers talk to (run as one Ray actor, `num_cpus=0`, pinned there).

It serves bundles by content hash (content.py), keeps each job's events until the app reads them, says whether a
job was cancelled, records which node ran each attempt, and receives training checkpoints as the worker saves them:
each is written into the run's own `checkpoints/` folder on this node the way engine/train/checkpoints.py writes
one (a temporary folder, every file fsynced, one rename, then verified against its manifest), so the newest
checkpoint a retried task resumes from is one this node holds, whichever worker died. Workers never name a path
here: only a job id, a step and file names, all checked.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
from pathlib import Path

from engine.cluster.content import Bundle, ContentError, read_chunk, safe_rel
from engine.core.errors import CheckpointError
from engine.core.events import TrainCheckpoint
from engine.core.files import atomic_dir, atomic_write_bytes, fsync_dir


class HeadStore:
    """State shared between the app and its workers; one method call at a time (a Ray actor's default)."""

    def __init__(self):
        self._bundles: dict[str, Bundle] = {}
        self._jobs: dict[str, dict] = {}

    # ---- bundles ---------------------------------------------------------------------------------------------
    def add_bundle(self, bundle: Bundle) -> None:
        self._bundles[bundle.hash] = bundle

    def manifest(self, h: str) -> dict:
        if h not in self._bundles:
            raise ContentError(f"no bundle {str(h)[:12]} on the app's node")
        return self._bundles[h].manifest

    def read(self, h: str, rel: str, offset: int, size: int) -> bytes:
        b = self._bundles.get(h)
        if b is None:
            raise ContentError(f"no bundle {str(h)[:12]} on the app's node")
        return read_chunk(b.base, b.manifest, rel, offset, size)

    # ---- jobs ------------------------------------------------------------------------------------------------
    def open_job(self, job_id: str, run_dir: str | None = None, keep: int = 2) -> None:
        self._jobs[job_id] = {"events": [], "base": 0, "attempts": [], "cancel": False, "run_dir": run_dir,
                              "keep": keep}

    def close_job(self, job_id: str) -> list[str]:
        """Forget the job; returns the node ids of its attempts, in order."""
        job = self._jobs.pop(job_id, None)
        return job["attempts"] if job else []

    def started(self, job_id: str, node_id: str) -> int:
        """A task attempt began on `node_id`; returns its number (1 = first try)."""
        attempts = self._job(job_id)["attempts"]
        attempts.append(node_id)
        return len(attempts)

    def attempts(self, job_id: str) -> list[str]:
        return list(self._job(job_id)["attempts"])

    def emit(self, job_id: str, event) -> None:
        job = self._jobs.get(job_id)
        if job is not None:  # events of a job the app already finished are dropped
            job["events"].append(event)

    def events(self, job_id: str, since: int) -> list:
        """The job's events from number `since` on; those before it were read (one reader: the app) and are
        dropped, so a long run's progress does not pile up here."""
        job = self._jobs.get(job_id)
        if job is None:
            return []
        drop = max(0, min(since - job["base"], len(job["events"])))
        del job["events"][:drop]
        job["base"] += drop
        return job["events"][since - job["base"]:]

    def barrier(self) -> None:
        """A worker's last call: Ray runs one caller's calls in order, so when this returns every event the worker
        sent (without waiting) is here for the app's last read."""

    def cancel(self, job_id: str) -> None:
        self._job(job_id)["cancel"] = True

    def cancelled(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return job is None or job["cancel"]  # a job the app forgot must not keep a worker busy

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def put_checkpoint(self, job_id: str, step: int, files: dict[str, bytes]) -> str:
        """Write checkpoint-<step>/ into the job's run folder on this node; returns its path. Keeps the newest
        `keep` (the run's checkpoints_total_limit) and a full fine-tuning run's best one, deleting older ones only
        after the new one verifies."""
        from engine.train import checkpoints as ck

        ckpt_dir = self._ckpt_dir(job_id)
        if not isinstance(step, int) or isinstance(step, bool) or step < 1 or "manifest.json" not in files:
            raise CheckpointError("a checkpoint needs a step >= 1 and its manifest.json")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = ckpt_dir / f"checkpoint-{step}"
        tmp = ckpt_dir / f"checkpoint-{step}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir()
            for name, data in files.items():
                if safe_rel(name) != name or "/" in name:
                    raise ContentError(f"bad checkpoint file name {name[:60]!r}")
                with open(tmp / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if final.exists():  # a retried attempt saves the same step again: keep the first one aside
                final.rename(ckpt_dir / f"{final.name}.bad-{uuid.uuid4().hex[:8]}")
            tmp.rename(final)
            fsync_dir(ckpt_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            ck.verify_checkpoint(final)
        except CheckpointError as e:
            ck.quarantine(final, str(e), lambda m: None)
            raise
        protect = frozenset()
        if ck.FULL_WEIGHTS in files:  # full fine-tuning publishes from a checkpoint's weights: keep the best one,
            from engine.train.evaluate import best_step  # as engine.train.checkpoints.save_run does on one machine

            protect = frozenset(s for s in (best_step(ckpt_dir.parent),) if s is not None)
        ck.prune(ckpt_dir, self._job(job_id)["keep"], keep=final, warn=lambda m: None, protect=protect)
        self.emit(job_id, TrainCheckpoint(step, final))  # the app's event says where it is held, once it is
        return str(final)

    # ---- evaluations ------------------------------------------------------------------------------------------
    def put_evaluation(self, job_id: str, event, export: dict[str, bytes], scores: bytes) -> None:
        """A checkpoint's evaluation into the job's run folder on this node, laid out as engine/train/evaluate.py
        does locally (evaluation/step-N/ with the LoRA, style.json and grid; evaluation/scores.json), then reported
        under this node's run id, so the Train tab can show it and publish that checkpoint. `export` is empty when
        a resumed attempt re-shows a checkpoint evaluated before: the export written then is kept."""
        from engine.train.evaluate import EVAL_DIR, checkpoint_export

        run_dir = self._job(job_id)["run_dir"]
        step = getattr(event, "step", None)
        if run_dir is None or not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError("an evaluation needs a training job with a run folder and a step >= 0")
        if export:
            folder = checkpoint_export(run_dir, step)
            staged = folder.with_name(f"{folder.name}.new-{uuid.uuid4().hex[:8]}")
            with atomic_dir(staged) as tmp:
                for name, data in export.items():
                    if safe_rel(name) != name or "/" in name:
                        raise ContentError(f"bad evaluation file name {name[:60]!r}")
                    (tmp / name).write_bytes(data)
            if folder.exists():  # a retried attempt evaluates the same step again: keep the first one aside
                folder.rename(folder.with_name(f"{folder.name}.bad-{uuid.uuid4().hex[:8]}"))
            staged.rename(folder)
        atomic_write_bytes(Path(run_dir) / EVAL_DIR / "scores.json", scores)
        self.emit(job_id, dataclasses.replace(event, run_id=Path(run_dir).name))

    def scores(self, job_id: str) -> bytes | None:
        """The run's scores.json as this node holds it (a resumed attempt continues its records), or None."""
        from engine.train.evaluate import EVAL_DIR

        run_dir = self._job(job_id)["run_dir"]
        path = Path(run_dir) / EVAL_DIR / "scores.json" if run_dir else None
        return path.read_bytes() if path is not None and path.is_file() else None

    def latest_checkpoint(self, job_id: str) -> tuple[int, dict[str, bytes]] | None:
        """The newest checkpoint of the job's run that verifies (older ones if newer are damaged), as bytes."""
        from engine.train import checkpoints as ck

        found = ck.find_resume_checkpoint(self._ckpt_dir(job_id), lambda m: None)
        if found is None:
            return None
        path, manifest = found
        names = [*manifest.get("files", {}), "manifest.json"]
        return int(manifest["step"]), {n: (path / n).read_bytes() for n in names}

    def _job(self, job_id: str) -> dict:
        if job_id not in self._jobs:
            raise ContentError(f"unknown job {str(job_id)[:40]!r}")
        return self._jobs[job_id]

    def _ckpt_dir(self, job_id: str) -> Path:
        run_dir = self._job(job_id)["run_dir"]
        if run_dir is None:
            raise CheckpointError("this job keeps no checkpoints")
        return Path(run_dir) / "checkpoints"
