"""The Stylebooth Gradio app: a header naming the loaded model, a Model switcher, and one tab per task.

`build_app(engine)` builds the Blocks; `launch_options(data_dir)` holds the hardened `launch()` settings
(RELIABILITY §2) so the launcher and the tests launch the app the same way.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from .blend_tab import build_blend_tab
from .feedback_tab import build_feedback_tab
from .generate_tab import build_generate_tab
from .jobs_panel import build_jobs_panel
from .library_tab import build_library_tab
from .rating_row import rating_controls
from .session import is_admin, user_of
from .studio_tab import build_studio_tab
from .train_tab import build_train_tab

# Layout of the data directory (DESIGN.md); blocked even before they exist, so a file created after launch is
# covered too.
DATA_ENTRIES = ("stylebooth.db", "stylebooth.db-wal", "stylebooth.db-shm", "styles", "priors", "runs", "outputs",
                "cache")
CSS = "#header {margin-bottom: 0} #status {min-height: 1.5em}"


def model_summary(info: dict[str, Any] | None, error: str | None = None) -> str:
    """The header line: which base model is loaded, or why none is (or why another one is)."""
    if info is None:
        return f"## Stylebooth\n**No model loaded.** {error or ''} Open **Model** below to pick one."
    pred = "v-prediction" if info.get("prediction_type") == "v_prediction" else "epsilon"
    line = (f"## Stylebooth\n**Model:** {info.get('name')} · {info.get('kind')} · {pred} · "
            f"{info.get('resolution')} px · fingerprint `{str(info.get('fingerprint', ''))[:10]}`")
    # The configured model failed at start and the demo model stands in: say so where every page shows it.
    return line + (f"\n\n**⚠ {error}** Open **Model** below to pick another one." if error else "")


class AppHandlers:
    """Model header and switching, as plain methods (testable without a browser).

    The header text is cached here rather than read from `engine.model` on every page load: that property takes
    the engine's lock, so a page opened during a long generation would hang until it finished.
    """

    def __init__(self, engine, remote: bool = False):
        self.engine = engine
        self.remote = remote  # open to the network (--listen, --share): see allowed()
        self.header = model_summary(None, "Starting…")

    def allowed(self, source: str) -> bool:
        """May this source be loaded at a client's request?

        On this computer only (127.0.0.1): anything, the user sits at the machine and can read its files anyway.
        Open to the network: only the demo model (""), the model the app started with and settings.toml's
        `allowed_models`, compared as exact strings *before* anything touches the disk. Otherwise the Model box
        would be a file oracle: its messages ("not found", "not a model folder", a checkpoint's header) would tell
        a stranger which files exist on the server, and it would open any file the app can read.
        """
        if not self.remote:
            return True
        settings = getattr(self.engine, "settings", None)
        listed = {"", getattr(settings, "model", ""), *getattr(settings, "allowed_models", ())}
        return source in listed

    def refresh(self) -> str:
        """Load (or look at) the engine's current model; a failure becomes the header, not a crash."""
        try:
            info = self.engine.model.describe()
            self.header = model_summary(info, getattr(self.engine, "load_error", None))
        except (ValueError, OSError) as e:  # ModelLoadError & co. carry plain-words messages
            self.header = model_summary(None, str(e))
        return self.header

    def switch_model(self, source: str | None, user_is_admin: bool = True) -> str:
        """Load another base model; on failure the old one stays and the message is shown once.

        In studio mode only admins may (the model is shared by everyone): the caller's role is checked by the
        event on the server (GR-9), and the source must still pass allowed()."""
        if not user_is_admin:
            raise gr.Error("Only a studio admin can switch the base model.")
        source = (source or "").strip() if isinstance(source, str) else ""
        if not self.allowed(source):
            raise gr.Error("This app is open to the network, so the Model box loads only the models listed under "
                           "`allowed_models` in its settings.toml. Ask whoever runs it to add this one.")
        try:
            info = self.engine.load_model(source or None)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        self.header = model_summary(info)
        return self.header


def build_app(engine, remote: bool = False) -> gr.Blocks:
    """The whole UI over one Engine; loads the configured model so the header can name it.

    `remote`: the app is reachable from other computers (--listen, --share), see AppHandlers.allowed.
    """
    h = AppHandlers(engine, remote)
    h.refresh()
    studio_mode = getattr(engine, "studio", None) is not None
    with gr.Blocks(title="Stylebooth", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        header = gr.Markdown(h.header, elem_id="header")
        with gr.Accordion("Model", open=False):
            with gr.Row(equal_height=True):
                source = gr.Textbox(label="Base model", scale=4,
                                    placeholder="a diffusers folder, a hub id such as "
                                                "stable-diffusion-v1-5/stable-diffusion-v1-5, or a .safetensors file",
                                    info="Leave empty for the bundled demo model. Pickle files (.ckpt, .pt, .bin) "
                                         "are refused because they can run code.", elem_id="model-source")
                load = gr.Button("Load model", scale=1, elem_id="load-model")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as gen_tab:
                gen = build_generate_tab(engine)
                rating_controls(gen, engine)  # rates as the request's user, their own images only
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                train = build_train_tab(engine)
            with gr.Tab("Library", id="library", elem_id="tab-library") as lib_tab:
                library = build_library_tab(engine)
            with gr.Tab("Blend", id="blend", elem_id="tab-blend") as blend_tab:
                blend = build_blend_tab(engine)
            with gr.Tab("My jobs", id="jobs", elem_id="tab-jobs") as jobs_tab:
                jobs = build_jobs_panel(engine)
            # Every Feedback event takes its user from the request and its round from the browser session.
            with gr.Tab("Feedback", id="feedback", elem_id="tab-feedback") as fb_tab:
                feedback = build_feedback_tab(engine)
            studio = studio_tab = None
            if studio_mode:
                # Shown to admins only (demo.load below); every Studio event checks the role again on the server.
                with gr.Tab("Studio", id="studio", elem_id="tab-studio", visible=False) as studio_tab:
                    studio = build_studio_tab(engine)
        # Loading a model competes with generation for the GPU: same concurrency id as Generate.
        def on_switch(request: gr.Request, src):
            return h.switch_model(src, is_admin(engine, request))

        load.click(on_switch, [source], [header], concurrency_id="gpu", concurrency_limit=1,
                   api_visibility="private")
        demo.load(lambda: h.header, None, [header], queue=False, api_visibility="private")
        # Styles trained since the app started (Train tab, CLI) show up on the next page load, when a training
        # run ends, and whenever the Generate tab is opened.
        pickers = gen.style_dropdowns

        def style_dropdown(request: gr.Request):
            return gen.handlers.style_dropdowns(len(pickers), user_of(engine, request))
        style = dict(fn=style_dropdown, inputs=None, outputs=pickers, queue=False, api_visibility="private")
        demo.load(**style)
        gen_tab.select(**style)
        instant = dict(fn=gen.handlers.instant_dropdown, inputs=None, outputs=[gen.fields["instant_style"]],
                       queue=False, api_visibility="private")
        demo.load(**instant)
        gen_tab.select(**instant)
        train.train_event.then(**style)
        train.resume_event.then(**style)
        # The Library lists styles trained or imported since the page was built.
        demo.load(**library.refresh)
        lib_tab.select(**library.refresh)
        demo.load(**blend.refresh)
        blend_tab.select(**blend.refresh)
        # Jobs started on a page that was closed, or before the app restarted, are listed on the next visit.
        demo.load(**jobs.refresh)
        jobs_tab.select(**jobs.refresh)
        demo.load(**feedback.refresh)
        fb_tab.select(**feedback.refresh)
        demo.load(None, None, None, js=feedback.keys_js, queue=False, api_visibility="private")  # rating keys
        # Runs interrupted by a crash (or cancelled) while the page was closed show up in the Train tab.
        runs = dict(fn=train.runs_for, inputs=None, outputs=[train.runs], queue=False,
                    api_visibility="private")
        demo.load(**runs)
        train_tab.select(**runs)
        if studio is not None:
            demo.load(studio.visible_for, None, [studio_tab], queue=False, api_visibility="private")
            studio_tab.select(studio.refresh, None, [studio.components["users"], studio.components["usage"]],
                              queue=False, api_visibility="private")
    # A studio's users each may have a job waiting for the one GPU (fair turns in the engine); alone, 16 is plenty.
    demo.queue(default_concurrency_limit=1, max_size=64 if getattr(engine, "studio", None) is not None else 16)
    return demo


def blocked_paths(data_dir: str | os.PathLike, extra: list[str | os.PathLike] = ()) -> list[str]:
    """Everything under the data dir except Gradio's own temp folder, plus `extra` and the HF token folder.

    Gradio checks blocked_paths before everything else, so blocking the whole data dir would also block the
    temp folder the launcher puts inside it (GRADIO_TEMP_DIR), and then no upload or result could be served.
    """
    data = Path(data_dir).expanduser().resolve()
    temp = Path(get_upload_folder()).resolve()
    hf_home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    out = [Path(p).expanduser().resolve() for p in extra] + [hf_home]
    if not temp.is_relative_to(data):
        return [str(p) for p in [data, *out]]
    entries = {data / n for n in DATA_ENTRIES} | (set(data.iterdir()) if data.is_dir() else set())
    # Entries that hold the temp folder cannot be blocked as a whole; everything beside it still is.
    for e in sorted(entries):
        if temp == e or temp.is_relative_to(e):
            continue
        out.append(e)
    return [str(p) for p in out]


def launch_options(data_dir: str | os.PathLike, extra_blocked: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """The hardened keyword arguments for `launch()` (RELIABILITY §2, names as in Gradio 6.31)."""
    return dict(
        max_file_size="25mb",  # images only; model files are picked by path, never uploaded
        blocked_paths=blocked_paths(data_dir, extra_blocked),
        allowed_paths=[],
        enable_monitoring=False,  # None (the default) would expose /monitoring
        strict_cors=True,  # refuse `Origin: null` requests to a localhost app
        ssr_mode=False,  # no Node server process
        show_error=False,  # our errors are gr.Error, which Gradio always shows; others stay in the terminal
        footer_links=["gradio", "settings"],  # no "api" link: the API is not a supported surface
        max_threads=8,
        theme=gr.themes.Soft(),
        css=CSS,
    )
