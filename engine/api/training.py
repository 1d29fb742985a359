"""The Engine's training methods (a mixin of engine.api.Engine): train a style, resume a run, publish any evaluated
checkpoint. Runs go through the same job queue, fair turn and model lock as generation (Engine._job)."""
from __future__ import annotations

import dataclasses
import re
import uuid
from pathlib import Path
from typing import Callable, Iterator

from engine.api.support import charged, iterate
from engine.core.caller import LOCAL, Caller
from engine.core.config import ConfigError, from_dict
from engine.core.errors import LibraryError
from engine.core.events import ResumableRun, TrainJobResult, TrainResult
from engine.core.train_config import TrainConfig
from engine.styles.store import StyleInfo


class TrainingMethods:
    @charged("train")
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
            # The evaluation model is the app's setting (a path the server opens), whatever the request says.
            cfg = dataclasses.replace(cfg, eval_model=self.settings.eval_model)
            if self.cluster is not None:
                return self._cluster_train(cfg, name, on_event, run_dir, user, job, into_style)
            if self._adapters is not None:  # prior images come from the base model, not the last style used
                self._adapters.activate_many([])
            self._detach_instant()
            return run_training(self.model, self.data_dir, cfg, name, run_dir=run_dir, on_event=on_event,
                                stop_event=job.token, style_id=into_style,
                                on_run_dir=lambda d: self._run_started(job.id, d, user))

    def train_iter(self, cfg: TrainConfig, name: str, *, run_dir: Path | None = None, user: str = "local",
                   job_id: str | None = None, into_style: str | None = None) -> Iterator:
        """`train` in a worker thread: yields the trainer's events, then the TrainJobResult."""
        job_id = job_id or uuid.uuid4().hex
        extra = {"into_style": into_style} if into_style else {}
        return iterate(lambda emit: self.train(cfg, name, emit, run_dir=run_dir, user=user, job_id=job_id, **extra),
                       TrainJobResult, self._waiting(job_id, user))

    def resumable_runs(self, *, user: str | Caller = LOCAL) -> list[ResumableRun]:
        """Runs to offer "resume?": interrupted (their worker died: power cut, kill) and cancelled after a step;
        the caller's own (admins: all; a run whose owner was never recorded belongs to the local user)."""
        from engine.train.job import resumable_runs

        caller = self.caller(user)
        owners = self.library.run_owners()
        return [r for r in resumable_runs(self.data_dir / "runs") if caller.can_see(owners.get(r.run_id, LOCAL))]

    def resume_iter(self, run_id: str, *, user: str | Caller = LOCAL, job_id: str | None = None) -> Iterator:
        """Resume a run from `resumable_runs()` (by its id, never a path) from its newest valid checkpoint, exactly."""
        run = next((r for r in self.resumable_runs(user=user) if r.run_id == run_id), None)
        if run is None:
            raise ConfigError("that run is no longer resumable (finished, or resumed already); refresh the list")
        cfg = from_dict(TrainConfig, run.config)
        return self.train_iter(cfg, run.name, run_dir=self.data_dir / "runs" / run.run_id, user=user, job_id=job_id)

    def publish_checkpoint(self, run_id: str, step: int, *, user: str | Caller = LOCAL) -> StyleInfo:
        """Publish evaluated checkpoint `step` of the caller's training run `run_id` (by id, never a path) as the
        style: the next version of the style the run published, or a new style with the run's name if it published
        none (cancelled) or that style is gone. Same library path as the final LoRA (engine/train/job.py)."""
        from engine.train.job import publish_checkpoint, published_style

        caller = self.caller(user)
        runs = self.data_dir / "runs"
        known = (isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_id)
                 and (runs / run_id).is_dir() and caller.can_see(self.library.run_owners().get(run_id, LOCAL)))
        if not known:  # another user's run reads the same as one that does not exist
            raise ConfigError(f"unknown training run {str(run_id)[:60]!r}; train or resume one first")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ConfigError(f"pick an evaluated checkpoint (a step number), not {str(step)[:20]!r}")
        style_id = published_style(runs / run_id)
        if style_id is not None:
            try:
                self._style_for(caller, style_id, change=True)
            except LibraryError:  # deleted since: the checkpoint becomes a new style
                style_id = None
        style = publish_checkpoint(self.data_dir, runs / run_id, step, style_id=style_id)
        if caller.name != LOCAL and self.library.get(style.id).owner == LOCAL:
            self.library.set_owner(style.id, caller.name)
        return style
