"""Reading the evaluated images: files to (N, 3, H, W) tensors in [0, 1], and an image reduced to its subject.

Separate from the metric formulas (primitives.py) and the evaluator: the benchmarks and the world's checks read
images the same way without scoring anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from subjectops.errors import SubjectopsError


def load_image(path: Path) -> Tensor:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise SubjectopsError(f"cannot read image {path}: {exc}", fix="re-run the stage that wrote it") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def load_images(paths: Sequence[Path], size: Optional[tuple[int, int]] = None) -> Tensor:
    """(N, 3, H, W) float in [0, 1]; resized (bilinear, antialiased) to ``size`` when given."""
    out = []
    for p in paths:
        x = load_image(Path(p))
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x.clamp(0, 1))
    if not out:
        return torch.zeros(0, 3, *(size or (1, 1)))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise SubjectopsError(f"images have different sizes {sorted(shapes)}", fix="pass a common size")
    return torch.stack(out)


def subject_region(pixels: Tensor, mask: np.ndarray) -> Tensor:
    """One image (3, H, W) reduced to its subject: the mask's bounding box with the background outside the mask
    gray, resized back to H x W (the encoders see the subject, not the scene). An empty mask keeps the image."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    ys, xs = torch.nonzero(m, as_tuple=True)
    if ys.numel() == 0:
        return pixels
    region = torch.where(m, pixels, torch.full_like(pixels, 0.5))[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return F.interpolate(region[None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)
