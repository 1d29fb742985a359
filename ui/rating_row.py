"""The small rating row under the Generate tab's gallery: thumbs up/down (with tags) for the selected image."""
from __future__ import annotations

import gradio as gr

from .feedback_tab import FeedbackHandlers, Round
from .session import user_of


def rating_controls(gen, engine) -> None:
    """Thumbs up/down (with tags) for the image selected in the Generate tab's gallery, rated as the request's user
    by the engine's own path of that image (GenerateHandlers.last_paths_for(user)), never by the browser's copy."""
    h = FeedbackHandlers(engine)
    with gr.Row():
        up = gr.Button("👍 selected", size="sm", elem_id="gen-up")
        down = gr.Button("👎 selected", size="sm", elem_id="gen-down")
        tags = gr.Textbox(show_label=False, placeholder="tags: too dark, wrong linework", elem_id="gen-tags")
    selected = gr.State(None)  # this browser session's selected gallery index

    def on_select(evt: gr.SelectData):
        return evt.index

    def rate(value):
        def on_rate(request: gr.Request, t, index):
            user = user_of(engine, request)
            rnd = Round(paths=list(gen.handlers.last_paths_for(user)), user=user)
            return {gen.outputs["status"]: h.rate(value, t, index=index, rnd=rnd, user=user)["status"]}
        return on_rate

    gen.outputs["gallery"].select(on_select, None, [selected], queue=False, api_visibility="private")
    up.click(rate("up"), [tags, selected], [gen.outputs["status"]], api_visibility="private")
    down.click(rate("down"), [tags, selected], [gen.outputs["status"]], api_visibility="private")
