"""The Generate tab's batch panel: many prompts (one per line, or a .txt file) x seeds x styles (or x strengths of
one style), one progress bar, a gallery, an X/Y grid image and a zip of everything.

The sampler settings (negative prompt, steps, guidance, size, sampler, seed) come from the Generate form by field
name; the batch's own choices are here. `BatchHandlers` are plain methods (tests drive them without a browser).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from engine.core.batch_config import BatchRequest
from engine.core.config import ConfigError
from engine.core.events import BatchResult

from .downloads import copy_for_download
from .session import user_of

# Form fields of the Generate tab that a batch takes over as they are.
SHARED = ("negative_prompt", "num_inference_steps", "guidance_scale", "guidance_rescale", "width", "height", "seed",
          "scheduler", "instant_style", "instant_strength", "instant_style_only")  # the form's instant style too
MAX_SHOWN = 64  # the gallery shows the first images; the zip has all of them


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in (text or "").replace(";", ",").split(",") if x.strip())
    except ValueError:
        raise gr.Error("Strengths are numbers separated by commas, e.g. 0, 0.5, 1") from None


class BatchHandlers:
    """What the batch panel's buttons do, as plain methods over one Engine."""

    def __init__(self, engine, user: str = "local"):
        self.engine = engine
        self.user = user

    def request(self, form: dict[str, Any], prompts: str, prompts_file: str | None, seeds_per_prompt: int,
                axis: str, styles: list[str] | None, strength_style: str, strengths: str) -> BatchRequest:
        """A BatchRequest from the panel and the Generate form's sampler settings (by field name)."""
        shared = {k: form[k] for k in SHARED if k in form and form[k] is not None}
        for k in ("num_inference_steps", "width", "height", "seed"):  # sliders send whole floats
            if isinstance(shared.get(k), float) and shared[k].is_integer():
                shared[k] = int(shared[k])
        text = prompts or ""
        if prompts_file:
            try:
                text = Path(prompts_file).read_text("utf-8")
            except (OSError, UnicodeDecodeError):
                raise gr.Error("That prompts file could not be read: upload a UTF-8 .txt file, one prompt per "
                               "line.") from None
        try:
            if axis == "strengths":
                if not strength_style:
                    raise gr.Error("Pick the style whose strengths to compare.")
                return BatchRequest(prompts=text, seeds_per_prompt=int(seeds_per_prompt), styles=(strength_style,),
                                    strengths=_numbers(strengths), **shared)
            return BatchRequest(prompts=text, seeds_per_prompt=int(seeds_per_prompt),
                                styles=tuple(styles) if styles else ("",), **shared)
        except ConfigError as e:
            raise gr.Error(str(e)) from None

    def run(self, req: BatchRequest, progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Progress over the whole batch, then the gallery, the X/Y grid and the zip."""
        user = user or self.user
        finished = False
        try:
            for ev in self.engine.generate_batch_iter(req, user=user):
                if isinstance(ev, BatchResult):
                    finished = True
                    yield self._result(ev)
                    return
                if progress is not None:
                    progress((ev.done, ev.total), desc=ev.message, unit="images")
                yield {"batch_status": ev.message}
        except GeneratorExit:
            if not finished:  # Gradio closed us (Cancel, closed tab): stop the worker too
                self.engine.cancel(kind="batch", user=user)
            raise
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def cancel(self, user: str | None = None) -> dict[str, Any]:
        user = user or self.user
        self.engine.cancel(kind="batch", user=user)
        stopped = self.engine.wait_for_jobs(kind="batch", user=self.engine.caller(user).name, timeout=30)
        return {"batch_status": "Batch cancelled; the images made so far are in the zip." if stopped else
                "Stopping after the current image…"}

    @staticmethod
    def _result(res: BatchResult) -> dict[str, Any]:
        shown = copy_for_download(res.paths[:MAX_SHOWN])
        extra = [p for p in (res.grid_path, res.zip_path) if p is not None]
        copies = dict(zip(extra, copy_for_download(extra)))
        word = "Cancelled" if res.cancelled else "Done"
        more = f" (the gallery shows the first {MAX_SHOWN})" if len(res.paths) > MAX_SHOWN else ""
        return {"batch_gallery": [str(p) for p in shown],
                "batch_grid": str(copies[res.grid_path]) if res.grid_path in copies else None,
                "batch_zip": str(copies[res.zip_path]) if res.zip_path in copies else None,
                "batch_status": f"{word}: {len(res.paths)} of {res.total} image(s) in {res.seconds:.1f} s{more}."}


def build_batch_panel(engine, fields: dict[str, Any], style_choices: list[tuple[str, str]]) -> dict[str, Any]:
    """The panel's components (inside the current layout) wired to the Generate form's `fields`."""
    h = BatchHandlers(engine)
    c: dict[str, Any] = {}
    with gr.Accordion("Batch: prompts × seeds × styles, with an X/Y grid and a zip", open=False):
        with gr.Row():
            c["prompts"] = gr.Textbox(label="Prompts, one per line", lines=4, elem_id="batch-prompts", scale=3)
            c["prompts_file"] = gr.File(label="…or a .txt file", file_types=[".txt"], type="filepath", scale=1)
        with gr.Row():
            c["seeds_per_prompt"] = gr.Slider(1, 8, value=1, step=1, label="Seeds per prompt",
                                              elem_id="batch-seeds")
            c["axis"] = gr.Radio([("Compare styles", "styles"), ("Compare strengths of one style", "strengths")],
                                 value="styles", label="Columns of the grid", elem_id="batch-axis")
        c["styles"] = gr.Dropdown(style_choices, value=[""], multiselect=True, label="Styles (columns)",
                                  info="“No style” is the base model", elem_id="batch-styles")
        with gr.Row():
            c["strength_style"] = gr.Dropdown(style_choices, value="", label="Style for the strength columns")
            c["strengths"] = gr.Textbox(value="0, 0.5, 1", label="Strengths")
        with gr.Row():
            run = gr.Button("Run batch", variant="primary", elem_id="batch-run")
            stop = gr.Button("Cancel batch", variant="stop", elem_id="batch-cancel")
        c["batch_status"] = gr.Markdown(elem_id="batch-status")
        c["batch_grid"] = gr.Image(label="X/Y grid", type="filepath", interactive=False, elem_id="batch-grid")
        c["batch_gallery"] = gr.Gallery(label="Batch images", columns=6, height=240)
        c["batch_zip"] = gr.File(label="Everything as a zip", interactive=False, elem_id="batch-zip")

    panel = ["prompts", "prompts_file", "seeds_per_prompt", "axis", "styles", "strength_style", "strengths"]
    names = list(fields)
    outs = [c[k] for k in ("batch_gallery", "batch_grid", "batch_zip", "batch_status")]

    def on_batch(request: gr.Request, *args, progress=gr.Progress()):
        form = dict(zip(names, args[:len(names)]))
        req = h.request(form, *args[len(names):])
        for update in h.run(req, progress, user=user_of(engine, request)):
            yield {c[k]: v for k, v in update.items()}

    ev = run.click(on_batch, list(fields.values()) + [c[k] for k in panel], outs, concurrency_id="gpu",
                   concurrency_limit=1, show_progress_on=[c["batch_grid"]], api_visibility="private")
    def on_cancel(request: gr.Request):
        return h.cancel(user_of(engine, request))["batch_status"]

    stop.click(on_cancel, None, [c["batch_status"]], cancels=[ev], queue=False,
               api_visibility="private")
    c["handlers"] = h
    c["refresh_styles"] = [c["styles"], c["strength_style"]]
    return c
