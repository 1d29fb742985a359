"""Styles: trained LoRA styles on disk (store.py) and applying them to the loaded model (adapters.py).

Owns: styles/<id>/v<N>/ folders. The library (SQLite, import/export, blending) grows here.
May import: engine.core, engine.models.
"""
