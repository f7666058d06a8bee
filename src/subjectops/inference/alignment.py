"""Mask alignment for reference-guided generation (HiFi Tuner, seed 001 sec. 3.3, eq. 8, eq. 9, alg. 4).

T_theta = S(theta_1) R(theta_2) Tr(theta_3, theta_4) maps the reference mask M_r onto the generated mask M_g;
alg. 4 fits theta by gradient descent on a point-set distance between P(T_theta(M_r)) and P(M_g).

Points are in normalised image coordinates ([-1, 1] on both axes, `align_corners=True` convention), so one
learning rate serves every resolution and `warp` can use `grid_sample` directly.

Pure tensor functions: no model, no hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# alg. 4 compares every transformed point with every target point: a subsample bounds the N x M matrix.
MAX_POINTS = 500


@dataclass(frozen=True)
class Similarity:
    """theta of eq. 8: scale, rotation (radians), translation (normalised units, applied before R and S)."""

    scale: float
    angle: float
    tx: float
    ty: float

    def matrix(self) -> torch.Tensor:
        return similarity_matrix(torch.tensor([self.scale, self.angle, self.tx, self.ty], dtype=torch.float64))

    def shift_pixels(self, size: int) -> tuple[float, float]:
        """Where the transform moves the image centre, in pixels of a `size` x `size` image."""
        m = self.matrix()
        return float(m[0, 2]) * (size - 1) / 2, float(m[1, 2]) * (size - 1) / 2

    def to_dict(self, size: int) -> dict:
        sx, sy = self.shift_pixels(size)
        return {"scale": self.scale, "angle_degrees": math.degrees(self.angle), "theta_3": self.tx,
                "theta_4": self.ty, "centre_shift_px": [sx, sy], "image_size": size}


def similarity_matrix(theta: torch.Tensor) -> torch.Tensor:
    """Eq. 8: [[t1, 0, 0], [0, t1, 0], [0, 0, 1]] @ R(t2) @ [[1, 0, t3], [0, 1, t4], [0, 0, 1]] (3 x 3)."""
    s, a, tx, ty = theta.unbind()
    c, n = torch.cos(a), torch.sin(a)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    scale = torch.stack([torch.stack([s, zero, zero]), torch.stack([zero, s, zero]), torch.stack([zero, zero, one])])
    rot = torch.stack([torch.stack([c, -n, zero]), torch.stack([n, c, zero]), torch.stack([zero, zero, one])])
    shift = torch.stack([torch.stack([one, zero, tx]), torch.stack([zero, one, ty]), torch.stack([zero, zero, one])])
    return scale @ rot @ shift


def mask_points(mask: torch.Tensor, max_points: int = MAX_POINTS) -> torch.Tensor:
    """P(M) of alg. 4: the (x, y, 1) coordinates where M == 1, normalised to [-1, 1]; an even subsample
    (every k-th point, deterministic) when there are more than `max_points`."""
    h, w = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(h, w) > 0.5, as_tuple=True)
    step = max(1, math.ceil(len(xs) / max_points))
    xs, ys = xs[::step].double(), ys[::step].double()
    x = xs * 2 / max(w - 1, 1) - 1
    y = ys * 2 / max(h - 1, 1) - 1
    return torch.stack([x, y, torch.ones_like(x)], dim=1)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for every pair (N x M), by broadcasting (cdist's backward is far slower on CPU)."""
    return (a[:, None, :2] - b[None, :, :2]).pow(2).sum(-1)


def one_sided_distance(moved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """alg. 4 as written: for each transformed point, the squared distance to its nearest target point, averaged
    (the paper sums; the mean keeps the learning rate independent of the point count)."""
    return squared_distances(moved, target).min(dim=1).values.mean()


def symmetric_distance(moved: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The distance alg. 4 descends, made symmetric. The one-sided term is zero for every transform that shrinks
    M_r to any spot inside M_g, so alone it cannot recover scale (it collapses theta_1); the reverse term
    (every target point's distance to the nearest transformed point) is zero only when T(M_r) covers M_g."""
    d = squared_distances(moved, target)
    return d.min(dim=1).values.mean() + d.min(dim=0).values.mean()


def initial_theta(ref: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """A start for alg. 4 (the paper gives none): no rotation, the scale of the areas' ratio (second moments), and
    the translation that maps the reference centroid onto the generated one (Tr acts before S R: t = c_g / s - c_r)."""
    cr, cg = ref[:, :2].mean(0), gen[:, :2].mean(0)
    spread_r = (ref[:, :2] - cr).pow(2).sum(1).mean().sqrt()
    spread_g = (gen[:, :2] - cg).pow(2).sum(1).mean().sqrt()
    s = spread_g / spread_r.clamp_min(1e-6)
    t = cg / s - cr
    return torch.stack([s, torch.zeros_like(s), t[0], t[1]])


def fit_similarity(ref_mask: torch.Tensor, gen_mask: torch.Tensor, steps: int = 200, lr: float = 0.01,
                   angles: int = 4) -> Similarity:
    """Alg. 4 with the symmetric distance: gradient descent (Adam) on theta from `angles` evenly spaced starting
    rotations (a point-set distance has local minima in the angle), keeping the best fit.

    Raises ValueError when either mask is empty."""
    ref, gen = mask_points(ref_mask), mask_points(gen_mask)
    if len(ref) == 0 or len(gen) == 0:
        raise ValueError("alg. 4 needs two non-empty masks")
    best, best_loss = None, math.inf
    for k in range(angles):
        theta = initial_theta(ref, gen)
        theta[1] = 2 * math.pi * k / angles
        theta[2:] = _shift_for(theta, ref, gen)
        theta = theta.clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = symmetric_distance(ref @ similarity_matrix(theta).T, gen)
            loss.backward()
            opt.step()
        with torch.no_grad():
            final = float(symmetric_distance(ref @ similarity_matrix(theta).T, gen))
        if final < best_loss:
            best, best_loss = theta.detach(), final
    s, a, tx, ty = (float(v) for v in best)
    return Similarity(s, math.atan2(math.sin(a), math.cos(a)), tx, ty)


def _shift_for(theta: torch.Tensor, ref: torch.Tensor, gen: torch.Tensor) -> torch.Tensor:
    """The translation that maps the reference centroid onto the generated one under scale and angle of theta."""
    s, a = theta[0], theta[1]
    rot = torch.stack([torch.stack([torch.cos(a), -torch.sin(a)]), torch.stack([torch.sin(a), torch.cos(a)])])
    return torch.linalg.solve(s * rot, gen[:, :2].mean(0)) - ref[:, :2].mean(0)


def warp(image: torch.Tensor, transform: Similarity) -> torch.Tensor:
    """T_theta(I): the image (B, C, H, W) moved by the transform; each output pixel q samples I at T^-1(q)
    (bilinear; outside the image: zeros)."""
    inverse = torch.linalg.inv(transform.matrix())[:2].to(image.dtype)
    grid = F.affine_grid(inverse.expand(image.shape[0], 2, 3), list(image.shape), align_corners=True)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
