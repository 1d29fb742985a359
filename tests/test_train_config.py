"""TrainConfig: validation messages, presets, TOML round trip, trigger tokens; the trainer reads every field."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import pytest

from engine.core.config import ConfigError
from engine.core.train_config import (TRIGGER_CANDIDATES, TrainConfig, config_hash, field_names, load_train_config,
                                 presets, save_train_config, suggest_trigger_token)

ROOT = Path(__file__).resolve().parents[1]


def make(**over) -> TrainConfig:
    return TrainConfig(**{**presets("subject"), "instance_images": ("a.png", "b.png"), **over})


def test_presets_are_valid_and_follow_their_templates():
    subject, style = make(), TrainConfig(**dict(presets("style"), instance_images=("a.png",)))
    assert subject.instance_prompt == "a photo of olis shape" and not subject.with_prior_preservation  # opt-in
    assert subject.class_prompt == "a photo of shape" and "conv1" in subject.unet_target_modules
    assert style.instance_prompt == "a olis style shape" and not style.with_prior_preservation
    assert style.random_flip and style.lora_rank >= subject.lora_rank
    p = presets("style", token="zyk", class_noun="painting")
    assert p["instance_prompt"] == "a zyk style painting" and "instance_images" not in p
    assert set(p) | {"instance_images", "instance_captions", "schema_version"} == set(field_names())
    with pytest.raises(ConfigError, match="choose one of: subject, style"):
        presets("portrait")


@pytest.mark.parametrize("over, message", [
    (dict(instance_images=()), "add at least one training image"),
    (dict(instance_prompt="a photo of shape"), "must contain the trigger token 'olis'"),
    (dict(trigger_token="photo", instance_prompt="a photo of photo"), "common word"),
    (dict(trigger_token="two words"), "one short word"),
    (dict(class_prompt="a photo of olis"), "must not contain the trigger token"),
    (dict(class_prompt="", with_prior_preservation=True), "describe the class"),
    (dict(lr_scheduler="polynomial"), "lr_scheduler` must be one of constant, cosine, linear"),
    (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(resolution=500), "divisible by 8 .* try 496"),
    (dict(learning_rate=0.5), "at most 0.01"),
    (dict(lr_warmup_steps=400), "below `max_train_steps`"),
    (dict(text_encoder_stop_fraction=1.5), "between 0.0 and 1.0"),
    (dict(min_timestep=-1), "`min_timestep` must be between 0 and 999"),
    (dict(max_timestep=1001), "`max_timestep` must be between 1 and 1000"),
    (dict(min_timestep=500, max_timestep=500), r"`min_timestep` \(500\) must be below `max_timestep` \(500\)"),
    (dict(cache_latents=True, center_crop=False), "cache_latents` needs `center_crop`"),
    (dict(uncond_preservation_weight=-1.0), "`uncond_preservation_weight` must be between 0.0 and 100.0"),
    (dict(uncond_preservation_weight="5"), "uncond_preservation_weight"),
    (dict(uncond_preservation_weight=5.0, method="full"), "set it to 0 or use method 'lora'"),
    (dict(output_name="../x"), "plain file name"),
    (dict(max_train_steps=2.5), "whole number"),
    (dict(validation_prompts=("ok", " ")), "empty prompt"),
    (dict(schema_version=2), "schema_version"),
    (dict(instance_captions=("a olis shape",)), "1 captions for 2 images"),
    (dict(instance_captions=("a olis shape", "a red shape")), r"caption 2 \(b.png: 'a red shape'\) must contain"),
])
def test_validation_messages_say_how_to_fix(over, message):
    with pytest.raises(ConfigError, match=message):
        make(**over)


def test_wandb_only_when_importable():
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            make(report_to="wandb")
    assert make(report_to="none").report_to == "none"


def test_toml_round_trip_and_unknown_key_named(tmp_path):
    cfg = make(validation_prompts=("a photo of olis shape",), prior_loss_weight=1, seed=7)
    assert cfg.prior_loss_weight == 1.0 and isinstance(cfg.prior_loss_weight, float)  # TOML ints become floats
    path = tmp_path / "run.toml"
    save_train_config(cfg, path)
    assert load_train_config(path) == dataclasses.replace(cfg, instance_images=tuple(
        str(tmp_path / p) for p in cfg.instance_images))  # relative image paths are taken from the file's folder
    path.write_text(path.read_text() + "learning_rat = 0.001\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rat"):
        load_train_config(path)


def test_config_hash_ignores_fields_that_do_not_change_weights():
    base = make()
    assert config_hash(base) == config_hash(dataclasses.replace(base, validation_prompts=("x",), output_name="y"))
    assert config_hash(base) != config_hash(dataclasses.replace(base, learning_rate=2e-4))


def test_fields_added_later_keep_old_checkpoints_resumable():
    """A checkpoint written before min/max_timestep, caption_dropout, uncond_preservation_weight, prior_target and
    onpolicy_prior_weight existed hashed every other field: at their "as before" values the hash is the same, so the run resumes after an
    upgrade; another value is another run (old runs had no prior_target and read as "images", its default)."""
    base = dataclasses.replace(make(), prior_target="images")
    old = {k: v for k, v in dataclasses.asdict(base).items()
           if k not in ("validation_prompts", "validation_steps", "checkpointing_steps", "checkpoints_total_limit",
                        "report_to", "output_name", "eval_seeds", "eval_prompts", "eval_model", "eval_fidelity_floor",
                        "extract_rank", "extract_energy", "min_timestep", "max_timestep", "caption_dropout",
                        "uncond_preservation_weight", "prior_target", "onpolicy_prior_weight")}
    assert config_hash(base) == hashlib.sha256(json.dumps(old, sort_keys=True, default=list).encode()).hexdigest()
    assert config_hash(dataclasses.replace(base, max_timestep=500)) != config_hash(base)
    assert config_hash(dataclasses.replace(base, uncond_preservation_weight=5.0)) != config_hash(base)
    assert config_hash(dataclasses.replace(base, prior_target="base")) != config_hash(base)
    with_prior = dataclasses.replace(base, with_prior_preservation=True)
    assert config_hash(dataclasses.replace(with_prior, onpolicy_prior_weight=5.0)) != config_hash(with_prior)


class _VocabTokenizer:
    """Greedy longest-match over a tiny vocabulary, like BPE for our purpose."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            piece = next(text[i:j] for j in range(len(text), i, -1) if text[i:j] in self.vocab or j == i + 1)
            ids.append(self.vocab.get(piece, 0))
            i += len(piece)
        return type("Enc", (), {"input_ids": ids})()


def test_suggest_trigger_token_prefers_a_single_rare_token():
    tok = _VocabTokenizer({"zyk": 1, "ol": 2, "is": 3})
    assert suggest_trigger_token(tok) == "zyk"  # "olis" splits into two tokens here
    assert suggest_trigger_token(_VocabTokenizer({"olis": 5, "zyk": 1})) == "olis"
    char_level = _VocabTokenizer({})
    assert suggest_trigger_token(char_level) == min(TRIGGER_CANDIDATES, key=len)  # fewest tokens wins
    assert suggest_trigger_token(_VocabTokenizer({"olis": 5, "zyk": 1}), avoid=("olis",)) == "zyk"


def test_suggest_trigger_token_on_clip_vocabulary():
    tok_dir = ROOT / "assets" / "demo-model" / "tokenizer"
    if not (tok_dir / "vocab.json").is_file():
        pytest.skip("the demo model (with CLIP's real vocabulary) is not built")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tok_dir)
    word = suggest_trigger_token(tok)
    assert word == "olis" and len(tok(word, add_special_tokens=False).input_ids) == 1


def test_every_field_is_read_by_the_trainer():
    """A GUI setting the trainer silently ignores is the anti-pattern this guards against."""
    files = ("loop.py", "prepare.py", "state.py", "data.py", "output.py", "evaluate.py", "checkpoints.py", "full.py")
    source = "".join((ROOT / "engine" / "train" / f).read_text() for f in files)
    unread = [f for f in field_names() if f != "instance_images" and not re.search(rf"\bcfg\.{f}\b", source)]
    assert unread == []
    assert "cfg.instance_images" in source
