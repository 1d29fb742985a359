"""Base models: loading (diffusers folder, hub id, single-file checkpoint), file safety, fingerprints.

Owns: which files may be loaded (pickles refused by content) and the loaded `LoadedModel` components.
May import: engine.core, engine.generate.sampler (the `Components` bundle the sampler runs on).
"""
