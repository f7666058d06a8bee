"""Evaluation prompt sets: named, versioned lists of (prompt, seed) that the infer stage renders and
the evaluate stage scores. A set's prompts and seeds are written into the run (infer/prompt_sets.json),
so a metric is always tied to the exact prompts that produced its images.

Sets (chosen by ``params.infer.prompt_sets``):

- ``prompt-invariant``: one fixed prompt, "a photo of [V] [C]", rendered ``num_images`` times with
  different seeds. Hypnos (seed 000, sec. 3.5 "Prompt Invariant Evaluation"; app. B.3: 50 images).
- ``prompt-varying``: Hypnos' prompt sampler (seed 000, sec. 3.5 and fig. 4): each prompt joins an
  image type (photo, painting, ...), a background-or-composition clause, and a style clause drawn from
  a list that depends on the sampled image type.
- ``dreambench``: the DreamBooth benchmark's 25 object or 25 live-subject prompts, 4 images each
  (as used by HiFi Tuner, seed 001 sec. 4, and DreamBlend, seed 003). Shipped in dreambench_prompts.json.
"""

from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable

from subjectops.digest import digest_json
from subjectops.errors import ConfigError

PROMPT_SET_NAMES = ("prompt-invariant", "prompt-varying", "dreambench", "world")

# Bump a version whenever the prompts a set produces for the same config change.
VERSIONS = {
    "prompt-invariant": "1",
    "prompt-varying": "hypnos-fig4-reconstructed.1",
    "dreambench": "dreambooth-25.1",
    "world": "dreambooth-contexts-8.1",
}

# ---------------------------------------------------------------------------------------------------
# Hypnos prompt-varying lists (seed 000, sec. 3.5, fig. 4).
#
# RECONSTRUCTED: fig. 4 holds the paper's actual lists and figures are not in the text we have. What
# the text says, and what these lists follow: (1) the first part is the **image type**, "such as photo
# or painting"; (2) the second is **background information**, "not only limited to the background scene
# but also the image composition other than the main object itself"; (3) the third is the **style**,
# whose description "may vary across image types, hence ... is acquired from the previously sampled
# image type". The entries below are ours, not the paper's; results on this set are comparable across
# runs of this project (same version), not with Hypnos' table 2.
# ---------------------------------------------------------------------------------------------------
IMAGE_TYPES: tuple[str, ...] = (
    "photo",
    "painting",
    "watercolor painting",
    "pencil sketch",
    "digital illustration",
    "3D render",
)

BACKGROUNDS: tuple[str, ...] = (
    # scenes
    "on a wooden table in a sunlit kitchen",
    "on the beach at sunset",
    "in a snowy forest",
    "on a city street at night",
    "in front of a green wall",
    "on a marble countertop",
    "in a cozy living room",
    "on top of a mountain",
    "in a flower garden",
    "on a desk next to a laptop",
    "on a shelf in a bookstore",
    "on a picnic blanket in a park",
    # compositions (sec. 3.5: "the image composition other than the main object itself")
    "close-up view, centered",
    "seen from a low angle",
    "top-down view on a plain white background",
    "next to a cup of coffee",
    "small in the corner of a wide empty room",
    "surrounded by autumn leaves",
)

STYLES: dict[str, tuple[str, ...]] = {
    "photo": (
        "professional product photography, soft studio lighting",
        "natural daylight, shallow depth of field",
        "golden hour lighting, high detail, DSLR",
        "cinematic lighting, 4k, highly detailed",
        "35mm film, grainy, muted colors",
    ),
    "painting": (
        "oil on canvas, impressionist brushstrokes",
        "thick impasto, vivid colors",
        "renaissance style, dramatic chiaroscuro",
        "acrylic, bold colors, expressive strokes",
    ),
    "watercolor painting": (
        "soft washes, pastel colors, paper texture",
        "loose wet-on-wet, bleeding colors",
        "ink outlines with light watercolor fill",
    ),
    "pencil sketch": (
        "graphite on paper, cross hatching, monochrome",
        "charcoal, high contrast, rough strokes",
        "colored pencils, detailed shading",
    ),
    "digital illustration": (
        "concept art, vibrant colors, sharp details",
        "flat vector style, clean lines",
        "anime style, cel shading",
        "storybook illustration, warm palette",
    ),
    "3D render": (
        "octane render, volumetric lighting",
        "isometric, clay material, soft shadows",
        "unreal engine, ray tracing, realistic materials",
        "low poly, pastel colors",
    ),
}
assert set(STYLES) == set(IMAGE_TYPES)


@dataclass
class PromptItem:
    prompt: str
    seed: int
    # Parts the prompt was built from (prompt-varying: image_type/background/style; dreambench: template).
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "seed": self.seed}
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptItem:
        return cls(prompt=str(d["prompt"]), seed=int(d["seed"]), meta=dict(d.get("meta") or {}))


@dataclass
class PromptSet:
    name: str
    version: str
    items: list[PromptItem]
    # Settings that produced the set (template, sampler seed, identifier, source and license, ...).
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Content hash of the prompts and seeds: two sets with the same digest render the same images."""
        return digest_json([self.name, self.version, [[i.prompt, i.seed] for i in self.items]])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "config": self.config,
            "items": [i.to_dict() for i in self.items],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptSet:
        try:
            return cls(
                name=str(d["name"]),
                version=str(d["version"]),
                items=[PromptItem.from_dict(i) for i in d["items"]],
                config=dict(d.get("config") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"prompt set entry is malformed ({type(exc).__name__}: {exc})",
                fix="each prompt set needs name, version and items [{prompt, seed}]; re-run infer",
            ) from None


def prompt_sets_to_json(sets: Iterable[PromptSet]) -> list[dict[str, Any]]:
    """The content of infer/prompt_sets.json: a list of sets, each with name, version, digest and items."""
    return [s.to_dict() for s in sets]


def prompt_sets_from_json(data: Any) -> list[PromptSet]:
    if isinstance(data, dict) and "prompt_sets" in data:
        data = data["prompt_sets"]
    if not isinstance(data, list):
        raise ConfigError(
            f"prompt_sets.json must hold a list of prompt sets, found {type(data).__name__}",
            fix="re-run infer to rewrite infer/prompt_sets.json",
        )
    return [PromptSet.from_dict(d) for d in data]


# ---------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------
def _check_words(identifier: str, class_word: str) -> None:
    if not identifier or not identifier.strip() or re.search(r"\s", identifier):
        raise ConfigError(
            f"identifier {identifier!r} must be one non-empty word without spaces",
            fix="use the identifier from finetune/method.json (e.g. sks or <subject>)",
        )
    if not class_word or not class_word.strip():
        raise ConfigError("class word is empty", fix="pass the subject's class noun, e.g. --class teapot")


def _format(template: str, key: str, **fields: str) -> str:
    allowed = set(fields)
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ConfigError(f"{key} = {template!r} is not a valid template: {exc}") from None
    unknown = names - allowed
    if unknown:
        raise ConfigError(
            f"{key} = {template!r} uses unknown field(s) {sorted(unknown)}",
            fix=f"use only {{{'}, {'.join(sorted(allowed))}}} in the template",
        )
    if "token" not in names:
        raise ConfigError(
            f"{key} = {template!r} does not contain {{token}}, so the prompts would not name the subject",
            fix="put {token} where the rare identifier [V] goes, e.g. 'a photo of {token} {class_word}'",
        )
    return " ".join(template.format(**fields).split())


def prompt_invariant(template: str, num_images: int, identifier: str, class_word: str, seed: int = 0) -> PromptSet:
    """Hypnos' prompt-invariant set (seed 000, sec. 3.5; app. B.3: 50 images): one prompt, many seeds."""
    _check_words(identifier, class_word)
    prompt = _format(template, "infer.prompt_invariant.template", token=identifier, class_word=class_word)
    items = [PromptItem(prompt, seed + i) for i in range(num_images)]
    return PromptSet(
        "prompt-invariant",
        VERSIONS["prompt-invariant"],
        items,
        {"template": template, "num_images": num_images, "identifier": identifier, "class_word": class_word,
         "base_seed": seed},
    )


def sample_varying_parts(num: int, sampler_seed: int) -> list[tuple[str, str, str]]:
    """(image type, background, style) triples, deterministic for ``sampler_seed`` (seed 000, fig. 4).

    Image types are drawn in shuffled rounds (every type once per round of len(IMAGE_TYPES) prompts) so
    each type is covered once num >= len(IMAGE_TYPES) and the mix stays balanced; the background is drawn
    uniformly; the style is drawn from the list of the image type just sampled (sec. 3.5).
    """
    rng = random.Random(sampler_seed)  # Mersenne Twister: same sequence on every platform and version
    out: list[tuple[str, str, str]] = []
    round_: list[str] = []
    for _ in range(num):
        if not round_:
            round_ = list(IMAGE_TYPES)
            rng.shuffle(round_)
        image_type = round_.pop()
        background = rng.choice(BACKGROUNDS)
        style = rng.choice(STYLES[image_type])
        out.append((image_type, background, style))
    return out


def prompt_varying(template: str, num_images: int, sampler_seed: int, identifier: str, class_word: str,
                   seed: int = 0) -> PromptSet:
    _check_words(identifier, class_word)
    items = []
    for i, (image_type, background, style) in enumerate(sample_varying_parts(num_images, sampler_seed)):
        prompt = _format(template, "infer.prompt_varying.template", token=identifier, class_word=class_word,
                         image_type=image_type, background=background, style=style)
        items.append(PromptItem(prompt, seed + i,
                                {"image_type": image_type, "background": background, "style": style}))
    return PromptSet(
        "prompt-varying",
        VERSIONS["prompt-varying"],
        items,
        {"template": template, "num_images": num_images, "sampler_seed": sampler_seed, "identifier": identifier,
         "class_word": class_word, "base_seed": seed,
         "lists": "reconstructed from the text of Hypnos sec. 3.5 (fig. 4 not available)"},
    )


@lru_cache(maxsize=1)
def dreambench_data() -> dict[str, Any]:
    """The DreamBooth benchmark's prompt lists (CC BY 4.0, Ruiz et al.), shipped with the package."""
    text = resources.files("subjectops.data").joinpath("dreambench_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def dreambench_kind(class_word: str, subject_type: str = "auto") -> str:
    """'live' for the benchmark's live-subject classes (cat, dog), 'object' otherwise, unless forced."""
    if subject_type in ("object", "live"):
        return subject_type
    if subject_type != "auto":
        raise ConfigError(f"infer.dreambench.subject_type = {subject_type!r}", fix="use auto, object or live")
    return "live" if class_word.strip().lower() in dreambench_data()["live_classes"] else "object"


def dreambench(images_per_prompt: int, identifier: str, class_word: str, seed: int = 0,
               subject_type: str = "auto") -> PromptSet:
    """DreamBench: 25 prompts x 4 images (seed 001 sec. 4: "4 images for each prompt template")."""
    _check_words(identifier, class_word)
    data = dreambench_data()
    kind = dreambench_kind(class_word, subject_type)
    templates = data[f"{kind}_prompts"]
    items = []
    for p, template in enumerate(templates):
        prompt = _format(template, "dreambench prompt", token=identifier, class_word=class_word)
        for j in range(images_per_prompt):
            idx = p * images_per_prompt + j
            items.append(PromptItem(prompt, seed + idx, {"template_index": p, "kind": kind}))
    return PromptSet(
        "dreambench",
        VERSIONS["dreambench"],
        items,
        {"kind": kind, "images_per_prompt": images_per_prompt, "identifier": identifier, "class_word": class_word,
         "base_seed": seed, "source": data["source"], "license": data["license"]},
    )


def world_contexts(images_per_prompt: int, identifier: str, class_word: str, seed: int = 0) -> PromptSet:
    """DreamBench's object prompts that the miniature world can draw: its first eight contexts (world/vocab.py
    SCENES, word for word), `images_per_prompt` images each; the world judge scores whether each image shows
    its context."""
    from subjectops.world.vocab import SCENES

    _check_words(identifier, class_word)
    items = []
    for p, scene in enumerate(SCENES):
        prompt = f"a {identifier} {class_word} {scene}"
        for j in range(images_per_prompt):
            items.append(PromptItem(prompt, seed + p * images_per_prompt + j, {"template_index": p}))
    return PromptSet("world", VERSIONS["world"], items,
                     {"images_per_prompt": images_per_prompt, "identifier": identifier, "class_word": class_word,
                      "base_seed": seed, "source": "DreamBench object prompts 1-8 (dreambench_prompts.json)"})


def strip_identifier(prompt: str, identifier: str) -> str:
    """The prompt with the rare identifier removed, for CLIP-T (seed 003, sec. 5: "Prior to computing text
    embeddings, we remove any rare token, such as 'sks' from the prompt")."""
    if not identifier:
        return prompt
    pattern = r"(?<![\w<>])" + re.escape(identifier) + r"(?![\w<>])"
    text = " ".join(re.sub(pattern, " ", prompt).split())
    return re.sub(r"\s+([,.;:!?])", r"\1", text)
