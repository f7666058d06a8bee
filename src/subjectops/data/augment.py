"""Hypnos (seed 000) content-centric augmentation, sec. 3.3, and the latent discriminator's image types, Table 3.

Images are (3, H, W) tensors in [-1, 1]; masks are (1, H, W) in [0, 1] with 1 = subject (refine's GrabCut
masks). Every random choice comes from a torch.Generator passed in, so a seed reproduces the data exactly.

- Fine-tuning (sec. 3.3): with probability `replace_background` (0.66) the background becomes one monotone
  colour and the prompt's second clause names it ("a photo of [V] [C], red background"); otherwise the
  background stays and a second rare word stands for it. A small portion of the replaced ones is also
  resized spatially (the subject shrinks on the colour canvas).
- Discriminator pretraining (app. B.2, Table 3): real = instance, coloured background, coloured background +
  resize; fake = class images and instance images with an altered foreground (negative colours, or the
  foreground masked out with a colour), on their own or on a coloured background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from subjectops.errors import SubjectopsError

# Table 3, in order; the first three are real, the other five fake.
IMAGE_TYPES = (
    "instance",
    "colored_background",
    "colored_background_resize",
    "class_image",
    "negative_foreground",
    "masked_foreground",
    "colored_background_negative_foreground",
    "colored_background_masked_foreground",
)
REAL_TYPES = frozenset(IMAGE_TYPES[:3])


def color_tensor(rgb, like: torch.Tensor) -> torch.Tensor:
    """An RGB triple in 0-255 as a (3, 1, 1) tensor in [-1, 1]."""
    return (torch.tensor([float(c) for c in rgb], dtype=like.dtype, device=like.device) / 127.5 - 1).view(3, 1, 1)


def replace_background(img: torch.Tensor, mask: torch.Tensor, rgb) -> torch.Tensor:
    """Subject kept, background = one colour (soft mask edges blend)."""
    return img * mask + color_tensor(rgb, img) * (1 - mask)


def negative_foreground(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The subject in negative colours (255 - v, i.e. -v in [-1, 1]); the background untouched."""
    return img * (1 - mask) - img * mask


def mask_foreground(img: torch.Tensor, mask: torch.Tensor, rgb) -> torch.Tensor:
    """The subject removed: its region filled with one colour; the background untouched."""
    return img * (1 - mask) + color_tensor(rgb, img) * mask


def resize_subject(img: torch.Tensor, mask: torch.Tensor, scale: float, rgb, offset: tuple[float, float]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the subject by `scale` and place it on a canvas of colour `rgb`.

    offset = (dy, dx) in [0, 1]: where the shrunken frame sits within the free margin. Returns the image and
    the subject mask at its new place.
    """
    _, h, w = img.shape
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    small = F.interpolate(img[None], size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)[0]
    small_mask = F.interpolate(mask[None], size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)[0]
    small_mask = small_mask.clamp(0, 1)
    top, left = round((h - sh) * offset[0]), round((w - sw) * offset[1])
    new_mask = torch.zeros_like(mask)
    new_mask[:, top:top + sh, left:left + sw] = small_mask
    canvas = color_tensor(rgb, img).expand_as(img).clone()
    canvas[:, top:top + sh, left:left + sw] = replace_background(small, small_mask, rgb)
    return canvas, new_mask


def _pick(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(0, n, (1,), generator=generator))


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


# -------------------------------------------------------------------------------------------------------
# Fine-tuning: a seeded pool of pre-augmented variants
# -------------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    pixels: torch.Tensor
    mask: torch.Tensor
    background: str | None  # colour name, or None = the original background
    resized: bool
    source: int  # index of the photo it came from


def content_centric_variants(images: list[torch.Tensor], masks: list[torch.Tensor], cfg, seed: int) -> list[Variant]:
    """`cfg.variants_per_image` variants of every photo (cfg: methods.hypnos.HypnosAugmentCfg).

    Exactly round(replace_background * pool) variants get a monotone background, spread over the photos as
    evenly as possible, and round(resize * replaced) of those are also resized; colours, scales and
    positions are drawn from the seeded generator. The trainer draws the pool uniformly, so each training
    sample has a replaced background with probability replace_background (sec. 3.3), up to rounding.
    """
    if len(images) != len(masks):
        raise SubjectopsError(f"{len(images)} images but {len(masks)} masks", fix="run `subjectops refine` again")
    g = torch.Generator().manual_seed(seed)
    n, k = len(images), cfg.variants_per_image
    total = n * k
    n_replaced = round(cfg.replace_background * total)
    # Per photo: floor share, plus one for randomly chosen photos until the quota is met.
    per_photo = [n_replaced // n] * n
    for i in torch.randperm(n, generator=g)[: n_replaced - sum(per_photo)].tolist():
        per_photo[i] += 1
    replaced_slots = [(i, j) for i in range(n) for j in range(per_photo[i])]
    n_resized = round(cfg.resize * len(replaced_slots))
    resized = {replaced_slots[s] for s in torch.randperm(len(replaced_slots), generator=g)[:n_resized].tolist()}
    names = list(cfg.colors)
    lo, hi = cfg.resize_scale
    out: list[Variant] = []
    for i, (img, mask) in enumerate(zip(images, masks)):
        for j in range(k):
            if j >= per_photo[i]:
                out.append(Variant(img, mask, None, False, i))
                continue
            name = names[_pick(g, len(names))]
            rgb = cfg.colors[name]
            if (i, j) in resized:
                scale = _uniform(g, lo, hi)
                offset = (float(torch.rand((), generator=g)), float(torch.rand((), generator=g)))
                pix, m = resize_subject(img, mask, scale, rgb, offset)
                out.append(Variant(pix, m, name, True, i))
            else:
                out.append(Variant(replace_background(img, mask, rgb), mask, name, False, i))
    return out


# -------------------------------------------------------------------------------------------------------
# Discriminator pretraining: the eight image types of Table 3
# -------------------------------------------------------------------------------------------------------
class DiscriminatorSampler:
    """Draws images of the Table 3 types with the configured proportions; label 1 = real, 0 = fake.

    proportions: {type: weight} (normalized here); augment: methods.hypnos.HypnosAugmentCfg (colours, resize range),
    the same procedure fine-tuning uses for its real images (app. B.2).
    """

    def __init__(self, images: list[torch.Tensor], masks: list[torch.Tensor], class_images: list[torch.Tensor],
                 proportions: dict[str, float], augment, generator: torch.Generator):
        unknown = set(proportions) - set(IMAGE_TYPES)
        if unknown:
            raise SubjectopsError(f"unknown discriminator image types {sorted(unknown)}",
                                  fix=f"use the Table 3 types: {', '.join(IMAGE_TYPES)}")
        if not images:
            raise SubjectopsError("the discriminator sampler needs instance images",
                                  fix="run `subjectops refine` first")
        weights = torch.tensor([float(proportions.get(t, 0.0)) for t in IMAGE_TYPES], dtype=torch.float64)
        if weights[IMAGE_TYPES.index("class_image")] > 0 and not class_images:
            raise SubjectopsError("the discriminator's class_image proportion is above 0 but there are no class "
                                  "images",
                                  fix="run `subjectops priors` (priors.num_images > 0) or set "
                                      "pretrain_disc.proportions.class_image=0")
        self.probs = weights / weights.sum()
        self.images, self.masks, self.class_images = images, masks, class_images
        self.augment, self.generator = augment, generator
        self.colors = list(augment.colors)

    def draw_types(self, n: int) -> list[str]:
        idx = torch.multinomial(self.probs, n, replacement=True, generator=self.generator)
        return [IMAGE_TYPES[i] for i in idx.tolist()]

    def _color(self, exclude: str | None = None) -> tuple:
        names = [c for c in self.colors if c != exclude]
        name = names[_pick(self.generator, len(names))]
        return name, self.augment.colors[name]

    def make(self, kind: str) -> torch.Tensor:
        g = self.generator
        if kind == "class_image":
            return self.class_images[_pick(g, len(self.class_images))]
        i = _pick(g, len(self.images))
        img, mask = self.images[i], self.masks[i]
        if kind == "instance":
            return img
        if kind == "negative_foreground":
            return negative_foreground(img, mask)
        bg_name, bg = self._color()
        if kind == "masked_foreground":
            return mask_foreground(img, mask, bg)
        if kind == "colored_background":
            return replace_background(img, mask, bg)
        if kind == "colored_background_resize":
            lo, hi = self.augment.resize_scale
            scale = _uniform(g, lo, hi)
            offset = (float(torch.rand((), generator=g)), float(torch.rand((), generator=g)))
            return resize_subject(img, mask, scale, bg, offset)[0]
        if kind == "colored_background_negative_foreground":
            return replace_background(negative_foreground(img, mask), mask, bg)
        if kind == "colored_background_masked_foreground":
            _, fg = self._color(exclude=bg_name)  # a second colour, so the silhouette stays visible
            return replace_background(mask_foreground(img, mask, fg), mask, bg)
        raise ValueError(f"unknown image type {kind!r}")

    def draw(self, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        kinds = self.draw_types(n)
        pixels = torch.stack([self.make(k) for k in kinds])
        labels = torch.tensor([1.0 if k in REAL_TYPES else 0.0 for k in kinds])
        return pixels, labels, kinds
