"""The encoders an evaluation runs on and the device they run on: tiny random or world encoders for the offline
presets, the configured backbones otherwise, FID's features, and the set shared between evaluators of one process.

Separate from the evaluator: `subjectops weights check` asks the same questions (`tiny_mode`, `world_mode`) to
list what evaluate will load, without loading it.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional, Sequence

import torch

from subjectops.config import Params
from subjectops.errors import ConfigError, ModelNotFoundError
from subjectops.metrics import backbones as B
from subjectops.metrics.primitives import InceptionFID


def tiny_mode(params: Params, generated_by: Optional[str] = None) -> bool:
    """evaluate.tiny: true/false, or auto = the images come from an offline preset (models.tiny.TINY_PRESETS:
    random weights, so real encoders would measure nothing): ``generated_by`` (the base model recorded by
    infer) when known, else model.base."""
    from subjectops.models.loading import is_tiny

    t = params.evaluate.tiny
    if t == "auto":
        return is_tiny(generated_by or params.model.base)
    return bool(t)


def world_mode(params: Params, generated_by: Optional[str] = None) -> bool:
    """evaluate.tiny=auto and the images come from the miniature world's models: its encoders and judge score them."""
    from subjectops.models.loading import is_world

    return params.evaluate.tiny == "auto" and is_world(generated_by or params.model.base)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device = cuda but no CUDA device is visible",
                          fix="set evaluate.device=auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class Encoders:
    """The encoders one evaluation needs, loaded once (and shareable between evaluators)."""

    def __init__(self, params: Params, metrics: Iterable[str], generated_by: Optional[str] = None):
        cfg = params.evaluate
        self.tiny = tiny_mode(params, generated_by)
        self.world = world_mode(params, generated_by)
        self.device = pick_device(cfg.device)
        metrics = list(metrics)
        bb = cfg.backbones
        preset = "tiny" if self.tiny else B.WORLD if self.world else None
        ids = {role: preset or getattr(bb, role) for role in ("dino", "clip", "lpips")}
        self.fid_features = self._fid_features(cfg.fid_features, bb.inception) if "fid" in metrics else None
        # the world judge: world-accuracy metrics, and FID's features (the world's Inception)
        self.judge = B.load_world_judge(self.device) if self.world or self.fid_features == "judge" else None
        need_dino = bool({"dino", "dino-subject"} & set(metrics)) or self.fid_features == "dino"
        need_clip = bool({"clip-i", "clip-t", "clip-i-subject"} & set(metrics)) or self.fid_features == "clip"
        cache = params.model.cache_dir
        self.dino = B.load_dino(ids["dino"], self.device, cache) if need_dino else None
        self.clip = B.load_clip(ids["clip"], self.device, cache) if need_clip else None
        self.lpips = B.load_lpips(ids["lpips"], self.device) if "lpips" in metrics else None
        self.inception = None
        if self.fid_features == "inception":
            self.inception = InceptionFID(B.find_inception(bb.inception), self.device)

    @classmethod
    def from_parts(cls, *, dino=None, clip=None, lpips=None, inception=None, fid_features: Optional[str] = "dino",
                   device: Optional[torch.device] = None, tiny: bool = False) -> Encoders:
        """Encoders built elsewhere (benchmarks, notebooks): same evaluator, no loading."""
        self = cls.__new__(cls)
        self.dino, self.clip, self.lpips, self.inception = dino, clip, lpips, inception
        self.fid_features, self.tiny, self.world, self.judge = fid_features, tiny, False, None
        self.device = device or torch.device("cpu")
        return self

    def _fid_features(self, setting: str, inception_setting: str) -> str:
        if setting in ("dino", "clip", "judge"):
            return setting
        if self.world:
            return "judge"
        weights = None if self.tiny else B.find_inception(inception_setting)
        if setting == "inception":
            if self.tiny:
                return "dino"  # tiny mode never uses real weights; recorded as random DINO features
            if weights is None:
                raise ModelNotFoundError(
                    "evaluate.fid_features = inception but the Inception weights are not present "
                    f"({B.hub_checkpoint(B.INCEPTION_FILE)} missing, evaluate.backbones.inception = "
                    f"{inception_setting})",
                    fix=f"copy torch-fidelity's {B.INCEPTION_FILE} into that folder or point "
                        "evaluate.backbones.inception at it; or set evaluate.fid_features=auto to use DINO features")
            return "inception"
        return "inception" if weights is not None else "dino"

    def infos(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in ("dino", "clip", "lpips", "inception", "judge"):
            enc = getattr(self, name)
            if enc is not None:
                out[name] = enc.info.to_dict()
        return out


def shared_encoders(params: Params, metrics: Sequence[str], generated_by: Optional[str]) -> Encoders:
    """The encoders of these evaluation settings: loaded here, or the ones loaded earlier in this process when models
    are shared (models/shared.py)."""
    from subjectops.models.shared import shared_models

    shared = shared_models()
    if shared is None:
        return Encoders(params, metrics, generated_by)
    key = json.dumps([params.evaluate.model_dump(mode="json"), params.model.model_dump(mode="json"), list(metrics),
                      generated_by], sort_keys=True)
    return shared.encoders(key, lambda: Encoders(params, metrics, generated_by))
