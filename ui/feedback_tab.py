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
from engine.core.events import Queued
from engine.core.feedback_config import REFINE_BETA, REFINE_STEPS, RefineRequest, RefineResult

from .downloads import copy_for_download
from .feedback_keys import KEYS_HELP, KEYS_JS
from .session import user_of

ROUND_STEPS = 20
DEFAULT_PROMPTS = "a photo of a shape"
BLOCKS_HELP = ("Per-block UNet weights, times the UNet weight. Roughly: the **down** and **middle** blocks carry "
               "*what* is drawn and where (content, layout), the **up** blocks *how* it looks (texture, colour, line "
               "work). To keep a style's look but free the content, lower down/middle; to keep its subject but "
               "soften its look, lower up. 0 everywhere (and text encoder 0) switches the style off.")


@dataclass
class Round:
    """One round of images on the server: the engine's own paths (what gets rated), by gallery index, and who made
    them. Kept per browser session (a gr.State, which clients cannot send), never shared between users."""

    style: str = ""
    paths: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    selected: int | None = None
    user: str = ""


class FeedbackHandlers:
    """The tab's work as plain methods. `user` of each call is who asks (ui.session.user_of on the request), else
    `default_user` (the local user without accounts); every engine call passes it on, and the engine checks it."""

    def __init__(self, engine, user: str = "local"):
        self.engine, self.default_user = engine, user
        self.round = Round()  # the round of direct calls without a session (tests, scripts)

    def _user(self, user: str | None) -> str:
        return user or self.default_user

    # ---- versions and rounds ---------------------------------------------------------------------------------
    def version_choices(self, user: str | None = None) -> list[tuple[str, str]]:
        """(label, "id@vN") for every version of every style `user` may use."""
        out = []
        for s in self.engine.library_list(user=self._user(user)):
            for v in reversed(s.versions):
                out.append((f"{s.name} v{v.version} ({s.id})", f"{s.id}@v{v.version}"))
        return out

    def new_round(self, style: str, prompts: str, seed: int, per_prompt: int, use_feedback: bool,
                  user: str | None = None) -> dict[str, Any]:
        """Generate `per_prompt` images for each prompt line with the picked version (FABRIC when asked)."""
        if not style:
            raise gr.Error("pick a style version first")
        user = self._user(user)
        try:
            req = GenerateRequest(prompt=prompts or DEFAULT_PROMPTS, style=style, seed=int(seed),
                                  batch_size=int(per_prompt), prompt_per_line=True, num_inference_steps=ROUND_STEPS)
            res = self.engine.generate(req, user=user, use_feedback=bool(use_feedback))
        except (ConfigError, ValueError) as e:
            raise gr.Error(str(e)) from None
        rnd = Round(style, [im.path for im in res.images], [im.recipe["seed"] for im in res.images], None, user)
        self.round = rnd
        shown = copy_for_download(rnd.paths)
        gallery = [(str(p), f"seed {s}") for p, s in zip(shown, rnd.seeds)]
        fb = " with your feedback" if use_feedback else ""
        return {"gallery": gallery, "round": rnd,
                "status": f"{len(gallery)} images{fb}: click one (or press j / k), then rate it (1-5, + or -)."}

    def select(self, index: int | None, rnd: Round | None = None) -> dict[str, Any]:
        rnd = rnd if rnd is not None else self.round
        rnd.selected = index
        return {"status": f"image {index + 1} selected" if index is not None else "nothing selected", "round": rnd}

    def rate(self, rating, tags: str = "", index: int | None = None, rnd: Round | None = None,
             user: str | None = None) -> dict[str, Any]:
        """Rate the selected image (or `index`) of the round: "up", "down" or 1..5, as `user` (the engine refuses
        an image that is not one of `user`'s outputs)."""
        rnd, user = rnd if rnd is not None else self.round, self._user(user)
        i = rnd.selected if index is None else index
        if i is None or not 0 <= i < len(rnd.paths):
            raise gr.Error("click an image of the round first")
        try:
            r = self.engine.rate_image(rnd.paths[i], rating, tags, user=user)
        except ValueError as e:  # ConfigError, AccessDenied
            raise gr.Error(str(e)) from None
        return {"status": f"image {i + 1}: {r.rating}/5" + (f" ({', '.join(r.tags)})" if r.tags else ""),
                "table": self.ratings_table(rnd.style, user)}

    def ratings_table(self, style: str, user: str | None = None) -> list[list]:
        """`user`'s own ratings of the picked version."""
        if not style:
            return []
        sid, _, v = style.partition("@v")
        user = self._user(user)
        return [[r.style_version, r.prompt, r.seed, r.rating, ", ".join(r.tags), r.updated]
                for r in self._engine(self.engine.list_ratings, sid, int(v) if v.isdigit() else None, user=user,
                                      rater=user)]

    def history(self, style: str, user: str | None = None) -> dict[str, Any]:
        """`user`'s rounds per version of the style: rows and the plot data (liked share, mean stars by version)."""
        import pandas as pd

        sid, user = style.partition("@v")[0], self._user(user)
        rows = self._engine(self.engine.rating_summary, sid, user=user, rater=user) if sid else []
        df = pd.DataFrame(rows or [], columns=["version", "ratings", "liked", "mean"])
        df["version"] = df["version"].map(lambda v: f"v{v}")
        return {"history": df, "plot": df}

    def export(self, style: str, user: str | None = None) -> dict[str, Any]:
        """`user`'s own ratings (of the picked style, or all) as a JSON file to download."""
        import tempfile
        from pathlib import Path

        user = self._user(user)
        doc = self._engine(self.engine.export_ratings, (style or "").partition("@v")[0] or None, user=user,
                           rater=user)
        path = Path(tempfile.mkdtemp()) / "ratings.json"
        path.write_text(doc, "utf-8")
        return {"export": str(copy_for_download([path])[0])}

    def save_defaults(self, style: str, strength: float, unet_weight: float, te_weight: float,
                      down: float = 1.0, mid: float = 1.0, up: float = 1.0, user: str | None = None) -> dict[str, Any]:
        """Save the picked version's defaults (applied whenever it is used); its owner or an admin only."""
        if not style:
            raise gr.Error("pick a style version first")
        d = self._engine(self.engine.set_version_defaults, style, strength=float(strength),
                         unet_weight=float(unet_weight), te_weight=float(te_weight),
                         blocks={"down": float(down), "mid": float(mid), "up": float(up)}, user=self._user(user))
        b = d["blocks"]
        return {"status": f"{style}: strength {d['strength']:g}, UNet {d['unet_weight']:g} (down {b['down']:g}, "
                          f"mid {b['mid']:g}, up {b['up']:g}), text encoder {d['te_weight']:g} saved as this "
                          "version's defaults"}

    def load_defaults(self, style: str, user: str | None = None) -> dict[str, Any]:
        d = (self._engine(self.engine.version_defaults, style, user=self._user(user)) if style else
             {"strength": 1.0, "unet_weight": 1.0, "te_weight": 1.0, "blocks": {"down": 1.0, "mid": 1.0, "up": 1.0}})
        return {"strength": d["strength"], "unet_weight": d["unet_weight"], "te_weight": d["te_weight"],
                **{f"block_{k}": v for k, v in d["blocks"].items()}}

    @staticmethod
    def _engine(fn, *args, **kw):
        """An engine call whose refusals (bad input, another user's style) become a message in the page."""
        try:
            return fn(*args, **kw)
        except ValueError as e:  # ConfigError, LibraryError, AccessDenied
            raise gr.Error(str(e)) from None

    # ---- refine, compare, keep or revert -------------------------------------------------------------------------
    def refine(self, style: str, steps: int, beta: float, progress=None,
               user: str | None = None) -> Iterator[dict[str, Any]]:
        """Refine the picked version from `user`'s own ratings of it (the engine checks `user` may change it and,
        in studio mode, charges a training run)."""
        if not style:
            raise gr.Error("pick a style version first")
        user = self._user(user)
        try:
            req = RefineRequest(style=style, steps=int(steps), beta=float(beta), raters=(user,))
        except (ConfigError, ValueError) as e:
            raise gr.Error(str(e)) from None
        yield from self._follow(lambda: self.engine.refine_iter(req, user=user), progress, user)

    def resumable(self, user: str | None = None) -> list[tuple[str, str]]:
        """(label, run id) of `user`'s refinements that can continue from a checkpoint."""
        return [(f"{r['style']}: {r['state']} at step {r['step']}/{r['total']} ({r['run_id']})", r["run_id"])
                for r in self.engine.resumable_refines(user=self._user(user))]

    def resume(self, run_id: str, progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Continue an interrupted or cancelled refinement from its newest checkpoint."""
        if not run_id:
            raise gr.Error("pick a refinement to resume")
        user = self._user(user)
        yield from self._follow(lambda: self.engine.resume_refine_iter(run_id, user=user), progress, user)

    def _follow(self, start, progress, user: str) -> Iterator[dict[str, Any]]:
        finished = False
        try:
            for ev in start():
                if isinstance(ev, RefineResult):
                    finished = True
                    yield self._refined(ev, user)
                    return
                if isinstance(ev, Queued):
                    yield {"status": ev.message}
                elif progress is not None and hasattr(ev, "step") and hasattr(ev, "total"):
                    progress((ev.step, ev.total), desc=f"refining: step {ev.step}/{ev.total}", unit="steps")
        except GeneratorExit:
            if not finished:
                self.engine.cancel(kind="refine", user=user)
            raise
        except ValueError as e:  # ConfigError, AccessDenied, LibraryError, QuotaExceeded & co.
            raise gr.Error(str(e)) from None

    def _refined(self, res: RefineResult, user: str) -> dict[str, Any]:
        if res.cancelled:
            return {"status": f"Refinement cancelled after {res.steps} steps; v{res.parent.version} is unchanged. "
                              "Resume it from the list below.", "new_version": ""}
        new = f"{res.style.id}@v{res.style.version}"
        made = (f"v{res.style.version} made from {res.liked} liked / {res.disliked} disliked images in "
                f"{res.seconds:.0f} s.")
        try:
            side_by_side = self.compare(f"{res.parent.id}@v{res.parent.version}", new, user=user)
        except gr.Error as e:  # e.g. no free generations left for the comparison: the new version is still made
            return {"status": f"{made} No comparison: {e}", "new_version": new}
        return {"status": f"{made} Compare, then keep or revert.", "new_version": new, **side_by_side}

    def cancel_refine(self, user: str | None = None) -> dict[str, Any]:
        user = self._user(user)
        self.engine.cancel(kind="refine", user=user)
        self.engine.wait_for_jobs(kind="refine", user=user, timeout=30)
        return {"status": "Cancelled."}

    def compare(self, old: str, new: str, seed: int = 0, prompts: str = DEFAULT_PROMPTS,
                user: str | None = None) -> dict[str, Any]:
        """v(N) and v(N+1) on the same prompts and seeds, side by side."""
        out = {}
        for key, ref in (("before", old), ("after", new)):
            req = GenerateRequest(prompt=prompts or DEFAULT_PROMPTS, style=ref, seed=int(seed), batch_size=4,
                                  prompt_per_line=True, num_inference_steps=ROUND_STEPS)
            res = self._engine(self.engine.generate, req, user=self._user(user))
            shown = copy_for_download([im.path for im in res.images])
            out[key] = [(str(p), f"{ref.partition('@')[2]} seed {im.recipe['seed']}")
                        for p, im in zip(shown, res.images)]
        return out

    def keep(self, new: str) -> dict[str, Any]:
        return {"status": f"kept {new}: it is the style's newest version" if new else "nothing to keep"}

    def revert(self, new: str, user: str | None = None) -> dict[str, Any]:
        if not new:
            raise gr.Error("there is no refined version to revert")
        sid, _, v = new.partition("@v")
        if not v.isdigit():
            raise gr.Error("there is no refined version to revert")
        back = self._engine(self.engine.revert_version, sid, int(v), user=self._user(user))
        return {"status": f"reverted: v{v} removed, v{back.version} is the newest again", "new_version": ""}


def build_feedback_tab(engine) -> FeedbackHandlers:
    """Lay out the Feedback tab inside the current gr.Blocks and wire it. Every event takes its user from the
    request (ui.session.user_of) and its round from this browser session's gr.State."""
    h = FeedbackHandlers(engine)
    rnd_state = gr.State(Round())
    with gr.Row():
        with gr.Column(scale=1):
            style = gr.Dropdown(choices=[], label="Style version", elem_id="fb-style")
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
                stars = [gr.Button(f"{n}★", elem_id=f"fb-star-{n}", size="sm", min_width=40) for n in range(1, 6)]
                tags = gr.Textbox(label="Tags", placeholder="too dark, wrong linework", elem_id="fb-tags")
            gr.Markdown(KEYS_HELP, elem_id="fb-keys-help")
            table = gr.Dataframe(headers=["version", "prompt", "seed", "rating", "tags", "when"],
                                 label="Your ratings of this version", interactive=False)
    with gr.Accordion("Refine: make the next version from your ratings", open=True):
        with gr.Row():
            steps = gr.Slider(5, 300, value=REFINE_STEPS, step=5, label="Steps", elem_id="fb-steps")
            beta = gr.Number(REFINE_BETA, label="DPO β")
            refine = gr.Button("Refine", variant="primary", elem_id="fb-refine")
            cancel = gr.Button("Cancel", variant="stop", elem_id="fb-cancel")
        with gr.Row():
            resumable = gr.Dropdown(choices=[], label="Interrupted or cancelled refinements", scale=3,
                                    elem_id="fb-resumable")
            resume = gr.Button("Resume", scale=1, elem_id="fb-resume")
        new_version = gr.Textbox(label="New version", interactive=False, elem_id="fb-new")
        with gr.Row():
            before = gr.Gallery(label="v(N)", columns=4, height=200, elem_id="fb-before")
            after = gr.Gallery(label="v(N+1), same seeds", columns=4, height=200, elem_id="fb-after")
        with gr.Row():
            keep = gr.Button("Keep v(N+1)", elem_id="fb-keep")
            revert = gr.Button("Revert", elem_id="fb-revert")
    with gr.Accordion("Adjust by hand (saved as this version's defaults)", open=False):
        with gr.Row():
            strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Overall strength", elem_id="fb-strength")
            unet_w = gr.Slider(0, 2, value=1.0, step=0.05, label="UNet weight (look, shapes)", elem_id="fb-unet")
            te_w = gr.Slider(0, 2, value=1.0, step=0.05, label="Text-encoder weight (the trigger's meaning)",
                             elem_id="fb-te")
        gr.Markdown(BLOCKS_HELP)
        with gr.Row():
            b_down = gr.Slider(0, 2, value=1.0, step=0.05, label="Down blocks (layout, content)", elem_id="fb-down-w")
            b_mid = gr.Slider(0, 2, value=1.0, step=0.05, label="Middle block (overall content)", elem_id="fb-mid-w")
            b_up = gr.Slider(0, 2, value=1.0, step=0.05, label="Up blocks (texture, colour: style)", elem_id="fb-up-w")
            save_defaults = gr.Button("Save defaults", elem_id="fb-defaults")
    with gr.Accordion("History", open=False):
        history = gr.Dataframe(label="Your ratings by version", interactive=False)
        plot = gr.BarPlot(x="version", y="liked", title="Share of liked images by version", y_lim=[0, 1])
        export_btn = gr.Button("Export my ratings (JSON)", elem_id="fb-export")
        export = gr.File(label="ratings.json", interactive=False)

    comps = {"strength": strength, "unet_weight": unet_w, "te_weight": te_w, "block_down": b_down,
             "block_mid": b_mid, "block_up": b_up, "status": status, "gallery": gallery, "table": table,
             "new_version": new_version, "before": before, "after": after, "history": history, "plot": plot,
             "export": export, "round": rnd_state}

    def out(update: dict) -> dict:
        return {comps[k]: v for k, v in update.items()}

    def on_round(request: gr.Request, s, p, sd, n, fb):
        return out(h.new_round(s, p, sd, n, fb, user=user_of(engine, request)))

    new_round.click(on_round, [style, prompts, seed, per_prompt, use_fb], [status, gallery, rnd_state],
                    concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def on_select(evt: gr.SelectData, rnd: Round):
        return out(h.select(evt.index, rnd))

    gallery.select(on_select, [rnd_state], [status, rnd_state], queue=False, api_visibility="private")

    def rate_with(value):
        def on_rate(request: gr.Request, t, s, rnd):
            user = user_of(engine, request)
            return out({**h.rate(value, t, rnd=rnd, user=user), **h.history(s, user)})
        return on_rate

    for btn, value in ((up, "up"), (down, "down"), *((b, n) for n, b in enumerate(stars, 1))):
        btn.click(rate_with(value), [tags, style, rnd_state], [status, table, history, plot],
                  api_visibility="private")

    def on_style(request: gr.Request, s):
        user = user_of(engine, request)
        return out({"table": h.ratings_table(s, user), **h.history(s, user), **h.load_defaults(s, user)})

    style.change(on_style, [style], [table, history, plot, strength, unet_w, te_w, b_down, b_mid, b_up],
                 api_visibility="private")
    def on_save(request: gr.Request, s, st, u, t, d, m, up_w):
        return out(h.save_defaults(s, st, u, t, d, m, up_w, user=user_of(engine, request)))

    save_defaults.click(on_save, [style, strength, unet_w, te_w, b_down, b_mid, b_up], [status],
                        api_visibility="private")

    def on_refine(request: gr.Request, s, n, b, progress=gr.Progress()):
        for update in h.refine(s, n, b, progress, user=user_of(engine, request)):
            yield out(update)

    ev = refine.click(on_refine, [style, steps, beta], [status, new_version, before, after],
                      concurrency_id="gpu", concurrency_limit=1, api_visibility="private")

    def on_resume(request: gr.Request, run_id, progress=gr.Progress()):
        for update in h.resume(run_id, progress, user=user_of(engine, request)):
            yield out(update)

    def runs_list(request: gr.Request):
        return gr.Dropdown(choices=h.resumable(user_of(engine, request)), value=None)

    ev_resume = resume.click(on_resume, [resumable], [status, new_version, before, after], concurrency_id="gpu",
                             concurrency_limit=1, api_visibility="private")
    for e in (ev, ev_resume):
        e.then(runs_list, None, [resumable], queue=False, api_visibility="private")
    def on_cancel(request: gr.Request):
        return out(h.cancel_refine(user_of(engine, request)))

    def on_revert(request: gr.Request, n):
        return out(h.revert(n, user_of(engine, request)))

    def on_export(request: gr.Request, s):
        return out(h.export(s, user_of(engine, request)))

    cancel.click(on_cancel, None, [status], cancels=[ev, ev_resume], queue=False,
                 api_visibility="private").then(runs_list, None, [resumable], queue=False, api_visibility="private")
    keep.click(lambda n: out(h.keep(n)), [new_version], [status], api_visibility="private")
    revert.click(on_revert, [new_version], [status, new_version], api_visibility="private")
    export_btn.click(on_export, [style], [export], api_visibility="private")
    h.components = {"style": style, **comps}

    def refresh(request: gr.Request):
        user = user_of(engine, request)
        return gr.Dropdown(choices=h.version_choices(user)), gr.Dropdown(choices=h.resumable(user), value=None)

    h.refresh = dict(fn=refresh, inputs=None, outputs=[style, resumable], queue=False, api_visibility="private")
    h.keys_js = KEYS_JS
    return h
