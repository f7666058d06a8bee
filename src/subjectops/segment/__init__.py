"""Subject mask backends. GrabCut needs no weights (the default); SAM takes a checkpoint path. CLIPSeg
(segment/clipseg.py) takes a text prompt as well, and serves the alchemy inference strategy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Protocol

from PIL import Image

from subjectops.config_base import RefineCfg


class MaskBackend(Protocol):
    name: str
    # True when `mask` runs in native code that releases the GIL and uses one core (GrabCut): then
    # `segment_all` segments one image per core at once. Torch backends are already parallel inside.
    one_core: bool

    def mask(self, image: Image.Image) -> Image.Image:
        """An L-mode mask of the image's size, 255 on the subject."""


def get_backend(cfg: RefineCfg) -> MaskBackend:
    if cfg.mask_backend == "sam":
        from subjectops.segment.sam import SamBackend

        return SamBackend(cfg)
    from subjectops.segment.grabcut import GrabCutBackend

    return GrabCutBackend(cfg)


def segment_all(backend: MaskBackend, images: Iterable[Image.Image]) -> Iterator[Image.Image]:
    """The backend's masks of the images, in order: with a one-core backend, one image per available core at
    once (each mask is computed exactly as alone, so the results are the same)."""
    if not backend.one_core:
        yield from map(backend.mask, images)
        return
    from subjectops.threads import cpus

    with ThreadPoolExecutor(max_workers=cpus()) as pool:  # the CPU quota and affinity, not every core of the node
        yield from pool.map(backend.mask, images)
