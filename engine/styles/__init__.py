"""Styles: the library and everything a style is made of.

Owns: styles/<id>/v<N>/ folders and the library tables of <data_dir>/stylebooth.db.
  store.py        StyleInfo, publish (atomic folder, then a library row), trigger insertion
  db.py           the SQLite connection (WAL, foreign keys) and schema migrations
  library.py      styles, versions, tags, trash, search, adoption of folders the database does not know
  lora_format.py  LoRA/embedding key formats (PEFT, diffusers, kohya/A1111), matching against the loaded model
  interop.py      import (safetensors only, matched, MF-3/4/7/8) and export (diffusers, A1111) of styles
  adapters.py     applying one or several styles to the loaded model (LoRA adapters fused, embedding tokens)
  blend.py        live weighted blends and bakes into new styles (exact rank concatenation or SVD)
  instant.py      instant styles: IP-Adapter folders (demo / local / hub), image embeddings, attaching the
                  adapter with InstantStyle block scales
May import: engine.core, engine.models.
"""
