"""Segment Anything (Kirillov et al. 2023) prompted with a centred box, as HiFi Tuner (seed 001) uses SAM masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from subjectops.config_base import RefineCfg
from subjectops.errors import ModelNotFoundError


class SamBackend:
    name = "sam"
    one_core = False  # a torch model: parallel inside

    def __init__(self, cfg: RefineCfg):
        if not cfg.sam_checkpoint or not Path(cfg.sam_checkpoint).is_file():
            raise ModelNotFoundError(
                f"refine.mask_backend = sam but the SAM checkpoint {cfg.sam_checkpoint!r} is not a file",
                fix=f"download sam_{cfg.sam_model_type} (.pth) from the segment-anything release on a machine with "
                "network access, then --set refine.sam_checkpoint=/path/to/sam.pth; or use "
                "refine.mask_backend=grabcut",
            )
        import torch
        from segment_anything import SamPredictor, sam_model_registry

        sam = sam_model_registry[cfg.sam_model_type](checkpoint=cfg.sam_checkpoint)
        sam.to("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = SamPredictor(sam)
        self.margin = cfg.grabcut_margin

    def mask(self, image: Image.Image) -> Image.Image:
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        mx, my = int(w * self.margin), int(h * self.margin)
        self.predictor.set_image(rgb)
        masks, scores, _ = self.predictor.predict(box=np.array([mx, my, w - mx, h - my]), multimask_output=True)
        best = masks[int(np.argmax(scores))]
        return Image.fromarray((best * 255).astype(np.uint8), mode="L")
