"""The miniature world: a procedural text-to-image world with ground truth, its subjects, and the models the
project pretrains on it (`world-sd15`, `world-sdxl`, the world's metric encoders and judge).

The trained weights ship in `weights/` (fp16 safetensors, with `manifest.json`: hashes, build command, seed).
"""

from __future__ import annotations

import os
from pathlib import Path

from subjectops.errors import ModelNotFoundError

SHIPPED_WEIGHTS = Path(__file__).parent / "weights"
WORLD_MODELS = ("world-sd15", "world-sdxl")
WORLD_ENCODERS = ("clip", "dino", "judge")
ENCODER_ID = "world"  # the encoder id (metrics/backbones.py) of the world's trained encoder of a role
PROVENANCE = "world-pretrained"


def is_world(name: str) -> bool:
    return name in WORLD_MODELS


def weights_root() -> Path:
    """The shipped weights, or a build of one's own (`subjectops world build --out DIR`) named by
    SUBJECTOPS_WORLD_WEIGHTS."""
    return Path(os.environ.get("SUBJECTOPS_WORLD_WEIGHTS") or SHIPPED_WEIGHTS)


def _shipped(rel: str, what: str) -> Path:
    path = weights_root() / rel
    if not (path / ("model_index.json" if rel in WORLD_MODELS else "config.json")).exists():
        raise ModelNotFoundError(f"the world's {what} is not in {path}",
                                 fix="run `subjectops world build` (or `make world`), about an hour on 2 CPU cores")
    return path


def model_dir(name: str) -> Path:
    """The diffusers folder of `world-sd15` or `world-sdxl`."""
    return _shipped(name, f"pretrained pipeline {name}")


def encoder_dir(role: str) -> Path:
    """The folder of a world metric encoder: clip, dino or judge."""
    return _shipped(f"encoders/{role}", f"{role} encoder")
