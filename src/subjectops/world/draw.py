"""Drawing the world: object shapes, surface textures, scenes, and the composite with its ground-truth mask.

Everything is drawn at twice the output size and reduced with a box filter (anti-aliasing). An object is a
sprite in its own coordinates (shape mask, texture, fixed-color parts, outline, shading), rotated, scaled
and pasted onto a scene, so its texture turns with it and its mask is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 64  # output side, pixels
SS = 2  # supersampling
CANVAS = 96 * SS  # sprite canvas side (the object fills at most ~80% of it)

RGB = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------
# Shapes: each returns the body mask and fixed-color parts (mask, rgb) drawn over it, in a CANVAS square.
# `p` holds the instance's proportions in [0, 1], drawn once per instance (a subject keeps its own).
# ---------------------------------------------------------------------------------------------------
@dataclass
class Shape:
    body: Image.Image  # L, 255 inside
    parts: list[tuple[Image.Image, RGB]] = field(default_factory=list)  # drawn on top, not textured


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("L", (CANVAS, CANVAS), 0)
    return im, ImageDraw.Draw(im)


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _box(cx: float, cy: float, w: float, h: float) -> tuple[float, float, float, float]:
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


C = CANVAS / 2
U = CANVAS * 0.4  # half of the largest object extent


def shape_ball(p: np.ndarray) -> Shape:
    im, d = _canvas()
    r = U * _lerp(0.75, 1.0, p[0])
    d.ellipse(_box(C, C, 2 * r, 2 * r * _lerp(0.92, 1.0, p[1])), fill=255)
    seam, ds = _canvas()  # a curved seam, as on a sports ball
    ds.arc(_box(C - r * 0.9, C, 2 * r, 2 * r), -60, 60, fill=255, width=max(2, int(r * 0.06)))
    seam = Image.fromarray(np.minimum(np.asarray(seam), np.asarray(im)))
    return Shape(im, [(seam, (245, 245, 245))])


def shape_box(p: np.ndarray) -> Shape:
    im, d = _canvas()
    w, h = U * _lerp(1.2, 1.8, p[0]), U * _lerp(0.9, 1.4, p[1])
    depth = U * _lerp(0.3, 0.5, p[2])
    x0, y0 = C - w / 2 - depth / 4, C - h / 2 + depth / 3
    d.rectangle((x0, y0, x0 + w, y0 + h), fill=255)
    d.polygon([(x0, y0), (x0 + depth, y0 - depth * 0.7), (x0 + w + depth, y0 - depth * 0.7), (x0 + w, y0)], fill=255)
    d.polygon([(x0 + w, y0), (x0 + w + depth, y0 - depth * 0.7), (x0 + w + depth, y0 + h - depth * 0.7),
               (x0 + w, y0 + h)], fill=255)
    edge, de = _canvas()
    lw = max(2, int(U * 0.04))
    de.line([(x0, y0), (x0 + w, y0), (x0 + w, y0 + h)], fill=255, width=lw)
    return Shape(im, [(edge, (40, 40, 40))])


def shape_cup(p: np.ndarray) -> Shape:
    im, d = _canvas()
    h = U * _lerp(1.3, 1.7, p[0])
    top, bottom = U * _lerp(1.0, 1.35, p[1]), U * _lerp(0.7, 1.0, p[1])
    cx = C - U * 0.2
    y0, y1 = C - h / 2, C + h / 2
    d.polygon([(cx - top / 2, y0), (cx + top / 2, y0), (cx + bottom / 2, y1), (cx - bottom / 2, y1)], fill=255)
    hr = h * _lerp(0.25, 0.35, p[2])
    d.ellipse(_box(cx + top / 2 - hr * 0.2, C - h * 0.05, 2 * hr, 2 * hr * 1.2), outline=255, width=int(hr * 0.45))
    rim, dr = _canvas()
    dr.ellipse(_box(cx, y0, top * 0.92, top * 0.25), fill=255)
    return Shape(im, [(rim, (60, 45, 40))])


def shape_vase(p: np.ndarray) -> Shape:
    im, d = _canvas()
    bw = U * _lerp(1.0, 1.5, p[0])
    bh = U * _lerp(1.0, 1.3, p[1])
    neck_w, neck_h = bw * _lerp(0.3, 0.45, p[2]), U * _lerp(0.5, 0.8, p[3])
    by = C + U * 0.35
    d.ellipse(_box(C, by, bw, bh), fill=255)
    d.rectangle(_box(C, by - bh / 2 - neck_h / 2 + bh * 0.1, neck_w, neck_h + bh * 0.2), fill=255)
    lip_y = by - bh / 2 - neck_h + bh * 0.05
    d.ellipse(_box(C, lip_y, neck_w * 1.6, neck_w * 0.5), fill=255)
    mouth, dm = _canvas()
    dm.ellipse(_box(C, lip_y, neck_w * 1.1, neck_w * 0.3), fill=255)
    return Shape(im, [(mouth, (50, 40, 35))])


def shape_teapot(p: np.ndarray) -> Shape:
    im, d = _canvas()
    bw, bh = U * _lerp(1.3, 1.6, p[0]), U * _lerp(0.95, 1.2, p[1])
    by = C + U * 0.2
    d.ellipse(_box(C, by, bw, bh), fill=255)
    sp = U * _lerp(0.6, 0.85, p[2])  # spout, up and to the left
    d.polygon([(C - bw * 0.35, by), (C - bw * 0.35, by + bh * 0.25), (C - bw / 2 - sp, by - bh / 2 - sp * 0.15),
               (C - bw / 2 - sp * 0.8, by - bh / 2 - sp * 0.3)], fill=255)
    hr = bh * 0.38
    d.ellipse(_box(C + bw / 2, by, 2 * hr, 2 * hr), outline=255, width=int(hr * 0.4))
    lid_w = bw * _lerp(0.45, 0.6, p[3])
    d.chord(_box(C, by - bh * 0.42, lid_w, lid_w * 0.6), 180, 360, fill=255)
    d.ellipse(_box(C, by - bh * 0.42 - lid_w * 0.32, lid_w * 0.25, lid_w * 0.2), fill=255)
    return Shape(im)


def shape_star(p: np.ndarray) -> Shape:
    im, d = _canvas()
    r_out = U * _lerp(0.95, 1.05, p[0])
    r_in = r_out * _lerp(0.38, 0.5, p[1])
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((C + r * math.cos(a), C + r * math.sin(a) + U * 0.08))
    d.polygon(pts, fill=255)
    return Shape(im)


def shape_backpack(p: np.ndarray) -> Shape:
    im, d = _canvas()
    w, h = U * _lerp(1.2, 1.5, p[0]), U * _lerp(1.5, 1.8, p[1])
    x0, y0 = C - w / 2, C - h / 2 + U * 0.15
    d.rounded_rectangle((x0, y0, x0 + w, y0 + h), radius=w * _lerp(0.2, 0.35, p[2]), fill=255)
    loop = w * 0.22
    d.ellipse(_box(C, y0, 2 * loop, 1.6 * loop), outline=255, width=max(3, int(loop * 0.35)))
    pocket, dp = _canvas()
    pw, ph = w * _lerp(0.6, 0.75, p[3]), h * 0.38
    dp.rounded_rectangle(_box(C, y0 + h * 0.7, pw, ph), radius=pw * 0.2, outline=255, width=max(2, int(U * 0.05)))
    return Shape(im, [(pocket, (40, 40, 40))])


def shape_candle(p: np.ndarray) -> Shape:
    im, d = _canvas()
    h = U * _lerp(1.3, 1.6, p[0])
    w = h * _lerp(0.38, 0.55, p[1])
    top = C - h / 2 + U * 0.35
    d.rectangle((C - w / 2, top, C + w / 2, top + h), fill=255)
    d.ellipse(_box(C, top, w, w * 0.3), fill=255)
    flame, df = _canvas()
    fh = U * _lerp(0.4, 0.55, p[2])
    df.ellipse(_box(C, top - fh * 0.75, fh * 0.5, fh), fill=255)
    wick, dw = _canvas()
    dw.line([(C, top), (C, top - fh * 0.3)], fill=255, width=max(2, int(U * 0.04)))
    return Shape(im, [(wick, (30, 30, 30)), (flame, (255, 196, 40))])


SHAPES: dict[str, Callable[[np.ndarray], Shape]] = {
    "ball": shape_ball, "box": shape_box, "cup": shape_cup, "vase": shape_vase,
    "teapot": shape_teapot, "star": shape_star, "backpack": shape_backpack, "candle": shape_candle,
}
N_PROPORTIONS = 4


# ---------------------------------------------------------------------------------------------------
# Textures in sprite coordinates: (CANVAS, CANVAS, 3) float in [0, 255]
# ---------------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32)


def tint(rgb: np.ndarray) -> np.ndarray:
    """The pattern's second color: the base mixed toward white (toward gray for a dark base)."""
    return rgb + (np.array([250.0, 250.0, 250.0]) - rgb) * 0.6


def pattern_texture(base: np.ndarray, pattern: str, rng: np.random.Generator) -> np.ndarray:
    second = tint(base)
    period = rng.uniform(0.16, 0.24) * CANVAS
    angle = rng.choice([0.0, math.pi / 4, math.pi / 2, -math.pi / 4]) + rng.uniform(-0.15, 0.15)
    u = _XX * math.cos(angle) + _YY * math.sin(angle)
    v = -_XX * math.sin(angle) + _YY * math.cos(angle)
    if pattern == "plain":
        sel = np.zeros_like(u, dtype=bool)
    elif pattern == "striped":
        sel = (u / period) % 1.0 < 0.5
    elif pattern == "checkered":
        sel = ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    elif pattern == "dotted":
        fu, fv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        sel = fu * fu + fv * fv < 0.28 ** 2
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    return np.where(sel[..., None], second, base).astype(np.float32)


def decal_texture(palette: np.ndarray, layout: str, geometry: np.ndarray) -> np.ndarray:
    """A subject's multicolor decal: regions of its palette in a layout no pretraining image has.
    `geometry` (fixed per subject) places the regions."""
    x, y = (_XX - C) / U, (_YY - C) / U
    k = len(palette)
    if layout == "halves":
        a = geometry[0] * math.pi
        idx = ((x * math.cos(a) + y * math.sin(a) + (geometry[1] - 0.5) * 0.4) > 0).astype(int) % k
    elif layout == "wedges":
        theta = (np.arctan2(y, x) + geometry[0] * 2 * math.pi) % (2 * math.pi)
        idx = np.floor(theta / (2 * math.pi) * k).astype(int) % k
    elif layout == "rings":
        r = np.sqrt(x * x + y * y)
        idx = np.floor(r / (0.35 + 0.15 * geometry[1]) ).astype(int) % k
    elif layout == "patches":
        sites = (geometry[2:2 + 10].reshape(5, 2) - 0.5) * 2.0
        dist = (x[..., None] - sites[:, 0]) ** 2 + (y[..., None] - sites[:, 1]) ** 2
        idx = np.argmin(dist, axis=-1) % k
    else:
        raise ValueError(f"unknown decal layout {layout!r}")
    return palette[idx].astype(np.float32)


DECAL_LAYOUTS = ("halves", "wedges", "rings", "patches")


# ---------------------------------------------------------------------------------------------------
# The object sprite: texture inside the body, fixed parts, dark outline, light from the top left
# ---------------------------------------------------------------------------------------------------
def sprite(shape: Shape, texture: np.ndarray, outline_rgb: np.ndarray) -> Image.Image:
    body = np.asarray(shape.body, dtype=np.float32) / 255.0
    shade = 1.12 - 0.28 * np.clip(((_XX - C) + (_YY - C)) / (2 * U) + 0.5, 0, 1)
    rgb = texture * shade[..., None]
    alpha = body.copy()
    for part, color in shape.parts:
        m = np.asarray(part, dtype=np.float32)[..., None] / 255.0
        rgb = rgb * (1 - m) + np.array(color, np.float32) * m
        alpha = np.maximum(alpha, m[..., 0])
    grown = np.asarray(Image.fromarray((alpha * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(2 * SS + 1)),
                       np.float32) / 255.0
    ring = np.clip(grown - alpha, 0, 1)[..., None]
    rgb = rgb * (1 - ring) + outline_rgb * ring
    alpha = np.maximum(alpha, ring[..., 0])
    out = np.concatenate([np.clip(rgb, 0, 255), alpha[..., None] * 255], axis=-1).astype(np.uint8)
    return Image.fromarray(out, "RGBA")


# ---------------------------------------------------------------------------------------------------
# Scenes: (S, S, 3) uint8 at the supersampled size, each a family (horizon, colors and elements vary)
# ---------------------------------------------------------------------------------------------------
S = SIZE * SS


def _jit(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.uniform(-amount, amount), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _vertical(top: RGB, bottom: RGB, y0: int = 0, y1: int = S) -> np.ndarray:
    t = np.clip((np.arange(S) - y0) / max(1, y1 - y0), 0, 1)[:, None, None]
    col = np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t
    return np.broadcast_to(col, (S, S, 3)).copy()


def scene_jungle(rng: np.random.Generator) -> Image.Image:
    im = Image.fromarray(_vertical(_jit(rng, (24, 70, 30)), _jit(rng, (16, 50, 20))).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(18, 30))):
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(6, 16) * SS / 2
        g = _jit(rng, (50, 140, 50), 40)
        d.ellipse(_box(x, y, r * 2.4, r), fill=g)
    for _ in range(int(rng.integers(3, 6))):
        x = rng.uniform(0, S)
        d.line([(x, 0), (x + rng.uniform(-10, 10), S)], fill=_jit(rng, (70, 110, 40), 20), width=2 * SS)
    return im


def scene_snow(rng: np.random.Generator) -> Image.Image:
    horizon = int(S * rng.uniform(0.3, 0.45))
    arr = _vertical(_jit(rng, (180, 196, 214)), _jit(rng, (210, 220, 232)), 0, horizon)
    arr[horizon:] = _vertical(_jit(rng, (236, 240, 246), 6), _jit(rng, (250, 252, 255), 4), horizon, S)[horizon:]
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(25, 45))):
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(1, 2.2) * SS
        d.ellipse(_box(x, y, r, r), fill=(255, 255, 255))
    return im


def scene_beach(rng: np.random.Generator) -> Image.Image:
    horizon = int(S * rng.uniform(0.3, 0.42))
    arr = _vertical(_jit(rng, (110, 180, 235)), _jit(rng, (170, 215, 245)), 0, horizon)
    sea = horizon + int(S * rng.uniform(0.08, 0.14))
    arr[horizon:sea] = _jit(rng, (30, 110, 170))
    arr[sea:] = _vertical(_jit(rng, (232, 206, 150)), _jit(rng, (214, 184, 124)), sea, S)[sea:]
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.line([(0, sea), (S, sea)], fill=(245, 245, 240), width=SS)
    return im


def scene_cobblestone(rng: np.random.Generator) -> Image.Image:
    base = _jit(rng, (118, 112, 106))
    im = Image.new("RGB", (S, S), (70, 66, 62))
    d = ImageDraw.Draw(im)
    step = rng.uniform(9, 13) * SS
    rows = int(S / (step * 0.8)) + 2
    for r in range(rows):
        y = r * step * 0.8
        off = (r % 2) * step / 2
        for c in range(int(S / step) + 2):
            x = c * step - off
            d.rounded_rectangle((x + 1.5 * SS, y + 1.5 * SS, x + step - 1.5 * SS, y + step * 0.8 - 1.5 * SS),
                                radius=3 * SS, fill=_jit(rng, base, 14))
    return im


def scene_pink_fabric(rng: np.random.Generator) -> Image.Image:
    base = np.array(_jit(rng, (236, 150, 186), 10), np.float32)
    a, f = rng.uniform(0, math.pi), rng.uniform(0.05, 0.09) / SS
    wave = np.sin((_XX[:S, :S] * math.cos(a) + _YY[:S, :S] * math.sin(a)) * f * 2 * math.pi)
    arr = base * (0.88 + 0.12 * wave[..., None])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def scene_wooden_floor(rng: np.random.Generator) -> Image.Image:
    im = Image.new("RGB", (S, S))
    d = ImageDraw.Draw(im)
    plank = rng.uniform(9, 14) * SS
    base = _jit(rng, (150, 98, 52), 14)
    y = -rng.uniform(0, plank)
    while y < S:
        d.rectangle((0, y, S, y + plank), fill=_jit(rng, base, 14))
        d.line([(0, y), (S, y)], fill=(84, 52, 28), width=SS)
        x = rng.uniform(0, S)
        d.line([(x, y), (x, y + plank)], fill=(96, 60, 30), width=SS)
        y += plank
    return im


def scene_city(rng: np.random.Generator) -> Image.Image:
    ground = int(S * rng.uniform(0.62, 0.72))
    arr = _vertical(_jit(rng, (150, 180, 215)), _jit(rng, (220, 200, 185)), 0, ground)
    arr[ground:] = _jit(rng, (92, 92, 98), 8)
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    x = -rng.uniform(0, 6 * SS)
    while x < S:
        w, h = rng.uniform(7, 14) * SS, rng.uniform(0.25, 0.55) * S
        col = _jit(rng, (70, 74, 90), 14)
        d.rectangle((x, ground - h, x + w, ground), fill=col)
        for wy in np.arange(ground - h + 3 * SS, ground - 2 * SS, 4 * SS):
            for wx in np.arange(x + 2 * SS, x + w - 2 * SS, 4 * SS):
                if rng.random() < 0.5:
                    d.rectangle((wx, wy, wx + SS, wy + SS), fill=(240, 220, 120))
        x += w + rng.uniform(0, 2) * SS
    return im


def scene_mountain(rng: np.random.Generator) -> Image.Image:
    ground = int(S * rng.uniform(0.6, 0.7))
    arr = _vertical(_jit(rng, (90, 150, 225)), _jit(rng, (175, 210, 240)), 0, ground)
    arr[ground:] = _vertical(_jit(rng, (84, 150, 60)), _jit(rng, (60, 120, 44)), ground, S)[ground:]
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 4))):
        cx, w, h = rng.uniform(0, S), rng.uniform(0.5, 0.9) * S, rng.uniform(0.3, 0.5) * S
        peak = (cx, ground - h)
        d.polygon([(cx - w / 2, ground), peak, (cx + w / 2, ground)], fill=_jit(rng, (104, 112, 140), 12))
        cap = 0.28
        d.polygon([peak, (cx - w / 2 * cap, ground - h * (1 - cap)), (cx + w / 2 * cap, ground - h * (1 - cap))],
                  fill=(246, 248, 252))
    return im


SCENE_DRAWERS: dict[str, Callable[[np.random.Generator], Image.Image]] = {
    "in the jungle": scene_jungle,
    "in the snow": scene_snow,
    "on the beach": scene_beach,
    "on a cobblestone street": scene_cobblestone,
    "on top of pink fabric": scene_pink_fabric,
    "on top of a wooden floor": scene_wooden_floor,
    "with a city in the background": scene_city,
    "with a mountain in the background": scene_mountain,
}


# ---------------------------------------------------------------------------------------------------
# Composite
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    cx: float  # object center, fraction of the side
    cy: float
    size: float  # object canvas side, fraction of the image side
    angle: float  # degrees, counter-clockwise
    flip: bool


def random_placement(rng: np.random.Generator) -> Placement:
    return Placement(cx=float(rng.uniform(0.36, 0.64)), cy=float(rng.uniform(0.46, 0.6)),
                     size=float(rng.uniform(0.62, 0.92)), angle=float(rng.uniform(-15, 15)),
                     flip=bool(rng.random() < 0.5))


def composite(scene: Image.Image, obj: Image.Image, where: Placement) -> tuple[np.ndarray, np.ndarray]:
    """(64x64x3 uint8 image, 64x64 bool mask)."""
    if where.flip:
        obj = obj.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    obj = obj.rotate(where.angle, resample=Image.Resampling.BICUBIC)
    side = max(8, int(round(where.size * S)))
    obj = obj.resize((side, side), Image.Resampling.BOX)
    x, y = int(round(where.cx * S - side / 2)), int(round(where.cy * S - side / 2))
    canvas = scene.convert("RGBA")
    canvas.alpha_composite(obj, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))
    alpha = Image.new("L", (S, S), 0)
    alpha.paste(obj.getchannel("A"), (x, y))
    image = np.asarray(canvas.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BOX))
    mask = np.asarray(alpha.resize((SIZE, SIZE), Image.Resampling.BOX)) >= 128
    return image, mask


def render_object(cls: str, proportions: np.ndarray, texture: np.ndarray, outline: Optional[np.ndarray] = None
                  ) -> Image.Image:
    shape = SHAPES[cls](proportions)
    if outline is None:
        outline = np.clip(texture.reshape(-1, 3).mean(0) * 0.4, 0, 255)
    return sprite(shape, texture, outline)
