"""World subjects: one object instance whose look the world's words cannot describe, photographed like a
DreamBench subject.

A subject is a class shape with fixed proportions wearing a multicolor decal (2-3 colors of any hue, in one
of four layouts: halves, wedges, rings, patches). Pretraining images are one named color with a pattern of
its own tint, so no caption and no pretraining image shows a subject's look. `write_subject(seed, out)`
writes `photos/` (what `subjectops run` takes), `heldout/` (evaluation), `masks/` and `subject.json`.
Any seed gives a valid subject.
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from subjectops.world import draw
from subjectops.world.vocab import CLASSES, SCENES

NUM_PHOTOS = 5
NUM_HELDOUT = 8


@dataclass(frozen=True)
class SubjectSpec:
    seed: int
    class_word: str
    proportions: tuple[float, ...]
    palette: tuple[tuple[int, int, int], ...]  # the decal's colors (sRGB)
    layout: str  # draw.DECAL_LAYOUTS
    geometry: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"world-{self.class_word}-{self.seed}"

    def texture(self) -> np.ndarray:
        return draw.decal_texture(np.array(self.palette, np.float32), self.layout, np.array(self.geometry))

    def sprite(self):
        outline = np.array([28.0, 28.0, 32.0])  # one dark outline for every subject: the decal is the identity
        return draw.render_object(self.class_word, np.array(self.proportions), self.texture(), outline)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _palette(rng: np.random.Generator) -> tuple[tuple[int, int, int], ...]:
    """2-3 colors whose hues are at least 70 degrees apart, saturated and bright enough to tell apart."""
    k = int(rng.integers(2, 4))
    start, hues = rng.random(), []
    gaps = rng.dirichlet(np.ones(k)) * (1 - k * 70 / 360) + 70 / 360
    for g in gaps:
        hues.append(start % 1.0)
        start += g
    out = []
    for h in hues:
        r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.55, 0.95), rng.uniform(0.6, 0.98))
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return tuple(out)


def subject_spec(seed: int) -> SubjectSpec:
    rng = np.random.default_rng([seed, 7])
    return SubjectSpec(
        seed=seed,
        class_word=CLASSES[int(rng.integers(len(CLASSES)))],
        proportions=tuple(float(x) for x in rng.random(draw.N_PROPORTIONS)),
        palette=_palette(rng),
        layout=draw.DECAL_LAYOUTS[int(rng.integers(len(draw.DECAL_LAYOUTS)))],
        geometry=tuple(float(x) for x in rng.random(12)),
    )


@dataclass
class Photo:
    image: np.ndarray
    mask: np.ndarray
    scene: str
    placement: draw.Placement


def photograph(spec: SubjectSpec, count: int, stream: int, sprite=None) -> list[Photo]:
    """`count` photos in distinct scenes (cycling when count > 8), positions and sizes; `stream` separates
    the training photos from the held-out ones."""
    rng = np.random.default_rng([spec.seed, 11, stream])
    sprite = sprite or spec.sprite()
    order = [SCENES[i] for i in rng.permutation(len(SCENES))]
    photos = []
    for i in range(count):
        scene = order[i % len(order)]
        where = draw.random_placement(rng)
        image, mask = draw.composite(draw.SCENE_DRAWERS[scene](rng), sprite, where)
        photos.append(Photo(image, mask, scene, where))
    return photos


def write_subject(seed: int, out: Path, num_photos: int = NUM_PHOTOS, num_heldout: int = NUM_HELDOUT) -> Path:
    out = Path(out)
    spec = subject_spec(seed)
    sprite = spec.sprite()
    record: dict[str, Any] = {
        "world_subject": 1, "name": spec.name, "seed": seed, "class_word": spec.class_word,
        "decal": {"palette": [list(c) for c in spec.palette], "layout": spec.layout},
        "spec": spec.to_dict(),
    }
    for folder, count, stream in (("photos", num_photos, 0), ("heldout", num_heldout, 1)):
        (out / folder).mkdir(parents=True, exist_ok=True)
        (out / "masks" / folder).mkdir(parents=True, exist_ok=True)
        entries = []
        for i, photo in enumerate(photograph(spec, count, stream, sprite)):
            name = f"{i:02d}.png"
            Image.fromarray(photo.image).save(out / folder / name)
            Image.fromarray((photo.mask * 255).astype(np.uint8)).save(out / "masks" / folder / name)
            entries.append({"file": f"{folder}/{name}", "mask": f"masks/{folder}/{name}", "scene": photo.scene,
                            "placement": asdict(photo.placement)})
        record[folder] = entries
    (out / "subject.json").write_text(json.dumps(record, indent=1))
    return out


def read_subject(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "subject.json").read_text())


def truth_beside(photos_dir: Path) -> dict[str, Any] | None:
    """A world subject's ground truth when `photos_dir` is the photos/ or heldout/ folder `write_subject` wrote
    (its subject.json beside it); None for any other subject folder."""
    photos_dir = Path(photos_dir)
    path = photos_dir.parent / "subject.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("world_subject") != 1 or \
            photos_dir.name not in ("photos", "heldout"):
        return None
    masks = {Path(e["file"]).name: photos_dir.parent / e["mask"] for e in record.get(photos_dir.name, [])}
    return {"name": record["name"], "seed": record["seed"], "class_word": record["class_word"],
            "palette": record["decal"]["palette"], "layout": record["decal"]["layout"], "masks": masks}


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0
