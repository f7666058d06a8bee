"""Image-Alchemy's subject-region blurs and the final composite (seed 002, app. A.1), as pure functions on
float images (H, W, C) in [0, 1] and boolean masks (H, W), True on the subject.

- Gaussian blur: the masked region replaced by its Gaussian blur (kernel 151, sigma 100), the rest untouched.
- Exponential-decay Gaussian blur: the paper writes G'(x, y) = G(x, y) * exp(-lambda * d), d the distance from
  the subject mask. Read literally, multiplying the kernel by exp(-lambda d) < 1 makes it sum to less than 1,
  so every pixel outside the mask becomes exp(-lambda d) times its blurred value: the image darkens towards
  black away from the subject instead of sharpening. What the paper describes (blurring that "decreased
  exponentially with increasing distance", a smooth transition, details kept in the background) is a blend:
      out = w * blur(I) + (1 - w) * I,   w = exp(-lambda * d)
  so w = 1 inside the mask (d = 0) and the original image returns far from it.

d is the distance transform of the mask (pixels to the nearest subject pixel) divided by the image's shorter
side: the paper gives lambda = 5 without units, and in pixels exp(-5 d) would vanish one pixel away from the
mask. With d in image widths the blur weight is 1/e a fifth of the image away and below 1% at its far side.
"""

from __future__ import annotations

import cv2
import numpy as np


def distance_from_mask(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance in pixels from each pixel to the nearest True pixel of `mask` (0 on the mask)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the mask is empty: there is no subject region to measure distances from")
    # cv2 measures the distance to the nearest zero pixel: the subject must be the zeros
    return cv2.distanceTransform(np.where(mask, 0, 255).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def gaussian(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """The whole image Gaussian-blurred (the kernel G of app. A.1)."""
    return cv2.GaussianBlur(np.asarray(image, dtype=np.float32), (kernel_size, kernel_size), sigma,
                            borderType=cv2.BORDER_REFLECT)


def decay_weight(mask: np.ndarray, decay: float) -> np.ndarray:
    """exp(-lambda * d), d the distance from the mask in units of the image's shorter side: 1 on the mask."""
    d = distance_from_mask(mask) / min(mask.shape[:2])
    return np.exp(-decay * d).astype(np.float32)


def blend(image: np.ndarray, other: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """weight * other + (1 - weight) * image, per pixel (weight (H, W) in [0, 1])."""
    w = np.asarray(weight, dtype=np.float32)[..., None]
    return w * np.asarray(other, dtype=np.float32) + (1 - w) * np.asarray(image, dtype=np.float32)


def gaussian_blur_region(image: np.ndarray, mask: np.ndarray, kernel_size: int = 151,
                         sigma: float = 100.0) -> np.ndarray:
    """App. A.1, first technique: the Gaussian blur applied uniformly inside the mask, nothing outside."""
    return blend(image, gaussian(image, kernel_size, sigma), np.asarray(mask, dtype=np.float32))


def exponential_decay_blur(image: np.ndarray, mask: np.ndarray, kernel_size: int = 151, sigma: float = 100.0,
                           decay: float = 5.0) -> np.ndarray:
    """App. A.1, second technique, as a blend whose blur weight decays exponentially with distance from the mask
    (see the module docstring for why the literal kernel product is not used)."""
    return blend(image, gaussian(image, kernel_size, sigma), decay_weight(mask, decay))


def feather_alpha(mask: np.ndarray, feather: int) -> np.ndarray:
    """The composite's alpha: 1 on the mask, falling linearly to 0 at `feather` pixels from it, exactly 0 beyond."""
    if feather <= 0:
        return np.asarray(mask, dtype=np.float32)
    return np.clip(1.0 - distance_from_mask(mask) / feather, 0.0, 1.0).astype(np.float32)


def composite(scene: np.ndarray, insert: np.ndarray, mask: np.ndarray, feather: int) -> np.ndarray:
    """The subject region (feathered) from `insert`, the stage-1 `scene` everywhere else: `infer.alchemy.composite`,
    the project's addition (the paper's final image is the img2img output itself, sec. 3.4)."""
    return blend(scene, insert, feather_alpha(mask, feather))
