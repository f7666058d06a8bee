"""Subject-region DINO and CLIP-I (Image-Alchemy sec. 5.1): the similarities measured on the segmented subject."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from subjectops.config import Params
from subjectops.metrics.definitions import METRICS
from subjectops.metrics.evaluator import Evaluator
from subjectops.metrics.images import subject_region

SIZE = 48


def smooth(seed: int) -> torch.Tensor:
    low = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)[0]


def square(lo=12, hi=36) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[lo:hi, lo:hi] = True
    return m


class SquareSegmenter:
    """A stand-in mask backend that finds the subject where the test put it."""

    name = "square"
    one_core = False

    def mask(self, image: Image.Image) -> Image.Image:
        return Image.fromarray(square().astype(np.uint8) * 255)


def test_subject_region_is_the_masked_bounding_box_on_gray():
    image, mask = smooth(0), square()
    region = subject_region(image, mask)
    assert region.shape == image.shape
    expected = F.interpolate(image[None, :, 12:36, 12:36], size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                             antialias=True)[0]
    torch.testing.assert_close(region, expected)
    gray = subject_region(image, square(12, 36) & ~square(14, 34))  # a ring: its inside is background, so gray
    assert torch.allclose(gray[:, SIZE // 2, SIZE // 2], torch.full((3,), 0.5))
    torch.testing.assert_close(subject_region(image, np.zeros((SIZE, SIZE), bool)), image)


def test_subject_metrics_ignore_the_scene_around_the_subject(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBJECTOPS_HOME", str(tmp_path))
    params = Params.model_validate({"evaluate": {"tiny": True, "batch_size": 4,
                                                 "metrics": ["dino", "clip-i", "dino-subject", "clip-i-subject"]}})
    evaluator = Evaluator(params)
    evaluator.segmenter = SquareSegmenter()
    subject, mask = smooth(1), square()
    on = lambda background: torch.where(torch.from_numpy(mask), subject, background)  # noqa: E731
    refs = evaluator.references_from_tensor(torch.stack([on(smooth(2)), on(smooth(3))]), [mask, mask])
    gen = torch.stack([on(smooth(4)), on(smooth(5)), on(smooth(6))])  # the same subject in other scenes
    records = {r.metric: r for r in evaluator.score_batches("s", "1", [gen], ["p"] * 3, ["sks"] * 3, refs)}
    assert records["dino-subject"].mean == pytest.approx(1.0, abs=1e-5)
    assert records["clip-i-subject"].mean == pytest.approx(1.0, abs=1e-5)
    assert records["dino"].mean < 1 - 1e-3 and records["clip-i"].mean < 1 - 1e-3  # the whole images differ
    # the same backbone provenance as the whole-image metrics, and the direction from the definitions
    for metric, whole in (("dino-subject", "dino"), ("clip-i-subject", "clip-i")):
        doc = records[metric].to_dict()
        assert (doc["backbone"], doc["pretrained"]) == (records[whole].backbone, records[whole].pretrained)
        assert doc["higher_is_better"] is METRICS[metric].higher_is_better is True
        assert "square" in doc["note"] and doc["n_pairs"] == 6
