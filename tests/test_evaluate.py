"""Evaluation during training (engine/train/evaluate.py): the scoring functions, the best-checkpoint rule, the
over-training warning, the CLIP plumbing, the per-checkpoint hook and exports, publishing a checkpoint, and the
Train tab's evaluation view. The demo learning check (the pick is within 0.05 of the best on fresh seeds) is in
tests/test_evaluate_learning.py.

The CLIP tests use a tiny CLIPModel with random weights saved in a tmp folder: they check the plumbing (loading,
embedding, the formulas, TensorBoard), not that CLIP scores mean anything.
"""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from engine.api import Engine
from engine.core.config import ConfigError, Settings
from engine.core.events import TrainEvaluation, TrainProgress
from engine.core.train_config import TrainConfig, presets
from engine.train import evaluate as E
from engine.train.loop import train
from tests.test_training import draw_images
from ui.train_handlers import TrainHandlers
from ui.train_plots import eval_frame

torch.set_num_threads(1)
R = E.Record


@pytest.fixture(autouse=True)
def fast_previews(monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)  # the final grid (conftest lowers EVAL_STEPS)


# ---- pure functions --------------------------------------------------------------------------------------------

def test_clip_i_and_clip_t_are_mean_cosines():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # CLIP-I: all pairs (1, 1/√2, 0, 1/√2) averaged; CLIP-T: matched pairs (1 and 1/√2) averaged
    assert E.clip_i(a, b) == pytest.approx((1 + 2 / 2 ** 0.5) / 4)
    assert E.clip_t(a, b) == pytest.approx((1 + 1 / 2 ** 0.5) / 2)


def test_concept_likeness_and_attribute_fidelity():
    train_probs = np.array([[0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])  # the training images show class 1
    gen = np.array([[0.0, 1.0, 0.0], [0.5, 0.2, 0.3]])
    assert E.concept_likeness(gen, train_probs) == (pytest.approx(0.6), 1)
    preds = [{"fg": "red", "bg": "blue", "shape": "star"}, {"fg": "red", "bg": "red", "shape": "ring"}]
    truths = [{"fg": "red", "bg": "blue"}, {"fg": "red", "bg": "blue", "shape": "circle"}]
    assert E.attribute_fidelity(preds, truths) == pytest.approx((1 + 1 / 3) / 2)
    assert E.attribute_fidelity(preds, [{}, {}]) is None  # prompts that name nothing: no fidelity to measure


def test_prompt_parsing_for_the_demo_and_for_clip():
    assert E.without_trigger("a photo of olis shape, olis2 olis", "olis") == "a photo of shape, olis2"
    assert E.demo_truth("a photo of shape in red on a blue background") == {"fg": "red", "bg": "blue"}
    assert E.demo_truth("a star in green on a white background") == {"shape": "star", "fg": "green", "bg": "white"}
    assert E.demo_truth("a painting of a dog") == {}


def test_best_checkpoint_rule():
    floor = 0.9
    rs = [R(0, 0.1, 1.0), R(50, 0.6, 0.95), R(100, 0.8, 0.92), R(150, 0.9, 0.85), R(200, 0.85, 0.7)]
    assert E.best_record(rs, floor).step == 100  # 150 and 200 have more likeness but lost prompt fidelity
    assert E.best_record(rs, 0.8).step == 150  # a lower floor lets 150 in
    assert E.best_record([R(0, 0.1, 1.0), R(50, 0.7, 0.9), R(100, 0.7, 0.95)], floor).step == 50  # tie: earlier
    assert E.best_record([R(0, 0.1, 1.0), R(50, 0.7, 0.5), R(100, 0.9, 0.6)], floor).step == 100  # none keeps it
    assert E.best_record([R(0, 0.1, 1.0)], floor) is None  # nothing trained yet
    assert E.best_record([R(0, None, None), R(50, None, None)], floor) is None  # scores not available
    assert E.best_record([R(50, 0.5, 1.0), R(100, 0.9, 0.8)], floor).step == 50  # no step 0: the first is the base


def test_overtraining_warning_names_the_best_step():
    floor = 0.9
    rising = [R(0, 0.1, 1.0), R(50, 0.5, 0.98), R(100, 0.8, 0.97)]
    assert E.overtraining_warning(rising, E.best_record(rising, floor)) == ""  # still the best
    over = rising + [R(150, 0.81, 0.85)]  # likeness flat, fidelity fell
    msg = E.overtraining_warning(over, E.best_record(over, floor))
    assert "step 100" in msg and "0.97 → 0.85" in msg and "publish it" in msg
    climbing = rising + [R(150, 0.95, 0.85)]  # fidelity fell but likeness still rises: not this warning
    assert E.overtraining_warning(climbing, E.best_record(climbing, 0.8)) == ""
    noisy = rising + [R(150, 0.79, 0.95)]  # flat, fidelity within FIDELITY_DROP
    assert E.overtraining_warning(noisy, E.best_record(noisy, floor)) == ""


# ---- CLIP plumbing (tiny random CLIP: loading and formulas only) -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tests.conftest import _minimal_tokenizer

    out = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=_minimal_tokenizer(out / "_tok")).save_pretrained(out)
    return out


def _cfg(model, images, **over) -> TrainConfig:
    base = {**presets("subject"), "instance_images": tuple(images), "base_model": str(model), "max_train_steps": 4,
            "checkpointing_steps": 2, "checkpoints_total_limit": 1, "validation_steps": 0, "report_to": "none",
            "with_prior_preservation": False, "learning_rate": 1e-3, "eval_seeds": 1}
    return TrainConfig(**{**base, **over})


def test_clip_scorer_matches_the_formulas(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    images = draw_images(tmp_path / "img", 3)
    E.load_clip.cache_clear()
    scorer, why = E.make_scorer(_cfg("x", images, eval_model=str(tiny_clip)), "x", "cpu", print)
    assert why == "" and isinstance(scorer, E.ClipScorer)
    model, proc = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    pil = [Image.open(p).convert("RGB") for p in images]
    gen = [pil[0], Image.new("RGB", (64, 64), "black")]
    prompts = ["a photo of olis shape", "olis in the snow"]
    with torch.no_grad():
        emb = lambda ims: model.get_image_features(**proc(images=ims, return_tensors="pt")).pooler_output  # noqa: E731
        txt = model.get_text_features(**proc.tokenizer(["a photo of shape", "in the snow"], padding=True,
                                                       return_tensors="pt")).pooler_output
        g, ref = emb(gen), emb(pil)
    like, fid = scorer.score(gen, prompts, "olis")
    cos = torch.nn.functional.cosine_similarity
    assert like == pytest.approx(float(torch.stack([cos(x[None], ref) for x in g]).mean()), abs=1e-5)
    assert fid == pytest.approx(float(cos(g, txt).mean()), abs=1e-5)


def test_no_or_unloadable_model_means_not_available(tiny_sd, tmp_path):
    images, warnings = draw_images(tmp_path / "img", 3), []
    assert E.make_scorer(_cfg(tiny_sd, images), str(tiny_sd), "cpu", warnings.append) == (
        None, "no evaluation model for this base model (start the app with --eval-model set to a CLIP folder or "
              "hub id, or set eval_model in the run's TOML)")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: pickle files are refused")
    for source in (str(pickled), str(tmp_path / "missing"), "someone/clip-offline"):
        scorer, why = E.make_scorer(_cfg(tiny_sd, images, eval_model=source), str(tiny_sd), "cpu", warnings.append)
        assert scorer is None and why.startswith(f"could not load the evaluation model {source!r}")
    assert len(warnings) == 3 and all("evaluation grids are still made" in w for w in warnings)


def test_the_app_evaluates_with_its_own_model_whatever_the_request_says(tiny_sd, tiny_clip, tmp_path):
    """eval_model is a path the server opens: the app's setting (--eval-model), never a request's."""
    from launcher import parse_args, resolve_settings

    args = parse_args(["--eval-model", str(tiny_clip), "--data-dir", str(tmp_path / "d")])
    settings = dataclasses.replace(resolve_settings(args, tmp_path / "settings.toml"), model=str(tiny_sd))
    assert settings.eval_model == str(tiny_clip)
    eng, events = Engine(settings), []
    cfg = _cfg(tiny_sd, draw_images(tmp_path / "img", 3), max_train_steps=2, eval_model=str(tmp_path / "elsewhere"))
    eng.train(cfg, "clip run", events.append)
    last = [e for e in events if isinstance(e, TrainEvaluation)][-1]
    assert last.metric.startswith(f"CLIP ({tiny_clip})") and last.scores[-1][1] is not None


# ---- the hook in the training loop -----------------------------------------------------------------------------

def test_each_checkpoint_is_scored_exported_and_logged(tiny_sd, tiny_clip, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    E.load_clip.cache_clear()
    events = []
    cfg = _cfg(tiny_sd, draw_images(tmp_path / "img"), eval_model=str(tiny_clip), report_to="tensorboard",
               eval_seeds=2, eval_prompts=("a photo of olis shape", "olis in the snow", "olis on a beach"))
    result = train(cfg, tmp_path / "run", on_event=events.append)
    evs = [e for e in events if isinstance(e, TrainEvaluation)]
    assert [e.step for e in evs] == [0, 2, 4] and evs[-1].run_id == "run"
    assert [s for s, _, _ in evs[-1].scores] == [0, 2, 4] and all(-1 <= v <= 1 for _, lk, f in evs[-1].scores
                                                                   for v in (lk, f))
    assert len(evs[0].images) == 6 and evs[-1].metric.startswith("CLIP (")  # 3 prompts x 2 seeds
    assert evs[-1].best_step == E.best_record([E.Record(*s) for s in evs[-1].scores], 0.9).step
    saved = json.loads((tmp_path / "run" / "evaluation" / "scores.json").read_text())
    assert saved["best_step"] == evs[-1].best_step and "prompt fidelity is at least 0.90" in saved["rule"]
    for step in (2, 4):  # exported like the final result, though only one checkpoint is kept
        folder = tmp_path / "run" / "evaluation" / f"step-{step}"
        style = json.loads((folder / "style.json").read_text())
        assert style["steps"] == step and (folder / style["lora_file"]).is_file()
        assert Image.open(folder / "preview.png").size == (2 * 64, 3 * 64)  # seeds x prompts
    assert not (tmp_path / "run" / "evaluation" / "step-0" / "style.json").exists()  # the base: nothing to publish
    from safetensors.torch import load_file

    last, final = load_file(tmp_path / "run" / "evaluation" / "step-4" / "lora.safetensors"), load_file(result.lora_path)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)  # the final LoRA
    acc = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert {"eval/likeness", "eval/prompt_fidelity"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("eval/likeness")] == [0, 2, 4] and "eval/grid" in acc.Tags()["images"]


def test_evaluation_leaves_training_alone_and_a_cancel_is_evaluated_on_resume(tiny_sd, tmp_path):
    images, events, stop = draw_images(tmp_path / "img"), [], threading.Event()

    def on_event(e):
        events.append(e)
        if isinstance(e, TrainProgress) and e.step == 3:
            stop.set()  # cancel: checkpoint 3 is saved at once, its evaluation waits for the resume

    off = train(_cfg(tiny_sd, images, eval_seeds=0), tmp_path / "off")
    assert not (tmp_path / "off" / "evaluation").exists()
    assert train(_cfg(tiny_sd, images), tmp_path / "on", on_event=on_event, stop_event=stop).cancelled
    assert [e.step for e in events if isinstance(e, TrainEvaluation)] == [0, 2]
    events.clear()
    on = train(_cfg(tiny_sd, images), tmp_path / "on", on_event=events.append)
    assert on.losses == off.losses  # bit for bit: the evaluation forks the random state
    evs = [e for e in events if isinstance(e, TrainEvaluation)]
    assert [e.step for e in evs] == [3, 4] and len(evs[0].images) == 4  # 4 built-in prompts x 1 seed
    assert [s for s, _, _ in evs[-1].scores] == [0, 2, 3, 4] and evs[-1].metric.startswith("not available")
    events.clear()
    train(_cfg(tiny_sd, images), tmp_path / "on", on_event=events.append)  # done already: shows the history
    evs = [e for e in events if isinstance(e, TrainEvaluation)]
    assert [e.step for e in evs] == [4] and evs[0].images == [] and len(evs[0].scores) == 4
    events.clear()
    train(_cfg(tiny_sd, images), tmp_path / "on", on_event=events.append, resume=False)  # starts over
    evs = [e for e in events if isinstance(e, TrainEvaluation)]
    assert [e.step for e in evs] == [0, 2, 4] and [s for s, _, _ in evs[-1].scores] == [0, 2, 4]
    folder = tmp_path / "on" / "evaluation"
    assert not (folder / "step-3").exists() and len(list(folder.glob("step-3.old-*"))) == 1  # set aside


# ---- publishing a checkpoint through the engine, and the Train tab ---------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    """One run through the Train tab's handler (which goes through Engine.train): checkpoints at 2 and 4."""
    eng = Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))
    h = TrainHandlers(eng)
    from tests.test_ui_train import draw, form

    updates = list(h.train(draw(3), "eval test", form(with_prior_preservation=False, validation_steps=0,
                                                      checkpointing_steps=2, eval_seeds=1)))
    return eng, h, updates


def test_the_train_tab_shows_the_evaluation_and_publishes_a_checkpoint(trained):
    eng, h, updates = trained
    *partial, final = updates
    assert [u["eval_grid"][0][1] for u in partial if "eval_grid" in u] == ["step 0", "step 2", "step 4"]
    assert final["checkpoint"].choices == [("step 2 · scores not available", 2), ("step 4 · scores not available", 4)]
    assert final["checkpoint"].value == 4 and "not available: no evaluation model" in final["eval_note"]
    assert isinstance(final["eval_plot"], pd.DataFrame) and final["eval_plot"].empty
    run_id = final["eval_run"]
    first = eng.list_styles()[0]
    out = h.publish_checkpoint(run_id, 2)
    assert out["status"].startswith("Checkpoint 2 published as style “eval test” v2")
    versions = eng.library.versions(first.id)
    assert [v.version for v in versions] == [1, 2]
    v2 = json.loads((versions[1].folder / "style.json").read_text())
    assert v2["steps"] == 2  # the checkpoint, not the final LoRA
    for bad, message in ((None, "train or resume a run first"), ("../data", "unknown training run")):
        with pytest.raises(gr.Error, match=message):
            h.publish_checkpoint(bad, 2)
    with pytest.raises(gr.Error, match=r"checkpoint 3 of this run was not evaluated.*\(2, 4\)"):
        h.publish_checkpoint(run_id, 3)
    with pytest.raises(gr.Error, match="pick a checkpoint"):
        h.publish_checkpoint(run_id, None)


def test_publish_checkpoint_checks_who_asks(trained):
    eng, _, updates = trained
    run_id = updates[-1]["eval_run"]
    with pytest.raises(ConfigError, match="not 'x'"):
        eng.publish_checkpoint(run_id, "x")
    with pytest.raises(ConfigError, match="unknown training run"):
        eng.publish_checkpoint("not-a-run", 2)
    studio = eng.enable_studio()
    studio.accounts.add("bob", "bob-password")
    with pytest.raises(ConfigError, match="unknown training run"):  # the run is the local user's, not bob's
        eng.publish_checkpoint(run_id, 2, user="bob")
    eng.studio = None


def test_evaluation_view_shows_scores_best_step_and_warning():
    scores = ((0, 0.1, 1.0), (50, 0.6, 0.97), (100, 0.8, 0.96), (150, 0.8, 0.8))
    ev = TrainEvaluation(150, scores, 100, "Over-training likely: ... Checkpoint 100 is the best", "demo checker",
                         [], "run-1", "best checkpoint = ...")
    view = TrainHandlers.evaluation_view(ev)
    assert view["eval_run"] == "run-1" and view["checkpoint"].value == 100
    assert [c[1] for c in view["checkpoint"].choices] == [50, 100, 150]
    assert view["checkpoint"].choices[1][0] == "step 100 · likeness 0.80 · fidelity 0.96 · best"
    assert view["eval_plot"].shape == (8, 3) and set(view["eval_plot"]["metric"]) == {"likeness", "prompt fidelity"}
    assert "**step 100** (likeness 0.80, prompt fidelity 0.96)" in view["eval_note"]
    assert "⚠️ Over-training likely" in view["eval_note"]
    assert eval_frame(((0, None, None),)).empty
