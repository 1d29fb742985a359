"""scripts/conditioning_ceiling.py measures what conditioning alone can do: that only holds if nothing but the
message trains (README "Instant style": the ceiling on the demo model)."""
from __future__ import annotations

import torch

import scripts.conditioning_ceiling as CC
from engine.models.loading import load_base_model
from scripts.learning_table import TOKEN, example_files


def _frozen_demo():
    c = load_base_model(None).components  # a fresh copy: the test changes its embedding table
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False)
    return c


def test_textual_inversion_moves_the_trigger_row_only():
    c = _frozen_demo()
    table = c.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    params, condition, after_step = CC.text_message(c, [f"a {TOKEN} circle in red on a blue background"])
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(2):
        states, added = condition()
        states.pow(2).mean().backward()  # any loss through the encoder reaches the caption's other words too
        opt.step()
        opt.zero_grad()
        after_step()
    assert added is None
    changed = (table != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [c.tokenizer.convert_tokens_to_ids(TOKEN + "</w>")]
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_adapter_ceiling_optimises_the_image_embedding_and_nothing_else():
    c = _frozen_demo()
    images, captions = example_files("checkered")
    unet_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    params, condition, _ = CC.adapter_message(c, images, captions)
    (e,) = params
    start = e.detach().clone()
    opt = torch.optim.Adam(params, lr=0.1)
    z = CC.example_latents(c, images)
    states, added = condition()
    t = torch.full((len(z),), 500)
    c.unet(z, t, states, added_cond_kwargs=added).sample.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(e.detach(), start)
    assert added["image_embeds"][0].shape[:2] == (len(images), 1)
    after = c.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in unet_before.items())  # the UNet's own weights untouched
    assert not any(p.requires_grad for p in c.unet.parameters())


def test_pathway_ceiling_trains_the_adapter_layers_of_the_blocks_on_and_never_the_unets_own():
    """`--via pathway --blocks style` (the per-texture upper bound of an IP-Adapter, "style only"): the embedding,
    the projection and the style blocks' to_k_ip / to_v_ip move; the other blocks' adapter layers and every UNet
    weight of its own stay; `--via tokens` moves the projection but no key or value."""
    from engine.styles.instant import STYLE_BLOCKS

    images, captions = example_files("checkered")
    for train in ("tokens", "pathway"):
        c = _frozen_demo()
        own = {k: v.clone() for k, v in c.unet.state_dict().items()}
        params, condition, _ = CC.adapter_message(c, images, captions, train=train, style_only=True)
        before = {k: v.clone() for k, v in c.unet.state_dict().items()}
        opt = torch.optim.Adam(params, lr=0.1)
        z = CC.example_latents(c, images)
        states, added = condition()
        c.unet(z, torch.full((len(z),), 500), states, added_cond_kwargs=added).sample.pow(2).mean().backward()
        opt.step()
        moved = {k for k, v in c.unet.state_dict().items() if not torch.equal(v, before[k])}
        assert moved
        assert not moved & own.keys()  # the UNet's own weights untouched
        proj = {k for k in moved if k.startswith("encoder_hid_proj.")}
        kv = moved - proj
        assert proj  # the image projection trains in both
        if train == "tokens":
            assert not kv
        else:
            assert kv and all(k.startswith(STYLE_BLOCKS["demo"]) and "_ip." in k for k in kv)
            styled = {n for n, p in c.unet.attn_processors.items() if hasattr(p, "to_k_ip") and p.scale[0] > 0}
            assert len({k.rsplit(".processor", 1)[0] for k in kv}) == len(styled)  # every style block's layers
