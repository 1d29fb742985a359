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

from .generate_tab import build_generate_tab
from .library_tab import build_library_tab
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

    def switch_model(self, source: str | None) -> str:
        """Load another base model; on failure the old one stays and the message is shown once."""
        # In studio mode this must become an admin-only event (GR-9); until then see allowed().
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
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                train = build_train_tab(engine)
            with gr.Tab("Library", id="library", elem_id="tab-library") as lib_tab:
                library = build_library_tab(engine)
        # Loading a model competes with generation for the GPU: same concurrency id as Generate.
        load.click(h.switch_model, [source], [header], concurrency_id="gpu", concurrency_limit=1,
                   api_visibility="private")
        demo.load(lambda: h.header, None, [header], queue=False, api_visibility="private")
        # Styles trained since the app started (Train tab, CLI) show up on the next page load, when a training
        # run ends, and whenever the Generate tab is opened.
        style = dict(fn=gen.handlers.style_dropdown, inputs=None, outputs=[gen.fields["style"]], queue=False,
                     api_visibility="private")
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
        # Runs interrupted by a crash (or cancelled) while the page was closed show up in the Train tab.
        runs = dict(fn=train.handlers.runs_dropdown, inputs=None, outputs=[train.runs], queue=False,
                    api_visibility="private")
        demo.load(**runs)
        train_tab.select(**runs)
    demo.queue(default_concurrency_limit=1, max_size=16)
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
