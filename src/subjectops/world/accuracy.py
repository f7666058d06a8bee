"""World accuracy: the world judge (trained on ground truth) says whether a generated image shows what its
prompt asked for, and whether the object wears the subject's decal.

- class / color / scene: the judge's prediction equals the attribute the prompt states. A prompt that does not
  state an attribute (no color word, no world scene) does not count for that attribute.
- decal match: in the object region the judge segments, at least half of the pixels lie near one of the
  subject's decal colors and at least two of those colors each cover a tenth of the region. Pretraining
  objects are one named color with its own tint, so the class prompt alone rarely matches; the thresholds
  are checked on held-out photos of the subject against other subjects' photos (tests/test_world.py).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from subjectops.world.vocab import CLASSES, COLORS, SCENES

DECAL_DISTANCE = 0.22  # RGB distance in [0, 1] units: covers the world's shading (x0.84..x1.12) and blur
DECAL_COVERAGE = 0.5
DECAL_COLOR_SHARE = 0.1
MIN_REGION_PIXELS = 40


def prompted(prompt: str, class_word: str) -> dict[str, Optional[int]]:
    """The attribute indices a prompt states (None where it states none)."""
    text = prompt.lower()
    scene = next((i for i, s in enumerate(SCENES) if s in text), None)
    if scene is not None:  # "on top of pink fabric" names a color that is not the object's
        text = text.replace(SCENES[scene], " ")
    words = text.replace(",", " ").split()
    color = next((i for i, c in enumerate(COLORS) if c in words), None)
    cls = CLASSES.index(class_word) if class_word in CLASSES else None
    return {"class": cls, "color": color, "scene": scene}


def decal_match(image: Tensor, region: Tensor, palette: Sequence[Sequence[int]]) -> bool:
    """image (3, H, W) in [0, 1]; region (H, W) bool; palette: the decal's sRGB colors."""
    if int(region.sum()) < MIN_REGION_PIXELS:
        return False
    pixels = image.permute(1, 2, 0)[region]  # (P, 3)
    colors = torch.tensor(np.asarray(palette, np.float32) / 255.0)
    dist = torch.cdist(pixels.float(), colors)  # (P, K)
    nearest = dist.argmin(1)
    close = dist.min(1).values < DECAL_DISTANCE
    shares = torch.stack([(close & (nearest == k)).float().mean() for k in range(len(colors))])
    return bool(close.float().mean() >= DECAL_COVERAGE and int((shares >= DECAL_COLOR_SHARE).sum()) >= 2)


@torch.no_grad()
def score(judged: dict[str, Tensor], images: Tensor, prompts: Sequence[str], class_word: str,
          palette: Optional[Sequence[Sequence[int]]]) -> dict[str, list[Optional[float]]]:
    """Per image 1.0 / 0.0 for each world metric, None where it does not apply."""
    out: dict[str, list[Optional[float]]] = {"world-class": [], "world-color": [], "world-scene": [],
                                             "world-decal": []}
    for i, prompt in enumerate(prompts):
        want = prompted(prompt, class_word)
        for head in ("class", "color", "scene"):
            target = want[head]
            out[f"world-{head}"].append(None if target is None else float(int(judged[head][i].argmax()) == target))
        region = judged["mask"][i] > 0
        out["world-decal"].append(None if palette is None
                                  else float(decal_match(images[i].cpu(), region.cpu(), palette)))
    return out
