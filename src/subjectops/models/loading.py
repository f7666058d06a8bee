"""Load a base diffusion pipeline from a hub id, a local diffusers directory, or a tiny preset.

The same `from_pretrained` call serves all three: tiny presets are directories the project builds.
Offline and missing, loading fails at once with a message that says how to provide the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from subjectops import world
from subjectops.digest import DIGEST_CHARS, sha256_bytes
from subjectops.errors import ModelNotFoundError
from subjectops.models.tiny import TINY_PRESETS, tiny_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from subjectops.config_base import ModelCfg

# A real CLIP tokenizer has ~49k entries; offline, transformers may hand back a 2-entry stub silently.
MIN_TOKENIZER_SIZE = 100


def is_tiny(model: ModelCfg | str) -> bool:
    base = model if isinstance(model, str) else model.base
    return base in TINY_PRESETS


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def how_to_provide(model_id: str) -> str:
    return (
        f"download '{model_id}' on a machine with network access (e.g. `hf download {model_id}`), then either "
        f"copy the folder here and pass --model /path/to/folder, or copy the hub cache and set HF_HOME "
        f"(or model.cache_dir); for a smoke test without weights use --model tiny-sd15"
    )


def is_world(model: ModelCfg | str) -> bool:
    """The miniature world's pretrained pipelines (world-sd15, world-sdxl), shipped with the package."""
    return world.is_world(model if isinstance(model, str) else model.base)


def resolve(model: ModelCfg) -> str:
    """The path or hub id `from_pretrained` will receive."""
    if is_tiny(model):
        return str(tiny_dir(model.base))
    if is_world(model):
        return str(world.model_dir(model.base))
    path = Path(model.base).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(
                f"{path} is not a diffusers pipeline directory (no model_index.json)",
                fix="point --model at the folder that holds model_index.json, unet/, vae/, text_encoder/",
            )
        return str(path)
    if model.base.startswith((".", "/", "~")) or model.base.count("/") > 1:
        raise ModelNotFoundError(f"model directory {model.base} does not exist", fix="check the path given to --model")
    return model.base


def load_pipeline(model: ModelCfg, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """The base pipeline (a private copy of one loaded earlier in this process when models are shared:
    models/shared.py)."""
    from subjectops.models.shared import shared_models

    shared = shared_models()
    if shared is not None:
        key = (model.base, model.revision, model.cache_dir, str(dtype))
        return shared.pipeline(key, lambda: _load_pipeline(model, dtype))
    return _load_pipeline(model, dtype)


def _load_pipeline(model: ModelCfg, dtype: torch.dtype) -> DiffusionPipeline:
    # imported here: stages that only read a model's config (refine's resolution) skip diffusers' 4 s import
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    source = resolve(model)
    diffusers_logging.disable_progress_bar()  # per-component bars; our stages show their own progress
    # safetensors only: a .bin beside or instead of them (a model-cache volume is shared) is never unpickled
    kwargs = dict(dtype=dtype, revision=model.revision, cache_dir=model.cache_dir, use_safetensors=True)
    if offline() and not Path(source).exists():
        kwargs["local_files_only"] = True
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise ModelNotFoundError(f"cannot load the pipeline in {source}: {exc}",
                                     fix="check the folder is complete") from None
        raise ModelNotFoundError(
            f"base model '{source}' is not available on this machine"
            + (" (HF_HUB_OFFLINE=1: no download is attempted)" if offline() else f": {exc}"),
            fix=how_to_provide(source),
        ) from None
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < MIN_TOKENIZER_SIZE:
            raise ModelNotFoundError(
                f"the {name} of '{source}' has only {len(tok)} entries: its vocabulary files are missing",
                fix=how_to_provide(source),
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def fingerprint(model: ModelCfg) -> str:
    """Identity of the base weights, for cache keys: configs plus weight file names and sizes.

    Reading 4 GB of weights per run to hash them would dominate a small job; configs, names, sizes
    and the safetensors headers change whenever the weights do in practice.
    """
    if not is_tiny(model) and not is_world(model) and not Path(model.base).expanduser().exists():
        return sha256_bytes(f"{model.base}@{model.revision}".encode())[:DIGEST_CHARS]
    root = Path(resolve(model))
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        h.update(rel.encode())
        if f.suffix in (".json", ".txt"):
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 16))
    return h.hexdigest()[:DIGEST_CHARS]


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent along a side, from a VAE config (a dict or the VAE's own `config`): the number
    diffusers pipelines expose as `pipe.vae_scale_factor`, for code that has the VAE or its config alone."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_resolution(model: ModelCfg) -> int:
    """The resolution the model was trained at (diffusers' default height): unet sample size x VAE scale."""
    source = resolve(model)
    try:
        if Path(source).exists():
            unet = json.loads((Path(source) / "unet" / "config.json").read_text())
            vae = json.loads((Path(source) / "vae" / "config.json").read_text())
        else:
            from huggingface_hub import hf_hub_download

            def get(sub):
                return json.loads(Path(hf_hub_download(source, f"{sub}/config.json", revision=model.revision,
                                                                          cache_dir=model.cache_dir,
                                                                          local_files_only=offline())).read_text())
            unet, vae = get("unet"), get("vae")
    except Exception as exc:  # noqa: BLE001 - every failure here means "the configs are not available"
        raise ModelNotFoundError(
            f"cannot read the configs of '{source}' to find its resolution ({exc.__class__.__name__})",
            fix=how_to_provide(source) + "; or set subject.resolution explicitly",
        ) from None
    return unet["sample_size"] * vae_scale_factor(vae)


def training_resolution(params) -> int:
    return params.subject.resolution or native_resolution(params.model)
