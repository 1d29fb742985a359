"""Training: DreamBooth + LoRA as numbered steps (loop.py), its math, data, priors, checkpoints, output, the
app job (job.py) and the command line (`python -m engine.train`).

Owns: run folders (runs/<id>/: checkpoints, tensorboard, job.json) and prior-image caches (priors/).
May import: engine.core, engine.models, engine.generate, engine.styles, engine.jobs.
"""
