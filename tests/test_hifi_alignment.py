"""Alg. 4 (HiFi Tuner app. B) with the symmetric point-set distance recovers a known similarity transform."""

import math

import torch

from subjectops.inference.alignment import (
    Similarity,
    fit_similarity,
    mask_points,
    one_sided_distance,
    similarity_matrix,
    symmetric_distance,
    warp,
)

SIZE = 64


def l_shape() -> torch.Tensor:
    """An asymmetric shape (no rotation maps it onto itself), off-centre."""
    m = torch.zeros(1, 1, SIZE, SIZE)
    m[..., 14:40, 16:26] = 1
    m[..., 32:40, 26:38] = 1
    return m


def test_eq8_matrix_is_scale_rotation_translation():
    m = similarity_matrix(torch.tensor([2.0, math.pi / 2, 1.0, 0.0], dtype=torch.float64))
    # Tr first (x + 1), then R(90 degrees): (x, y) -> (-y, x), then S(2)
    p = m @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(p, torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64), atol=1e-12)


def test_one_sided_distance_cannot_see_a_shrunk_mask_but_the_symmetric_one_can():
    gen = mask_points(l_shape())
    shrunk = gen.clone()
    shrunk[:, :2] = gen[:, :2].mean(0) + 0.01 * (gen[:, :2] - gen[:, :2].mean(0))
    assert one_sided_distance(shrunk, gen) < 1e-3
    assert symmetric_distance(shrunk, gen) > 100 * one_sided_distance(shrunk, gen)


def test_alg4_recovers_a_known_scale_rotation_and_shift():
    ref = l_shape()
    truth = Similarity(scale=1.3, angle=math.radians(25), tx=0.08, ty=-0.05)
    gen = (warp(ref, truth) > 0.5).float()
    fitted = fit_similarity(ref, gen)
    assert abs(fitted.scale / truth.scale - 1) < 0.02
    assert abs(math.degrees(fitted.angle - truth.angle)) < 2
    for got, want in zip(fitted.shift_pixels(SIZE), truth.shift_pixels(SIZE)):
        assert abs(got - want) < 1


def test_warp_with_the_identity_keeps_the_image():
    img = torch.rand(1, 3, 16, 16)
    assert torch.allclose(warp(img, Similarity(1.0, 0.0, 0.0, 0.0)), img, atol=1e-5)
