"""Generation: the one CFG sampler (previews, priors and Generate all use it) and PNG recipes.

Owns: the denoising loop and what goes into / comes out of a PNG's text chunks.
May import: engine.core. Never engine.train.
"""
