"""What the Train tab's buttons do: `TrainHandlers`, plain methods over dicts keyed by *names* (TrainConfig field
names for the form; "status"/"log"/"loss_plot"/"previews"/"result"/"result_image"/"runs" for results, and
"eval_plot"/"eval_note"/"eval_grid"/"checkpoint"/"eval_run" for the evaluation at each checkpoint), so tests
drive it without a browser. ui/train_tab.py lays the components out and maps names to them.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import gradio as gr
from PIL import Image

from engine.core.config import ConfigError, from_dict
from engine.core.errors import AccessDenied, CheckpointError, DiskFullError, LibraryError, TrainingError
from engine.core.events import (Queued, TrainCheckpoint, TrainEvaluation, TrainJobResult, TrainLog, TrainPreview,
                                TrainProgress)
from engine.core.train_config import TrainConfig

from .train_form import MAX_IMAGES, MIN_IMAGES, FormHandlers, split_uploads
from .train_plots import evaluation_view, loss_frame

PLOT_EVERY_S = 0.5  # the loss plot resends all points; twice a second is live enough
LOG_LINES = 200
# Errors whose messages tell the user what to do (ValueError covers ConfigError, ImageRejected, ModelLoadError & co.).
USER_ERRORS = (ValueError, TrainingError, CheckpointError, DiskFullError)


def _eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class TrainHandlers(FormHandlers):
    """What the Train tab's buttons do, as plain methods over one Engine (the form's: ui.train_form)."""

    def __init__(self, engine, user: str = "local"):
        self.engine = engine
        self.user = user  # whose jobs this tab starts and cancels (one local user until studio accounts exist)
        self._runs = 0  # training runs of ours still in the engine, followed or draining (see cancel)
        self._runs_changed = threading.Condition()

    # ---- train ---------------------------------------------------------------------------------------------
    def train(self, images: list[str] | None, name: str, values: dict[str, Any],
              progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield partial updates while training, then the result card (see module doc for the keys)."""
        n = len(split_uploads(images)[0])
        if not MIN_IMAGES <= n <= MAX_IMAGES:
            raise gr.Error(f"upload {MIN_IMAGES} to {MAX_IMAGES} images of your subject or style; you gave {n}")
        if not (name or "").strip():
            raise gr.Error("give the style a name, e.g. 'my heart shape'")
        cfg = self.config(values, images)
        user = user or self.user
        yield from self._follow(lambda: self.engine.train_iter(cfg, name.strip(), user=user), cfg, progress, user)

    def resume(self, run_id: str | None, progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Continue an interrupted or cancelled run (picked by id from the engine's list) from its last checkpoint."""
        if not run_id:
            raise gr.Error("pick a run to resume from the list (press Refresh if it is empty)")
        user = user or self.user
        run = next((r for r in self.engine.resumable_runs(user=user) if r.run_id == run_id), None)
        if run is None:
            raise gr.Error("that run is no longer resumable (finished, or resumed already); press Refresh")
        cfg = self._cfg(run.config)
        yield from self._follow(lambda: self.engine.resume_iter(run.run_id, user=user), cfg, progress, user)

    @staticmethod
    def _cfg(config: dict) -> TrainConfig:
        try:
            return from_dict(TrainConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
        except ConfigError as e:
            raise gr.Error(f"this run's config cannot be read by this version: {e}") from None

    def _follow(self, start, cfg: TrainConfig, progress, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Render the engine's events. If Gradio closes us (closed tab, Cancel) the run goes on (Cancel stops it
        through `cancel`), and a closed page finds it again under My jobs (GR-12)."""
        log: list[str] = []
        steps: list[int] = []
        losses: list[float] = []
        gallery: list[tuple[Image.Image, str]] = []
        last, done, draining = 0.0, False, False
        evaluation: TrainEvaluation | None = None
        self._count(+1)
        try:
            events = start()
            for ev in events:
                if isinstance(ev, TrainJobResult):
                    done = True
                    self._count(-1)  # before the last yield: a waiting cancel() must not wait for the browser
                    yield self._final(ev, cfg, log, evaluation)
                    return
                update: dict[str, Any] = {}
                if isinstance(ev, Queued):  # waiting behind other jobs (fair across users)
                    yield {"status": ev.message}
                    continue
                if isinstance(ev, TrainProgress):
                    if ev.loss != ev.loss:  # NaN: the prior-image phase, before step 1
                        if progress is not None:
                            progress((0, ev.total), desc="making class-prior images", unit="steps")
                        continue
                    steps.append(ev.step)
                    losses.append(ev.loss)
                    desc = f"step {ev.step}/{ev.total} · loss {ev.loss:.4f} · ETA {_eta(ev.eta_s)}"
                    if progress is not None:
                        progress((ev.step, ev.total), desc=desc, unit="steps")
                    if time.monotonic() - last < PLOT_EVERY_S and ev.step < ev.total:
                        continue
                    update = {"status": desc, "loss_plot": loss_frame(steps, losses)}
                elif isinstance(ev, TrainPreview):
                    prompts = cfg.validation_prompts or (cfg.instance_prompt,)
                    gallery = [(img, f"step {ev.step}: {p}") for img, p in zip(ev.images, prompts)] + gallery
                    update = {"previews": gallery[:24]}
                elif isinstance(ev, TrainEvaluation):
                    evaluation = ev
                    update = self.evaluation_view(ev)
                    if ev.images:  # the fixed-seed grid of this checkpoint (on disk: evaluation/step-N/)
                        update["eval_grid"] = [(img, f"step {ev.step}") for img in ev.images]
                elif isinstance(ev, (TrainLog, TrainCheckpoint)):
                    line = f"checkpoint saved at step {ev.step}" if isinstance(ev, TrainCheckpoint) else \
                        (ev.message if ev.level == "info" else f"{ev.level.upper()}: {ev.message}")
                    log = (log + [line])[-LOG_LINES:]
                    update = {"log": "\n".join(log), "status": line}
                last = time.monotonic()
                yield update
        except GeneratorExit:
            if not done:  # the page went away (the run goes on, under My jobs: GR-12), or Cancel (see `cancel`)
                draining = True
                threading.Thread(target=self._drain, args=(events,), daemon=True).start()
            raise
        except MemoryError:
            raise gr.Error("Out of memory: lower the resolution or batch size, or turn on gradient "
                           "checkpointing, then resume.") from None
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        finally:
            if not (done or draining):
                self._count(-1)

    def _count(self, delta: int) -> None:
        with self._runs_changed:
            self._runs += delta
            self._runs_changed.notify_all()

    def _drain(self, events) -> None:
        """Consume an abandoned run to its end, so `cancel()` can tell when its checkpoint is on disk."""
        try:
            for _ in events:
                pass
        except Exception:  # noqa: BLE001 - nobody listens any more; the engine logged it and job.json says so
            pass
        finally:
            self._count(-1)

    evaluation_view = staticmethod(evaluation_view)  # the evaluation's plot, note and checkpoint list

    def publish_checkpoint(self, run_id: str | None, step, user: str | None = None) -> dict[str, Any]:
        """Publish the picked checkpoint of the last run followed here as the style (Engine.publish_checkpoint)."""
        if not run_id:
            raise gr.Error("train or resume a run first: its evaluated checkpoints appear here")
        if step is None or step == "":
            raise gr.Error("pick a checkpoint from the list")
        try:
            style = self.engine.publish_checkpoint(run_id, int(step), user=user or self.user)
        except (TypeError, ValueError, LibraryError, AccessDenied) as e:
            raise gr.Error(str(e)) from None
        return {"status": f"Checkpoint {int(step)} published as style “{style.name}” v{style.version}: choose "
                          f"{style.label} in the Generate tab."}

    def _final(self, res: TrainJobResult, cfg: TrainConfig, log: list[str],
               evaluation: TrainEvaluation | None = None) -> dict[str, Any]:
        r = res.result
        out = {"loss_plot": loss_frame(list(range(1, len(r.losses) + 1)), r.losses), "log": "\n".join(log),
               "runs": self.runs_dropdown(), "result_image": None}
        if evaluation is not None:
            out.update(self.evaluation_view(evaluation))
        skipped = "".join(f"\n- skipped **{f}**: {why}" for f, why in res.rejected)
        if res.style is None:
            msg = (f"Cancelled at step {r.steps} of {cfg.max_train_steps}. A checkpoint was saved: pick the run "
                   "under **Interrupted runs** and press **Resume** to finish it." if r.steps else
                   "Cancelled before the first training step; nothing to resume.")
            return {**out, "status": msg.replace("**", ""), "result": f"### Training cancelled\n{msg}"}
        s = res.style
        if s.preview is not None:
            with Image.open(s.preview) as im:  # a copy in memory: the data dir is not served by Gradio
                out["result_image"] = im.convert("RGB")
        example = cfg.instance_prompt
        card = (f"### Style “{s.name}” is ready\nTrigger word **`{s.trigger_token}`** · {s.preset} · "
                f"{r.steps} steps · final loss {r.losses[-1]:.4f}\n\nGo to the **Generate** tab, choose "
                f"**{s.label}** under *Style* and write a prompt with `{s.trigger_token}`, e.g. *{example}*."
                + (f"\n\n{len(res.rejected)} image(s) were not used:{skipped}" if res.rejected else ""))
        return {**out, "status": f"Done: style “{s.name}” trained in {r.steps} steps. Go to Generate to use it.",
                "result": card}

    def cancel(self, wait_s: float = 60.0, user: str | None = None) -> dict[str, Any]:
        """Stop the caller's run at the next step; wait for its checkpoint so the Interrupted runs list shows it."""
        user = user or self.user
        self.engine.cancel(kind="train", user=user)
        if getattr(self.engine, "studio", None) is not None:  # other users' runs go on: wait for this one only
            stopped = self.engine.wait_for_jobs(kind="train", user=self.engine.caller(user).name, timeout=wait_s)
        else:
            with self._runs_changed:
                stopped = self._runs_changed.wait_for(lambda: self._runs == 0, timeout=wait_s)
        msg = "Cancelled." if stopped else "Stopping after the current step…"
        return {"status": msg + " Resume it under Interrupted runs.", "runs": self.runs_dropdown(user)}

    # ---- interrupted runs ----------------------------------------------------------------------------------
    def resumable_runs(self, user: str | None = None) -> list[tuple[str, str]]:
        """(label, run id): the caller's runs whose worker died and runs cancelled with a checkpoint."""
        if self.engine is None or (user is None and getattr(self.engine, "studio", None) is not None):
            return []
        return [(r.label, r.run_id) for r in self.engine.resumable_runs(user=user or self.user)]

    def runs_dropdown(self, user: str | None = None) -> gr.Dropdown:
        runs = self.resumable_runs(user)
        return gr.Dropdown(choices=runs, value=runs[0][1] if runs else None)
