"""Automatic class prompts for prior preservation (issue 14): the instance captions with the trigger replaced by
members of the class (engine.core.captions.class_prompts_from_captions), used by the presets."""
from __future__ import annotations

from engine.core.captions import class_prompts_from_captions
from engine.core.train_config import TrainConfig, presets
from engine.demo import world as W

HEART = ["a photo of olis shape in red on a blue background", "a photo of olis shape in yellow on a purple background",
         "a photo of olis shape in green on a white background", "a photo of olis shape in orange on a black background"]


def test_subject_captions_become_class_members_in_the_same_contexts():
    got = class_prompts_from_captions(HEART, "olis", W.TRAIN_SHAPES, class_noun="shape", n=100)
    assert got[:2] == ["a photo of a circle in red on a blue background",
                       "a photo of a square in yellow on a purple background"]
    assert len(got) == len(set(got)) == len(HEART) * len(W.TRAIN_SHAPES)  # every caption x member pair, once
    assert not any("olis" in p for p in got)
    first12 = class_prompts_from_captions(HEART, "olis", W.TRAIN_SHAPES, class_noun="shape")
    assert first12 == got[:12]
    assert {p.split()[4] for p in first12} == set(W.TRAIN_SHAPES)  # the first 12 cover every member...
    assert {p.split(" in ")[1] for p in first12} == {c.split(" in ")[1] for c in HEART}  # ...and every caption


def test_style_trigger_is_replaced_in_place_and_articles_follow():
    caps = ["a olis circle in blue on a yellow background", "an olis square, red background"]
    assert class_prompts_from_captions(caps, "olis", ["striped", "ornate"]) == [
        "a striped circle in blue on a yellow background", "an ornate square, red background",
        "an ornate circle in blue on a yellow background", "a striped square, red background"]
    # a class word as the only member (a real user's subject): "olis dog" -> "a dog"
    assert class_prompts_from_captions(["olis dog on the grass", "a photo of the olis dog"], "olis", ["dog"],
                                       class_noun="dog") == ["a dog on the grass", "a photo of a dog"]
    assert class_prompts_from_captions(["Olis toy", "olisx toy"], "olis", ["toy"], class_noun="toy") == [
        "a toy", "olisx toy"]  # case-insensitive, whole words only
    assert class_prompts_from_captions([], "olis", ["dog"]) == []
    assert class_prompts_from_captions(HEART, "olis", []) == []


def test_presets_use_them_and_the_config_accepts_them():
    p = presets("subject", token="olis", class_noun="shape", captions=HEART, class_members=W.TRAIN_SHAPES)
    prompts = p["class_prompt"].splitlines()
    # every caption x member pair (4 x 6), 4 class images each; the base model's prediction as their target
    assert prompts[0] == "a photo of a shape" and len(prompts) == 25 and p["num_class_images"] == 4 * 25
    assert prompts[1:] == class_prompts_from_captions(HEART, "olis", W.TRAIN_SHAPES, class_noun="shape", n=24)
    assert p["prior_target"] == "base"
    cfg = TrainConfig(instance_images=("x.png",) * 4, instance_captions=tuple(HEART),
                      **dict(p, with_prior_preservation=True))
    assert cfg.class_prompts == prompts
    # without captions nothing changes; a real user's class word is the default member
    assert presets("subject")["class_prompt"] == "a photo of shape"
    assert presets("subject", class_noun="dog", captions=["olis dog in the snow"])["class_prompt"].splitlines() == [
        "a photo of a dog", "a dog in the snow"]
