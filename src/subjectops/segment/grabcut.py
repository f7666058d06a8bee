"""GrabCut (Rother et al. 2004) initialised with a centred rectangle: subject photos are framed on the subject."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from subjectops.config_base import RefineCfg


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected foreground region and fill its holes: the subject is one object."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return mask
    keep = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == keep).astype(np.uint8) * 255
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(region)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled


class GrabCutBackend:
    name = "grabcut"
    one_core = True  # OpenCV releases the GIL in grabCut, and its RNG (seeded per call below) is per thread

    def __init__(self, cfg: RefineCfg):
        self.iterations = cfg.grabcut_iterations
        self.margin = cfg.grabcut_margin

    def mask(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        mx, my = max(1, int(w * self.margin)), max(1, int(h * self.margin))
        rect = (mx, my, w - 2 * mx, h - 2 * my)
        labels = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's GMM initialisation is random: masks must be reproducible
        cv2.grabCut(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), labels, rect, bgd, fgd, self.iterations,
                    cv2.GC_INIT_WITH_RECT)
        fg = np.where((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD), 255, 0).astype(np.uint8)
        if fg.sum() == 0:  # GrabCut found nothing: fall back to the initial rectangle
            fg[my : h - my, mx : w - mx] = 255
        return Image.fromarray(largest_component(fg), mode="L")
