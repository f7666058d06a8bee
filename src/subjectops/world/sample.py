"""World images with their ground truth, deterministic from a seed.

`draw_example(seed)` gives one pretraining image: a random object (class, color, pattern, proportions) in a
random scene, never in a held-out combination, with a caption that may leave attributes unsaid.
`draw_heldout(seed)` gives the held-out combinations only (evaluation). `render_batch` makes many at once
across processes (drawing is CPU-bound Python).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from subjectops.world import draw
from subjectops.world.vocab import (
    CLASSES,
    COLORS,
    DROP_COLOR,
    DROP_PATTERN,
    DROP_SCENE,
    HELDOUT_CLASS_SCENE,
    HELDOUT_COLOR_CLASS,
    PATTERNS,
    PREFIXES,
    SCENES,
    Caption,
    is_heldout,
)


@dataclass(frozen=True)
class Truth:
    cls: str
    color: str
    pattern: str
    scene: str

    def labels(self) -> tuple[int, int, int, int]:
        return (CLASSES.index(self.cls), list(COLORS).index(self.color), PATTERNS.index(self.pattern),
                SCENES.index(self.scene))


@dataclass
class Example:
    image: np.ndarray  # (64, 64, 3) uint8
    mask: np.ndarray  # (64, 64) bool
    truth: Truth
    caption: Caption


def _choice(rng: np.random.Generator, items) -> str:
    return items[int(rng.integers(len(items)))]


def named_color(rng: np.random.Generator, color: str) -> np.ndarray:
    return np.clip(np.array(COLORS[color], np.float32) + rng.uniform(-14, 14, 3), 0, 255)


def draw_object(rng: np.random.Generator, truth: Truth) -> tuple[np.ndarray, np.ndarray]:
    proportions = rng.random(draw.N_PROPORTIONS)
    texture = draw.pattern_texture(named_color(rng, truth.color), truth.pattern, rng)
    obj = draw.render_object(truth.cls, proportions, texture)
    scene = draw.SCENE_DRAWERS[truth.scene](rng)
    return draw.composite(scene, obj, draw.random_placement(rng))


def random_caption(rng: np.random.Generator, truth: Truth) -> Caption:
    prefixes, weights = zip(*PREFIXES)
    prefix = prefixes[int(rng.choice(len(prefixes), p=np.array(weights) / sum(weights)))]
    drop_color = rng.random() < DROP_COLOR
    return Caption(
        cls=truth.cls,
        color=None if drop_color else truth.color,
        pattern=None if drop_color or rng.random() < DROP_PATTERN else truth.pattern,
        scene=None if rng.random() < DROP_SCENE else truth.scene,
        prefix=prefix,
    )


def draw_example(seed: int) -> Example:
    """A pretraining image: any combination except the held-out ones."""
    rng = np.random.default_rng([seed, 1])
    while True:
        truth = Truth(_choice(rng, CLASSES), _choice(rng, list(COLORS)), _choice(rng, PATTERNS), _choice(rng, SCENES))
        if not is_heldout(truth.cls, truth.color, truth.scene):
            break
    image, mask = draw_object(rng, truth)
    return Example(image, mask, truth, random_caption(rng, truth))


def draw_any(seed: int) -> Example:
    """Any combination, held-out ones included: the judge's training images. The judge is the world's measuring
    instrument, not the generator: like an ImageNet classifier it has seen every class in every setting, so
    that it can score the generator on the combinations the generator never saw."""
    rng = np.random.default_rng([seed, 3])
    truth = Truth(_choice(rng, CLASSES), _choice(rng, list(COLORS)), _choice(rng, PATTERNS), _choice(rng, SCENES))
    image, mask = draw_object(rng, truth)
    return Example(image, mask, truth, full_caption(truth))


def draw_heldout(seed: int) -> Example:
    """An image of a held-out combination (class x scene or color x class), fully captioned."""
    rng = np.random.default_rng([seed, 2])
    if rng.random() < 0.5:
        cls, scene = sorted(HELDOUT_CLASS_SCENE)[int(rng.integers(len(HELDOUT_CLASS_SCENE)))]
        color = _choice(rng, [c for c in COLORS if (c, cls) not in HELDOUT_COLOR_CLASS])
    else:
        color, cls = sorted(HELDOUT_COLOR_CLASS)[int(rng.integers(len(HELDOUT_COLOR_CLASS)))]
        scene = _choice(rng, SCENES)
    truth = Truth(cls, color, _choice(rng, PATTERNS), scene)
    image, mask = draw_object(rng, truth)
    return Example(image, mask, truth, Caption(cls, color, truth.pattern, scene))


def full_caption(truth: Truth) -> Caption:
    return Caption(truth.cls, truth.color, truth.pattern, truth.scene)


@dataclass
class Batch:
    images: np.ndarray  # (N, 64, 64, 3) uint8
    masks: np.ndarray  # (N, 64, 64) bool
    labels: np.ndarray  # (N, 4) int64: class, color, pattern, scene
    captions: list[str]
    truths: list[Truth]


def _render_range(args: tuple[int, int, str]) -> Batch:
    start, count, kind = args
    fn = {"heldout": draw_heldout, "any": draw_any, "train": draw_example}[kind]
    examples = [fn(s) for s in range(start, start + count)]
    return Batch(
        images=np.stack([e.image for e in examples]),
        masks=np.stack([e.mask for e in examples]),
        labels=np.array([e.truth.labels() for e in examples], np.int64),
        captions=[e.caption.text() for e in examples],
        truths=[e.truth for e in examples],
    )


def render_batch(start: int, count: int, kind: str = "train", workers: int = 1,
                 progress: Optional[callable] = None) -> Batch:
    """Images start..start+count-1 of the train (or held-out) stream; identical for any `workers`."""
    chunk = 512
    jobs = [(s, min(chunk, start + count - s), kind) for s in range(start, start + count, chunk)]
    parts: list[Batch] = []
    if workers <= 1:
        for job in jobs:
            parts.append(_render_range(job))
            if progress:
                progress(job[1])
    else:
        with ProcessPoolExecutor(workers) as pool:
            for part in pool.map(_render_range, jobs):
                parts.append(part)
                if progress:
                    progress(len(part.captions))
    return Batch(
        images=np.concatenate([p.images for p in parts]),
        masks=np.concatenate([p.masks for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        captions=[c for p in parts for c in p.captions],
        truths=[t for p in parts for t in p.truths],
    )
