"""The Generate tab: a form wired to `GenerateRequest` by field name, a live preview, a gallery and downloads.

The work lives in `GenerateHandlers`, plain methods that take and return dicts keyed by *names* (request field
names for the form, "gallery"/"preview"/"files"/"status" for results), so tests drive them without a browser.
`build_generate_tab` only lays out components and maps names to components.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
from PIL import UnidentifiedImageError

from engine.core.config import SCHEDULER_LABELS, SCHEDULERS, ConfigError, GenerateRequest, style_pairs
from engine.core.events import GenerateResult, Queued

from .batch_panel import build_batch_panel
from .downloads import copy_for_download

from .forms import int_fields, whole_numbers
from .session import user_of

# Every GenerateRequest field the user sets; schema_version belongs to the file format, not to the form.
FIELD_NAMES = tuple(f.name for f in dataclasses.fields(GenerateRequest) if f.name != "schema_version")
# The form shows every int field with a Slider or a Number, which send floats (build_generate_tab checks this).
INT_FIELDS = tuple(f.name for f in dataclasses.fields(GenerateRequest) if f.type == "int" and f.name in FIELD_NAMES)
MAX_SEED = 2**32 - 1
EXTRA_STYLES = 2  # extra style rows in the form (a recipe may carry more: they ride along in `styles`)
STATUS_EVERY_S = 0.25  # a websocket message per denoising step is wasteful; the progress bar shows every step



def default_values() -> dict[str, Any]:
    """The form's starting values: the dataclass defaults, and an empty prompt."""
    out = {}
    for f in dataclasses.fields(GenerateRequest):
        if f.name in FIELD_NAMES:
            out[f.name] = "" if f.default is dataclasses.MISSING else f.default
    return out


class GenerateHandlers:
    """What the Generate tab's buttons do, as plain methods over one Engine."""

    def __init__(self, engine, user: str = "local"):
        self.engine = engine
        self.user = user  # whose jobs this tab starts and cancels (one local user until studio accounts exist)
        self._last_paths: dict[str, list] = {}  # user -> the engine's paths of their last result (rating row)

    def last_paths_for(self, user: str) -> list:
        """The engine's own paths of `user`'s last generated images (what the rating row under the gallery rates)."""
        return self._last_paths.get(user, [])

    def request(self, values: dict[str, Any]) -> GenerateRequest:
        """Build the request by field name; a bad value becomes a gr.Error with the engine's message."""
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:  # a wiring bug, not a user error: fail loudly
            raise KeyError(f"not GenerateRequest fields: {unknown}")
        clean = {k: v for k, v in values.items() if v is not None}  # an emptied Number box falls back to its default
        clean = whole_numbers(clean, INT_FIELDS)
        try:
            return GenerateRequest(**clean)
        except ConfigError as e:
            raise gr.Error(str(e)) from None
        except TypeError as e:  # a direct API call sent e.g. a list where a number belongs
            raise gr.Error(f"invalid value in the request: {e}") from None

    def generate(self, values: dict[str, Any], progress=None, user: str | None = None) -> Iterator[dict[str, Any]]:
        """Yield partial updates {status, preview} while sampling, then {gallery, files, status, preview}.
        `user`: who asks (ui.session.user_of), else this tab's default user."""
        user = user or self.user
        req = self.request(values)
        last = 0.0
        try:
            for ev in self.engine.generate_iter(req, user=user):
                if isinstance(ev, GenerateResult):
                    self._last_paths[user] = [img.path for img in ev.images]
                    yield self._result(ev, req)
                    return
                if isinstance(ev, Queued):  # waiting behind other jobs (fair across users)
                    yield {"status": ev.message}
                    continue
                if progress is not None:
                    progress((ev.done, ev.total), desc=ev.message, unit="steps")
                now = time.monotonic()
                if ev.preview is not None or now - last >= STATUS_EVERY_S:
                    last = now
                    update = {"status": ev.message}
                    if ev.preview is not None:
                        update["preview"] = ev.preview
                    yield update
        except GeneratorExit:
            # Gradio closed the generator: the browser went away, or Cancel (whose own handler stops the job,
            # `cancel` below). A job whose page went away runs on and is found again under My jobs (GR-12).
            raise
        except ValueError as e:  # ConfigError, ModelLoadError and other checks carry user-facing messages
            raise gr.Error(str(e)) from None
        except MemoryError:
            raise gr.Error("Out of memory: lower the batch size or the image size, then try again.") from None

    def _result(self, result, req: GenerateRequest) -> dict[str, Any]:
        paths = copy_for_download([img.path for img in result.images])
        gallery = [(str(p), f"seed {img.recipe.get('seed', '?')}") for p, img in zip(paths, result.images)]
        n = len(result.images)
        if result.cancelled:
            status = f"Cancelled after {n} of {req.num_images} image(s) ({result.seconds:.1f} s)."
        else:
            status = f"Done: {n} image(s) in {result.seconds:.1f} s."
        return {"gallery": gallery, "files": [str(p) for p in paths] or None, "status": status, "preview": None}

    def cancel(self, wait_s: float = 30.0, user: str | None = None) -> dict[str, Any]:
        """Really stop this tab's generation within one denoising step (Gradio's own cancel only stops the UI).

        Answers only once the worker has stopped: the run's last progress message then reaches the page before
        this one, so the status ends on "Cancelled." however busy the machine is, never on a stale step count.
        """
        user = user or self.user
        self.engine.cancel(kind="generate", user=user)
        stopped = self.engine.wait_for_jobs(kind="generate", user=self.engine.caller(user).name, timeout=wait_s)
        return {"status": "Cancelled." if stopped else "Stopping after the current step…"}

    @staticmethod
    def random_seed() -> dict[str, Any]:
        return {"seed": random.randint(0, MAX_SEED)}

    def style_choices(self, user: str | None = None) -> list[tuple[str, str]]:
        """(label, id) for the Style dropdown: "no style" first, then the styles `user` may use, newest first
        (instant styles have their own picker)."""
        # Built before anyone asks (the page layout): in studio mode nobody's styles go into it.
        anonymous = user is None and getattr(self.engine, "studio", None) is not None
        styles = self.engine.list_styles(user=user or self.user) if self.engine is not None and not anonymous else []
        return [("No style", "")] + [(s.label, s.id) for s in styles if s.kind != "instant"]

    def instant_choices(self, user: str | None = None) -> list[tuple[str, str]]:
        """(label, id) for the Instant style dropdown: styles with an instant version (reference images)."""
        anonymous = user is None and getattr(self.engine, "studio", None) is not None
        styles = self.engine.library_list(user=user or self.user) if self.engine is not None and not anonymous else []
        return [("No instant style", "")] + [(f"{s.name} ({s.id})", s.id) for s in styles
                                             if any(v.kind == "instant" for v in s.versions)]

    def instant_dropdown(self) -> gr.Dropdown:
        return gr.Dropdown(choices=self.instant_choices())

    def style_dropdown(self, request: gr.Request = None) -> gr.Dropdown:
        """The Style dropdown with fresh choices (styles trained since the page was built) for who is asking."""
        return gr.Dropdown(choices=self.style_choices(user_of(self.engine, request) if request is not None
                                                      else None))

    def style_dropdowns(self, n: int, user: str | None = None) -> list[gr.Dropdown]:
        """`n` style dropdowns with fresh choices (the Style picker, the extra styles, the batch panel's) for
        `user` (ui.session.user_of)."""
        choices = self.style_choices(user)
        return [gr.Dropdown(choices=choices) for _ in range(n)]

    def load_recipe(self, path: str | Path | None) -> dict[str, Any]:
        """Form values (by field name) from a dropped PNG's recipe, plus a status line.

        The file is untrusted: values of the wrong type are ignored (and named in the status), and the rest must
        make a valid GenerateRequest, or a gr.Error says what is wrong and the form stays as it was.
        """
        if not path:
            return {}
        try:
            recipe = self.engine.read_recipe(path)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL raises SyntaxError on broken PNG chunks
            raise gr.Error(f"Could not read that image ({type(e).__name__}); drop a PNG file.") from None
        except ValueError as e:  # RecipeError: too large, not a regular file, over-long or over-nested text
            raise gr.Error(f"Could not use that image's recipe: {e}.") from None
        if not recipe:
            return {"status": "That image carries no Stylebooth or A1111 recipe; the form is unchanged."}
        out, ignored = {}, []
        for k, v in recipe.items():
            if k in FIELD_NAMES and k != "styles":
                value = _as_field_type(k, v)
                (ignored.append(k) if value is None else out.__setitem__(k, value))
        if isinstance(out.get("prompt"), str) and not out["prompt"].strip():
            del out["prompt"]  # an empty prompt (A1111 allows it) would only blank the form's prompt
        note = ""
        if isinstance(recipe.get("styles"), list):
            # A recipe lists every style it applied; the first goes to the Style dropdown, the rest ride along.
            try:
                listed = list(style_pairs(recipe["styles"], "recipe styles"))
            except ConfigError:
                listed = []
            known = {sid for _, sid in self.style_choices()}
            missing = [sid for sid, _ in listed if sid not in known]
            if missing:
                # The dropdown would refuse an unknown id at Generate time; say so now instead.
                note = "".join(f" Its style {m!r} is not in this library, so it is not selected." for m in missing)
            kept = [(sid, w) for sid, w in listed if sid in known]
            out["style"], out["style_strength"] = kept[0] if kept else ("", listed[0][1] if listed else 1.0)
            out["styles"] = tuple(kept[1:])
            if kept[1:]:
                note += f" Plus {len(kept) - 1} more style(s): {', '.join(f'{s} ({w:g})' for s, w in kept[1:])}."
        if out.get("style") and out["style"] not in {sid for _, sid in self.style_choices()}:
            # The dropdown would refuse an unknown id at Generate time; say so now instead.
            note += f" Its style {out.pop('style')!r} is not in this library, so no style is selected."
            out["style"] = ""
        # The same checks as Generate (engine/core/config.py), so a recipe that fills the form can be generated.
        # A placeholder prompt stands in when the recipe has none; the form keeps its own.
        try:
            req = GenerateRequest(**{**default_values(), "prompt": "-", **out})
        except (ConfigError, TypeError) as e:
            raise gr.Error(f"That image's recipe cannot be used: {str(e)[:300]}. The form is unchanged.") from None
        out = {k: getattr(req, k) for k in out}  # validated and coerced (20.0 -> 20)
        if ignored:
            note += f" Ignored setting(s) of the wrong type: {', '.join(sorted(ignored))}."
        out["status"] = f"Recipe loaded: {len(out)} setting(s) from the image.{note} Press Generate to reuse it."
        return out


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(GenerateRequest)}


def _as_field_type(name: str, value: Any) -> Any:
    """Recipes come from files other tools wrote: keep only values of the field's type (None drops the value).

    Numbers keep their value (no silent int(7.5) -> 7, no OverflowError on a JSON 1e400 = inf); GenerateRequest
    then refuses what is out of range or not whole, with a message.
    """
    kind = _FIELD_TYPES[name]
    if kind in ("bool", bool):
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):  # JSON true is an int to Python, but never a number here
        return None
    if kind in ("int", int, "float", float):
        if isinstance(value, str):
            try:
                value = float(value.strip()) if kind in ("float", float) else int(value.strip())
            except ValueError:
                return None
        if not isinstance(value, (int, float)):
            return None
        if kind in ("float", float):
            try:
                return float(value)
            except OverflowError:  # an integer too large for a float
                return float("inf")  # GenerateRequest names the field and the range
        return value
    if name == "scheduler" and value not in SCHEDULERS:
        return None
    return value if isinstance(value, str) else None


@dataclass
class GenerateTab:
    """What `build_generate_tab` made, so the app and tests can reach components by name."""

    fields: dict[str, gr.components.Component]
    outputs: dict[str, gr.components.Component]
    handlers: GenerateHandlers
    generate_button: gr.Button
    cancel_button: gr.Button
    generate_event: Any
    style_dropdowns: list  # every dropdown that lists styles (refreshed when styles are trained or imported)


def _form(d: dict[str, Any], styles: list[tuple[str, str]],
          instant: list[tuple[str, str]] = ()) -> dict[str, gr.components.Component]:
    """The components, one per GenerateRequest field, keyed by field name."""
    sched = [(SCHEDULER_LABELS.get(k, k), k) for k in SCHEDULERS]
    f: dict[str, gr.components.Component] = {}
    f["prompt"] = gr.Textbox(label="Prompt", lines=2, value=d["prompt"], max_length=2000,
                             placeholder="e.g. a red circle on a blue background", elem_id="prompt")
    f["prompt_per_line"] = gr.Checkbox(value=d["prompt_per_line"], label="One prompt per line",
                                       info="every line is its own prompt; all lines run together in one batch",
                                       elem_id="prompt-per-line")
    f["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=1, value=d["negative_prompt"], max_length=2000,
                                      placeholder="what to avoid, e.g. blurry")
    with gr.Row(equal_height=True):
        f["style"] = gr.Dropdown(styles, value=d["style"], label="Style", scale=4, elem_id="style",
                                 info="a trained style; its trigger word is added to the prompt if missing")
        f["style_strength"] = gr.Slider(-2, 2, value=d["style_strength"], step=0.05, label="Style strength",
                                        scale=3)
    # More styles at once, (id, strength) pairs: set by the "More styles" rows below (build_generate_tab wires
    # them) or by a dropped recipe; the request takes them by this field name.
    f["styles"] = gr.State(value=d["styles"])
    with gr.Row(equal_height=True):  # an instant style (IP-Adapter) on top of the LoRA styles
        f["instant_style"] = gr.Dropdown(instant, value=d["instant_style"], label="Instant style", scale=4,
                                         elem_id="instant-style", info="reference images, no training")
        f["instant_strength"] = gr.Slider(0, 2, value=d["instant_strength"], step=0.05, label="Instant strength",
                                          scale=2)
        f["instant_style_only"] = gr.Checkbox(value=d["instant_style_only"], label="Style only", scale=1,
                                              info="off: style and content")
    with gr.Row():
        f["num_inference_steps"] = gr.Slider(1, 150, value=d["num_inference_steps"], step=1, label="Steps",
                                             elem_id="steps")
        f["guidance_scale"] = gr.Slider(0, 30, value=d["guidance_scale"], step=0.5, label="Guidance scale")
    with gr.Row():
        f["width"] = gr.Slider(0, 2048, value=d["width"], step=8, label="Width (0 = the model's size)")
        f["height"] = gr.Slider(0, 2048, value=d["height"], step=8, label="Height (0 = the model's size)")
    with gr.Row():
        f["batch_size"] = gr.Slider(1, 8, value=d["batch_size"], step=1, label="Images per batch")
        f["batch_count"] = gr.Slider(1, 16, value=d["batch_count"], step=1, label="Batches", elem_id="batches")
    with gr.Row(equal_height=True):
        f["seed"] = gr.Number(value=d["seed"], precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                              info="image k uses seed + k", scale=3)
        f["scheduler"] = gr.Dropdown(sched, value=d["scheduler"], label="Sampler", scale=3)
    with gr.Accordion("Advanced", open=False):
        f["guidance_rescale"] = gr.Slider(0, 1, value=d["guidance_rescale"], step=0.05, label="Guidance rescale",
                                          info="0.7 helps v-prediction models that look washed out")
    return f


def build_generate_tab(engine) -> GenerateTab:
    """Lay out the tab inside the current gr.Blocks and wire its events by name."""
    h = GenerateHandlers(engine)
    with gr.Row():
        with gr.Column(scale=1):
            fields = _form(default_values(), h.style_choices(), h.instant_choices())
            assert int_fields(GenerateRequest, fields) == INT_FIELDS, "an int field needs a Slider or Number"
            dice = gr.Button("Random seed", size="sm")
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
            examples = engine.example_prompts() if engine is not None else []
            if examples:
                gr.Examples(examples=[[p] for p in examples], inputs=[fields["prompt"]], label="Example prompts")
            with gr.Accordion("More styles at once", open=False):
                gr.Markdown("Each extra style adds its learned change times its strength, on top of the Style above.")
                extra = []
                for k in range(EXTRA_STYLES):
                    with gr.Row(equal_height=True):
                        extra.append(gr.Dropdown(h.style_choices(), value="", label=f"Extra style {k + 1}", scale=3,
                                                 elem_id=f"extra-style-{k}"))
                        extra.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", scale=2))
            drop = gr.Image(label="Drop a Stylebooth/A1111 PNG to reuse its recipe", type="filepath",
                            image_mode=None, sources=["upload", "clipboard"], height=160,
                            elem_id="recipe-drop")
        with gr.Column(scale=1):
            outs = {"status": gr.Markdown("Ready.", elem_id="status"),
                    "preview": gr.Image(label="Preview", type="pil", interactive=False, height=200),
                    "gallery": gr.Gallery(label="Results", columns=4, height=360, format="png",
                                          buttons=["download", "fullscreen"], elem_id="gallery"),
                    "files": gr.File(label="Download PNGs (with recipe)", file_count="multiple",
                                     interactive=False)}

    batch = build_batch_panel(engine, fields, h.style_choices())

    def more_styles(*rows):
        return tuple((sid, float(w)) for sid, w in zip(rows[0::2], rows[1::2]) if sid)

    def on_generate(request: gr.Request, progress=gr.Progress(), **values):
        # `inputs_kwargs=fields` hands the values over by field name (the API uses the same names); order never
        # matters. Gradio fills `progress` with a tracker and `request` with the caller (its login) for this request.
        for update in h.generate(values, progress, user=user_of(engine, request)):
            yield {outs[k]: v for k, v in update.items()}

    def to_components(update: dict) -> dict:
        return {(fields.get(k) or outs[k]): v for k, v in update.items()}

    ev = go.click(on_generate, inputs_kwargs=fields, outputs=list(outs.values()), concurrency_id="gpu",
                  concurrency_limit=1, show_progress_on=[outs["gallery"]], api_name="generate")
    # Not queued behind the GPU job it has to stop; engine.cancel() stops the worker, cancels=[ev] the UI side.
    def on_cancel(request: gr.Request):
        return to_components(h.cancel(user=user_of(engine, request)))

    stop.click(on_cancel, None, [outs["status"]], cancels=[ev], queue=False,
               api_visibility="private")
    dice.click(lambda: to_components(h.random_seed()), None, [fields["seed"]], queue=False,
               api_visibility="private")
    drop.upload(lambda p: to_components(h.load_recipe(p)), [drop], [*fields.values(), outs["status"]],
                api_visibility="private")
    for comp in extra:  # any change of the "More styles" rows rewrites the `styles` field
        comp.change(more_styles, extra, [fields["styles"]], queue=False, api_visibility="private")
    return GenerateTab(fields, outs, h, go, stop, ev, [fields["style"], *extra[0::2], *batch["refresh_styles"]])
