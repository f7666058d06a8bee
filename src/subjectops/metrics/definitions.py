"""What each evaluation metric is: its name, display name, direction and meaning.

The one place that says whether higher or lower is better. The evaluator writes it into metrics.json,
the report draws its arrows from it, and promotion gates take their direction from it, so a gate on
FID or LPIPS cannot point the wrong way. Deliberately light (no torch): config validation imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDefinition:
    name: str  # machine name, as in params.yaml and metrics.json's `key`
    display: str
    higher_is_better: bool
    description: str


METRICS: dict[str, MetricDefinition] = {d.name: d for d in (
    MetricDefinition("dino", "DINO", True, "subject fidelity: DINO ViT-S/16 cosine similarity to the references"),
    MetricDefinition("clip-i", "CLIP-I", True,
                     "subject fidelity: CLIP image-embedding cosine similarity to the references"),
    MetricDefinition("clip-t", "CLIP-T", True,
                     "prompt fidelity: CLIP image-text cosine similarity, identifier removed"),
    MetricDefinition("fid", "FID", False, "Frechet distance between reference and generated feature distributions"),
    MetricDefinition("lpips", "LPIPS", False, "learned perceptual distance to the references"),
    MetricDefinition("ssim", "SSIM", True, "structural similarity to the references"),
    MetricDefinition("psnr", "PSNR", True, "peak signal-to-noise ratio against the references (dB)"),
    # Image-Alchemy sec. 5.1: the same similarities, measured in the subject region only
    MetricDefinition("dino-subject", "DINO (subject)", True,
                     "subject fidelity in the subject region: DINO cosine similarity of the segmented subjects"),
    MetricDefinition("clip-i-subject", "CLIP-I (subject)", True,
                     "subject fidelity in the subject region: CLIP image-embedding cosine similarity of the segmented "
                     "subjects"),
    # The miniature world's ground truth as a judge (subjectops.world.accuracy): computed whenever the world
    # judge is loaded (a run on world-sd15 / world-sdxl), over the images whose prompt states the attribute
    MetricDefinition("world-class", "class acc.", True, "share of images the world judge sees as the prompted class"),
    MetricDefinition("world-color", "color acc.", True,
                     "share of images whose object the judge sees in the prompted color"),
    MetricDefinition("world-scene", "scene acc.", True, "share of images the judge sees in the prompted scene"),
    MetricDefinition("world-decal", "decal match", True,
                     "share of images whose object region shows the subject's decal colors (world subjects)"),
)}
WORLD_METRICS = ("world-class", "world-color", "world-scene", "world-decal")
METRIC_NAMES = tuple(m for m in METRICS if m not in WORLD_METRICS)  # what evaluate.metrics may list
DISPLAY = {name: d.display for name, d in METRICS.items()}  # machine name -> display name, in display order


def direction(name: str) -> str:
    return "higher is better" if METRICS[name].higher_is_better else "lower is better"
