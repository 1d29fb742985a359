"""Full fine-tuning beside LoRA (engine/train/full.py) on tiny random models: every UNet and text-encoder weight
trains and the VAE does not, the model folder loads with diffusers, the SVD-extracted LoRA is published and
reproduces the full model, exact resume with the optimizer state, gradient checkpointing, 8-bit Adam, config."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import safetensors.torch as st
import torch

import engine.train.loop as T
from engine.core.config import ConfigError
from engine.core.events import TrainCheckpoint
from engine.core.train_config import TrainConfig, load_train_config, save_train_config
from engine.models.loading import load_base_model
from engine.train import checkpoints as ck
from tests.test_training import draw_images, make_config

torch.set_num_threads(1)
PROMPT = "a photo of olis shape"


@pytest.fixture(autouse=True)
def fast_previews(monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)


def full_config(model: Path, images, **over) -> TrainConfig:
    return make_config(model, images, **{"method": "full", "learning_rate": 2e-4, "text_encoder_lr": 2e-4,
                                         "extract_rank": 64, **over})


@pytest.fixture(scope="module")
def job(tiny_sd, tmp_path_factory):
    """One full fine-tuning job as the app runs it (ingest, train, publish), shared by the tests below."""
    from engine.models.loading import load_base_model
    from engine.train.job import run_training

    root = tmp_path_factory.mktemp("full")
    cfg = full_config(tiny_sd, draw_images(root / "img"))
    model = load_base_model(tiny_sd)
    events = []
    result = run_training(model, root / "data", cfg, "full heart", on_event=events.append)
    return result, model, events


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def test_every_unet_and_text_encoder_weight_trains_and_the_vae_does_not(job, tiny_sd):
    result, _, _ = job
    folder = result.run_dir / "output" / "model"
    assert sorted(p.name for p in folder.iterdir()) >= ["model_index.json", "scheduler", "text_encoder",
                                                        "tokenizer", "unet", "vae"]
    assert not list(folder.rglob("*.bin"))  # safetensors only
    tuned, base = _pipe(folder), _pipe(tiny_sd)
    for comp in ("unet", "text_encoder", "vae"):
        a, b = getattr(base, comp).state_dict(), getattr(tuned, comp).state_dict()
        assert a.keys() == b.keys()
        same = [k for k in a if torch.equal(a[k], b[k])]
        if comp == "vae":
            assert len(same) == len(a)
        else:  # every trainable tensor moved (AdamW's decay moves even rows without gradient)
            assert same == [], (comp, same[:5])
    # the folder holds exactly the weights of the last checkpoint
    saved = ck.read_tensors(result.run_dir / "checkpoints" / "checkpoint-4" / "weights.safetensors")
    unet = tuned.unet.state_dict()
    assert all(torch.equal(saved[f"unet.{k}"], v) for k, v in unet.items())
    assert sum(k.startswith("text_encoder.") for k in saved) == len(tuned.text_encoder.state_dict())


def test_extracted_lora_is_published_and_reproduces_the_full_model(job, tiny_sd):
    """The library's style is the SVD-extracted LoRA; applied to the base it gives the full model's images up to
    what a LoRA cannot hold (biases, norms, embeddings), with per-layer errors recorded in style.json."""
    from engine.generate.sampler import Components, sample
    from engine.styles.adapters import AdapterCache

    result, model, events = job
    style = result.style
    assert style is not None and style.lora.is_file()
    meta = json.loads((style.folder / "style.json").read_text())
    ex = meta["extraction"]
    assert meta["method"] == "full" and Path(meta["full_model"]).is_dir()
    assert ex["layers"] == len(ex["ranks"]) == len(ex["layer_rel_error"]) > 50
    assert ex["rel_error"] < 1e-3  # rank 64 is full rank on the tiny model: only float rounding is left
    assert 0 < ex["unrepresented_share"] < 0.5
    assert any("LoRA extracted by SVD" in getattr(e, "message", "") for e in events)

    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    full = _pipe(Path(meta["full_model"]))
    want = sample(Components(full.vae, full.text_encoder, full.tokenizer, full.unet, full.scheduler), [PROMPT],
                  [""], [1], **kw)
    c = model.components
    ids = c.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def te_out(te):
        with torch.no_grad():
            return te(ids)[0]

    base, te_base, te_full = sample(c, [PROMPT], [""], [1], **kw), te_out(c.text_encoder), te_out(full.text_encoder)
    cache = AdapterCache(c)
    cache.activate(style)
    got, te_lora = sample(c, [PROMPT], [""], [1], **kw), te_out(c.text_encoder)
    cache.activate(None)
    gap, miss = float((want - base).abs().mean()), float((want - got).abs().mean())
    te_gap, te_miss = float((te_full - te_base).abs().mean()), float((te_full - te_lora).abs().mean())
    print(f"images: full vs base {gap:.4f}, full vs base+extracted LoRA {miss:.4f}; text encoder: {te_gap:.4f}, "
          f"{te_miss:.4f}")
    assert gap > 1e-3 and miss < 0.4 * gap and te_miss < 0.7 * te_gap

    # What is left is exactly what a LoRA cannot hold: give the base those tensors (biases, norms, embeddings)
    # from the full model, add the extracted LoRA, and the full model comes back up to float rounding.
    fresh = load_base_model(tiny_sd).components
    with torch.no_grad():
        for comp in ("unet", "text_encoder"):
            mine, theirs = getattr(fresh, comp), getattr(full, comp)
            lora_weights = {f"{n}.weight" for n, m in mine.named_modules()
                            if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and m.groups == 1)}
            src = dict(theirs.named_parameters())
            for n, p in mine.named_parameters():
                if n not in lora_weights:
                    p.copy_(src[n])
    cache = AdapterCache(fresh)
    cache.activate(style)
    exact, te_exact = sample(fresh, [PROMPT], [""], [1], **kw), te_out(fresh.text_encoder)
    assert float((exact - want).abs().max()) < 1e-3 and float((te_exact - te_full).abs().max()) < 1e-3


def test_a_checkpoint_is_published_by_extracting_it_then(job, tmp_path):
    """Checkpoints of a full run are scored at once but their LoRA is extracted only when one is published (an SVD
    of every layer per checkpoint would cost minutes on SD): the last checkpoint's gives the final LoRA exactly, a
    pruned or corrupted checkpoint is refused with a message that says what to do, and the run is left as it was."""
    import shutil

    from engine.train.job import publish_checkpoint

    result, _, _ = job
    run_dir = tmp_path / "data" / "runs" / result.run_dir.name
    shutil.copytree(result.run_dir, run_dir)  # the shared job stays untouched for the other tests
    export = run_dir / "evaluation" / "step-4"
    meta = json.loads((export / "style.json").read_text())
    assert meta["extraction"] == "when published" and not (export / meta["lora_file"]).exists()
    style = publish_checkpoint(tmp_path / "data", run_dir, 4)
    got, want = st.load_file(str(style.lora)), st.load_file(str(result.style.lora))
    assert got.keys() == want.keys() and len(got) > 100
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    ex = json.loads((style.folder / "style.json").read_text())["extraction"]
    assert ex["layers"] > 50 and ex["rel_error"] < 1e-3 and ex["max_rank"] == 64

    weights = run_dir / "checkpoints" / "checkpoint-2" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(ConfigError, match="checkpoint 2 cannot be published.*sha256"):
        publish_checkpoint(tmp_path / "data", run_dir, 2)
    shutil.rmtree(weights.parent)  # pruned
    with pytest.raises(ConfigError, match="checkpoint 2's weights are no longer on disk.*checkpoints_total_limit"):
        publish_checkpoint(tmp_path / "data", run_dir, 2)
    assert not (run_dir / "evaluation" / "step-2" / meta["lora_file"]).exists()


def test_pruning_keeps_the_best_checkpoint_of_a_full_run(tiny_sd, tmp_path, monkeypatch):
    monkeypatch.setattr("engine.train.evaluate.best_step", lambda run_dir: 2)  # as scores.json would name it
    cfg = full_config(tiny_sd, draw_images(tmp_path / "img"), checkpointing_steps=1, checkpoints_total_limit=1,
                      eval_seeds=0)
    T.train(cfg, tmp_path / "run")
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 2]


def test_resume_equals_uninterrupted_with_optimizer_state(tiny_sd, tmp_path):
    imgs = draw_images(tmp_path / "img")
    cfg = full_config(tiny_sd, imgs, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=3,
                      lr_scheduler="cosine", lr_warmup_steps=1, text_encoder_stop_fraction=0.5)
    straight = T.train(cfg, tmp_path / "A")
    stop = threading.Event()
    first = T.train(cfg, tmp_path / "B", stop_event=stop,
                    on_event=lambda e: stop.set() if isinstance(e, TrainCheckpoint) and e.step == 2 else None)
    assert first.cancelled and first.steps == 2
    resumed = T.train(cfg, tmp_path / "B")
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(straight.losses, rel=1e-6)
    a, b = tmp_path / "A/checkpoints/checkpoint-4", tmp_path / "B/checkpoints/checkpoint-4"
    for name in ("weights.safetensors", "optimizer.safetensors"):
        x, y = st.load_file(str(a / name)), st.load_file(str(b / name))
        assert x.keys() == y.keys() and len(x) > 100
        assert all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7) for k in x), name
    # the optimizer holds both Adam moments for every trained weight
    n_weights = len(st.load_file(str(a / "weights.safetensors")))
    assert sum(k.endswith(".exp_avg_sq") for k in st.load_file(str(a / "optimizer.safetensors"))) == n_weights


def test_gradient_checkpointing_gives_the_same_training(tiny_sd, tmp_path):
    imgs = draw_images(tmp_path / "img")
    plain = T.train(full_config(tiny_sd, imgs, max_train_steps=2), tmp_path / "a")
    ckpt = T.train(full_config(tiny_sd, imgs, max_train_steps=2, gradient_checkpointing=True), tmp_path / "b")
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)
    x, y = (st.load_file(str(tmp_path / r / "checkpoints/checkpoint-2/weights.safetensors")) for r in "ab")
    assert all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7) for k in x)


def test_text_encoder_stays_frozen_without_train_text_encoder(tiny_sd, tmp_path):
    res = T.train(full_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=2, train_text_encoder=False,
                              extract_rank=2, extract_energy=0.5), tmp_path / "r")
    saved = ck.read_tensors(tmp_path / "r/checkpoints/checkpoint-2/weights.safetensors")
    assert saved and all(k.startswith("unet.") for k in saved)
    lora = st.load_file(str(res.lora_path))
    assert lora and all(k.startswith("unet.") for k in lora)
    ex = json.loads(res.style_json_path.read_text())["extraction"]
    assert max(ex["ranks"].values()) <= 2 and ex["max_rank"] == 2 and ex["rel_error"] > 0.01  # truncated: it shows


def test_method_and_extraction_fields_are_checked_and_round_trip(tiny_sd, tmp_path):
    imgs = draw_images(tmp_path / "img")
    with pytest.raises(ConfigError, match="`method` must be one of lora, full"):
        full_config(tiny_sd, imgs, method="dreambooth")
    with pytest.raises(ConfigError, match="`extract_rank` must be between 1 and 1024"):
        full_config(tiny_sd, imgs, extract_rank=0)
    with pytest.raises(ConfigError, match="extract_energy"):
        full_config(tiny_sd, imgs, extract_energy=1.5)
    with pytest.raises(ConfigError):
        full_config(tiny_sd, imgs, extract_rank="16")  # typed: a quoted number is an error
    cfg = full_config(tiny_sd, imgs, extract_energy=0.9)
    save_train_config(cfg, tmp_path / "run.toml")
    assert load_train_config(tmp_path / "run.toml") == cfg


def test_8bit_adam_is_refused_with_a_clear_message_where_it_cannot_run(tiny_sd, tmp_path, monkeypatch):
    imgs = draw_images(tmp_path / "img")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use_8bit_adam` needs a CUDA GPU"):
            T.train(full_config(tiny_sd, imgs, use_8bit_adam=True), tmp_path / "a")
    # Without bitsandbytes (an optional extra), the optimizer says how to get it.
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *a, **k):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    monkeypatch.setattr(T.torch.cuda, "is_available", lambda: True)  # pretend: only the optimizer step runs

    class Setup:
        cfg = full_config(tiny_sd, imgs, use_8bit_adam=True)
        acc = None

    class Models:
        class components:
            unet = torch.nn.Linear(2, 2)
            text_encoder = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match=r"stylebooth\[adam8bit\]"):
        T.make_optimizer(Setup, Models)


def test_train_tab_offers_the_method_and_maps_it_by_name(tmp_path):
    import gradio as gr

    from ui.train_form import default_values
    from ui.train_handlers import TrainHandlers
    from ui.train_tab import build_train_tab

    with gr.Blocks():
        tab = build_train_tab(engine=None)
    assert [v for _, v in tab.fields["method"].choices] == ["lora", "full"] and tab.fields["method"].value == "lora"
    assert {"extract_rank", "extract_energy", "gradient_checkpointing", "use_8bit_adam"} <= set(tab.fields)
    images = draw_images(tmp_path / "img", 3)
    h = TrainHandlers(None)
    cfg = h.config({**default_values(), "method": "full", "extract_rank": 8.0, "gradient_checkpointing": True},
                   images)  # a Number box sends floats
    assert cfg.method == "full" and cfg.extract_rank == 8 and cfg.gradient_checkpointing
    with pytest.raises(gr.Error, match="`method` must be one of lora, full"):
        h.config({**default_values(), "method": "everything"}, images)


def test_disk_space_for_full_checkpoints_is_checked_before_training(tiny_sd, tmp_path, monkeypatch):
    """TR-8 for full fine-tuning: every checkpoint holds all weights and both Adam moments, so the space is checked
    up front (room for a LoRA run is not room for this one)."""
    imgs = draw_images(tmp_path / "img")
    n = sum(p.numel() for p in _pipe(tiny_sd).unet.parameters()) + sum(
        p.numel() for p in _pipe(tiny_sd).text_encoder.parameters())
    need = n * 4 * (3 * (2 + 2) + 2) + ck.MARGIN_BYTES  # checkpoints_total_limit=2, plus the best one
    monkeypatch.setattr(ck, "free_bytes", lambda path: need - 1)
    with pytest.raises(ck.DiskFullError, match="full fine-tuning needs about"):
        T.train(full_config(tiny_sd, imgs, checkpoints_total_limit=2), tmp_path / "full")
    T.train(make_config(tiny_sd, imgs, max_train_steps=1, checkpoints_total_limit=2), tmp_path / "lora")  # fits
    monkeypatch.setattr(ck, "free_bytes", lambda path: need)
    assert T.train(full_config(tiny_sd, imgs, max_train_steps=1, checkpoints_total_limit=2), tmp_path / "ok").steps == 1
