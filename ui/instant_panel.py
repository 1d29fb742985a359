"""The Library's "Instant style" panel: drop 1-8 reference images, name, strength, style-only switch, Create ->
a preview at once (IP-Adapter, no training); the selected instant style's reference images; "Train it properly"
(a DreamBooth run on the same references, published as the next version of the same entry).

`InstantHandlers` holds the work as plain methods (tests drive them without a browser); `build_instant_panel`
lays out the components inside the Library tab.
"""
from __future__ import annotations

from typing import Any, Iterator

import gradio as gr

from engine.core.config import ConfigError, GenerateRequest
from engine.core.errors import LibraryError

from .downloads import copy_for_download

MAX_REFERENCES = 8


class InstantHandlers:
    def __init__(self, engine):
        self.engine = engine

    def create(self, files, name: str, strength: float, style_only: bool) -> dict[str, Any]:
        """Make the style and a preview image from the first example prompt; {status, style_id, preview}."""
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        if not 1 <= len(paths) <= MAX_REFERENCES:
            raise gr.Error(f"Drop 1 to {MAX_REFERENCES} reference images ({len(paths)} given).")
        try:
            info = self.engine.create_instant_style(name or "instant style", paths, style_only=bool(style_only),
                                                    strength=float(strength))
            prompt = (self.engine.example_prompts() or ["a picture"])[0]
            res = self.engine.generate(GenerateRequest(prompt=prompt, instant_style=info.id,
                                                       instant_strength=float(strength),
                                                       instant_style_only=bool(style_only)))
        except (ValueError, LibraryError) as e:  # ConfigError, ImageRejected, LibraryError: user-facing messages
            raise gr.Error(str(e)) from None
        return {"status": f"Instant style **{info.name}** (`{info.id}`) is ready: pick it under *Instant style* "
                          f"in Generate. Preview: “{prompt}”.",
                "style_id": info.id, "preview": res.images[0].image if res.images else None}

    def references(self, style_id: str | None) -> list[str]:
        """The reference images of the selected style's instant version (none for a trained-only style)."""
        if not style_id:
            return []
        try:
            refs = self.engine.instant_references(style_id)
        except (ConfigError, LibraryError):
            return []
        return [str(p) for p in copy_for_download(refs)]  # the data dir is in blocked_paths: serve copies

    def train(self, style_id: str | None, steps: int | None = None) -> Iterator[str]:
        """Status lines while the DreamBooth run trains; the last one names the new version."""
        if not style_id or not self.references(style_id):
            raise gr.Error("Pick an instant style (one with reference images) first.")
        try:
            for ev in self.engine.train_from_instant(style_id, max_train_steps=steps):
                style = getattr(ev, "style", None)
                if style is not None:
                    yield f"Trained: **{style.name}** v{style.version} is ready (trigger “{style.trigger_token}”)."
                    return
                step = getattr(ev, "step", None)
                if step is not None:
                    yield f"Training step {step}/{getattr(ev, 'total', '?')}…"
        except ValueError as e:
            raise gr.Error(str(e)) from None
        yield "Training stopped before it produced a version."


def build_instant_panel(engine, style_dropdown) -> dict[str, Any]:
    """The panel's components (inside the current layout); `style_dropdown` is the Library's style picker."""
    h = InstantHandlers(engine)
    c: dict[str, Any] = {}
    with gr.Accordion("Instant style from reference images", open=False):
        c["files"] = gr.File(label="Reference images (1-8)", file_count="multiple", file_types=["image"],
                             type="filepath", elem_id="instant-files")
        c["name"] = gr.Textbox(label="Name", elem_id="instant-name")
        with gr.Row():
            c["strength"] = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength", elem_id="instant-strength")
            c["style_only"] = gr.Checkbox(value=True, label="Style only", info="off: style and content",
                                          elem_id="instant-style-only")
        create = gr.Button("Create", variant="primary", elem_id="instant-create")
        c["preview"] = gr.Image(label="Preview", type="pil", interactive=False, height=160, elem_id="instant-preview")
        c["status"] = gr.Markdown(elem_id="instant-status")
        c["refs"] = gr.Gallery(label="References of the selected style", columns=4, height=140,
                               elem_id="instant-refs")
        with gr.Row(equal_height=True):
            c["train_steps"] = gr.Number(0, precision=0, minimum=0, maximum=20000, label="Training steps",
                                         info="0: the style preset's", elem_id="instant-train-steps", scale=1)
            train = gr.Button("Train it properly", elem_id="instant-train", scale=2)

    def on_create_instant(files, name, strength, style_only):
        out = h.create(files, name, strength, style_only)
        return out["status"], out["preview"], h.references(out["style_id"])

    lib = dict(api_visibility="private")
    create.click(on_create_instant, [c["files"], c["name"], c["strength"], c["style_only"]],
                 [c["status"], c["preview"], c["refs"]], concurrency_id="gpu", concurrency_limit=1, **lib)
    style_dropdown.change(h.references, [style_dropdown], [c["refs"]], queue=False, **lib)

    def on_train_instant(style_id, steps):
        yield from h.train(style_id, int(steps) if steps else None)

    c["trained"] = train.click(on_train_instant, [style_dropdown, c["train_steps"]], [c["status"]],
                               concurrency_id="gpu", concurrency_limit=1, **lib)  # the Library chains a refresh
    c["create_button"], c["train_button"] = create, train
    return c
