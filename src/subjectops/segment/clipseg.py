"""CLIPSeg (Lueddecke and Ecker 2022): a text-prompted mask backend, standing in for Image-Alchemy's Grounded-SAM
(seed 002 sec. 3.3) where a text prompt (the class word) finds the subject in a generated scene."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from subjectops.errors import ModelNotFoundError
from subjectops.segment.grabcut import largest_component

DEFAULT_MODEL = "CIDAS/clipseg-rd64-refined"


def available(model_id: str, cache_dir: Optional[str] = None) -> bool:
    """Whether the weights are on this machine (a local directory, or the hub cache), without loading them."""
    path = Path(model_id).expanduser()
    if path.is_dir() or model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # a directory, not a hub id
        return (path / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir), str)


class ClipSegBackend:
    name = "clipseg"

    def __init__(self, model_id: str = DEFAULT_MODEL, threshold: float = 0.4, cache_dir: Optional[str] = None):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        if not available(model_id, cache_dir):
            raise ModelNotFoundError(
                f"the CLIPSeg weights {model_id!r} are not on this machine",
                fix=f"download {model_id} on a machine with network access and copy the folder or the hub cache here, "
                    "or use the default segmenter (infer.alchemy.segmenter=auto or grabcut)")
        self.processor = CLIPSegProcessor.from_pretrained(model_id, cache_dir=cache_dir, local_files_only=True)
        self.model = CLIPSegForImageSegmentation.from_pretrained(model_id, cache_dir=cache_dir, local_files_only=True)
        self.model.eval()
        self.threshold = threshold

    def mask(self, image: Image.Image, text: str) -> Image.Image:
        """An L-mode mask of the image's size, 255 on the largest region where the model finds `text` (at least
        its most likely pixel, so the mask is never empty)."""
        import torch

        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = self.model(**inputs).logits
        probs = torch.nn.functional.interpolate(torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:])),
                                                size=(image.height, image.width), mode="bilinear",
                                                align_corners=False)[0, 0].numpy()
        found = (probs >= min(self.threshold, probs.max())).astype(np.uint8) * 255
        return Image.fromarray(largest_component(found), mode="L")
