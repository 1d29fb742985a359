"""DreamBooth + LoRA training on tiny random models: math, targets, reload, NaN guard, OOM back-off, cancel."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import engine.train.loop as T
import engine.train.math as TM
from engine.core.errors import TrainingDiverged, TrainingOOM
from engine.core.events import TrainLog, TrainPreview, TrainProgress
from engine.train.data import EpochSampler
from engine.train import checkpoints as ck
from engine.jobs import state as jobs
from engine.core.config import ConfigError
from engine.core.train_config import TrainConfig, presets

torch.set_num_threads(1)  # tiny models: threads only add contention (and change float summation order)
COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def draw_images(folder: Path, n: int = 4, size: int = 64, kind: str = "circle") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.new("RGB", (size + 8 * (i % 2), size), "white")  # some wider than tall: crops matter
        box = [8 + i, 8, size - 8, size - 8 - i]
        (ImageDraw.Draw(img).ellipse if kind == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=COLORS[i % 6])
        img.save(folder / f"{kind}{i}.png")
        out.append(str(folder / f"{kind}{i}.png"))
    return out


def make_config(model: Path, images, **over) -> TrainConfig:
    base = {**presets("subject"), "instance_images": tuple(images), "base_model": str(model), "max_train_steps": 4,
            "checkpointing_steps": 2, "validation_steps": 0, "validation_prompts": (), "report_to": "none",
            "with_prior_preservation": False, "lora_alpha": 8, "learning_rate": 1e-3, "text_encoder_lr": 1e-3}
    return TrainConfig(**{**base, **over})


@pytest.fixture(autouse=True)
def fast_previews(monkeypatch):
    monkeypatch.setattr("engine.train.output.PREVIEW_STEPS", 2)


# ---- math ----------------------------------------------------------------------------------------------------

def test_target_is_noise_for_epsilon_and_velocity_for_v_prediction():
    from diffusers import DDPMScheduler

    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    assert TM.diffusion_target(eps, x0, noise, t) is noise
    a = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(TM.diffusion_target(v, x0, noise, t), a * noise - s * x0)  # v = α ε − σ x0
    with pytest.raises(ConfigError, match="only 'epsilon' and 'v_prediction'"):
        TM.diffusion_target(DDPMScheduler(prediction_type="sample"), x0, noise, t)


def test_min_snr_weights_and_prior_loss():
    snr = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(TM.min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(TM.min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51]))
    pred, target = torch.zeros(4, 1, 2, 2), torch.tensor([1.0, 1.0, 2.0, 2.0]).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    ones = torch.ones(4)
    # Ruiz et al. eq. 2: instance half (MSE 1) + λ · class half (MSE 4)
    assert float(TM.dreambooth_loss(pred, target, ones, True, 0.5)) == pytest.approx(1 + 0.5 * 4)
    assert float(TM.dreambooth_loss(pred, target, ones, False, 0.5)) == pytest.approx(2.5)
    g = torch.Generator().manual_seed(0)
    plain = TM.offset_noise((2, 4, 8, 8), torch.Generator().manual_seed(0), 0.0)
    shifted = TM.offset_noise((2, 4, 8, 8), g, 0.1)
    diff = shifted - plain  # a constant per (sample, channel)
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff), atol=1e-6) and diff.abs().max() > 0


def test_timestep_range_is_sampled_and_checked_against_the_model():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    # The full range draws exactly what the loop drew before the range existed (old runs reproduce).
    assert torch.equal(TM.sample_timesteps(64, 0, 1000, 1000, g()), torch.randint(0, 1000, (64,), generator=g()))
    t = TM.sample_timesteps(2000, 700, 1000, 1000, g())
    assert int(t.min()) == 700 and int(t.max()) == 999
    assert int(TM.sample_timesteps(2000, 0, 1000, 500, g()).max()) == 499  # a model with fewer timesteps
    with pytest.raises(ConfigError, match="use a min_timestep below 500"):
        TM.sample_timesteps(1, 600, 1000, 500, g())


def test_timestep_range_changes_what_is_trained(tiny_sd_v, tmp_path, monkeypatch):
    """Every training step noises at a timestep inside [min_timestep, max_timestep), and the LoRA differs."""
    seen = []
    orig = T.diffusion_target
    monkeypatch.setattr(T, "diffusion_target", lambda s, x, n, t: seen.append(t.tolist()) or orig(s, x, n, t))
    images = draw_images(tmp_path / "img")
    low = make_config(tiny_sd_v, images, max_train_steps=3, checkpointing_steps=0, max_timestep=100)
    high = make_config(tiny_sd_v, images, max_train_steps=3, checkpointing_steps=0, min_timestep=900)
    loras = [T.train(cfg, tmp_path / name).lora_path for cfg, name in ((low, "low"), (high, "high"))]
    assert all(0 <= t < 100 for t in sum(seen[:3], [])) and all(900 <= t < 1000 for t in sum(seen[3:], []))
    a, b = (__import__("safetensors.torch").torch.load_file(str(p)) for p in loras)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_sampler_continues_mid_epoch_exactly():
    a, b = EpochSampler(4, seed=3), EpochSampler(4, seed=3)
    first = a.take(3)
    tensors, meta = a.state()
    c = EpochSampler(4, seed=99)
    c.load(tensors, meta)
    assert b.take(3) == first and c.take(9) == b.take(9) and sorted(first + [c.perm[0]]) != []


# ---- training ------------------------------------------------------------------------------------------------

def test_v_prediction_training_regresses_on_velocity(tiny_sd_v, tmp_path, monkeypatch):
    seen = []
    orig = T.diffusion_target

    def spy(sched, latents, noise, t):
        out = orig(sched, latents, noise, t)
        seen.append((sched.config.prediction_type, out, sched.get_velocity(latents, noise, t), noise))
        return out

    monkeypatch.setattr(T, "diffusion_target", spy)
    cfg = make_config(tiny_sd_v, draw_images(tmp_path / "img"), max_train_steps=2, checkpointing_steps=0)
    result = T.train(cfg, tmp_path / "run")
    assert result.steps == 2 and len(seen) == 2
    for kind, target, velocity, noise in seen:
        assert kind == "v_prediction" and torch.equal(target, velocity) and not torch.allclose(target, noise)


def test_lora_reload_reproduces_the_trained_model(tiny_sd, tmp_path, monkeypatch):
    """alpha (8) != rank (4): only correct with the saved alpha metadata. Also previews and tensorboard logs."""
    from diffusers import StableDiffusionPipeline
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.generate.sampler import Components, sample

    captured, events = {}, []
    orig = T.step6_save
    monkeypatch.setattr(T, "step6_save", lambda run: captured.setdefault("run", run) and orig(run))
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), validation_steps=2, report_to="tensorboard",
                      validation_prompts=("a photo of olis shape", "a photo of shape"))
    result = T.train(cfg, tmp_path / "run", on_event=events.append)
    run = captured["run"]
    c, acc = run.models.components, run.setup.acc
    trained = Components(c.vae, acc.unwrap_model(run.trainable.te), c.tokenizer, acc.unwrap_model(run.trainable.unet),
                         c.scheduler)
    kw = dict(num_inference_steps=4, guidance_scale=5.0)
    want = sample(trained, ["a photo of olis shape"], [""], [1], **kw)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    fresh = Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)
    base = sample(fresh, ["a photo of olis shape"], [""], [1], **kw)
    pipe.load_lora_weights(str(result.lora_path))
    got = sample(fresh, ["a photo of olis shape"], [""], [1], **kw)
    assert (want - base).abs().max() > 1e-4  # training changed the model ...
    assert (got - want).abs().max() < 1e-5  # ... and the file reproduces it
    assert any(k.startswith("text_encoder.") for k in __import__("safetensors.torch").torch.load_file(
        str(result.lora_path)))

    style = json.loads(result.style_json_path.read_text())
    assert style["schema_version"] == 1 and style["trigger_token"] == "olis"
    assert style["base_model_fingerprint"] == run.models.base.fingerprint and len(style["training_images"]) == 4
    assert style["training_config"]["learning_rate"] == cfg.learning_rate
    assert (result.lora_path.parent / style["preview_grid"]).is_file()
    previews = [e for e in events if isinstance(e, TrainPreview)]
    assert [p.step for p in previews] == [2, 4] and all(isinstance(i, Image.Image) for i in previews[0].images)
    acc = EventAccumulator(str(next((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert {"loss", "lr"} <= set(acc.Tags()["scalars"]) and acc.Tags()["images"]
    assert jobs.read_job(tmp_path / "run")["state"] == "done"


def test_text_encoder_stops_after_its_fraction(tiny_sd, tmp_path):
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), text_encoder_stop_fraction=0.5, checkpointing_steps=1,
                      checkpoints_total_limit=10)
    T.train(cfg, tmp_path / "run")
    lora = {s: ck.read_tensors(tmp_path / "run" / "checkpoints" / f"checkpoint-{s}" / "lora.safetensors")
            for s in (1, 2, 4)}
    te = {s: {k: v for k, v in sd.items() if k.startswith("text_encoder.")} for s, sd in lora.items()}
    un = {s: {k: v for k, v in sd.items() if k.startswith("unet.")} for s, sd in lora.items()}
    assert any(not torch.equal(te[1][k], te[2][k]) for k in te[1])  # trained during the first half
    assert all(torch.equal(te[2][k], te[4][k]) for k in te[2])  # frozen afterwards (no Adam momentum drift)
    assert any(not torch.equal(un[2][k], un[4][k]) for k in un[2])


def test_everything_on_at_once_bf16_cache_prior_snr(tiny_sd, tmp_path):
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=2, mixed_precision="bf16",
                      cache_latents=True, random_flip=True, with_prior_preservation=True, num_class_images=2,
                      snr_gamma=5.0, noise_offset=0.1, train_batch_size=2, gradient_checkpointing=True,
                      lr_scheduler="cosine", lr_warmup_steps=1, train_text_encoder=False)
    result = T.train(cfg, tmp_path / "run", class_images=draw_images(tmp_path / "cls", 3, kind="square"))
    assert result.steps == 2 and all(map(lambda x: x == x, result.losses))
    keys = __import__("safetensors.torch").torch.load_file(str(result.lora_path)).keys()
    assert keys and not any(k.startswith("text_encoder") for k in keys)


def test_prior_preservation_needs_class_images_and_8bit_adam_needs_cuda(tiny_sd, tmp_path):
    imgs = draw_images(tmp_path / "img")
    with pytest.raises(ConfigError, match="generate them first"):
        T.train(make_config(tiny_sd, imgs, with_prior_preservation=True), tmp_path / "a")
    assert jobs.read_job(tmp_path / "a")["state"] == "failed"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use_8bit_adam` needs a CUDA GPU"):
            T.train(make_config(tiny_sd, imgs, use_8bit_adam=True), tmp_path / "b")


def test_nan_loss_stops_the_job_and_saves_no_lora(tiny_sd, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = T.forward_loss

    def poisoned(run, batch, te_on):
        calls["n"] += 1
        loss = orig(run, batch, te_on)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(T, "forward_loss", poisoned)
    events = []
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=8, checkpointing_steps=1,
                      max_nonfinite_steps=3, checkpoints_total_limit=10)
    with pytest.raises(TrainingDiverged, match="Lower the learning rate or use bf16/fp32"):
        T.train(cfg, tmp_path / "run", on_event=events.append)
    assert not (tmp_path / "run" / "output" / "lora.safetensors").exists()
    assert sum("update skipped" in getattr(e, "message", "") for e in events) == 3
    job = jobs.read_job(tmp_path / "run")
    assert job["state"] == "failed" and "diverged" in job["message"]
    for _, path in ck.list_checkpoints(tmp_path / "run" / "checkpoints"):  # every checkpoint stays finite
        ck.verify_checkpoint(path)
        assert all(torch.isfinite(t).all() for t in ck.read_tensors(path / "lora.safetensors").values())


def test_nan_weights_are_never_saved(tiny_sd, tmp_path, monkeypatch):
    orig = T.step6_save

    def poison_then_save(run):
        next(iter(run.lora_params().values())).data[0, 0] = float("inf")
        return orig(run)

    monkeypatch.setattr(T, "step6_save", poison_then_save)
    with pytest.raises(TrainingDiverged, match="NaN/Inf"):
        T.train(make_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=1), tmp_path / "run")
    assert not list((tmp_path / "run" / "output").glob("*.safetensors"))


def test_fake_oom_halves_the_micro_batch_and_finishes(tiny_sd, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = T.forward_loss

    def flaky(run, batch, te_on):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return orig(run, batch, te_on)

    monkeypatch.setattr(T, "forward_loss", flaky)
    events = []
    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=2, train_batch_size=4)
    result = T.train(cfg, tmp_path / "run", on_event=events.append)
    assert result.steps == 2 and result.micro_batch_size == 1 and result.gradient_accumulation == 4
    msgs = [e.message for e in events if isinstance(e, TrainLog) and "out of memory" in e.message]
    assert "micro-batch 4 → 2" in msgs[0] and "micro-batch 2 → 1" in msgs[1] and "stays 4" in msgs[1]
    assert result.lora_path.is_file()

    monkeypatch.setattr(T, "forward_loss", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(TrainingOOM, match="even with a micro-batch of 1"):
        T.train(make_config(tiny_sd, draw_images(tmp_path / "img"), max_train_steps=1), tmp_path / "run2")


def test_cancel_stops_with_a_checkpoint(tiny_sd, tmp_path):
    stop = threading.Event()

    def on_event(e):
        if isinstance(e, TrainProgress) and e.step == 1:
            stop.set()

    cfg = make_config(tiny_sd, draw_images(tmp_path / "img"))
    result = T.train(cfg, tmp_path / "run", on_event=on_event, stop_event=stop)
    assert result.cancelled and result.steps == 1 and result.lora_path is None
    assert ck.latest_step(tmp_path / "run" / "checkpoints") == 1
    assert jobs.read_job(tmp_path / "run")["state"] == "cancelled"


@pytest.mark.parametrize("train_te", [False, True])
def test_prior_target_base_is_the_base_models_prediction(tiny_sd, tmp_path, monkeypatch, train_te):
    """prior_target "base": the class half of each batch is pulled to the frozen base model's prediction (LoRA
    bypassed, in the text encoder too), the instance half still to the noise. At step 0 LoRA B is 0, so the class
    half's target equals the prediction exactly; with "images" it is the noise and does not. After the text
    encoder stops (stop fraction 0.5) its trained LoRA must still be bypassed for the base target, every step."""
    seen, bypassed = [], []
    orig, orig_off = T.dreambooth_loss, T.adapters_off
    monkeypatch.setattr(T, "dreambooth_loss",
                        lambda p, tg, *a: seen.append((p.detach().clone(), tg.detach().clone())) or orig(p, tg, *a))
    monkeypatch.setattr(T, "adapters_off", lambda m: bypassed.append(type(m).__name__) or orig_off(m))
    images, classes = draw_images(tmp_path / "img"), draw_images(tmp_path / "cls", 2, kind="square")
    common = dict(max_train_steps=3, checkpointing_steps=0, with_prior_preservation=True, num_class_images=2,
                  class_prompt="a photo of shape", eval_seeds=0, train_text_encoder=train_te,
                  text_encoder_stop_fraction=0.5)
    T.train(make_config(tiny_sd, images, prior_target="base", **common), tmp_path / "base", class_images=classes)
    (pred, target), later = seen[0], seen[1:]
    assert torch.allclose(pred[1:], target[1:], atol=1e-6)  # class half: LoRA = base at step 0
    assert not torch.allclose(pred[:1], target[:1], atol=1e-3)  # instance half: the noise, as before
    assert all(not torch.allclose(p[1:], tg[1:], atol=1e-7) for p, tg in later)  # the LoRA moved; the base did not
    assert bypassed.count("CLIPTextModel") == (3 if train_te else 0)  # steps 2-3 too, after the encoder stopped
    assert bypassed.count("UNet2DConditionModel") == 3
    seen.clear()
    T.train(make_config(tiny_sd, images, prior_target="images", **common), tmp_path / "images", class_images=classes)
    assert not torch.allclose(seen[0][0][1:], seen[0][1][1:], atol=1e-3)  # "images": the class image's noise


def test_prior_target_base_needs_a_lora():
    with pytest.raises(ConfigError, match="prior_target"):
        TrainConfig(**{**presets("subject"), "instance_images": ("a.png",), "method": "full", "prior_target": "base",
                       "with_prior_preservation": True})
    TrainConfig(**{**presets("subject"), "instance_images": ("a.png",), "method": "full"})  # priors off: unused
    with pytest.raises(ConfigError, match="prior_target"):
        TrainConfig(**{**presets("subject"), "instance_images": ("a.png",), "prior_target": "model"})


def test_uncond_preservation_starts_at_zero_and_changes_training_only_when_on(tiny_sd, tmp_path, monkeypatch):
    """uncond_preservation_weight: the LoRA's empty-prompt prediction is compared with the base model's. At step 0
    LoRA B is 0, so the two agree and the term is 0; it grows once the LoRA moves. At 0 the term is never computed
    and the run is the run without the option; above 0 the LoRA differs. Prior preservation and gradient
    accumulation on, as the style preset may use them."""
    terms = []
    orig = T.uncond_preservation_mse
    monkeypatch.setattr(T, "uncond_preservation_mse",
                        lambda p, b: terms.append(float(orig(p, b).detach())) or orig(p, b))
    images, classes = draw_images(tmp_path / "img"), draw_images(tmp_path / "cls", 2, kind="square")
    common = dict(max_train_steps=2, checkpointing_steps=0, with_prior_preservation=True, num_class_images=2,
                  class_prompt="a photo of shape", gradient_accumulation_steps=2, eval_seeds=0)
    off = T.train(make_config(tiny_sd, images, **common), tmp_path / "off", class_images=classes)
    assert terms == []  # weight 0: no extra forward, the loss is the old one
    on = T.train(make_config(tiny_sd, images, uncond_preservation_weight=5.0, **common), tmp_path / "on",
                 class_images=classes)
    assert len(terms) == 2 * 2  # every micro-batch of every step
    assert terms[0] < 1e-10 and terms[1] < 1e-10  # step 0: LoRA = base, on the batched forward too
    assert max(terms[2:]) > 1e-8  # the LoRA moved its empty-prompt prediction; the term now pulls it back
    a, b = (__import__("safetensors.torch").torch.load_file(str(r.lora_path)) for r in (off, on))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert on.losses[0] == pytest.approx(off.losses[0], rel=1e-5)  # same first step: the term adds ~0


def test_adapters_off_bypasses_every_lora_layer_and_touches_nothing_else(tiny_sd):
    """The base-model passes (prior target, empty prompt, on-policy) run with every LoRA layer bypassed: the output
    is the UNet's without LoRA exactly, the LoRA is back afterwards, and no adapter weight's requires_grad changes
    (a frozen one stays frozen); with gradients on it refuses, since it does not freeze the adapters."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from engine.train.state import adapters_off

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    enc = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = unet(x, t, enc).sample
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"]))
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in lora:
            p.add_(0.1)  # LoRA B starts at 0: move it, so the LoRA changes the output
        lora[0].requires_grad_(False)
        with_lora = unet(x, t, enc).sample
        with adapters_off(unet) as off:
            bypassed = off(x, t, enc).sample
        after = unet(x, t, enc).sample
    assert not torch.allclose(with_lora, base, atol=1e-4)
    assert torch.equal(bypassed, base) and torch.equal(after, with_lora)
    assert [p.requires_grad for p in lora] == [False] + [True] * (len(lora) - 1)
    with pytest.raises(RuntimeError, match="no_grad"):
        with adapters_off(unet):
            pass
