"""The Feedback tab: pick a style version, make a fresh round of images, rate them (thumbs or 1-5 stars, tags),
steer the next round with "Use my feedback" (FABRIC, no training), or Refine: train version N+1 from the ratings,
compare v(N) and v(N+1) on the same seeds, keep it or revert. A history of rounds and a plot of how ratings moved.

`FeedbackHandlers` holds the work as plain methods (tests drive it without a browser); images are rated by the
engine's own output paths kept on the server, never a path from the browser. Also `rating_controls`, the small
thumbs row under the Generate tab's gallery.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr

from engine.core.config import ConfigError, GenerateRequest
from engine.core.feedback_config import REFINE_BETA, REFINE_STEPS, RefineRequest, RefineResult

from .downloads import copy_for_download

ROUND_STEPS = 20
DEFAULT_PROMPTS = "a photo of a shape"


@dataclass
class Round:
    """One round of images on the server: the engine's own paths (what gets rated), by gallery index."""

    style: str = ""
    paths: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    selected: int | None = None


class FeedbackHandlers:
    def __init__(self, engine, user: str = "local"):
        self.engine, self.user = engine, user
        self.round = Round()

    # ---- versions and rounds ---------------------------------------------------------------------------------
    def version_choices(self) -> list[tuple[str, str]]:
        """(label, "id@vN") for every version of every style in the library."""
        out = []
        for s in self.engine.library_list():
            for v in reversed(s.versions):
                out.append((f"{s.name} v{v.version} ({s.id})", f"{s.id}@v{v.version}"))
        return out

    def new_round(self, style: str, prompts: str, seed: int, per_prompt: int, use_feedback: bool) -> dict[str, Any]:
        """Generate `per_prompt` images for each prompt line with the picked version (FABRIC when asked)."""
        if not style:
            raise gr.Error("pick a style version first")
        try:
            req = GenerateRequest(prompt=prompts or DEFAULT_PROMPTS, style=style, seed=int(seed),
                                  batch_size=int(per_prompt), prompt_per_line=True, num_inference_steps=ROUND_STEPS)
            res = self.engine.generate(req, user=self.user, use_feedback=bool(use_feedback))
        except (ConfigError, ValueError) as e:
            raise gr.Error(str(e)) from None
        self.round = Round(style, [im.path for im in res.images], [im.recipe["seed"] for im in res.images])
        shown = copy_for_download(self.round.paths)
        gallery = [(str(p), f"seed {s}") for p, s in zip(shown, self.round.seeds)]
        fb = " with your feedback" if use_feedback else ""
        return {"gallery": gallery, "status": f"{len(gallery)} images{fb}: click one, then rate it."}

    def select(self, index: int | None) -> dict[str, Any]:
        self.round.selected = index
        return {"status": f"image {index + 1} selected" if index is not None else "nothing selected"}

    def rate(self, rating, tags: str = "", index: int | None = None, rnd: Round | None = None) -> dict[str, Any]:
        """Rate the selected image (or `index`) of the round: "up", "down" or 1..5."""
        rnd = rnd or self.round
        i = rnd.selected if index is None else index
        if i is None or not 0 <= i < len(rnd.paths):
            raise gr.Error("click an image of the round first")
        try:
            r = self.engine.rate_image(rnd.paths[i], rating, tags, user=self.user)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        return {"status": f"image {i + 1}: {r.rating}/5" + (f" ({', '.join(r.tags)})" if r.tags else ""),
                "table": self.ratings_table(rnd.style)}

    def ratings_table(self, style: str) -> list[list]:
        if not style:
            return []
        sid, _, v = style.partition("@v")
        return [[r.style_version, r.prompt, r.seed, r.rating, ", ".join(r.tags), r.updated]
                for r in self.engine.list_ratings(sid, int(v) if v else None, user=self.user)]

    def history(self, style: str) -> dict[str, Any]:
        """Rounds per version of the style: rows and the plot data (liked share and mean stars by version)."""
        import pandas as pd

        sid = style.partition("@v")[0]
        rows = self.engine.rating_summary(sid, user=self.user) if sid else []
        df = pd.DataFrame(rows or [], columns=["version", "ratings", "liked", "mean"])
        df["version"] = df["version"].map(lambda v: f"v{v}")
        return {"history": df, "plot": df}

    def export(self, style: str) -> dict[str, Any]:
        import tempfile
        from pathlib import Path

        doc = self.engine.export_ratings(style.partition("@v")[0] or None, user=self.user)
        path = Path(tempfile.mkdtemp()) / "ratings.json"
        path.write_text(doc, "utf-8")
        return {"export": str(copy_for_download([path])[0])}

    def save_defaults(self, style: str, strength: float, unet_weight: float, te_weight: float) -> dict[str, Any]:
        """Save the picked version's defaults (applied whenever it is used)."""
        if not style:
            raise gr.Error("pick a style version first")
        try:
            d = self.engine.set_version_defaults(style, strength=float(strength), unet_weight=float(unet_weight),
                                                 te_weight=float(te_weight))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return {"status": f"{style}: strength {d['strength']:g}, UNet {d['unet_weight']:g}, text encoder "
                          f"{d['te_weight']:g} saved as this version's defaults"}

    def load_defaults(self, style: str) -> dict[str, Any]:
        d = self.engine.version_defaults(style) if style else {"strength": 1.0, "unet_weight": 1.0, "te_weight": 1.0}
        return {"strength": d["strength"], "unet_weight": d["unet_weight"], "te_weight": d["te_weight"]}

    # ---- refine, compare, keep or revert -------------------------------------------------------------------------
    def refine(self, style: str, steps: int, beta: float, progress=None) -> Iterator[dict[str, Any]]:
        if not style:
            raise gr.Error("pick a style version first")
        try:
            req = RefineRequest(style=style, steps=int(steps), beta=float(beta), raters=(self.user,))
            for ev in self.engine.refine_iter(req, user=self.user):
                if isinstance(ev, RefineResult):
                    yield self._refined(ev)
                    return
                if progress is not None and hasattr(ev, "step"):
                    progress((ev.step, ev.total), desc=f"refining: step {ev.step}/{ev.total}", unit="steps")
        except GeneratorExit:
            self.engine.cancel(kind="refine", user=self.user)
            raise
        except (ConfigError, ValueError) as e:
            raise gr.Error(str(e)) from None

    def _refined(self, res: RefineResult) -> dict[str, Any]:
        if res.cancelled:
            return {"status": f"Refinement cancelled after {res.steps} steps; v{res.parent.version} is unchanged.",
                    "new_version": ""}
        new = f"{res.style.id}@v{res.style.version}"
        return {"status": f"v{res.style.version} made from {res.liked} liked / {res.disliked} disliked images in "
                          f"{res.seconds:.0f} s. Compare, then keep or revert.",
                "new_version": new, **self.compare(f"{res.parent.id}@v{res.parent.version}", new)}

    def cancel_refine(self) -> dict[str, Any]:
        self.engine.cancel(kind="refine", user=self.user)
        self.engine.wait_for_jobs(kind="refine", user=self.user, timeout=30)
        return {"status": "Cancelled."}

    def compare(self, old: str, new: str, seed: int = 0, prompts: str = DEFAULT_PROMPTS) -> dict[str, Any]:
        """v(N) and v(N+1) on the same prompts and seeds, side by side."""
        out = {}
        for key, ref in (("before", old), ("after", new)):
            req = GenerateRequest(prompt=prompts or DEFAULT_PROMPTS, style=ref, seed=int(seed), batch_size=4,
                                  prompt_per_line=True, num_inference_steps=ROUND_STEPS)
            res = self.engine.generate(req, user=self.user)
            shown = copy_for_download([im.path for im in res.images])
            out[key] = [(str(p), f"{ref.partition('@')[2]} seed {im.recipe['seed']}")
                        for p, im in zip(shown, res.images)]
        return out

    def keep(self, new: str) -> dict[str, Any]:
        return {"status": f"kept {new}: it is the style's newest version" if new else "nothing to keep"}

    def revert(self, new: str) -> dict[str, Any]:
        if not new:
            raise gr.Error("there is no refined version to revert")
        sid, _, v = new.partition("@v")
        try:
            back = self.engine.revert_version(sid, int(v))
        except ValueError as e:
            raise gr.Error(str(e)) from None
        return {"status": f"reverted: v{v} removed, v{back.version} is the newest again", "new_version": ""}


def build_feedback_tab(engine) -> FeedbackHandlers:
    """Lay out the Feedback tab inside the current gr.Blocks and wire it."""
    h = FeedbackHandlers(engine)
    with gr.Row():
        with gr.Column(scale=1):
            style = gr.Dropdown(choices=h.version_choices() if engine else [], label="Style version",
                                elem_id="fb-style")
            prompts = gr.Textbox(DEFAULT_PROMPTS, lines=3, label="Prompts (one per line)", elem_id="fb-prompts")
            with gr.Row():
                seed = gr.Number(0, precision=0, label="Seed")
                per_prompt = gr.Slider(1, 16, value=4, step=1, label="Images per prompt")
            use_fb = gr.Checkbox(False, label="Use my feedback (steer by liked / disliked images, no training)",
                                 elem_id="fb-use")
            new_round = gr.Button("New round", variant="primary", elem_id="fb-round")
            status = gr.Markdown("Pick a style version.", elem_id="fb-status")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Round: click an image, then rate it", columns=6, height=300,
                                 allow_preview=False, elem_id="fb-gallery")  # a click selects, for quick rating
            with gr.Row():
                up = gr.Button("👍 Like", elem_id="fb-up", size="sm")
                down = gr.Button("👎 Dislike", elem_id="fb-down", size="sm")
                stars = gr.Radio([1, 2, 3, 4, 5], label="Stars", elem_id="fb-stars")
                tags = gr.Textbox(label="Tags", placeholder="too dark, wrong linework", elem_id="fb-tags")
            table = gr.Dataframe(headers=["version", "prompt", "seed", "rating", "tags", "when"],
                                 label="Ratings of this version", interactive=False)
    with gr.Accordion("Refine: make the next version from these ratings", open=True):
        with gr.Row():
            steps = gr.Slider(5, 300, value=REFINE_STEPS, step=5, label="Steps")
            beta = gr.Number(REFINE_BETA, label="DPO β")
            refine = gr.Button("Refine", variant="primary", elem_id="fb-refine")
            cancel = gr.Button("Cancel", variant="stop", elem_id="fb-cancel")
        new_version = gr.Textbox(label="New version", interactive=False, elem_id="fb-new")
        with gr.Row():
            before = gr.Gallery(label="v(N)", columns=4, height=200, elem_id="fb-before")
            after = gr.Gallery(label="v(N+1), same seeds", columns=4, height=200, elem_id="fb-after")
        with gr.Row():
            keep = gr.Button("Keep v(N+1)", elem_id="fb-keep")
            revert = gr.Button("Revert", elem_id="fb-revert")
    with gr.Accordion("Adjust by hand (saved as this version's defaults)", open=False):
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Overall strength")
            unet_w = gr.Slider(0, 2, value=1.0, step=0.05, label="UNet weight (look, shapes)")
            te_w = gr.Slider(0, 2, value=1.0, step=0.05, label="Text-encoder weight (the trigger's meaning)")
            save_defaults = gr.Button("Save defaults", elem_id="fb-defaults")
    with gr.Accordion("History", open=False):
        history = gr.Dataframe(label="Ratings by version", interactive=False)
        plot = gr.BarPlot(x="version", y="liked", title="Share of liked images by version", y_lim=[0, 1])
        export_btn = gr.Button("Export ratings (JSON)")
        export = gr.File(label="ratings.json", interactive=False)

    comps = {"strength": strength, "unet_weight": unet_w, "te_weight": te_w, "status": status, "gallery": gallery, "table": table, "new_version": new_version, "before": before,
             "after": after, "history": history, "plot": plot, "export": export}

    def out(update: dict) -> dict:
        return {comps[k]: v for k, v in update.items()}

    def on_round(*a):
        return out(h.new_round(*a))

    new_round.click(on_round, [style, prompts, seed, per_prompt, use_fb],
                    [status, gallery], concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    gallery.select(_select(h, out), None, [status], queue=False, api_visibility="private")
    for btn, value in ((up, "up"), (down, "down")):
        btn.click(lambda t, s, v=value: out({**h.rate(v, t), **h.history(s)}), [tags, style],
                  [status, table, history, plot], api_visibility="private")
    stars.input(lambda n, t, s: out({**h.rate(int(n), t), **h.history(s)}), [stars, tags, style],
                [status, table, history, plot], api_visibility="private")
    style.change(lambda s: out({"table": h.ratings_table(s), **h.history(s), **h.load_defaults(s)}), [style],
                 [table, history, plot, strength, unet_w, te_w], api_visibility="private")
    save_defaults.click(lambda *a: out(h.save_defaults(*a)), [style, strength, unet_w, te_w], [status],
                        api_visibility="private")

    def on_refine(s, n, b, progress=gr.Progress()):
        for update in h.refine(s, n, b, progress):
            yield out(update)

    ev = refine.click(on_refine, [style, steps, beta], [status, new_version, before, after],
                      concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    cancel.click(lambda: out(h.cancel_refine()), None, [status], cancels=[ev], queue=False,
                 api_visibility="private")
    keep.click(lambda n: out(h.keep(n)), [new_version], [status], api_visibility="private")
    revert.click(lambda n: out(h.revert(n)), [new_version], [status, new_version], api_visibility="private")
    export_btn.click(lambda s: out(h.export(s)), [style], [export], api_visibility="private")
    h.components = {"style": style, **comps}
    h.refresh = dict(fn=lambda: gr.Dropdown(choices=h.version_choices()), inputs=None, outputs=[style],
                     queue=False, api_visibility="private")
    return h


def _select(h: FeedbackHandlers, out):
    def on_select(evt: gr.SelectData):
        return out(h.select(evt.index))
    return on_select


def rating_controls(gen, engine, user: str = "local") -> None:
    """Thumbs up/down (with tags) for the image selected in the Generate tab's gallery, rated by the engine's own
    path of that image (GenerateHandlers.last_paths), never by the browser's copy."""
    h = FeedbackHandlers(engine, user)
    with gr.Row():
        up = gr.Button("👍 selected", size="sm", elem_id="gen-up")
        down = gr.Button("👎 selected", size="sm", elem_id="gen-down")
        tags = gr.Textbox(show_label=False, placeholder="tags: too dark, wrong linework", elem_id="gen-tags")
    state = {"index": None}

    def on_select(evt: gr.SelectData):
        state["index"] = evt.index

    def rate(value, t):
        rnd = Round(paths=list(getattr(gen.handlers, "last_paths", [])))
        return {gen.outputs["status"]: h.rate(value, t, index=state["index"], rnd=rnd)["status"]}

    gen.outputs["gallery"].select(on_select, None, None, queue=False, api_visibility="private")
    up.click(lambda t: rate("up", t), [tags], [gen.outputs["status"]], api_visibility="private")
    down.click(lambda t: rate("down", t), [tags], [gen.outputs["status"]], api_visibility="private")
