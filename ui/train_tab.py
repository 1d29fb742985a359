"""The Train tab: images in, a form wired to `TrainConfig` by field name, live progress, a style out.

The work is in `ui.train_handlers.TrainHandlers` (its form part in ui.train_form); `build_train_tab` only lays out
components and maps names to components.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.core.train_config import LR_SCHEDULERS, MIXED_PRECISION, PRIOR_TARGETS, REPORT_TO, TrainConfig

from .forms import int_fields
from .session import user_of

from .train_form import EXAMPLES, INT_FIELDS, MAX_IMAGES, MIN_IMAGES, PROMPT_FIELDS, default_values
from .train_handlers import TrainHandlers
from .train_plots import eval_frame, loss_frame


@dataclass
class TrainTab:
    """What `build_train_tab` made, so the app and tests can reach components by name."""

    fields: dict[str, gr.components.Component]
    inputs: dict[str, gr.components.Component]  # images, style_name, class_noun: form parts outside TrainConfig
    outputs: dict[str, gr.components.Component]
    handlers: TrainHandlers
    runs: gr.Dropdown  # resumable runs; the app refreshes it on page load and tab select
    train_event: Any
    resume_event: Any
    runs_for: Any = None  # fn(request) -> the runs dropdown for who is asking (page load, tab select)


# The Advanced accordion, row by row: (field, kind, label, extra keyword arguments).
ADVANCED = [
    [("train_text_encoder", "check", "Train the text encoder", {}),
     ("text_encoder_lr", "float", "Text-encoder LR", {}),
     ("text_encoder_stop_fraction", "fraction", "Stop the text encoder after (fraction of steps)", {})],
    [("lora_rank", "int", "LoRA rank", {"minimum": 1}), ("lora_alpha", "int", "LoRA alpha", {"minimum": 1}),
     ("train_batch_size", "int", "Batch", {"minimum": 1}),
     ("gradient_accumulation_steps", "int", "Gradient accumulation", {"minimum": 1})],
    [("lr_scheduler", LR_SCHEDULERS, "LR schedule", {}), ("lr_warmup_steps", "int", "Warm-up steps", {}),
     ("max_grad_norm", "float", "Max grad norm", {}), ("seed", "int", "Seed", {})],
    [("mixed_precision", MIXED_PRECISION, "Mixed precision", {"info": "fp16/bf16 need a GPU"}),
     ("gradient_checkpointing", "check", "Gradient checkpointing", {"info": "less memory, slower"}),
     ("use_8bit_adam", "check", "8-bit Adam", {"info": "CUDA only"}),
     ("cache_latents", "check", "Cache latents", {"info": "encode images once; needs center crop"})],
    [("snr_gamma", "float", "Min-SNR γ (0 = off)", {}), ("noise_offset", "fraction", "Noise offset", {}),
     ("caption_dropout", "fraction", "Caption dropout",
      {"info": "share of steps on the instance prompt instead of the image's caption"}),
     ("max_nonfinite_steps", "int", "Stop after N NaN steps", {"minimum": 1})],
    [("min_timestep", "int", "Min timestep (of 1000)", {"minimum": 0, "info": "higher: more detail, less layout"}),
     ("max_timestep", "int", "Max timestep (of 1000)",
      {"minimum": 1, "info": "lower: a style keys less on its images' layouts"}),
     ("uncond_preservation_weight", "float", "Keep the empty prompt's prediction (weight, 0 = off)",
      {"info": "style: guidance then amplifies the style instead of cancelling it; ~1.8x time per step"})],
    [("resolution", "int", "Resolution (0 = the model's)", {"step": 8}),
     ("center_crop", "check", "Center crop", {}), ("random_flip", "check", "Random flip", {})],
    [("num_class_images", "int", "Class images", {"minimum": 1}),
     ("prior_loss_weight", "float", "Prior loss weight", {}),
     ("prior_target", PRIOR_TARGETS, "Prior target",
      {"info": "images: the class images' noise (DreamBooth); base: the base model's prediction (LoRA only)"}),
     ("onpolicy_prior_weight", "float", "Prior on the LoRA's own samples (weight, 0 = off)",
      {"info": "holds class prompts to the base model mid-sampling; LoRA with priors; ~2.3x work per step"})],
    [("extract_rank", "int", "Extracted LoRA rank (full fine-tuning)", {"minimum": 1}),
     ("extract_energy", "fraction", "…or keep this share of each layer's change (0 = fixed rank)", {})],
    [("checkpointing_steps", "int", "Checkpoint every N steps", {}),
     ("checkpoints_total_limit", "int", "Checkpoints to keep", {"minimum": 1}),
     ("report_to", REPORT_TO, "Report to", {}), ("output_name", "text", "LoRA file name", {})],
    [("validation_prompts", "text", "Preview prompts (one per line)", {"lines": 2, "scale": 3}),
     ("validation_steps", "int", "Preview every N steps (0 = off)", {"scale": 1})],
    [("eval_seeds", "int", "Evaluation seeds per prompt at each checkpoint (0 = off)", {"scale": 1}),
     ("eval_fidelity_floor", "fraction", "Best checkpoint keeps prompt fidelity ≥ this × the base model's",
      {"scale": 1}),
     ("eval_prompts", "text", "Evaluation prompts (one per line; empty = built in)", {"lines": 2, "scale": 2})],
    [("unet_target_modules", "text", "UNet LoRA modules (comma list)", {})],
    [("text_encoder_target_modules", "text", "Text-encoder LoRA modules (comma list)", {})],
]


def _component(kind, value, label: str, **kw) -> gr.components.Component:
    if isinstance(kind, tuple):
        return gr.Dropdown(list(kind), value=value, label=label, **kw)
    if kind == "check":
        return gr.Checkbox(value=value, label=label, **kw)
    if kind == "fraction":
        return gr.Slider(0, 1, value=value, step=0.01, label=label, **kw)
    if kind == "text":
        return gr.Textbox(value=value, label=label, **kw)
    kw.setdefault("minimum", 0)  # TrainConfig gives the precise message for anything else out of range
    return gr.Number(value=value, label=label, precision=0 if kind == "int" else None, **kw)



def _form(d: dict[str, Any]) -> dict[str, gr.components.Component]:
    """The components, one per TrainConfig form field, keyed by field name."""
    f: dict[str, gr.components.Component] = {}
    f["preset"] = gr.Radio([("Subject", "subject"), ("Style", "style")], value=d["preset"], label="Preset",
                           info="subject: one thing (a character, an object); style: a look across many things",
                           elem_id="preset")
    f["method"] = gr.Radio([("LoRA", "lora"), ("Full fine-tuning", "full")], value=d["method"], label="Method",
                           info="LoRA: small adapters, little memory. Full: every UNet and text-encoder weight trains "
                                "(VAE frozen), needs far more GPU memory and disk (use gradient checkpointing / "
                                "8-bit Adam and a lower learning rate); saves a model folder and a LoRA extracted "
                                "from it for the library", elem_id="method")
    f["instance_prompt"] = gr.Textbox(label="Instance prompt", value=d["instance_prompt"], elem_id="instance-prompt",
                                      info="describes your images; must contain the trigger word")
    f["class_prompt"] = gr.Textbox(label="Class prompt", value=d["class_prompt"], lines=1, max_lines=8,
                                   info="the general class, without the trigger (for prior preservation); "
                                        "several, one per line, spread the class images over its variety")
    f["with_prior_preservation"] = gr.Checkbox(value=d["with_prior_preservation"], label="Prior preservation",
                                               info="keeps the class word itself from turning into your subject, at some "
                                                    "cost to likeness; generates class images first")
    with gr.Row():
        f["max_train_steps"] = gr.Number(value=d["max_train_steps"], precision=0, minimum=1, label="Steps",
                                         elem_id="train-steps")
        f["learning_rate"] = gr.Number(value=d["learning_rate"], minimum=0, label="Learning rate (UNet)")
    return f


def _advanced(d: dict[str, Any]) -> dict[str, gr.components.Component]:
    f: dict[str, gr.components.Component] = {}
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        for row in ADVANCED:
            with gr.Row():
                for name, kind, label, kw in row:
                    f[name] = _component(kind, d[name], label, elem_id=name.replace("_", "-"), **kw)
    return f


def build_train_tab(engine) -> TrainTab:
    """Lay out the tab inside the current gr.Blocks and wire its events by name."""
    h = TrainHandlers(engine)
    d = default_values()
    with gr.Row():
        with gr.Column(scale=1):
            ins = {"images": gr.File(label=f"Training images ({MIN_IMAGES}–{MAX_IMAGES}), with optional .txt captions",
                                     file_count="multiple",
                                     file_types=["image", ".txt"], elem_id="train-images", height=140)}
            with gr.Row():
                ex = {k: gr.Button(f"Try the {k} example ({EXAMPLES[k][0]})", size="sm") for k in EXAMPLES}
            ins["style_name"] = gr.Textbox(label="Style name", placeholder="e.g. my heart shape", elem_id="style-name")
            with gr.Row(equal_height=True):
                ins["class_noun"] = gr.Textbox(value="shape", label="Class noun", scale=2,
                                               info="what it is: shape, dog, painting")
                trigger = gr.Textbox(value=d["trigger_token"], label="Trigger word", scale=2,
                                     info="changing it or the class noun rewrites the prompts")
                suggest = gr.Button("Suggest", size="sm", scale=1)
            fields = {"trigger_token": trigger, **_form(d)}
            with gr.Row():
                go = gr.Button("Train", variant="primary", elem_id="train")
                stop = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
            fields.update(_advanced(d))
            assert int_fields(TrainConfig, fields) == INT_FIELDS, "an int field needs a Number box"
            with gr.Row():
                save = gr.Button("Save config (TOML)", size="sm")
                # The TOML travels with its images and captions (pick them together): a config loaded here never
                # reads a path on the server (TrainHandlers.load_config).
                load = gr.UploadButton("Load config (TOML + its images)", file_types=[".toml", "image", ".txt"],
                                       file_count="multiple", size="sm", elem_id="load-config")
            config_file = gr.File(label="run.toml", interactive=False, visible=False, elem_id="config-file")
            with gr.Accordion("Interrupted runs", open=True):
                runs = gr.Dropdown(h.resumable_runs(), label="Runs that can be resumed", elem_id="runs")
                with gr.Row():
                    refresh = gr.Button("Refresh", size="sm")
                    resume = gr.Button("Resume", size="sm", elem_id="resume")
        with gr.Column(scale=1):
            outs = {"status": gr.Textbox("Ready.", label="Status", interactive=False, elem_id="train-status"),
                    "loss_plot": gr.LinePlot(loss_frame([], []), x="step", y="loss", title="Loss", height=220,
                                             elem_id="loss-plot"),
                    "previews": gr.Gallery(label="Previews", columns=4, height=200, elem_id="train-previews"),
                    "log": gr.Textbox(label="Log", lines=6, max_lines=10, autoscroll=True, interactive=False,
                                      elem_id="train-log"),
                    "eval_plot": gr.LinePlot(eval_frame(()), x="step", y="score", color="metric",
                                             title="Likeness and prompt fidelity per checkpoint", height=220,
                                             elem_id="eval-plot"),
                    "eval_note": gr.Markdown(elem_id="eval-note"),
                    "eval_grid": gr.Gallery(label="Evaluation grid (fixed seeds)", columns=4, height=160,
                                            elem_id="eval-grid"),
                    "eval_run": gr.State("")}
            with gr.Row(equal_height=True):
                outs["checkpoint"] = gr.Dropdown([], label="Checkpoint", elem_id="eval-checkpoint", scale=3,
                                                 info="evaluated checkpoints of this run; the best one is selected")
                publish = gr.Button("Publish this checkpoint as the style", size="sm", scale=1,
                                    elem_id="publish-checkpoint")
            outs["result"] = gr.Markdown(elem_id="train-result")
            outs["result_image"] = gr.Image(label="Preview grid of the new style", type="pil", interactive=False,
                                            height=200, elem_id="train-result-image")
    comps = {**fields, **ins, **outs, "config_file": config_file, "runs": runs}

    def to_components(update: dict) -> dict:
        return {comps[k]: v for k, v in update.items()}

    def on_train(request: gr.Request, images=None, style_name="", progress=gr.Progress(), **values):
        for update in h.train(images, style_name, values, progress, user=user_of(engine, request)):
            yield to_components(update)

    def on_resume(request: gr.Request, run_id=None, progress=gr.Progress()):
        for update in h.resume(run_id, progress, user=user_of(engine, request)):
            yield to_components(update)

    def on_cancel(request: gr.Request):
        return to_components(h.cancel(user=user_of(engine, request)))

    def on_suggest(request: gr.Request, t, k, n):
        return to_components(h.suggest_token(t, k, n, user=user_of(engine, request)))

    def on_publish(request: gr.Request, run_id, step):
        return to_components(h.publish_checkpoint(run_id, step, user=user_of(engine, request)))

    def on_runs(request: gr.Request):
        return h.runs_dropdown(user_of(engine, request))

    results = [*outs.values(), runs]
    gpu = dict(concurrency_id="gpu", concurrency_limit=1, show_progress_on=[outs["status"]])
    ev = go.click(on_train, inputs_kwargs={**fields, "images": ins["images"], "style_name": ins["style_name"]},
                  outputs=results, api_name="train", **gpu)
    rev = resume.click(on_resume, inputs_kwargs={"run_id": runs}, outputs=results, api_visibility="private", **gpu)
    # Not queued behind the job it stops: engine.cancel() stops the worker, cancels=[...] the UI side.
    stop.click(on_cancel, None, [outs["status"], runs], cancels=[ev, rev], queue=False,
               api_visibility="private")
    form = [*fields.values(), ins["images"], ins["style_name"], ins["class_noun"], outs["status"]]
    key = [fields["preset"], trigger, ins["class_noun"]]
    prompt_outs = [fields[k] for k in PROMPT_FIELDS]
    # `.input`, not `.change`: loading a TOML sets the preset too, and must not be overwritten by the preset.
    fields["preset"].input(lambda *a: to_components(h.preset(*a)), key, list(fields.values()), queue=False,
                           api_visibility="private")
    fields["method"].input(lambda *a: to_components(h.method(*a)),
                           [fields["method"], fields["preset"], fields["learning_rate"], fields["text_encoder_lr"],
                            fields["uncond_preservation_weight"], fields["prior_target"],
                            fields["onpolicy_prior_weight"]],
                           [fields["learning_rate"], fields["text_encoder_lr"], fields["uncond_preservation_weight"],
                            fields["prior_target"], fields["onpolicy_prior_weight"], outs["status"]], queue=False,
                           api_visibility="private")
    fields["with_prior_preservation"].input(
        lambda *a: to_components(h.prior(*a)),
        [fields["with_prior_preservation"], fields["preset"], fields["learning_rate"], fields["text_encoder_lr"],
         fields["uncond_preservation_weight"], fields["min_timestep"]],
        [fields["uncond_preservation_weight"], fields["min_timestep"], outs["status"]], queue=False,
        api_visibility="private")
    gr.on([trigger.blur, trigger.submit, ins["class_noun"].blur, ins["class_noun"].submit],
          lambda *a: to_components(h.prompts(*a)), key, prompt_outs, queue=False, api_visibility="private")
    suggest.click(on_suggest, [trigger, fields["preset"],
                  ins["class_noun"]], [trigger, *prompt_outs], queue=False, api_visibility="private")
    for name, button in ex.items():
        button.click(lambda name=name: to_components(h.example(name)), None, form, api_visibility="private")

    def on_save(images=None, **values):
        out = h.save_config(values, images)
        return {config_file: gr.File(out["config_file"], visible=True), outs["status"]: out["status"]}

    save.click(on_save, inputs_kwargs={**fields, "images": ins["images"]}, outputs=[config_file, outs["status"]],
               api_visibility="private")
    load.upload(lambda p: to_components(h.load_config(p)), [load], form, api_visibility="private")
    refresh.click(on_runs, None, [runs], queue=False, api_visibility="private")
    publish.click(on_publish, [outs["eval_run"], outs["checkpoint"]], [outs["status"]], api_visibility="private")
    return TrainTab(fields, ins, outs, h, runs, ev, rev, on_runs)
