"""Loading a base model: a diffusers folder, a hub id, or a single-file `.safetensors` checkpoint.

Pickle-based formats (.ckpt, .pt, .bin, or any file whose bytes are a pickle) are refused with a message that says
to convert to safetensors (RELIABILITY MF-1, MF-2, MF-4, MF-6). Every weight load passes `use_safetensors=True`,
so diffusers never falls back to a pickle file sitting next to a broken safetensors one (MF-3).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.models.safety import ModelFileError, check_model_file
from engine.generate.sampler import Components
from engine.core.errors import ModelLoadError  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "assets" / "demo-model"
REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
MAX_INDEX_BYTES = 16 * 2**20  # a real shard index is a few hundred KB (one line per tensor)


@dataclass
class LoadedModel:
    components: Components
    source: str  # what the user gave: a folder, a hub id or a file
    kind: str  # "folder" | "hub" | "single_file"
    fingerprint: str  # sha256 over the weights' bytes: identifies the base model for priors and the library
    name: str

    @property
    def prediction_type(self) -> str:
        return self.components.scheduler.config.get("prediction_type", "epsilon")

    def describe(self) -> dict:
        c = self.components
        return {"name": self.name, "source": self.source, "kind": self.kind, "fingerprint": self.fingerprint,
                "prediction_type": self.prediction_type, "resolution": c.default_size,
                "cross_attention_dim": c.unet.config.cross_attention_dim}


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~")) and not Path(source).exists()


def index_shards(d: Path) -> list[Path]:
    """Every shard file named by any `*.index.json` in component folder `d`, each checked like a weight file.

    diffusers and transformers load sharded weights through these indexes, by the names they list: a folder with a
    decoy `model.safetensors` and an index naming `.bin` shards would reach torch.load. So every shard must be a
    safetensors file (by content, MF-4) directly in `d`: no other extension, no path, no symlink leading out.
    Raises ModelLoadError naming the index and the shard.
    """
    shards: dict[Path, None] = {}
    if not d.is_dir():
        return []
    real_dir = d.resolve()
    for index in sorted(d.glob("*.index.json")):
        where = f"{d.name}/{index.name}"

        def refuse(problem: str) -> ModelLoadError:
            return ModelLoadError(f"{where} {problem}. Only safetensors shards inside the model folder are loaded "
                                  "(pickle weights can run code): re-download the model or convert it to "
                                  "safetensors.")

        try:
            if index.stat().st_size > MAX_INDEX_BYTES:
                raise refuse(f"is over {MAX_INDEX_BYTES // 2**20} MB, too large to be a shard index")
            data = json.loads(index.read_text("utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise refuse(f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise refuse("has no valid weight_map (tensor name -> shard file name)")
        for name in sorted(set(weight_map.values())):
            shown = name[:100]
            if Path(name).name != name or name in ("", ".", ".."):
                raise refuse(f"names the shard {shown!r} outside its folder")
            if not name.endswith(".safetensors"):
                raise refuse(f"names the shard {shown!r}, which is not a .safetensors file")
            shard = d / name
            if not shard.is_file():
                raise refuse(f"names the shard {shown!r}, which is missing")
            if shard.resolve().parent != real_dir:
                raise refuse(f"names the shard {shown!r}, a link to a file outside the model folder")
            check_model_file(shard, check_values=False)  # a pickle renamed .safetensors is refused here
            shards[shard] = None
    return list(shards)


def weight_files(path: Path) -> list[Path]:
    """The weight files of a diffusers folder that loading can read: each component's safetensors files and
    every shard its index files name (checked by `index_shards`). The fingerprint covers all of them."""
    files: dict[Path, None] = {}
    for part in WEIGHT_FILES:
        for f in sorted((path / part).glob("*.safetensors")):
            files[f] = None
        for f in index_shards(path / part):
            files[f] = None
    return list(files)


def check_folder(path: Path) -> None:
    """Raise ModelLoadError naming every missing part of a diffusers folder, and refuse pickle weights."""
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers model folder: model_index.json is missing. Pick the folder "
                             "that contains model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/.")
    missing = []
    for part in REQUIRED_PARTS:
        d = path / part
        cfg = "scheduler_config.json" if part == "scheduler" else "tokenizer_config.json" if part == "tokenizer" \
            else "config.json"
        if not (d / cfg).is_file() and not (part == "tokenizer" and (d / "vocab.json").is_file()):
            missing.append(f"{part}/{cfg}")
        if part in WEIGHT_FILES:
            st = [p for p in d.glob("*.safetensors")] if d.is_dir() else []
            pickles = [p for p in d.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth")] if d.is_dir() else []
            if not st:
                hint = (f" (found {pickles[0].name}: pickle weights are refused because they can run code; convert "
                        "them to safetensors)") if pickles else ""
                missing.append(f"{part}/{WEIGHT_FILES[part]}.safetensors{hint}")
            for f in st:
                check_model_file(f, check_values=False)  # reading 4 GB to look for NaN is too slow here
    # Index files anywhere in the folder (model_index.json can name more components than the three above).
    for d in sorted(p for p in path.iterdir() if p.is_dir()):
        index_shards(d)
    if missing:
        raise ModelLoadError(f"{path} is incomplete; missing: {', '.join(missing)}")


def fingerprint(files: list[Path], cache_file: Path | None = None) -> str:
    """sha256 over the weight files' bytes, cached by (path, size, mtime) so a 4 GB model is hashed once."""
    cache = {}
    if cache_file and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text("utf-8")).get("entries", {})
        except (OSError, ValueError):
            cache = {}
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.as_posix()):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for chunk in iter(lambda: fp.read(1 << 22), b""):
                    fh.update(chunk)
            cache[key] = fh.hexdigest()
        h.update(cache[key].encode())
    if cache_file:
        from engine.core.files import atomic_write_bytes

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, json.dumps({"schema_version": 1, "entries": cache}).encode())
    return h.hexdigest()


def _components(pipe) -> Components:
    return Components(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, pipe.scheduler)


def _prepare(pipe, device: str, dtype: torch.dtype):
    pipe.to(device=device, dtype=dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    if pipe.tokenizer.model_max_length > 1000:  # a folder without tokenizer_config: CLIP's length is 77
        pipe.tokenizer.model_max_length = 77
    return pipe


def check_finite_weights(components: Components) -> None:
    """Refuse a model with NaN or Inf in any floating weight: it would load fine and make only black images.

    Checks the loaded tensors (every format and shard ends up here), one torch.isfinite per tensor: about a second
    for SD 1.5 on CPU, much less on a GPU. Raises ModelLoadError naming the component and the tensor.
    """
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(components, part)
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ModelLoadError(
                    f"the model's {part} weights contain {bad} NaN or Inf value(s) (tensor {name[:120]!r}), so it "
                    "would only make black images. The file is damaged or was saved from a diverged training run: "
                    "re-download it or pick another model.")


def load_base_model(source: str | os.PathLike | None = None, *, device: str = "cpu",
                    dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
                    prediction_type: str | None = None) -> LoadedModel:
    """Load a base model from a diffusers folder, a hub id or a single `.safetensors` file (None: the demo model).

    `prediction_type` only matters for single files, whose weights do not say it (SD 2.x 512-base: "epsilon").
    """
    src = str(source) if source else str(DEMO_MODEL)
    try:
        return _load(src, device=device, dtype=dtype, cache_dir=cache_dir, prediction_type=prediction_type)
    except ValueError as e:
        if type(e).__module__.split(".")[0] == __name__.split(".")[0]:
            raise  # ours (ModelLoadError, UnsafeModelFile, SingleFileError...): their messages say what to do
        raise _unloadable(src, e) from e
    except MemoryError:
        raise ModelLoadError(f"not enough memory to load {src!r}; close other programs or pick a smaller "
                             "model") from None
    except Exception as e:  # noqa: BLE001 - diffusers/transformers/torch raise anything (ValueError, OSError,
        # NotImplementedError for a missing tensor, KeyError, RuntimeError): see _unloadable
        raise _unloadable(src, e) from e


def _unloadable(src: str, e: Exception) -> ModelLoadError:
    """One plain sentence naming the model and what to do, never a traceback; the cause stays chained for logs."""
    detail = " ".join(str(e).split())[:300] or type(e).__name__
    return ModelLoadError(f"could not load the model {src!r}: {detail}. Its files do not fit together (a damaged "
                          "download, or weights from another architecture). Pick a complete Stable Diffusion "
                          "1.x/2.x model: a diffusers folder, a hub id or a single .safetensors file.")


def _load(src: str, *, device: str, dtype: torch.dtype, cache_dir: Path | None,
          prediction_type: str | None) -> LoadedModel:
    from diffusers import StableDiffusionPipeline
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    fp_cache = cache_dir / "fingerprints.json" if cache_dir else None
    path = Path(src).expanduser()
    common = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, use_safetensors=True)
    if path.is_dir():
        check_folder(path)
        pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, **common)
        files = weight_files(path)
        kind, name = "folder", path.name
    elif path.is_file():
        check_model_file(path, check_values=False)  # refuses pickles whatever the extension, and lying names
        from engine.models.single_file import load_single_file

        pipe = load_single_file(path, prediction_type=prediction_type)
        files, kind, name = [path], "single_file", path.stem
    elif _is_hub_id(src):
        lm = load_base_model(download_from_hub(src), device=device, dtype=dtype, cache_dir=cache_dir)
        lm.source, lm.kind, lm.name = src, "hub", src
        return lm
    else:
        raise ModelLoadError(f"model {src!r} not found: give a diffusers folder, a .safetensors file, or a hub id "
                             "like 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    _prepare(pipe, device, dtype)
    components = _components(pipe)
    check_finite_weights(components)
    return LoadedModel(components, src, kind, fingerprint(files, fp_cache), name)


def download_from_hub(repo_id: str) -> Path:
    """The local snapshot of a hub model (from the cache, else downloaded with huggingface_hub's progress bar).

    Only configs, tokenizer files and safetensors weights are fetched: never pickle `.bin`/`.ckpt` files.
    """
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "*/*.json", "*/*.txt", "unet/*.safetensors", "vae/*.safetensors",
                "text_encoder/*.safetensors"]
    # Indexes of shards that are never fetched (pickle .bin shards, skipped fp16 variants): check_folder would
    # refuse the folder for naming missing or pickle shards.
    skip = ["*.fp16.safetensors", "*ema*", "*non_ema*", "*.bin.index.json", "*.fp16.safetensors.index.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=skip, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached yet: download below
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=skip))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo...: one clear message
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}). If this machine is "
            "offline, download the model on a connected machine and pick its folder, or use a .safetensors file."
        ) from None


__all__ = ["LoadedModel", "ModelLoadError", "ModelFileError", "load_base_model", "check_folder", "fingerprint",
           "index_shards", "weight_files", "check_finite_weights", "DEMO_MODEL"]
