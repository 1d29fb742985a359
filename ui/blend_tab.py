"""The Blend tab: pick two to four styles, set a weight for each, see an interpolation strip from all-A to all-B,
try the blend on a prompt, and save it as a new style (exact, or compressed to a rank by SVD with its error shown).

`BlendHandlers` holds the work as plain methods over dicts keyed by names (tests drive it without a browser);
`build_blend_tab` lays the components out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from engine.core.blend_config import BakeRequest, BlendRequest, BlendStripRequest
from engine.core.config import ConfigError, GenerateRequest
from engine.core.events import BlendStripResult, GenerateResult

from .downloads import copy_for_download
from .session import user_of

ROWS = 4  # styles a blend can mix in the UI (the engine takes up to MAX_STYLES)
EXPLAIN = ("**What the weights mean.** A style is a learned change to the model; the blend adds each style's "
           "change times its weight. 1 and 0 give the first style exactly, 0.5 and 0.5 half of each, above 1 "
           "exaggerates a style, below 0 pushes away from it. Weights need not add up to 1: 1 and 1 applies both "
           "fully. The strip shows the same prompt and seed from all of style A (left) to all of style B (right).")


def _pairs(values: dict[str, Any]) -> tuple[list[str], list[float]]:
    """The rows with a style picked, in order: (ids, weights)."""
    ids, weights = [], []
    for k in range(ROWS):
        sid = values.get(f"style_{k}") or ""
        if sid:
            ids.append(sid)
            weights.append(float(values.get(f"weight_{k}", 1.0)))
    return ids, weights


class BlendHandlers:
    """What the Blend tab's buttons do, as plain methods over one Engine."""

    def __init__(self, engine, user: str = "local"):
        self.engine = engine
        self.user = user  # whose jobs this tab starts and cancels

    def style_choices(self, user: str | None = None) -> list[tuple[str, str]]:
        # Built before anyone asks (the page layout): in studio mode nobody's styles go into it.
        anonymous = user is None and getattr(self.engine, "studio", None) is not None
        styles = self.engine.list_styles(user=user or self.user) if self.engine is not None and not anonymous else []
        return [("—", "")] + [(s.label, s.id) for s in styles if s.kind == "lora"]  # embeddings do not blend

    def blend(self, values: dict[str, Any]) -> BlendRequest:
        ids, weights = _pairs(values)
        if len(ids) < 2:
            raise gr.Error("Pick at least two styles to blend (style A and style B).")
        try:
            return BlendRequest(tuple(ids), tuple(weights))
        except ConfigError as e:
            raise gr.Error(str(e)) from None

    def strip(self, values: dict[str, Any], prompt: str, seed: int, num_images: int, steps: int,
              progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Images from all-A to all-B at one seed, then the strip as one picture."""
        ids, _ = _pairs(values)
        if len(ids) < 2:
            raise gr.Error("Pick style A and style B (the first two rows) for the strip.")
        try:
            req = BlendStripRequest(prompt=prompt or "", style_a=ids[0], style_b=ids[1], num_images=int(num_images),
                                    seed=int(seed), num_inference_steps=int(steps))
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        try:
            for ev in self.engine.blend_strip_iter(req, user=user or self.user):
                if isinstance(ev, BlendStripResult):
                    yield self._strip_result(ev)
                    return
                if progress is not None:
                    progress((ev.done, ev.total), desc=ev.message, unit="steps")
        except ValueError as e:
            raise gr.Error(str(e)) from None

    def _strip_result(self, res: BlendStripResult) -> dict[str, Any]:
        paths = copy_for_download([g.path for g in res.images])
        gallery = [(str(p), f"A {wa:g} · B {wb:g}") for p, (wa, wb) in zip(paths, res.weights)]
        strip = str(copy_for_download([res.strip_path])[0]) if res.strip_path else None
        word = "Cancelled" if res.cancelled else "Done"
        return {"strip_gallery": gallery, "strip_image": strip,
                "status": f"{word}: {len(res.images)} image(s) from all-A to all-B in {res.seconds:.1f} s."}

    def preview(self, values: dict[str, Any], prompt: str, seed: int, steps: int,
                user: str | None = None) -> dict[str, Any]:
        """One image of the blend as it is set now (the same request Generate would run)."""
        blend = self.blend(values)
        try:
            req = GenerateRequest(prompt=prompt or "", seed=int(seed), num_inference_steps=int(steps),
                                  styles=tuple(zip(blend.styles, blend.weights)))
            res: GenerateResult = self.engine.generate(req, user=user or self.user)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        paths = copy_for_download([g.path for g in res.images])
        return {"preview": str(paths[0]) if paths else None,
                "status": "Preview made with " + ", ".join(f"{s} × {w:g}" for s, w in zip(blend.styles, blend.weights))}

    def bake(self, values: dict[str, Any], name: str, method: str, rank: int,
             user: str | None = None) -> dict[str, Any]:
        """Save the blend as a new style; an SVD bake reports how much of the blend it lost."""
        blend = self.blend(values)
        try:
            rank = int(rank or 0) if method == "svd" else 0  # the slider keeps a value either way
            res = self.engine.bake_blend(BakeRequest((name or "").strip(), blend, method, rank),
                                         user=user or self.user)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        how = ("exact (ranks concatenated: it generates what the live blend does)" if res.method == "exact" else
               f"compressed to rank {res.rank} by SVD: relative error {res.relative_error:.4f} "
               "(Frobenius norm of what was dropped over the blend's)")
        return {"status": f"Saved **{res.style.name}** (`{res.style.id}`, rank {res.rank}), {how}. It is in the "
                          "Generate tab's style list now."}


@dataclass
class BlendTab:
    handlers: BlendHandlers
    components: dict[str, Any]
    refresh: dict[str, Any]  # event kwargs that refill the style dropdowns (page load, tab select)


def build_blend_tab(engine) -> BlendTab:
    """Lay out the Blend tab over one Engine; call inside a `gr.Tab`."""
    h = BlendHandlers(engine)
    c: dict[str, Any] = {}
    choices = h.style_choices()
    gr.Markdown(EXPLAIN)
    with gr.Row():
        with gr.Column(scale=1):
            for k in range(ROWS):
                with gr.Row(equal_height=True):
                    label = "Style A" if k == 0 else "Style B" if k == 1 else f"Style {chr(65 + k)} (optional)"
                    c[f"style_{k}"] = gr.Dropdown(choices, value="", label=label, scale=3,
                                                  elem_id=f"blend-style-{k}")
                    c[f"weight_{k}"] = gr.Slider(-2, 2, value=0.5 if k < 2 else 0.0, step=0.05, label="Weight",
                                                 scale=2, elem_id=f"blend-weight-{k}")
            c["prompt"] = gr.Textbox(label="Prompt", value="a red circle on a blue background", elem_id="blend-prompt")
            with gr.Row():
                c["seed"] = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                c["steps"] = gr.Slider(1, 50, value=20, step=1, label="Steps")
                c["num_images"] = gr.Slider(3, 9, value=9, step=1, label="Strip images")
            with gr.Row():
                preview_btn = gr.Button("Preview the blend", elem_id="blend-preview")
                strip_btn = gr.Button("Interpolation strip A → B", variant="primary", elem_id="blend-strip")
            with gr.Accordion("Save the blend as a new style", open=True):
                c["name"] = gr.Textbox(label="Name", placeholder="e.g. ink and watercolour", elem_id="blend-name")
                with gr.Row():
                    c["method"] = gr.Radio([("Exact", "exact"), ("Compressed (SVD)", "svd")], value="exact",
                                           label="How", info="exact keeps every rank; SVD makes a smaller file")
                    c["rank"] = gr.Slider(1, 64, value=8, step=1, label="Rank (SVD only)")
                bake_btn = gr.Button("Save as style", elem_id="blend-save")
        with gr.Column(scale=1):
            c["status"] = gr.Markdown(elem_id="blend-status")
            c["strip_image"] = gr.Image(label="Strip", type="filepath", interactive=False, elem_id="blend-strip-img")
            c["strip_gallery"] = gr.Gallery(label="Strip images", columns=5, height=220)
            c["preview"] = gr.Image(label="Preview", type="filepath", interactive=False, height=200)

    row_inputs = [c[f"style_{k}"] for k in range(ROWS)] + [c[f"weight_{k}"] for k in range(ROWS)]

    def values_of(args) -> dict[str, Any]:
        styles, weights = args[:ROWS], args[ROWS:2 * ROWS]
        return {**{f"style_{k}": s for k, s in enumerate(styles)}, **{f"weight_{k}": w for k, w in enumerate(weights)}}

    # `request` (first, so Gradio fills it): who is asking, from the login; never a form field.
    def on_strip(request: gr.Request, *args, progress=gr.Progress()):
        vals, (prompt, seed, n, steps) = values_of(args), args[2 * ROWS:]
        for out in h.strip(vals, prompt, seed, n, steps, progress, user=user_of(engine, request)):
            yield out["strip_gallery"], out["strip_image"], out["status"]

    def on_preview(request: gr.Request, *args):
        vals, (prompt, seed, steps) = values_of(args), args[2 * ROWS:]
        out = h.preview(vals, prompt, seed, steps, user=user_of(engine, request))
        return out["preview"], out["status"]

    def on_bake(request: gr.Request, *args):
        vals, (name, method, rank) = values_of(args), args[2 * ROWS:]
        return h.bake(vals, name, method, rank, user=user_of(engine, request))["status"]

    gpu = dict(concurrency_id="gpu", concurrency_limit=1, api_visibility="private")
    strip_btn.click(on_strip, row_inputs + [c["prompt"], c["seed"], c["num_images"], c["steps"]],
                    [c["strip_gallery"], c["strip_image"], c["status"]], show_progress_on=[c["strip_image"]], **gpu)
    preview_btn.click(on_preview, row_inputs + [c["prompt"], c["seed"], c["steps"]], [c["preview"], c["status"]],
                      **gpu)
    bake_btn.click(on_bake, row_inputs + [c["name"], c["method"], c["rank"]], [c["status"]], **gpu)

    def refill(request: gr.Request):
        fresh = h.style_choices(user_of(engine, request))
        return [gr.Dropdown(choices=fresh) for _ in range(ROWS)]

    refresh = dict(fn=refill, inputs=None, outputs=[c[f"style_{k}"] for k in range(ROWS)], queue=False,
                   api_visibility="private")
    return BlendTab(h, c, refresh)
