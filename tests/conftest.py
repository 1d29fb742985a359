"""Shared fixtures: tiny random Stable Diffusion models built from configs (no hub, no network)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One torch/OpenMP thread per process, here and in every subprocess a test starts (launched apps, the CLI): on a
# shared machine two spinning OpenMP threads per process made some runs ~50x slower (measured), and no result
# depends on the thread count (the learning tests give the same numbers with 1 and 2 threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")


pytest_plugins = ["tests.learning_fixtures"]  # session fixtures of several test files


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Whole test files go to one pytest-xdist worker each (the README runs `-n 2 --dist loadgroup`), so a file's
    module fixtures are built once; files that use the same trained demo LoRA (learning_fixtures.TRAINED) join one
    group, so each LoRA is trained once, not once per worker. Only files that share one are joined: test_feedback
    alone uses `feedback_subject`, and keeping it in the big group left that worker busy ~19 minutes while the
    other idled for the last 5 (measured 2026-11-29). The longest groups go first: started last, they would leave
    the other worker idle at the end."""
    from tests.learning_fixtures import TRAINED

    users: dict[str, set[str]] = {}  # trained fixture -> the files that use it
    for it in items:
        for name in set(TRAINED) & set(it.fixturenames):
            users.setdefault(name, set()).add(it.module.__name__)
    group = {}  # file -> its group: the files joined through shared fixtures (connected components)
    for files in users.values():
        joined = set(files).union(*(group[f] for f in files if f in group))
        for f in joined:
            group[f] = joined
    name = lambda it: min(group[it.module.__name__]) if it.module.__name__ in group else it.module.__name__  # noqa: E731
    for item in items:
        item.add_marker(pytest.mark.xdist_group(name(item)))
    # stable: the group of the two LoRAs test_learning trains first (~8 min), the longest single file second (its
    # own prior LoRA, ~8 min) so the other worker starts it at once, then the feedback LoRA's file (~4 min). Module
    # names are bare ("test_feedback") or dotted, depending on how pytest imported them.
    first = ("test_blend_learning", "test_prior_learning", "test_feedback")
    rank = lambda it: name(it).rsplit(".", 1)[-1]  # noqa: E731
    items.sort(key=lambda it: first.index(rank(it)) if rank(it) in first else len(first))


ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "assets" / "demo-model"


@pytest.fixture(autouse=True)
def fast_evaluation(monkeypatch):
    """Every training run evaluates its checkpoints (engine/train/evaluate.py); 2 denoising steps instead of 10
    keep that cheap in tests that do not look at the scores (tests/test_evaluate_learning.py sets its own)."""
    monkeypatch.setattr("engine.train.evaluate.EVAL_STEPS", 2)


def _minimal_tokenizer(out: Path):
    """A byte-level CLIP tokenizer with no merges (every word splits into characters): 514 tokens."""
    from transformers import CLIPTokenizer

    from scripts.build_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}), "utf-8")
    return CLIPTokenizer.from_pretrained(out)


def build_tiny_sd(out: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random-weight SD 1.x-shaped pipeline folder, ~2 MB, 64x64 px (vae_scale_factor 8)."""
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = _minimal_tokenizer(out / "_tok")
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                      bos_token_id=512, eos_token_id=513, pad_token_id=513))
    sched = DDPMScheduler.from_config(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                           steps_offset=1, prediction_type=prediction_type))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v") / "model", prediction_type="v_prediction", seed=1)


def build_tiny_ip_adapter(out: Path, unet_dir: Path, seed: int = 0, plus_tokens: int = 0) -> Path:
    """A random-weight IP-Adapter folder in diffusers' layout (ip_adapter.safetensors + image_encoder/);
    plus_tokens > 0: IP-Adapter Plus (a Resampler over the encoder's hidden states, the original key names)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                                         intermediate_size=37, num_hidden_layers=1,
                                                         num_attention_heads=4, projection_dim=16))
    enc.save_pretrained(out / "image_encoder")
    cad = unet.config.cross_attention_dim
    sd = {"image_proj.proj.weight": torch.randn(4 * cad, 16) * 0.3, "image_proj.proj.bias": torch.randn(4 * cad) * 0.1,
          "image_proj.norm.weight": torch.ones(cad), "image_proj.norm.bias": torch.zeros(cad)}
    if plus_tokens:
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        from scripts.train_demo_ip_adapter import plus_to_original

        resampler = IPAdapterPlusImageProjection(embed_dims=32, output_dims=cad, hidden_dims=64, heads=1,
                                                 num_queries=plus_tokens)
        sd = {f"image_proj.{k}": v for k, v in plus_to_original(resampler.state_dict()).items()}
    key = 1
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            sd[f"ip_adapter.{key}.to_k_ip.weight"] = torch.randn_like(mod.to_k.weight) * 0.3
            sd[f"ip_adapter.{key}.to_v_ip.weight"] = torch.randn_like(mod.to_v.weight) * 0.3
            key += 2
    save_file(sd, str(out / "ip_adapter.safetensors"))
    return out


@pytest.fixture(scope="session")
def tiny_ip_adapter(tiny_sd, tmp_path_factory) -> Path:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("tiny_ipa") / "adapter", tiny_sd / "unet")


@pytest.fixture(scope="session")
def tiny_ip_adapter_plus(tiny_sd, tmp_path_factory) -> Path:
    return build_tiny_ip_adapter(tmp_path_factory.mktemp("tiny_ipa_plus") / "adapter", tiny_sd / "unet",
                                 plus_tokens=6)
