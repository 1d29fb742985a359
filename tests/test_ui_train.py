"""The Train tab's handlers, called directly (no browser), against the tiny random model on CPU."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
import torch
from gradio.utils import get_upload_folder
from PIL import Image, ImageDraw

from engine.core.config import Settings
from engine.api import Engine
from engine.core.train_config import TRIGGER_CANDIDATES, TrainConfig, field_names, presets
from ui.app import build_app
from ui.generate_tab import GenerateHandlers
from ui.generate_tab import default_values as generate_defaults
from ui.train_form import DERIVED, FIELD_NAMES, default_values, to_form
from ui.train_handlers import TrainHandlers
from ui.train_tab import build_train_tab

torch.set_num_threads(1)  # two shared cores; tiny models only lose from more threads


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


@pytest.fixture()
def h(engine):
    return TrainHandlers(engine)


@pytest.fixture(autouse=True)
def fast_previews(monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)  # previews and the result grid: 2 denoising steps, not 20


def draw(n: int = 4, size: int = 64, folder: Path | None = None) -> list[str]:
    """Small drawn images, by default where Gradio keeps uploads (what the File component hands over)."""
    folder = folder or Path(tempfile.mkdtemp(prefix="test-train-", dir=get_upload_folder()))
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(img).ellipse([8 + i, 8, size - 8, size - 8 - i], fill=("red", "green", "blue", "orange")[i])
        img.save(folder / f"heart{i}.png")
        out.append(str(folder / f"heart{i}.png"))
    return out


def form(**kw):
    """A quick run: 4 steps, 2 prior images, a preview at steps 2 and 4, no tracker."""
    return {**default_values(), "max_train_steps": 4, "with_prior_preservation": True, "num_class_images": 2,
            "validation_steps": 2,
            "validation_prompts": "a photo of olis shape", "report_to": "none", "learning_rate": 1e-3, **kw}


def test_every_config_field_has_a_component_and_back():
    with gr.Blocks():
        tab = build_train_tab(engine=None)  # building touches no model
    assert set(tab.fields).isdisjoint(DERIVED) and set(tab.fields) | set(DERIVED) == set(field_names())
    assert set(tab.fields) == set(FIELD_NAMES)
    for name, comp in tab.fields.items():  # the form starts at the subject preset
        assert comp.value == default_values()[name], name
    h, images = TrainHandlers(None), draw(3)
    for kind in ("subject", "style"):  # form → TrainConfig → form → the same TrainConfig
        cfg = h.config(default_values(kind), images)
        assert cfg == TrainConfig(instance_images=tuple(images), **presets(kind))
        assert h.config(to_form(dataclasses.asdict(cfg)), images) == cfg
    with pytest.raises(KeyError, match="base_model"):
        h.config({"base_model": "x"}, images)  # derived fields have no component: a wiring bug


def test_presets_fill_the_form_and_prompts_follow_the_trigger(engine):
    h = TrainHandlers(engine)
    style = h.preset("style", "zyk", "painting")
    assert set(style) == set(FIELD_NAMES)
    assert style["instance_prompt"] == "a zyk style painting" and not style["with_prior_preservation"]
    assert style["random_flip"] and style["lora_rank"] == 8 and style["max_train_steps"] == 800
    subject = h.preset("subject", "", "")  # emptied boxes fall back to the defaults
    assert subject["instance_prompt"] == f"a photo of {TRIGGER_CANDIDATES[0]} shape"
    assert not subject["with_prior_preservation"] and subject["class_prompt"] == "a photo of shape"
    assert h.prompts("subject", "ohwx", "dog") == {
        "instance_prompt": "a photo of ohwx dog", "class_prompt": "a photo of dog",
        "validation_prompts": "a photo of ohwx dog\na photo of a red ohwx dog"}
    out = h.suggest_token("olis", "style", "shape")
    assert out["trigger_token"] != "olis" and out["trigger_token"] in TRIGGER_CANDIDATES
    assert out["instance_prompt"] == f"a {out['trigger_token']} style shape"


def test_example_fills_the_upload_and_the_preset(h):
    out = h.example("checkered")
    assert out["preset"] == "style" and out["class_noun"] == "shape" and len(out["images"]) == 8  # 4 + captions
    assert all(Path(p).is_relative_to(get_upload_folder()) for p in out["images"])  # servable under any launch
    cfg = h.config({k: v for k, v in out.items() if k in FIELD_NAMES}, out["images"])  # valid as it is
    assert len(cfg.instance_images) == 4 and all(p.endswith(".png") for p in cfg.instance_images)
    assert cfg.instance_captions[0] == "a olis circle in blue on a yellow background"  # {token} filled in
    changed = h.config({**{k: v for k, v in out.items() if k in FIELD_NAMES}, "trigger_token": "zyk",
                        "instance_prompt": "a zyk style shape"}, out["images"])
    assert changed.instance_captions[0] == "a zyk circle in blue on a yellow background"


def test_ticking_prior_preservation_on_the_demo_subject_sets_its_empty_prompt_term_and_timesteps(h):
    out = h.example("heart")
    assert (out["uncond_preservation_weight"], out["min_timestep"]) == (0.0, 100)  # the demo subject without priors
    args = ("subject", out["learning_rate"], out["text_encoder_lr"])
    on = h.prior(True, *args, out["uncond_preservation_weight"], out["min_timestep"])
    assert (on["uncond_preservation_weight"], on["min_timestep"]) == (5.0, 300)
    assert 'Keep the empty prompt\'s prediction" to 5' in on["status"] and '"Min timestep" to 300' in on["status"]
    assert h.prior(True, *args, 5.0, 300) == {}  # already set: nothing to say
    assert set(h.prior(True, *args, 5.0, 100)) == {"min_timestep", "status"}  # only what differs
    off = h.prior(False, *args, 5.0, 300)
    assert (off["uncond_preservation_weight"], off["min_timestep"]) == (0.0, 100)
    sd = presets("subject")  # Stable Diffusion's settings are the user's business: untouched
    assert h.prior(True, "subject", sd["learning_rate"], sd["text_encoder_lr"], 0.0, 0) == {}
    assert h.prior(True, "style", out["learning_rate"], out["text_encoder_lr"], 0.0, 0) == {}
    with pytest.raises(gr.Error, match="unknown preset"):
        h.prior(True, "../subject", 1e-3, 2e-4, 0.0, 0)
    with pytest.raises(gr.Error, match="invalid value"):
        h.prior(True, "subject", "1e-3; rm -rf /", 2e-4, 0.0, 0)
    with pytest.raises(gr.Error, match="invalid value"):
        h.prior(True, "subject", 1e-3, 2e-4, 0.0, "300 OR 1=1")


def test_switching_method_sets_its_learning_rates_and_keeps_the_users_own(h):
    for example, kind in (("heart", "subject"), ("checkered", "style")):
        out = h.example(example)  # the demo's LoRA rates for that preset
        full = h.method("full", kind, out["learning_rate"], out["text_encoder_lr"], out["uncond_preservation_weight"])
        assert (full["learning_rate"], full["text_encoder_lr"]) == (3e-5, 3e-5), example
        assert "full fine-tuning" in full["status"]
        # The style example keeps the empty prompt's prediction (a LoRA-only loss): full fine-tuning turns it off.
        assert (full.get("uncond_preservation_weight", out["uncond_preservation_weight"]) == 0.0
                and ("set to 0" in full["status"]) == (out["uncond_preservation_weight"] > 0)), example
        back = h.method("lora", kind, full["learning_rate"], full["text_encoder_lr"])
        assert (back["learning_rate"], back["text_encoder_lr"]) == (out["learning_rate"], out["text_encoder_lr"])
    sd = presets("subject")  # Stable Diffusion's LoRA rates -> DreamBooth's full fine-tuning rates
    assert h.method("full", "subject", sd["learning_rate"], sd["text_encoder_lr"])["learning_rate"] == 5e-6
    own = h.method("full", "subject", 7e-4, 1e-4)  # typed by the user: kept, and the note says to check them
    assert "learning_rate" not in own and "kept" in own["status"]
    cfg = h.config({**{k: v for k, v in out.items() if k in FIELD_NAMES}, "method": "full", **{
        k: full[k] for k in ("learning_rate", "text_encoder_lr", "uncond_preservation_weight")}}, out["images"])
    assert cfg.method == "full" and cfg.learning_rate == 3e-5
    # The base model's prediction as the prior target needs a LoRA too: full fine-tuning sets it back, and says so.
    base_target = h.method("full", "subject", 1e-3, 2e-4, 0.0, "base")
    assert base_target["prior_target"] == "images" and "Prior target set" in base_target["status"]
    assert "prior_target" not in h.method("full", "subject", 1e-3, 2e-4, 0.0, "images")
    assert "prior_target" not in h.method("lora", "subject", 3e-5, 3e-5, 0.0, "base")
    onpolicy = h.method("full", "subject", 1e-3, 2e-4, 0.0, "images", 5.0)  # it needs a LoRA under it too
    assert onpolicy["onpolicy_prior_weight"] == 0.0 and "own samples\" set to 0" in onpolicy["status"]
    assert "onpolicy_prior_weight" not in h.method("lora", "subject", 3e-5, 3e-5, 0.0, "images", 5.0)
    with pytest.raises(gr.Error, match="unknown method"):
        h.method("lora; rm -rf /", "subject", 1e-3, 2e-4)
    with pytest.raises(gr.Error, match="unknown preset"):
        h.method("full", "../style", 1e-3, 2e-4)


def test_toml_saved_by_the_ui_loads_back_to_the_same_config(h):
    images = draw(3)
    values = form(lora_rank=6, lora_alpha=12, seed=9, snr_gamma=0.0, lr_scheduler="cosine", lr_warmup_steps=1,
                  unet_target_modules="to_q, to_v", validation_prompts="a photo of olis shape\nolis on a table")
    cfg = h.config(values, images)
    saved = h.save_config(values, images)
    assert saved["config_file"].endswith("run.toml")
    loaded = h.load_config([saved["config_file"], *images])  # picked together, as the button takes them
    assert loaded.pop("status").startswith("Config loaded.") and loaded.pop("class_noun") == "shape"
    again = h.config(loaded, loaded.pop("images"))
    assert again == cfg  # every field, images included: the run it starts is the same run
    assert again.unet_target_modules == ("to_q", "to_v") and len(again.validation_prompts) == 2


def test_captions_survive_a_toml_round_trip(h):
    out = h.example("heart")
    values = {k: v for k, v in out.items() if k in FIELD_NAMES}
    cfg = h.config(values, out["images"])
    assert cfg.instance_captions[1] == "a photo of olis shape in yellow on a purple background"
    loaded = h.load_config([h.save_config(values, out["images"])["config_file"], *out["images"]])
    loaded.pop("status"), loaded.pop("class_noun")
    assert h.config(loaded, loaded.pop("images")) == cfg  # captions came back as sidecar files


def test_p01_a_loaded_toml_reads_only_the_files_uploaded_with_it(h, tmp_path):
    """Issue 8 p1 (handler level; tests/test_http_security.py does it over HTTP): paths in the TOML are matched by
    file name against the files uploaded with it; a file on the server is never opened, even if it exists."""
    outside = draw(3, folder=tmp_path / "pictures")
    saved = h.save_config(form(), outside)
    out = h.load_config([saved["config_file"]])
    assert out["images"] is None
    assert "3 image(s) named in it were not uploaded with it (heart0.png, heart1.png, heart2.png)" in out["status"]
    uploaded = draw(3)  # the same names, uploaded with the TOML
    out = h.load_config([saved["config_file"], *uploaded[1:]])
    assert out["images"] == uploaded[1:] and "1 image(s) named in it were not uploaded with it (heart0.png)" \
        in out["status"]
    with pytest.raises(gr.Error, match="not a file of this upload"):  # a server path handed in directly
        h.load_config([saved["config_file"], outside[0]])
    link = Path(tempfile.mkdtemp(dir=get_upload_folder())) / "heart0.png"
    link.symlink_to(outside[0])
    with pytest.raises(gr.Error, match="not a file of this upload"):  # a symlink inside the upload folder
        h.load_config([saved["config_file"], str(link)])


def test_unknown_key_in_a_toml_is_named(h):
    path = Path(tempfile.mkdtemp(dir=get_upload_folder())) / "run.toml"
    path.write_text('instance_images = ["a.png"]\ninstance_prompt = "a photo of olis shape"\nlearning_rat = 0.1\n')
    with pytest.raises(gr.Error) as e:
        h.load_config([str(path)])
    assert "unknown key(s) for TrainConfig: learning_rat" in e.value.message


@pytest.mark.parametrize("images, name, change, message", [
    (2, "x", {}, "upload 3 to 20 images"),
    (21, "x", {}, "you gave 21"),
    (3, " ", {}, "give the style a name"),
    (3, "x", {"trigger_token": "photo"}, "is a common word"),
    (3, "x", {"instance_prompt": "a photo of a shape"}, "must contain the trigger token"),
    (3, "x", {"resolution": 100}, "`resolution` must be 0"),
])
def test_bad_input_gives_gr_error_with_the_message(h, images, name, change, message):
    with pytest.raises(gr.Error) as e:
        list(h.train(draw(3) * 7 if images > 3 else draw(images), name, form(**change)))
    assert message in e.value.message


def test_training_through_the_handler_then_generating_with_the_new_style(h, engine):
    ticks = []
    updates = list(h.train(draw(4), "heart test", form(), progress=lambda p, **kw: ticks.append(p)))
    assert [t for t in ticks if t[0] > 0] == [(1, 4), (2, 4), (3, 4), (4, 4)]  # after the prior-image phase
    assert (0, 4) in ticks  # the bar moves (and says why) while class images are made
    *partial, final = updates
    plots = [u["loss_plot"] for u in partial if "loss_plot" in u]
    assert plots and isinstance(plots[-1], pd.DataFrame) and list(plots[-1].columns) == ["step", "loss"]
    previews = [u["previews"] for u in partial if "previews" in u]
    assert len(previews) == 2 and len(previews[-1]) == 2  # steps 2 and 4, newest first
    assert previews[-1][0][1] == "step 4: a photo of olis shape" and isinstance(previews[-1][0][0], Image.Image)
    assert any("prior images: 2 ready" in u.get("log", "") for u in partial)
    assert final["loss_plot"]["step"].tolist() == [1, 2, 3, 4] and final["loss_plot"]["loss"].notna().all()
    assert final["status"].startswith("Done: style “heart test”") and "Trigger word **`olis`**" in final["result"]
    assert isinstance(final["result_image"], Image.Image) and final["result_image"].size == (128, 64)
    style = engine.list_styles()[0]
    assert style.name == "heart test" and style.label in final["result"]
    gen = GenerateHandlers(engine)
    assert (style.label, style.id) in gen.style_choices()  # what the Generate tab's dropdown offers
    done = list(gen.generate({**generate_defaults(), "prompt": "a photo of olis shape", "style": style.id,
                              "num_inference_steps": 2}))[-1]
    assert done["status"].startswith("Done: 1 image(s)") and len(done["gallery"]) == 1


def cancel_mid_run(h, name: str) -> dict:
    """As Gradio does it: Cancel closes the generator (cancels=[ev]) and calls engine.cancel (h.cancel)."""
    run = h.train(draw(3), name, form(max_train_steps=40, with_prior_preservation=False, validation_steps=0,
                                      checkpointing_steps=100))
    for u in run:
        if "loss_plot" in u:  # training has begun
            break
    run.close()
    return h.cancel()  # waits until the abandoned run has saved its checkpoint


def test_cancel_mid_run_then_resume_completes_it(h, engine):
    out = cancel_mid_run(h, "cancel test")
    assert out["status"].startswith("Cancelled.")
    choices = out["runs"].choices
    assert len(choices) == 1 and choices[0][0].startswith("cancel test · cancelled at step")
    step = int(choices[0][0].split("step ")[1].split("/")[0])
    assert 1 <= step < 40
    updates = list(h.resume(choices[0][1]))
    final = updates[-1]
    assert final["status"].startswith("Done: style “cancel test” trained in 40 steps")
    assert final["loss_plot"]["step"].tolist() == list(range(1, 41))  # the whole curve, restored steps too
    assert not any(lbl.startswith("cancel test") for lbl, _ in h.resumable_runs())
    assert engine.list_styles()[0].name == "cancel test"
    with pytest.raises(gr.Error, match="no longer resumable"):
        list(h.resume(choices[0][1]))


def test_a_run_whose_worker_died_is_resumed_through_the_engine(h, engine):
    """engine.resumable_runs(): a job.json left "checkpointed" by a process that is gone (a crash, a kill)."""
    run_dir = engine.data_dir / "runs" / cancel_mid_run(h, "crash test")["runs"].value
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    job = json.loads((run_dir / "job.json").read_text())
    (run_dir / "job.json").write_text(json.dumps({**job, "state": "checkpointed", "pid": int(dead.stdout)}))
    assert [(r.run_id, r.state) for r in engine.resumable_runs()] == [(run_dir.name, "interrupted")]
    label, value = next(c for c in h.resumable_runs() if c[1] == run_dir.name)
    assert label.startswith("crash test · interrupted at step")
    final = list(h.resume(value))[-1]
    assert final["status"].startswith("Done: style “crash test” trained in 40 steps")
    assert engine.resumable_runs() == []


def test_cancel_seen_by_the_handler_shows_a_card(h, engine):
    updates, started = [], threading.Event()

    def consume():
        for u in h.train(draw(3), "card test", form(max_train_steps=40, with_prior_preservation=False,
                                                    validation_steps=0)):
            updates.append(u)
            if "loss_plot" in u:
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(120)
    h.cancel()
    t.join(60)
    assert "### Training cancelled" in updates[-1]["result"] and "press **Resume**" in updates[-1]["result"]
    assert any(label.startswith("card test") for label, _ in h.resumable_runs())


def test_app_wiring(engine):
    demo = build_app(engine)
    fns = dict(demo.fns)
    gpu = {f.name for f in fns.values() if f.concurrency_id == "gpu"}
    assert {"on_generate", "on_train", "on_resume"} <= gpu  # one GPU, one queue
    train_id = next(i for i, f in fns.items() if f.api_name == "train")
    resume_id = next(i for i, f in fns.items() if f.name == "on_resume")
    assert any({train_id, resume_id} <= set(f.cancels) for f in fns.values() if f.is_cancel_function)
    # When a run ends, the Generate tab's Style dropdown is refreshed.
    then = [f for f in fns.values() if f.trigger_after in (train_id, resume_id)]
    assert len(then) == 2 and {f.name for f in then} == {"style_dropdown"}


def test_studio_a_run_belongs_to_who_started_it_from_its_first_step_and_a_cancel_is_refunded(tiny_sd, tmp_path):
    import time

    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path / "d")))
    st = eng.enable_studio()
    st.accounts.add("ann", "ann-password")
    st.accounts.add("bob", "bob-password")
    st.quotas.add_credits("ann", 60)
    th = TrainHandlers(eng)
    run = th.train(draw(3), "ann run", form(max_train_steps=40, with_prior_preservation=False, validation_steps=0,
                                            checkpointing_steps=100), user="ann")
    for u in run:
        if "loss_plot" in u:  # training has begun: the run is ann's already (a crash now keeps it hers)
            assert list(eng.library.run_owners().values()) == ["ann"]
            assert st.quotas.balance("ann").credits == 10  # reserved before the GPU work
            break
    run.close()
    out = th.cancel(user="ann")
    assert out["status"].startswith("Cancelled.") and len(out["runs"].choices) == 1
    assert th.resumable_runs("bob") == [] and len(th.resumable_runs("ann")) == 1
    with pytest.raises(gr.Error, match="no longer resumable"):  # bob cannot resume ann's run by its id
        list(th.resume(out["runs"].choices[0][1], user="bob"))
    deadline = time.monotonic() + 30
    while st.quotas.balance("ann").credits != 60 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert st.quotas.balance("ann").credits == 60  # a cancelled run costs nothing
