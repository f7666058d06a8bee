"""Image-Alchemy's blurs and composite (seed 002 app. A.1) on synthetic images."""

from __future__ import annotations

import numpy as np
import pytest

from subjectops.inference import blur

SIZE = 96


def checkerboard(size: int = SIZE, cell: int = 4) -> np.ndarray:
    """High-frequency content everywhere, so a blur shows as a change wherever it acts."""
    yy, xx = np.mgrid[:size, :size]
    board = (((yy // cell) + (xx // cell)) % 2).astype(np.float32)
    return np.stack([board, 1 - board, np.full_like(board, 0.5)], axis=-1)


def square_mask(size: int = SIZE, lo: int = 8, hi: int = 28) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def test_distance_transform_is_zero_on_the_mask_and_grows_away_from_it():
    mask = square_mask()
    d = blur.distance_from_mask(mask)
    assert (d[mask] == 0).all()
    assert d[27, 40] == pytest.approx(40 - 27, abs=0.01)  # straight to the right of the square's edge
    with pytest.raises(ValueError, match="mask is empty"):
        blur.distance_from_mask(np.zeros((4, 4), bool))


@pytest.mark.parametrize("method", ["gaussian", "exponential"])
def test_inside_the_mask_is_blurred(method):
    image, mask = checkerboard(), square_mask()
    out = (blur.gaussian_blur_region(image, mask, 31, 20.0) if method == "gaussian"
           else blur.exponential_decay_blur(image, mask, 31, 20.0, 5.0))
    expected = blur.gaussian(image, 31, 20.0)
    np.testing.assert_allclose(out[mask], expected[mask], atol=1e-6)
    assert out[mask].std() < 0.2 * image[mask].std()  # the checkerboard is gone inside


def test_gaussian_region_leaves_everything_outside_the_mask_untouched():
    image, mask = checkerboard(), square_mask()
    out = blur.gaussian_blur_region(image, mask, 31, 20.0)
    np.testing.assert_array_equal(out[~mask], image[~mask])


def test_exponential_decay_leaves_far_pixels_unchanged_and_never_darkens():
    image, mask = checkerboard(), square_mask()
    out = blur.exponential_decay_blur(image, mask)  # the paper's kernel 151, sigma 100, lambda 5
    far = blur.distance_from_mask(mask) > 0.8 * SIZE  # the opposite corner
    assert far.any()
    assert np.abs(out[far] - image[far]).max() < 0.02  # exp(-5 * 0.8) < 0.02
    # a blend of the image and its blur: never darker than the darker of the two (the literal kernel product is)
    lower = np.minimum(image, blur.gaussian(image, 151, 100.0))
    assert (out >= lower - 1e-6).all()


def test_blur_weight_decreases_monotonically_with_distance():
    mask = square_mask()
    weight = blur.decay_weight(mask, 5.0)
    d = blur.distance_from_mask(mask)
    order = np.argsort(d, axis=None, kind="stable")
    w_sorted = weight.ravel()[order]
    assert (np.diff(w_sorted) <= 1e-7).all()
    assert (weight[mask] == 1).all() and weight[~mask].max() < 1
    np.testing.assert_allclose(weight, np.exp(-5.0 * d / SIZE), rtol=1e-5)
    # and so does what the blur changes, along a row leaving the square on a flat image with one edge
    ramp = np.repeat(np.linspace(0, 1, SIZE, dtype=np.float32)[None, :, None] ** 2, SIZE, 0).repeat(3, 2)
    change = np.abs(blur.exponential_decay_blur(ramp, mask, 31, 20.0) - ramp)[18, 28:, 0]
    relative = change / np.maximum(np.abs(blur.gaussian(ramp, 31, 20.0) - ramp)[18, 28:, 0], 1e-9)
    assert (np.diff(relative) <= 1e-5).all() and relative[0] > relative[-1]


def test_composite_keeps_the_scene_beyond_the_feather_and_the_insert_on_the_mask():
    scene, insert, mask = checkerboard(), np.zeros((SIZE, SIZE, 3), np.float32), square_mask()
    feather = 4
    out = blur.composite(scene, insert, mask, feather)
    beyond = blur.distance_from_mask(mask) >= feather
    np.testing.assert_array_equal(out[beyond], scene[beyond])
    np.testing.assert_array_equal(out[mask], insert[mask])
    np.testing.assert_array_equal(blur.composite(scene, insert, mask, 0)[~mask], scene[~mask])
