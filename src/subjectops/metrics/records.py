"""The records of metrics.json: one number with everything needed to know what it means, and the mean and std
of a set of scores.

Separate from the evaluator that fills them: the evaluate stage, the report and the tests build and read records
without scoring images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from subjectops.metrics.definitions import DISPLAY


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else ("-inf" if x < 0 else "nan"))


@dataclass
class MetricRecord:
    """One number of metrics.json, with everything needed to know what it means."""

    metric: str
    prompt_set: str
    prompt_set_version: str
    backbone: Optional[str]
    pretrained: Optional[bool]  # None: no learned weights involved (SSIM, PSNR)
    n_generated: int
    n_reference: int
    n_pairs: Optional[int]  # None for FID (one distance between two distributions)
    mean: float
    std: Optional[float]  # sample std (ddof=1) over the pairs; None for FID
    pairing: str
    higher_is_better: bool
    note: str = ""
    per_image: list[float] = field(default_factory=list)  # mean over references (or the pair) per image

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": DISPLAY[self.metric], "key": self.metric, "prompt_set": self.prompt_set,
            "prompt_set_version": self.prompt_set_version, "backbone": self.backbone, "pretrained": self.pretrained,
            "n_generated": self.n_generated, "n_reference": self.n_reference, "n_pairs": self.n_pairs,
            "mean": _finite(self.mean), "std": None if self.std is None else _finite(self.std),
            "pairing": self.pairing, "higher_is_better": self.higher_is_better, "note": self.note,
        }


def mean_and_std(values: Tensor) -> tuple[float, Optional[float]]:
    v = values.double().flatten()
    finite = v[torch.isfinite(v)]
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, None
    std = float(v.std(unbiased=True)) if finite.numel() == v.numel() else float("nan")
    if not math.isfinite(mean):  # PSNR of identical images: +inf; std of the finite part would mislead
        std = 0.0 if finite.numel() == 0 else float("nan")
    return mean, std
