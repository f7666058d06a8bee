"""Hypnos content-centric augmentation (seed 000 sec. 3.3) and the discriminator sampler (Table 3)."""

import torch
from scipy.stats import chisquare

from subjectops.config import Params
from subjectops.data.augment import (
    IMAGE_TYPES,
    REAL_TYPES,
    DiscriminatorSampler,
    color_tensor,
    content_centric_variants,
    mask_foreground,
    negative_foreground,
    replace_background,
    resize_subject,
)
from subjectops.methods.hypnos import HypnosAugmentCfg


def _subject(h=16):
    img = torch.linspace(-0.9, 0.9, 3 * h * h).view(3, h, h)
    mask = torch.zeros(1, h, h)
    mask[:, 4:12, 4:12] = 1
    return img, mask


def test_replace_background_keeps_subject_and_paints_background():
    img, mask = _subject()
    out = replace_background(img, mask, (255, 0, 0))
    assert torch.equal(out[:, 4:12, 4:12], img[:, 4:12, 4:12])
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(out[:, 15, 15], torch.tensor([1.0, -1.0, -1.0]))


def test_negative_and_masked_foreground_alter_only_the_subject():
    img, mask = _subject()
    neg = negative_foreground(img, mask)
    assert torch.allclose(neg[:, 4:12, 4:12], -img[:, 4:12, 4:12])  # 255 - v  <=>  -v in [-1, 1]
    assert torch.equal(neg[:, :4], img[:, :4])
    masked = mask_foreground(img, mask, (0, 0, 0))
    assert torch.allclose(masked[:, 4:12, 4:12], torch.full((3, 8, 8), -1.0))
    assert torch.equal(masked[:, :4], img[:, :4])
    assert torch.allclose(color_tensor((255, 128, 0), img).flatten(), torch.tensor([1.0, 128 / 127.5 - 1, -1.0]),
                          atol=1e-6)


def test_resize_subject_shrinks_subject_and_mask_on_colour_canvas():
    img, mask = _subject(32)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    out, new_mask = resize_subject(img, mask, 0.5, (0, 0, 255), (0.0, 0.0))
    assert new_mask.sum() < mask.sum() * 0.3  # a quarter of the area (edges blur a little)
    assert new_mask[:, 16:, :].sum() == 0 and new_mask[:, :, 16:].sum() == 0  # placed top-left
    assert torch.allclose(out[:, 31, 31], torch.tensor([-1.0, -1.0, 1.0]))


def test_variant_pool_has_configured_proportions_prompts_and_is_seeded():
    cfg = HypnosAugmentCfg(variants_per_image=10)
    imgs, masks = zip(*[_subject() for _ in range(5)])
    pool = content_centric_variants(list(imgs), list(masks), cfg, seed=42)
    assert len(pool) == 50
    replaced = [v for v in pool if v.background is not None]
    assert len(replaced) == 33  # round(0.66 * 50)
    assert sum(v.resized for v in pool) == round(0.1 * 33) and all(v.background for v in pool if v.resized)
    per_photo = [sum(1 for v in replaced if v.source == i) for i in range(5)]
    assert max(per_photo) - min(per_photo) <= 1  # spread evenly over the photos
    assert {v.background for v in replaced} <= set(cfg.colors)
    again = content_centric_variants(list(imgs), list(masks), cfg, seed=42)
    assert all(torch.equal(a.pixels, b.pixels) and a.background == b.background for a, b in zip(pool, again))
    other = content_centric_variants(list(imgs), list(masks), cfg, seed=7)
    assert [v.background for v in other] != [v.background for v in pool]


def test_sampler_types_follow_table_3_chi_square():
    params = Params()
    props = params.pretrain_disc.proportions.model_dump()
    img, mask = _subject()
    sampler = DiscriminatorSampler([img], [mask], [img.clone()], props, params.finetune.hypnos.augment,
                                   torch.Generator().manual_seed(0))
    n = 10_000
    kinds = sampler.draw_types(n)
    observed = [kinds.count(t) for t in IMAGE_TYPES]
    expected = (sampler.probs * n).tolist()
    stat, p = chisquare(observed, expected)
    assert p > 0.001, (observed, expected, stat)
    # Table 3's halves: 50% real, 50% fake
    real = sum(kinds.count(t) for t in REAL_TYPES) / n
    assert abs(real - 0.5) < 0.02
    assert abs(sampler.probs[IMAGE_TYPES.index("colored_background_masked_foreground")] - 0.1463) < 1e-3


def test_sampler_images_and_labels_match_their_type():
    params = Params()
    img, mask = _subject()
    cls = torch.full_like(img, 0.25)
    sampler = DiscriminatorSampler([img], [mask], [cls], params.pretrain_disc.proportions.model_dump(),
                                   params.finetune.hypnos.augment, torch.Generator().manual_seed(1))
    pixels, labels, kinds = sampler.draw(200)
    assert pixels.shape == (200, 3, 16, 16)
    for x, y, k in zip(pixels, labels, kinds):
        assert y == (1.0 if k in REAL_TYPES else 0.0)
        if k == "instance":
            assert torch.equal(x, img)
        elif k == "class_image":
            assert torch.equal(x, cls)
        elif k == "negative_foreground":
            assert torch.allclose(x[:, 4:12, 4:12], -img[:, 4:12, 4:12]) and torch.equal(x[:, :4], img[:, :4])
        elif k == "colored_background_masked_foreground":
            fg, bg = x[:, 8, 8], x[:, 0, 0]
            assert torch.allclose(x[:, 4:12, 4:12], fg.view(3, 1, 1).expand(3, 8, 8))
            assert not torch.allclose(fg, bg)  # two different colours: the silhouette stays visible


def test_sampler_without_class_images_names_the_fix():
    params = Params()
    img, mask = _subject()
    try:
        DiscriminatorSampler([img], [mask], [], params.pretrain_disc.proportions.model_dump(),
                             params.finetune.hypnos.augment, torch.Generator())
    except Exception as exc:  # noqa: BLE001
        assert "pretrain_disc.proportions.class_image=0" in str(exc)
    else:
        raise AssertionError("expected an error")
