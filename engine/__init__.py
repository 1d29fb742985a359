"""Stylebooth's engine: everything that touches models, files and (later) the database. Never imports gradio.

The UI and the CLI call one facade, `engine.api.Engine`, and match on the torch-free types in `engine.core`.
Subpackages by capability, each allowed to import only the ones listed in its own docstring:

    core/      requests, settings, events, results, errors, durable file writes, image intake (torch-free)
    models/    base-model loading (diffusers folder, hub id, single file), file safety, fingerprints
    generate/  the one CFG sampler, the recipes written into every PNG, batches with X/Y grids
    train/     the DreamBooth + LoRA trainer: loop, math, data, priors, checkpoints, output, app job, CLI
    styles/    the style library (SQLite + styles/<id>/v<N>/), import/export, adapters, blending and bakes
    feedback/  ratings, instant feedback (FABRIC) and refinement to version N+1 (liked-image tuning + Diffusion-DPO)
    jobs/      job state on disk, per-job cancel tokens and the fair (round-robin by user) GPU turn
    studio/    accounts, quotas and credits with a ledger, the Studio service that checks admin roles
    cluster/   jobs on a Ray cluster (optional): the backend, content-addressed bundles, the store on the app's node,
               the worker-side job bodies and a fair queue with several slots
    demo/      the demo model's shapes world and its checker
"""
