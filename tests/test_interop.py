"""Import and export of LoRAs and embeddings on a tiny SD model: exports reload in diffusers with the same images,
imports (PEFT, kohya/A1111 with LoCon convs, per-module alphas, embeddings) generate what the original did, and
files for another architecture, NaN-filled, truncated or pickled files are refused with clear messages."""
from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine.api import Engine
from engine.core.config import GenerateRequest, Settings
from engine.core.errors import LibraryError, ModelFileError, UnsafeModelFile
from engine.generate.recipes import a1111_parameters
from engine.styles.interop import export_file_name
from engine.styles.store import publish
from lora_support import ALPHA, R, _pipe, trained_like_lora

torch.set_num_threads(1)


def _images(pipe, prompt="a red circle") -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, generator=g, output_type="np", height=64, width=64).images


@pytest.fixture(scope="module")
def engine(tiny_sd, tmp_path_factory):
    return Engine(Settings(model=str(tiny_sd), data_dir=str(tmp_path_factory.mktemp("data"))))


@pytest.fixture(scope="module")
def style(engine, tiny_sd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    lora = trained_like_lora(tiny_sd, tmp)
    meta = tmp / "style.json"
    meta.write_text(json.dumps({
        "schema_version": 1, "trigger_token": "olis", "preset": "style", "base_model": engine.model.name,
        "base_model_fingerprint": engine.model.fingerprint, "prediction_type": "epsilon", "steps": 4,
        "instance_prompt": "a olis style shape", "created": "2026-01-01T00:00:00",
        "training_config": {"learning_rate": 1e-4, "text_encoder_lr": 5e-5, "seed": 0, "max_train_steps": 4,
                            "lora_rank": R, "lora_alpha": ALPHA},
        "training_images": [{"name": "a.png", "sha256": "0" * 64}, {"name": "b.png", "sha256": "1" * 64}]}))
    return publish(engine.data_dir, "Heart shape", lora, meta)


@pytest.fixture(scope="module")
def reference(tiny_sd, style):
    pipe = _pipe(tiny_sd)
    base = _images(pipe)
    pipe.load_lora_weights(str(style.lora), adapter_name="orig")
    with_style = _images(pipe)
    assert np.abs(with_style - base).max() > 0.05  # the LoRA really changes the images
    return with_style


def _engine_image(engine, style_id: str) -> np.ndarray:
    res = engine.generate(GenerateRequest(prompt="a red circle", num_inference_steps=2, seed=3, style=style_id))
    return np.asarray(res.images[0].image, np.int16)


@pytest.mark.parametrize("fmt", ["a1111", "diffusers"])
def test_export_reloads_in_diffusers_with_the_same_images(engine, style, reference, tiny_sd, tmp_path, fmt):
    res = engine.export_style(style.id, fmt, out_dir=tmp_path)
    pipe = _pipe(tiny_sd)
    pipe.load_lora_weights(str(res.path), adapter_name="exported")
    assert np.abs(_images(pipe) - reference).max() <= 1e-4
    with safe_open(str(res.path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    ours = json.loads(meta["stylebooth"])
    assert ours["schema_version"] == 1 and ours["trigger_words"] == ["olis"] and ours["style_id"] == style.id
    assert meta["modelspec.trigger_phrase"] == "olis" and meta["ss_output_name"] == "Heart shape"
    assert meta["ss_steps"] == "4" and meta["ss_learning_rate"] == "0.0001" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_olis": {"olis": 2}}
    if fmt == "a1111":
        assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
        for k in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                  "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj.alpha",
                  "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                  "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"):  # LoCon conv included
            assert k in keys, k
        assert float(load_file(str(res.path))["lora_unet_down_blocks_0_resnets_0_conv1.alpha"]) == ALPHA
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(R), str(ALPHA))
    else:
        assert all(re.search(r"^(unet|text_encoder)\..*\.lora_[AB]\.weight$", k) for k in keys)


def test_a1111_export_is_named_like_the_lora_entry_in_generated_pngs(engine, style, tmp_path):
    res = engine.export_style(style.id, "a1111", out_dir=tmp_path)
    png = engine.generate(GenerateRequest(prompt="a red circle", num_inference_steps=1, style=style.id)).images[0]
    entry = re.search(r"Lora: ([^,]+):[\d.]+", a1111_parameters(png.recipe)).group(1)
    assert res.path.name == f"{entry}.safetensors" == "Heart shape.safetensors"
    assert export_file_name('a/b:c*"d') == "a_b_c__d.safetensors"


@pytest.mark.parametrize("fmt", ["a1111", "diffusers"])
def test_import_of_an_export_generates_what_the_original_did(engine, style, tmp_path, fmt):
    exported = engine.export_style(style.id, fmt, out_dir=tmp_path).path
    res = engine.import_lora(exported, name="Imported heart")
    assert (res.kind, res.matched, res.total, res.warnings) == ("lora", res.total, res.total, ())
    assert res.total == len([k for k in load_file(str(style.lora)) if k.endswith("lora_A.weight")])
    s = res.style
    assert s.trigger_token == "olis" and s.source == "imported" and s.base_model_fingerprint == engine.model.fingerprint
    assert engine.get_style(s.id).tags == () and s.folder.is_relative_to(engine.data_dir / "styles")
    assert np.abs(_engine_image(engine, s.id) - _engine_image(engine, style.id)).max() <= 1
    assert any(x.id == s.id for x in engine.library_list("imported heart"))


def _manual_module_check(pipe, sd: dict[str, torch.Tensor], alphas: dict[str, float], index) -> int:
    """How many modules of a kohya file the pipeline applies with the wrong scale (W x + a/r · up(down(x)))."""
    import torch.nn.functional as Fn

    bad = 0
    for name, alpha in alphas.items():
        comp, path = index[name]
        d, u = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        mod = (pipe.unet if comp == "unet" else pipe.text_encoder).get_submodule(path)
        base = mod.get_base_layer()
        with torch.no_grad():
            if isinstance(base, torch.nn.Linear):
                x = torch.randn(3, base.in_features)
                want = base(x) + alpha / d.shape[0] * Fn.linear(Fn.linear(x, d), u)
            else:
                x = torch.randn(1, base.in_channels, 8, 8)
                want = base(x) + alpha / d.shape[0] * Fn.conv2d(Fn.conv2d(x, d, padding=base.padding), u)
            bad += int((mod(x) - want).abs().max() > 1e-4)
    return bad


def test_kohya_file_with_per_module_ranks_and_alphas_imports_exactly(engine, style, tiny_sd, tmp_path):
    sd = load_file(str(engine.export_style(style.id, "a1111", out_dir=tmp_path).path))
    names = sorted({k.split(".")[0] for k in sd})
    alphas = {}
    for i, n in enumerate(names):  # what kohya writes for LoCon with conv_alpha, or dynamic-rank LoRA
        alphas[n] = float(1 + i % 5)
        sd[f"{n}.alpha"] = torch.tensor(alphas[n])
        if i % 3 == 0:
            sd[f"{n}.lora_down.weight"] = sd[f"{n}.lora_down.weight"][:2].contiguous()
            sd[f"{n}.lora_up.weight"] = sd[f"{n}.lora_up.weight"][:, :2].contiguous()
    f = tmp_path / "varied.safetensors"
    save_file(sd, str(f), metadata={"ss_output_name": "varied_style"})
    res = engine.import_lora(f)
    assert res.matched == len(names) and res.style.trigger_token == "varied_style"
    from engine.styles.lora_format import module_index

    pipe = _pipe(tiny_sd)
    index = {k[1]: (k[0], v[0]) for k, v in module_index(pipe.unet, pipe.text_encoder).items()}
    pipe.load_lora_weights(str(res.style.lora), adapter_name="stored")
    assert _manual_module_check(pipe, sd, alphas, index) == 0
    # and the stored style round-trips to kohya with every module's alpha intact
    back = load_file(str(engine.export_style(res.style.id, "a1111", out_dir=tmp_path / "b").path))
    assert {n: float(back[f"{n}.alpha"]) for n in names} == alphas


def test_lora_for_another_architecture_is_refused_with_the_layer_count(engine, style, tmp_path):
    sd = load_file(str(engine.export_style(style.id, "a1111", out_dir=tmp_path).path))
    wide = {}  # the same layer names for a UNet/text encoder 10x as wide (another model family)
    for k, t in sd.items():
        if k.endswith("lora_down.weight"):
            t = torch.randn(t.shape[0], t.shape[1] * 10, *t.shape[2:])
        elif k.endswith("lora_up.weight"):
            t = torch.randn(t.shape[0] * 10, *t.shape[1:])
        wide[k] = t
    n = len([k for k in sd if k.endswith("lora_down.weight")])
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LibraryError, match=rf"0 of {n} layers matched: this LoRA is for another architecture"):
        engine.import_lora(tmp_path / "wide.safetensors")
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 1280),
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 4),
            "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.randn(4, 640),
            "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.randn(640, 4)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(LibraryError, match="0 of 2 layers matched"):
        engine.import_lora(tmp_path / "sdxl.safetensors")
    assert not any(s.name in ("wide", "sdxl") for s in engine.library_list(archived=None))


def test_partial_match_imports_with_a_warning_naming_the_count(engine, style, tmp_path):
    sd = load_file(str(engine.export_style(style.id, "a1111", out_dir=tmp_path).path))
    n = len([k for k in sd if k.endswith("lora_down.weight")])
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.randn(4, 64)  # no down block 7 here
    sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.randn(64, 4)
    save_file(sd, str(tmp_path / "partial.safetensors"))
    res = engine.import_lora(tmp_path / "partial.safetensors", trigger="zwx, zwx style", tags="found, partial")
    assert (res.matched, res.total) == (n, n + 1)
    assert res.warnings and res.warnings[0].startswith(f"{n} of {n + 1} layers matched")
    assert res.style.trigger_words == ("zwx", "zwx style") and engine.get_style(res.style.id).tags == ("found", "partial")
    assert not any("down_blocks.7" in k for k in load_file(str(res.style.lora)))  # only what applies is stored


def test_nan_truncated_and_pickled_files_are_refused(engine, style, tmp_path):
    good = engine.export_style(style.id, "a1111", out_dir=tmp_path).path
    sd = load_file(str(good))
    sd = {k: torch.full_like(v, float("nan")) if k.endswith("up.weight") else v for k, v in sd.items()}
    save_file(sd, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelFileError, match="NaN or Inf"):
        engine.import_lora(tmp_path / "nan.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        engine.import_lora(cut)
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": [1.0]}, protocol=4))
    with pytest.raises(UnsafeModelFile, match="pickle"):
        engine.import_lora(pkl)
    named = tmp_path / "lora.ckpt"
    named.write_bytes(good.read_bytes())
    with pytest.raises(ModelFileError, match="extension does not match"):
        engine.import_lora(named)


def test_trigger_word_from_kohya_tag_frequency_or_file_name(engine, style, tmp_path):
    sd = load_file(str(engine.export_style(style.id, "a1111", out_dir=tmp_path).path))
    save_file(sd, str(tmp_path / "tags.safetensors"),
              metadata={"ss_tag_frequency": json.dumps({"10_sks dog": {"sks dog": 12, "grass": 3}})})
    assert engine.import_lora(tmp_path / "tags.safetensors").style.trigger_token == "sks dog"
    save_file(sd, str(tmp_path / "spec.safetensors"), metadata={"modelspec.trigger_phrase": "zq, zq art",
                                                                  "modelspec.title": "Zq art"})
    res = engine.import_lora(tmp_path / "spec.safetensors")
    assert (res.style.trigger_words, res.style.name) == (("zq", "zq art"), "Zq art")
    save_file(sd, str(tmp_path / "my lora.safetensors"))
    res = engine.import_lora(tmp_path / "my lora.safetensors")
    assert (res.style.trigger_token, res.style.name) == ("my_lora", "my lora")


@pytest.mark.parametrize("layout", ["diffusers", "a1111", "string_to_param"])
def test_textual_inversion_embeddings_import_and_apply(engine, tmp_path, layout):
    torch.manual_seed(2)
    vectors = torch.randn(2, 32) * 0.5
    f = tmp_path / f"heart-{layout}.safetensors"
    content = {"diffusers": {"<heart>": vectors[0]}, "a1111": {"emb_params": vectors},
               "string_to_param": {"string_to_param.*": vectors}}[layout]
    save_file(content, str(f))
    res = engine.import_lora(f, name=f"heart {layout}")
    want = vectors[:1] if layout == "diffusers" else vectors
    token = "<heart>" if layout == "diffusers" else f"heart-{layout}"
    assert res.kind == "embedding" and res.style.trigger_token == token and res.style.kind == "embedding"
    plain = engine.generate(GenerateRequest(prompt=f"a {token} circle", num_inference_steps=2, seed=1))
    styled = engine.generate(GenerateRequest(prompt=f"a {token} circle", num_inference_steps=2, seed=1,
                                             style=res.style.id))
    tok, te = engine.model.components.tokenizer, engine.model.components.text_encoder
    ids = tok.convert_tokens_to_ids([token] + [f"{token}_{i}" for i in range(1, len(want))])
    torch.testing.assert_close(te.get_input_embeddings().weight[ids].detach(), want)
    assert np.abs(np.asarray(plain.images[0].image, np.int16) - np.asarray(styled.images[0].image, np.int16)).max() > 0
    exported = engine.export_style(res.style.id, "a1111", out_dir=tmp_path / "out").path
    assert exported.name == f"{token.strip('<>')}.safetensors" and list(load_file(str(exported))) == ["emb_params"]
    f2 = tmp_path / "wide-emb.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, str(f2))
    with pytest.raises(LibraryError, match="0 of 1 layers matched: this embedding is for another architecture"):
        engine.import_lora(f2)


def test_emptying_the_trash_unloads_the_removed_styles_and_generation_goes_on(engine, style, tmp_path):
    exported = engine.export_style(style.id, "diffusers", out_dir=tmp_path).path
    res = engine.import_lora(exported, name="to be removed")
    before = _engine_image(engine, res.style.id)
    engine.delete_style(res.style.id)
    assert engine.empty_trash() == 1
    assert res.style.adapter_name not in engine._adapters.loaded
    assert not res.style.folder.exists()
    with pytest.raises(LibraryError, match="unknown style"):
        engine.generate(GenerateRequest(prompt="a red circle", num_inference_steps=1, style=res.style.id))
    assert np.abs(_engine_image(engine, style.id) - before).max() <= 1  # the original still applies


def test_export_refuses_weights_changed_on_disk(engine, style, tmp_path):
    res = engine.import_lora(engine.export_style(style.id, "diffusers", out_dir=tmp_path).path, name="tampered")
    sd = load_file(str(res.style.lora))
    key = next(iter(sd))
    sd[key] = sd[key] + 1
    save_file(sd, str(res.style.lora), metadata={"format": "pt"})
    with pytest.raises(LibraryError, match="changed on disk"):
        engine.export_style(res.style.id, "a1111", out_dir=tmp_path / "x")


@pytest.mark.parametrize("extra, kind", [({"model.diffusion_model.out.0.weight": torch.ones(4)}, "unknown"),
                                         ({"lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale": torch.ones(1, 32)},
                                          "DoRA")])
def test_keys_outside_the_lora_schema_are_refused(engine, style, tmp_path, extra, kind):
    sd = {**load_file(str(engine.export_style(style.id, "a1111", out_dir=tmp_path).path)), **extra}
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(LibraryError, match=rf"{kind} keys that Stylebooth cannot apply"):
        engine.import_lora(tmp_path / "odd.safetensors")


def test_older_diffusers_keys_import_and_generate_what_the_original_did(engine, style, tmp_path):
    """unet.X.lora.down.weight / text_encoder.X.lora_linear_layer.up.weight, no alpha (scale 1): the original's
    alpha/rank is folded into `up` so the same images are expected."""
    old = {}
    for k, v in load_file(str(style.lora)).items():
        comp, rest = k.split(".", 1)
        mod, ab = rest.rsplit(".lora_", 1)
        mid = ".lora." if comp == "unet" else ".lora_linear_layer."
        old[f"{comp}.{mod}{mid}{'down' if ab.startswith('A') else 'up'}.weight"] = v if ab.startswith("A") \
            else v * (ALPHA / R)
    save_file(old, str(tmp_path / "old.safetensors"))
    res = engine.import_lora(tmp_path / "old.safetensors", trigger="olis")
    assert res.matched == res.total == len(old) // 2 and not res.warnings
    assert np.abs(_engine_image(engine, res.style.id) - _engine_image(engine, style.id)).max() <= 1


def test_full_model_and_sdxl_embedding_files_are_refused_with_what_they_are(engine, tmp_path):
    save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 4), "first_stage_model.x": torch.ones(2)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(LibraryError, match="neither a LoRA .* nor an embedding.*Model tab"):
        engine.import_lora(tmp_path / "model.safetensors")
    save_file({"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(LibraryError, match="0 of 2 layers matched: this is an SDXL embedding"):
        engine.import_lora(tmp_path / "xl.safetensors")


def test_parsing_and_matching_random_key_sets_never_crash(engine):
    from hypothesis import HealthCheck, given, settings, strategies as st

    from engine.styles import lora_format as LF

    names = st.sampled_from(["lora_unet_down_blocks_0_attentions_0_proj_in", "unet.conv_in", "text_encoder.x",
                             "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_a", "weird"])
    suffixes = st.sampled_from([".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight",
                                ".lora_B.weight", ".dora_scale", ".hada_w1_a", ""])
    shapes = st.lists(st.integers(1, 40), min_size=0, max_size=4)
    c = engine.model.components

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.tuples(names, suffixes), shapes, max_size=6))
    def check(spec):
        sd = {n + s: torch.ones(shape) for (n, s), shape in spec.items()}
        try:
            LF.match(LF.parse_lora(sd, {}), c.unet, c.text_encoder)
        except LibraryError:
            pass

    check()
