"""Core types shared by every part of the engine and by the UI; torch-free, so ui/ may import them.

Owns: request and settings dataclasses (config.py, train_config.py, blend_config.py, batch_config.py), events and results (events.py), errors
(errors.py), durable writes (files.py), image intake (images.py), caption sidecars (captions.py).
May import: nothing of ours (the standard library, numpy, Pillow, tomli-w only).
"""
