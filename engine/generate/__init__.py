"""Generation: the one CFG sampler (previews, priors and Generate all use it), PNG recipes, and batches with
X/Y grids and zips (batch.py; styles come in through a callback, so no engine.styles import).

Owns: the denoising loop and what goes into / comes out of a PNG's text chunks.
May import: engine.core. Never engine.train.
"""
