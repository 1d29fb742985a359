"""Checkpoint I/O, exact-resume state and the crash-safe job file (RELIABILITY.md TR-1..TR-9).

A checkpoint is a folder `checkpoint-<step>/` that appears in one rename: it is written as
`checkpoint-<step>.tmp-<uuid>/`, every file fsynced, `manifest.json` (size + sha256 of every file) written last,
then renamed and the parent fsynced. Resume takes the newest folder whose manifest verifies; others are
quarantined as `.bad-*`. Tensors go to safetensors and everything else to JSON: nothing here unpickles.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.torch as st
import torch

from engine.models.safety import ModelFileError, validate_safetensors
from engine.core.train_config import config_hash
from engine.train.state import Counters
from engine.core.errors import CheckpointError, DiskFullError  # noqa: F401
from engine.core.files import fsync_dir
from engine.core.files import sha256_file

SCHEMA_VERSION = 1
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
MARGIN_BYTES = 32 * 2**20  # room for logs, previews and filesystem overhead on top of the estimate
Warn = Callable[[str], None]


# ---- low-level writes (one function, so tests can inject ENOSPC or a kill at every write) ---------------------

def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file: data must be on disk before the manifest that vouches for it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import safetensors
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "safetensors": safetensors.__version__}


# ---- disk space (TR-8) ---------------------------------------------------------------------------------------

def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free_space(path: Path, need: int, what: str) -> None:
    """Raise DiskFullError unless `need` bytes (plus a margin) are free where `path` lives."""
    free = free_bytes(path)
    if free < need + MARGIN_BYTES:
        raise DiskFullError(f"disk full: {what} needs about {(need + MARGIN_BYTES) / 2**20:.0f} MiB at {path} but "
                            f"only {free / 2**20:.0f} MiB are free. Free some space (or lower "
                            "checkpoints_total_limit) and resume; the last valid checkpoint is kept.")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---- writing, verifying, choosing and pruning checkpoints (TR-1, TR-2, TR-3) ----------------------------------

def save_checkpoint(ckpt_dir: Path, step: int, *, tensors: dict[str, dict[str, torch.Tensor]],
                    blobs: dict[str, bytes], json_files: dict[str, dict], manifest_info: dict, limit: int,
                    warn: Warn, protect: frozenset[int] = frozenset()) -> Path:
    """Write checkpoint-<step>/ atomically, verify it, then prune to `limit` (never the new or only one, nor the
    steps in `protect`)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    payload = {name: st.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}) for name, sd in tensors.items()}
    payload.update(blobs)
    payload.update({name: json.dumps(obj, indent=1, sort_keys=True).encode() for name, obj in json_files.items()})
    check_free_space(ckpt_dir, sum(map(len, payload.values())), f"checkpoint {step}")
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f"checkpoint-{step}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        files = {}
        for name, data in payload.items():
            _write_bytes(tmp / name, data)
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = dict(manifest_info, schema_version=SCHEMA_VERSION, step=step, files=files,
                        library_versions=library_versions(),
                        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        _write_bytes(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())  # last
        fsync_dir(tmp)
        if final.exists():  # a leftover from an abandoned branch of this run: keep it aside, never overwrite
            final.rename(ckpt_dir / f"{final.name}.bad-{uuid.uuid4().hex[:8]}")
        tmp.rename(final)
        fsync_dir(ckpt_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder must never linger (it is never resumed anyway)
        last = latest_step(ckpt_dir)
        kept = f"checkpoint-{last} is kept" if last is not None else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while saving checkpoint {step}; {kept}. Free some space and resume.") from e
        raise CheckpointError(f"could not write checkpoint {step} ({e}); {kept}.") from e
    try:
        verify_checkpoint(final)  # TR-2: prune only after the new checkpoint reads back correctly
    except CheckpointError as e:
        quarantine(final, str(e), warn)
        raise
    prune(ckpt_dir, limit, keep=final, warn=warn, protect=protect)
    return final


def verify_checkpoint(path: Path) -> dict:
    """Return the manifest if every listed file has its size and sha256; raise CheckpointError otherwise."""
    try:
        manifest = json.loads((path / "manifest.json").read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: manifest.json is missing (the save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: manifest.json is unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(f"{path.name}: manifest schema_version is not {SCHEMA_VERSION}")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"{path.name}: {name} is missing")
        if f.stat().st_size != info["size"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{path.name}: {name} does not match its sha256 in the manifest (corrupted)")
        if name.endswith(".safetensors"):
            try:
                validate_safetensors(f, check_values=False)
            except ModelFileError as e:
                raise CheckpointError(f"{path.name}: {e}") from None
    return manifest


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders, newest first (`.tmp-*` and `.bad-*` never match)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m[1]), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def latest_step(ckpt_dir: Path) -> int | None:
    steps = list_checkpoints(ckpt_dir)
    return steps[0][0] if steps else None


def remove_partial(ckpt_dir: Path, warn: Warn) -> None:
    """Delete `.tmp-*` folders left by a crash during a save; they are never valid."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob("checkpoint-*.tmp-*"):
            warn(f"removing {p.name}: an unfinished checkpoint from an interrupted save")
            shutil.rmtree(p, ignore_errors=True)


def quarantine(path: Path, reason: str, warn: Warn) -> None:
    bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    path.rename(bad)
    warn(f"WARNING: skipping {path.name}: {reason}. Moved it to {bad.name}; resuming from an earlier checkpoint.")


def find_resume_checkpoint(ckpt_dir: Path, warn: Warn) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; each invalid newer one is quarantined with a loud warning (TR-3)."""
    remove_partial(ckpt_dir, warn)
    for _, path in list_checkpoints(ckpt_dir):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as e:
            quarantine(path, str(e), warn)
    return None


def prune(ckpt_dir: Path, limit: int, *, keep: Path, warn: Warn, protect: frozenset[int] = frozenset()) -> None:
    """Delete the oldest checkpoints beyond `limit`; `keep` (just verified) always stays, and so do the steps in
    `protect` (full fine-tuning's best checkpoint, which is published from its weights), outside the count."""
    others = [p for step, p in list_checkpoints(ckpt_dir) if p != keep and step not in protect]
    for p in others[max(0, limit - 1):]:
        shutil.rmtree(p, ignore_errors=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return st.load_file(str(path))


# ---- optimizer, scheduler and RNG state as safetensors + JSON (TR-4, TR-5) ------------------------------------

def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors and JSON (no pickle, unlike optimizer.bin)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"optimizer state does not fit this model ({e}); start a new run") from None


def rng_blob(generators: dict[str, torch.Generator]) -> bytes:
    """Every RNG of this process (python, numpy, torch CPU/CUDA, named generators) as safetensors bytes."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    for name, g in generators.items():
        tensors[f"gen_{name}"] = g.get_state()
    npv = np.random.get_state()
    meta = {"python": json.dumps(random.getstate()),
            "numpy": json.dumps([npv[0], npv[1].tolist(), int(npv[2]), int(npv[3]), float(npv[4])])}
    return st.save(tensors, metadata=meta)


def restore_rng(path: Path, generators: dict[str, torch.Generator]) -> None:
    """Restore every RNG saved by `rng_blob`; any failure is an error, never a silent inexact resume (TR-5)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        py = json.loads(meta["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        name, keys, pos, has_gauss, gauss = json.loads(meta["numpy"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(tensors["torch_cpu"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count())])
        for name, g in generators.items():
            g.set_state(tensors[f"gen_{name}"])
    except Exception as e:  # noqa: BLE001 - every cause means the same thing to the user
        raise CheckpointError(f"could not restore the random state from {path.name} ({type(e).__name__}: {e}); "
                              "resume would not be exact. Resume on the same setup, or start a new run.") from None


# ---- a training run's full state <-> a checkpoint folder (called by engine.train.loop) --------------------------

def gather_blobs(acc, blob: bytes) -> list[bytes]:
    """Every rank's bytes on every rank (padded uint8 tensors through accelerator.gather)."""
    if acc.num_processes == 1:
        return [blob]
    t = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    sizes = acc.gather(torch.tensor([t.numel()], dtype=torch.int64)).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: t.numel()] = t
    rows = acc.gather(padded[None])
    return [bytes(rows[i, : sizes[i]].numpy()) for i in range(acc.num_processes)]


FULL_WEIGHTS = "weights.safetensors"
ONPOLICY_FILE = "onpolicy.safetensors"  # the on-policy prior's pool (engine.train.onpolicy)


def weights_file(cfg) -> str:
    """The trained weights in a checkpoint: the LoRA, or every trained weight with method="full"."""
    return FULL_WEIGHTS if cfg.method == "full" else "lora.safetensors"


def save_run(run, warn: Warn) -> Path | None:
    """Checkpoint a training run's full state (TR-1): LoRA, optimizer, LR schedule, scaler, sampler position,
    counters and every RNG of every rank. Collective: every rank calls it, rank 0 writes; errors are raised on all
    ranks. `run` is an engine.train.loop.Run; returns the folder on rank 0."""
    from accelerate.utils import broadcast_object_list

    setup, tr, data = run.setup, run.trainable, run.data
    cfg, acc = setup.cfg, setup.acc
    lora = {k: p.detach().float() for k, p in run.lora_params().items()}
    protect = frozenset()
    if cfg.method == "full":  # its checkpoints are exported only when published (engine.train.full): keep the best
        from engine.train.evaluate import best_step

        protect = frozenset(s for s in (best_step(setup.run_dir),) if s is not None)
    blobs = gather_blobs(acc, rng_blob({"train": data.gen}))  # collective: every rank takes part
    error, path = [None], None
    if setup.main:
        try:
            if not all(bool(torch.isfinite(t).all()) for t in lora.values()):
                raise CheckpointError("the trained weights contain NaN/Inf; not saved. Lower the learning rate or use "
                                      "bf16/fp32 and resume from the last checkpoint")
            opt_tensors, opt_meta = optimizer_state(tr.optimizer)
            samp_tensors, samp_meta = data.sampler.state()
            state = {**run.counters.to_json(), "world_size": acc.num_processes, "sampler": samp_meta,
                     "optimizer": opt_meta, "lr_scheduler": tr.lr_scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
            path = save_checkpoint(
                setup.ckpt_dir, run.counters.step,
                tensors={weights_file(cfg): lora, "optimizer.safetensors": opt_tensors,
                         "sampler.safetensors": samp_tensors,
                         **({ONPOLICY_FILE: dict(data.onpolicy)} if data.onpolicy else {})},
                blobs={f"rng-rank{r}.safetensors": b for r, b in enumerate(blobs)}, json_files={"state.json": state},
                manifest_info={"seed": cfg.seed, "epoch": data.sampler.epoch, "config_hash": config_hash(cfg),
                               "dataset_hash": data.dataset_hash, "base_model_fingerprint": run.models.base.fingerprint},
                limit=cfg.checkpoints_total_limit, warn=warn, protect=protect)
        except (CheckpointError, DiskFullError) as e:
            error = [e]
    if acc.num_processes > 1:
        broadcast_object_list(error)  # every rank stops together
    if error[0] is not None:
        raise error[0]
    return path if setup.main else None


def restore_run(run, resume: bool, warn: Warn):
    """`run` restored from the newest valid checkpoint (TR-3): the LoRA, optimizer, LR schedule, scaler, sampler
    and RNG in place, and the returned Run's counters from state.json (`run` unchanged on a fresh start). Any state
    that cannot be restored exactly is an error (TR-5). With resume=False old checkpoints are moved aside."""
    from accelerate.utils import broadcast_object_list

    setup, tr, data = run.setup, run.trainable, run.data
    cfg, acc, ckpt_dir = setup.cfg, setup.acc, setup.ckpt_dir
    chosen = [None]
    if setup.main:
        if not resume and list_checkpoints(ckpt_dir):  # start over, but never delete trained work
            aside = ckpt_dir.with_name(f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}")
            ckpt_dir.rename(aside)
            warn(f"resume is off: moved the existing checkpoints to {aside.name}")
        found = find_resume_checkpoint(ckpt_dir, warn) if resume else None
        chosen = [(str(found[0]), found[1]) if found else None]
    if acc.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[0] is None:
        return run
    path, manifest = Path(chosen[0][0]), chosen[0][1]
    for key, have in (("config_hash", config_hash(cfg)), ("dataset_hash", data.dataset_hash),
                      ("base_model_fingerprint", run.models.base.fingerprint)):
        if manifest.get(key) != have:
            raise CheckpointError(f"{path.name} was made with a different {key.split('_hash')[0]} "
                                  f"({key}); resume with the same settings, images and model, or use a new run folder")
    try:
        state = json.loads((path / "state.json").read_text("utf-8"))
        if state["world_size"] != acc.num_processes:
            raise CheckpointError(f"{path.name} was made by {state['world_size']} processes but {acc.num_processes} "
                                  "are running; resume would not be exact. Launch with the same number of processes.")
        params, saved = run.lora_params(), read_tensors(path / weights_file(cfg))
        if set(saved) != set(params):
            raise CheckpointError(f"{path.name} holds other trained weights than this config builds; start a new run")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        load_optimizer_state(tr.optimizer, read_tensors(path / "optimizer.safetensors"), state["optimizer"])
        tr.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if (state["scaler"] is None) != (acc.scaler is None):
            raise CheckpointError(f"{path.name} has a different mixed-precision setup; resume would not be exact")
        if acc.scaler is not None:
            acc.scaler.load_state_dict(state["scaler"])
        data.sampler.load(read_tensors(path / "sampler.safetensors"), state["sampler"])
        restore_rng(path / f"rng-rank{acc.process_index}.safetensors", {"train": data.gen})
        if cfg.onpolicy_prior_weight > 0:  # the pool the run was drawing from (engine.train.onpolicy)
            data.onpolicy.update(read_tensors(path / ONPOLICY_FILE))
        counters = Counters.from_json(state)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a state we cannot restore makes the resume inexact (TR-5)
        raise CheckpointError(f"could not restore {path.name} ({type(e).__name__}: {e}); resume would not be exact. "
                              "Start a new run, or resume with the same settings.") from None
    return dataclasses.replace(run, counters=counters)


def image_hashes(cfg) -> list[dict[str, str]]:
    """sha256 of each training image (provenance in style.json; a changed image blocks an inexact resume)."""
    return [{"file": Path(p).name, "sha256": sha256_file(Path(p))} for p in cfg.instance_images]


def dataset_hash(images: list[dict[str, str]]) -> str:
    return hashlib.sha256("".join(i["sha256"] for i in images).encode()).hexdigest()
