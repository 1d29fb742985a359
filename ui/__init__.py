"""Gradio UI: one file per tab, each built by a function that closes over the Engine.

Never imports torch, diffusers, transformers or peft (tests/test_import_boundaries.py checks this).
"""
