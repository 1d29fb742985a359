"""Single-file (.safetensors, CompVis/LDM layout) checkpoints load offline, exactly, and wrong files are refused.

Tiny SD 1.x- and 2.x-shaped checkpoints are made at test time: tiny diffusers components are converted to the
LDM key layout by the small converter below (diffusers 0.42.1 ships only the LDM -> diffusers direction), so a
round trip through `load_single_file` must give back the very same tensors.
"""
from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from engine.models.single_file import (CONFIG_ROOT, NotACheckpointError, SingleFileError, UnsupportedCheckpointError,
                                inspect_checkpoint, load_single_file)

torch.set_num_threads(1)
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _rename(sd, prefixes, inner=lambda p, rest: rest):
    """Rewrite each key's longest matching diffusers prefix to its LDM prefix (inner() renames the rest)."""
    out = {}
    for k, v in sd.items():
        p = max((p for p in prefixes if k.startswith(p)), key=len, default=None)
        out[(prefixes[p] + inner(p, k[len(p):])) if p else k] = v
    return out


def unet_to_ldm(sd, cfg):
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
         "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
         "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
         "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(lpb):
            m[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            m[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        for j in range(lpb + 1):
            m[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            m[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        if i < n - 1:
            m[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
            slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1  # the upsampler follows the attention
            m[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{slot}."

    def inner(p, rest):
        head, _, tail = rest.partition(".")
        return f"{RESNET.get(head, head)}.{tail}" if "resnets" in p else rest

    return {"model.diffusion_model." + k: v for k, v in _rename(sd, m, inner).items()}


def vae_to_ldm(sd, cfg):
    n, lpb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = {}
    for side in ("encoder", "decoder"):
        m |= {f"{side}.conv_norm_out.": f"{side}.norm_out.", f"{side}.mid_block.attentions.0.": f"{side}.mid.attn_1.",
              f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
              f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2."}
    for i in range(n):
        for j in range(lpb):
            m[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(lpb + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        m[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        m[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def inner(p, rest):
        for a, b in attn.items():
            if "attn" in m[p] and rest.startswith(a + "."):
                return b + rest[len(a):]
        return rest.replace("conv_shortcut", "nin_shortcut")

    out = _rename(sd, m, inner)
    # LDM's VAE attention projections are 1x1 convolutions
    return {"first_stage_model." + k: (v[..., None, None] if ".attn_1." in k and v.ndim == 2 else v)
            for k, v in out.items()}


def clip_to_ldm(sd):  # SD 1.x: HF CLIP under cond_stage_model.transformer. (transformers 5 dropped text_model.)
    out = {"cond_stage_model.transformer.text_model." + k: v for k, v in sd.items()}
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in SD1.5
    return out


def openclip_to_ldm(sd, hidden):  # SD 2.x: OpenCLIP names, fused q/k/v
    p, out = "cond_stage_model.model.", {}
    ren = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
           "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for k, v in sd.items():
        if k.startswith("encoder.layers."):
            i, rest = k[len("encoder.layers."):].split(".", 1)
            if rest.startswith("self_attn.q_proj."):
                kind = rest.rsplit(".", 1)[1]
                qkv = [sd[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                out[f"{p}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
            elif not rest.startswith(("self_attn.k_proj", "self_attn.v_proj")):
                a = next(a for a in ren if rest.startswith(a))
                out[f"{p}transformer.resblocks.{i}.{ren[a]}{rest[len(a):]}"] = v
    out |= {p + "token_embedding.weight": sd["embeddings.token_embedding.weight"],
            p + "positional_embedding": sd["embeddings.position_embedding.weight"],
            p + "ln_final.weight": sd["final_layer_norm.weight"], p + "ln_final.bias": sd["final_layer_norm.bias"],
            p + "text_projection": torch.zeros(hidden, hidden)}
    return out


def to_single_file(pipe, path, sd2=False):
    sd = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config) | vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)
    te = pipe.text_encoder.state_dict()
    sd |= openclip_to_ldm(te, pipe.text_encoder.config.hidden_size) if sd2 else clip_to_ldm(te)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)  # real checkpoints carry schedule buffers: must be ignored
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def config_only(folder, out):
    """A copy of a diffusers folder without weights, so everything loaded must come from the single file."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors", "_tok"))
    return out


@pytest.fixture(scope="module")
def sd1(tiny_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("sf1")
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd)
    return ref, to_single_file(ref, d / "tiny-sd1.safetensors"), config_only(tiny_sd, d / "cfg")


@pytest.fixture(scope="module")
def sd2(tiny_sd, tmp_path_factory):
    """SD 2.x-shaped: linear attention projections, per-block head dims, GELU OpenCLIP-style text encoder."""
    d = tmp_path_factory.mktemp("sf2")
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd)
    torch.manual_seed(2)
    ref.unet = UNet2DConditionModel.from_config({**ref.unet.config, "use_linear_projection": True,
                                                 "attention_head_dim": [4, 8]})
    ref.text_encoder = CLIPTextModel(CLIPTextConfig(**{**ref.text_encoder.config.to_dict(), "hidden_act": "gelu"}))
    ref.save_pretrained(d / "folder")
    ref = StableDiffusionPipeline.from_pretrained(d / "folder")
    return ref, to_single_file(ref, d / "tiny-sd2.safetensors", sd2=True), config_only(d / "folder", d / "cfg")


def _same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not bad, f"{name}: {bad[:5]}"


def _generate(pipe):
    return pipe("a red cube", negative_prompt="blurry", num_inference_steps=2, guidance_scale=5.0, height=64,
                width=64, output_type="np", generator=torch.Generator().manual_seed(7)).images


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse any socket connection or hub download attempt while loading."""
    import diffusers.loaders.single_file as sf

    tries = []

    def refuse(*a, **k):
        tries.append(a[:2])
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sf, "_download_diffusers_model_config_from_hub", refuse)
    return tries


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_round_trip_is_exact_and_generates_like_the_folder(family, request, no_network):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    ref, path, cfg = request.getfixturevalue(family)
    info = inspect_checkpoint(path)
    assert (info.family, info.cross_attention_dim) == (family, 32)
    pipe = load_single_file(path, config_dir=cfg)
    assert no_network == []
    _same_weights(ref, pipe)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    assert pipe.unet.config.use_linear_projection == (family == "sd2")
    # SD 1.x defaults to epsilon, SD 2.x to v-prediction (the 768-v models)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    ref.scheduler = pipe.scheduler  # same class + config; the folder's own scheduler is the epsilon one
    assert (_generate(pipe) == _generate(ref)).all()


def test_prediction_type_override(sd2):
    _, path, cfg = sd2
    assert load_single_file(path, config_dir=cfg, prediction_type="epsilon").scheduler.config.prediction_type \
        == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        load_single_file(path, config_dir=cfg, prediction_type="sample-ish")


def test_lora_file_is_refused_with_a_clear_message(tmp_path):
    kohya = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
             "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    peft = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}
    for name, sd in (("kohya", kohya), ("peft", peft)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(NotACheckpointError, match="looks like a LoRA, not a full checkpoint: load it as a style"):
            load_single_file(tmp_path / f"{name}.safetensors")


def test_other_wrong_files_are_refused(sd1, tmp_path):
    ref, _, _ = sd1
    cases = {"vae": (vae_to_ldm(ref.vae.state_dict(), ref.vae.config), NotACheckpointError, "VAE alone"),
             "random": ({"foo": torch.randn(3, 5), "bar": torch.randn(7)}, NotACheckpointError,
                        "does not look like a Stable Diffusion checkpoint"),
             "embedding": ({"emb_params": torch.zeros(2, 768)}, NotACheckpointError, "textual-inversion"),
             "sdxl": ({"conditioner.embedders.0.x": torch.zeros(1)}, UnsupportedCheckpointError, "SDXL"),
             "unet_only": ({"model.diffusion_model.out.2.bias": torch.zeros(4)}, SingleFileError, "no VAE")}
    for name, (sd, err, msg) in cases.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(err, match=msg):
            load_single_file(tmp_path / f"{name}.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(NotACheckpointError, match="not a readable .safetensors"):
        load_single_file(tmp_path / "junk.safetensors")
    assert issubclass(SingleFileError, ValueError)


def test_renamed_or_truncated_checkpoint_is_refused(sd1, tmp_path):
    _, path, cfg = sd1
    shutil.copy(path, tmp_path / "model.st")  # diffusers would torch.load any name not ending in .safetensors
    with pytest.raises(SingleFileError, match="rename"):
        load_single_file(tmp_path / "model.st", config_dir=cfg)
    from safetensors.torch import load_file
    sd = load_file(str(path))
    sd.pop("first_stage_model.decoder.conv_out.weight")
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(SingleFileError, match="cut.safetensors"):
        load_single_file(tmp_path / "cut.safetensors", config_dir=cfg)


def test_fp16_checkpoint_loads_as_fp32(sd1, tmp_path):
    """Most downloaded checkpoints are fp16; the pipeline must come out fp32 with the same (rounded) values."""
    ref, path, cfg = sd1
    from safetensors.torch import load_file
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(path)).items()},
              str(tmp_path / "half.safetensors"))
    pipe = load_single_file(tmp_path / "half.safetensors", config_dir=cfg)
    w = pipe.unet.conv_in.weight
    assert w.dtype == torch.float32 and torch.equal(w, ref.unet.conv_in.weight.half().float())
    assert {p.dtype for m in (pipe.vae, pipe.text_encoder) for p in m.parameters()} == {torch.float32}


@pytest.mark.parametrize("name,xattn,size,heads,linear,pt,te", [
    ("sd15", 768, 64, 8, False, "epsilon", (768, 12, "quick_gelu", "<|endoftext|>", 49407)),
    ("sd21", 1024, 96, [5, 10, 20, 20], True, "v_prediction", (1024, 23, "gelu", "!", 0))])
def test_shipped_configs(name, xattn, size, heads, linear, pt, te):
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
    from transformers import CLIPTokenizer

    d = CONFIG_ROOT / name
    u = UNet2DConditionModel.load_config(d, subfolder="unet", local_files_only=True)
    assert (u["cross_attention_dim"], u["sample_size"], u["attention_head_dim"], u["use_linear_projection"]) == \
        (xattn, size, heads, linear)
    assert u["upcast_attention"] == linear and u["block_out_channels"] == [320, 640, 1280, 1280]
    v = AutoencoderKL.load_config(d, subfolder="vae", local_files_only=True)
    assert v["sample_size"] == size * 8 and v["scaling_factor"] == 0.18215
    assert DiffusionPipeline.load_config(d)["_class_name"] == "StableDiffusionPipeline"
    s = DDIMScheduler.load_config(d, subfolder="scheduler", local_files_only=True)  # any scheduler class reads it
    assert s["prediction_type"] == pt and s["beta_schedule"] == "scaled_linear"
    assert s["_class_name"] == ("DDIMScheduler" if linear else "PNDMScheduler")  # as in the public repos
    c = CLIPTextConfig.from_pretrained(d, subfolder="text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(d, subfolder="tokenizer", local_files_only=True)
    assert (c.hidden_size, c.num_hidden_layers, c.hidden_act, tok.pad_token, tok.pad_token_id) == te
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77 and (d / "tokenizer" / "LICENSE-open_clip").is_file()
    # the configs build the real architectures (on the meta device: no memory): 859.5M / 865.9M UNet params
    from accelerate import init_empty_weights
    with init_empty_weights():
        n = sum(p.numel() for p in UNet2DConditionModel.from_config(u).parameters())
    assert n == {"sd15": 859_520_964, "sd21": 865_910_724}[name]
