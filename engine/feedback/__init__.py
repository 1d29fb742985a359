"""Feedback: ratings of generated images, instant feedback (FABRIC) and refinement (liked-image tuning +
Diffusion-DPO) that makes version N+1 of a style.

Owns: the `ratings` table of <data_dir>/stylebooth.db (its own schema version, ratings.py) and refinement runs
(runs/<id>/ with job.json, written by refine.py); the new style version goes through engine.styles.library.
  dpo.py       the Diffusion-DPO loss (Wallace et al. 2024, eq. 14) and the rating-weighted denoising loss
  fabric.py    the FABRIC attention processor (von Rütte et al. 2023) around the UNet's self-attention (attn1)
  ratings.py   ratings with the image's full recipe, owner, time and tags; change, remove, export as JSON
  refine.py    RefineRequest -> a short training round from v(N)'s LoRA to v(N+1)
May import: engine.core, engine.models, engine.generate, engine.styles, engine.jobs, engine.train.
"""
