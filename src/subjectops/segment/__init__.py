"""Subject mask backends. GrabCut needs no weights (the default); SAM takes a checkpoint path. CLIPSeg
(segment/clipseg.py) takes a text prompt as well, and serves the alchemy inference strategy."""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from subjectops.config import RefineCfg


class MaskBackend(Protocol):
    name: str

    def mask(self, image: Image.Image) -> Image.Image:
        """An L-mode mask of the image's size, 255 on the subject."""


def get_backend(cfg: RefineCfg) -> MaskBackend:
    if cfg.mask_backend == "sam":
        from subjectops.segment.sam import SamBackend

        return SamBackend(cfg)
    from subjectops.segment.grabcut import GrabCutBackend

    return GrabCutBackend(cfg)
