"""Random-weight presets: SD-1.x- and SDXL-shaped pipelines with seeded weights, built offline.

`tiny-sd15` and `tiny-sdxl` make tests fast; `small-sd15` (128 px, a deeper UNet and VAE, roughly 10x the
compute) gives benchmarks a second, larger point.

They are saved in diffusers format and loaded back through the same `from_pretrained` path as real
models, so every test exercises the real loading code. Their outputs are noise: they test plumbing,
never quality.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TINY_PRESETS = ("tiny-sd15", "tiny-sdxl", "small-sd15")
# Bump when a preset's architecture changes, so cached builds are not reused.
TINY_VERSION = "2"
TINY_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("SUBJECTOPS_HOME", Path.home() / ".cache" / "subjectops"))


def tiny_dir(preset: str) -> Path:
    """Build the preset once (atomically) and return its diffusers directory."""
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {', '.join(TINY_PRESETS)}")
    target = cache_root() / "tiny" / f"{preset}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    # the builder imports diffusers (4 s): only a first build pays it, not every stage that resolves a preset
    from subjectops.models.tiny_build import build_tiny

    build_tiny(preset, partial, TINY_SEED)
    (partial / "subjectops_tiny.json").write_text(
        json.dumps({"preset": preset, "version": TINY_VERSION, "seed": TINY_SEED, "random_weights": True}))
    try:
        partial.rename(target)
    except OSError:  # another process finished first: theirs is identical (same seed)
        shutil.rmtree(partial, ignore_errors=True)
    return target
