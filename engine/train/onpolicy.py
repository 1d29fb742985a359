"""On-policy prior preservation: the LoRA model's own sampling states for the class prompts, held to the base model.

Why: DreamBooth's prior term (Ruiz et al. 2023, eq. 2) holds the class prompts on *noised class images*, i.e. on
latents the base model passes through. A subject LoRA bends the trajectory, and on the demo model the leak into
other prompts happens in the middle of sampling (scripts/prior_leak_steps.py: the LoRA on for the first 5 of 20
steps only leaks nothing, on for steps 5-19 leaks as much as always on), on half-drawn shapes that neither the class
nor the instance images cover. Training on the states the learner itself visits, with the expert's answer as the
target, is DAgger (Ross et al. 2011); here the learner is the LoRA model, the expert the frozen base model under it.

Every `REFRESH` steps `ROLLOUTS` class prompts are sampled with the current LoRA model as the app samples (DPM++ 2M,
20 steps, guidance 5), and the latents entering steps `FIRST`..`LAST` are kept with their timesteps (the pool; owner:
this module, saved in checkpoints for exact resume). Each training step draws `PER_STEP` of them and adds
`onpolicy_prior_weight` x the mean squared difference between the LoRA model's and the base model's predictions for
the class prompt and for the empty prompt (guidance mixes the two: e_u + w (e_c - e_u), Ho & Salimans 2022 eq. 6).
"""
from __future__ import annotations

import torch

REFRESH, ROLLOUTS, PER_STEP = 50, 8, 2
STEPS, GUIDANCE, FIRST, LAST = 20, 5.0, 3, 15  # the app's sampling; the middle steps where the leak happens


class _Enough(Exception):
    """Stops a rollout once the last kept step is reached."""


def refresh(run, step: int) -> dict[str, torch.Tensor]:
    """Sample the pool at `step` with the current weights: its own generator (seed, step), so a resumed run that
    reaches the same step with the same weights draws the same pool."""
    from engine.generate.sampler import make_scheduler, sample, tokenize

    cfg, c = run.setup.cfg, run.models.components
    prompts = cfg.class_prompts
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    rows = [prompts[i] for i in torch.randint(len(prompts), (ROLLOUTS,), generator=gen).tolist()]
    seeds = torch.randint(2 ** 31 - 1, (ROLLOUTS,), generator=gen).tolist()
    sched = make_scheduler("dpmpp_2m", c.scheduler.config)
    sched.set_timesteps(STEPS)
    kept = []

    def keep(i: int, n: int, latents: torch.Tensor) -> None:  # latents after step i enter step i + 1
        if FIRST <= i + 1 <= LAST:
            kept.append(latents.clone())
        if i + 1 >= LAST:
            raise _Enough

    modes = [(m, m.training) for m in (c.unet, c.text_encoder)]
    for m, _ in modes:
        m.eval()
    try:
        sample(c, rows, [""] * ROLLOUTS, seeds, num_inference_steps=STEPS, guidance_scale=GUIDANCE, callback=keep,
               output="latent")
    except _Enough:
        pass
    finally:
        for m, was in modes:
            m.train(was)
    return {"latents": torch.stack(kept), "timesteps": sched.timesteps[FIRST:LAST + 1].clone(),
            "ids": tokenize(c.tokenizer, rows), "step": torch.tensor([step])}


def pool_for(run) -> dict[str, torch.Tensor]:
    """The pool for the current step, refreshed when it is `REFRESH` steps old (or missing)."""
    pool, step = run.data.onpolicy, run.counters.step
    due = step - step % REFRESH
    if not pool or int(pool["step"]) != due:
        pool.clear()
        pool.update(refresh(run, due))
    return pool


def draw(run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`PER_STEP` (latent, timestep, class-prompt ids) from the pool, drawn with the run's generator."""
    pool, gen = pool_for(run), run.data.gen
    k = torch.randint(pool["latents"].shape[0], (PER_STEP,), generator=gen)
    r = torch.randint(pool["latents"].shape[1], (PER_STEP,), generator=gen)
    return pool["latents"][k, r], pool["timesteps"][k], pool["ids"][r]
