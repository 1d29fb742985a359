"""Styles: trained LoRA styles on disk (store.py), applying one or several to the loaded model (adapters.py), and
blending them: live weighted sums and bakes into new styles (blend.py).

Owns: styles/<id>/v<N>/ folders. The library (SQLite, import/export, blending) grows here.
May import: engine.core, engine.models.
"""
