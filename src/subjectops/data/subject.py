"""Subject loading and validation: a directory of 3-20 photos of one subject plus a class word.

Every problem is found before anything is written: the error names the file, the problem and the fix.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from subjectops.config_base import SubjectCfg
from subjectops.digest import sha256_bytes, sha256_file
from subjectops.errors import SubjectError

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Kept with the photos (a dataset's own description and licence), never read as images.
DOCUMENTS = ("README.md", "LICENSE")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Letters of any script (`café`, `кот`): [^\W\d_] is a Unicode letter.
CLASS_WORD = re.compile(r"^[^\W\d_](?:[^\W\d_]|[ \-']){0,63}$")


@dataclass
class LoadedSubject:
    name: str
    images: list[Image.Image]  # RGB, resolution x resolution
    originals: list[Image.Image]  # RGB, EXIF-oriented, full size
    sources: list[dict]  # {file, sha256}
    warnings: list[str]
    conversions: list[dict]  # {file, mode, conversion} for every photo that was not 8-bit RGB


def check_subject_name(name: str) -> str:
    if not SAFE_NAME.match(name) or name in (".", ".."):
        raise SubjectError(
            f"subject name {name!r} is not a safe path component",
            fix="rename the folder to letters, digits, '.', '_' or '-' (at most 64 characters, no spaces or slashes)",
        )
    return name


def check_class_word(word: str | None) -> str:
    word = (word or "").strip()
    if not word:
        raise SubjectError("the class word is empty",
                           fix="pass --class with the subject's category, e.g. --class teapot")
    if not CLASS_WORD.match(word):
        raise SubjectError(f"class word {word!r} must be plain words (letters, spaces, hyphens)",
                           fix="pass a category such as 'teapot', 'dog' or 'stuffed animal'")
    return word


def subject_files(subject_dir: Path) -> list[Path]:
    """The files of a subject folder that subjectops reads: its photos and the documents beside them, hidden files
    skipped. One rule for every reader (refine, `data push`, the pods' copy), so a folder one accepts the others do;
    a link out of the folder or a file that is not a photo is refused, named, before any file is read."""
    entries = sorted(f for f in Path(subject_dir).iterdir() if not f.name.startswith("."))
    root = Path(subject_dir).resolve()
    for entry in entries:
        real = entry.resolve()
        if not real.is_relative_to(root):
            raise SubjectError(f"{entry} is a link to {real}, outside the subject folder {subject_dir}",
                               fix="copy the photo into the subject folder instead of linking to it")
    folders = [f.name for f in entries if f.is_dir()]
    if folders:
        raise SubjectError(f"{subject_dir} holds folders ({', '.join(folders)}): photos inside them would not be read",
                           fix="move the photos of the subject into the folder itself and remove the subfolders")
    files = [f for f in entries if f.is_file()]
    others = [f.name for f in files if f.suffix.lower() not in IMAGE_SUFFIXES and f.name not in DOCUMENTS]
    if others:
        raise SubjectError(f"{subject_dir} holds files that are not images: {', '.join(others)}",
                           fix=f"keep only photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in the subject folder")
    return files


# Alpha is composited on white (a studio backdrop; the class images the model draws are mostly on plain ground),
# never dropped: a dropped alpha shows whatever colour the editor left under the transparent pixels.
ALPHA_BACKGROUND = (255, 255, 255)
# A cut-out whose opaque part (alpha >= 128) covers less than this is refused: the subject would be a speck on white.
MIN_OPAQUE_FRACTION = 0.05
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Modes Pillow converts to RGB exactly (colour spaces, palettes and replication of one channel).
DIRECT_MODES = {"1": "bilevel", "L": "8-bit grayscale", "P": "palette", "CMYK": "CMYK",
                "YCbCr": "YCbCr", "LAB": "CIELAB", "HSV": "HSV"}


def check_photo_file(path: Path, cfg: SubjectCfg) -> None:
    """The file's byte size and its declared pixel count, from the header only."""
    size = path.stat().st_size
    if size == 0:
        raise SubjectError(f"{path} is an empty (zero-byte) file", fix="remove it or replace it with the real photo")
    if size > cfg.max_file_bytes:
        raise SubjectError(f"{path} is {size:,} bytes, above the limit of {cfg.max_file_bytes:,}",
                           fix="re-export the photo smaller, or raise subject.max_file_bytes if it is genuine")
    try:
        # Pillow's own bomb check would hide the declared size behind its exception: read the header without it.
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as probe:
                w, h = probe.size
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    if w * h > cfg.max_pixels:
        raise SubjectError(
            f"{path} declares {w}x{h} = {w * h:,} pixels, above the limit of {cfg.max_pixels:,} "
            "(a decompression bomb or an unreasonably large photo)",
            fix="downscale the photo, or raise subject.max_pixels if it is genuine",
        )


def _unreadable(path: Path, exc: BaseException) -> SubjectError:
    return SubjectError(f"{path} is not a readable image ({exc.__class__.__name__}: {exc})",
                        fix="re-export the photo as JPEG or PNG, or remove it")


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as probe:
            probe.verify()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            # Pillow hands over the first frame only: a silent choice of which view trains
            raise SubjectError(f"{path} is animated ({frames} frames); subjectops would use its first frame only",
                               fix="export the frame that shows the subject as a still JPEG or PNG")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise _unreadable(path, exc) from None
    return ImageOps.exif_transpose(img)


def _composite(img: Image.Image, path: Path, what: str) -> tuple[Image.Image, str]:
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    if alpha.min() == 255:
        return rgba.convert("RGB"), f"{what}: every pixel opaque, alpha dropped"
    opaque = float((alpha >= 128).mean())
    if opaque < MIN_OPAQUE_FRACTION:
        raise SubjectError(
            f"{path} is {1 - opaque:.0%} transparent: on the {ALPHA_BACKGROUND} background the subject would be lost",
            fix="use a photo of the subject with its background, or a cut-out where the subject fills more of the "
                "frame",
        )
    background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
    return (Image.alpha_composite(background, rgba).convert("RGB"),
            f"{what}: composited on RGB {ALPHA_BACKGROUND} ({opaque:.0%} opaque)")


def to_rgb(img: Image.Image, path: Path) -> tuple[Image.Image, str | None]:
    """8-bit RGB with the photo's tones, and what was converted (None when it already was 8-bit RGB)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, None
    if mode in ALPHA_MODES or "transparency" in img.info:
        return _composite(img, path, f"{mode} with transparency")
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise SubjectError(f"{path} holds {mode} values outside 0-65535", fix="re-export the photo as 8-bit RGB")
        # 16-bit full range onto 8 bits: 65535 / 257 = 255 (Pillow's own conversion clips at 255: a ramp turns white)
        gray = Image.fromarray(np.round(values / 257).astype(np.uint8), "L")
        return gray.convert("RGB"), f"{mode} (16-bit grayscale) scaled to 8 bits (value / 257)"
    if mode in DIRECT_MODES:
        return img.convert("RGB"), f"{mode} ({DIRECT_MODES[mode]}) converted to RGB"
    raise SubjectError(f"{path} has pixel mode {mode}, which subjectops does not convert",
                       fix="re-export the photo as 8-bit RGB JPEG or PNG")


def fit(img: Image.Image, resolution: int, mode: str) -> Image.Image:
    w, h = img.size
    if mode == "center-crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)
    scale = resolution / max(w, h)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    border = np.concatenate([np.asarray(small)[[0, -1]].reshape(-1, 3), np.asarray(small)[:, [0, -1]].reshape(-1, 3)])
    canvas = Image.new("RGB", (resolution, resolution), tuple(int(c) for c in border.mean(0)))
    canvas.paste(small, ((resolution - small.width) // 2, (resolution - small.height) // 2))
    return canvas


def load_subject(subject_dir: Path, cfg: SubjectCfg, resolution: int) -> LoadedSubject:
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        problem = "is a file, not a folder" if subject_dir.exists() else "does not exist"
        raise SubjectError(f"subject directory {subject_dir} {problem}", fix="pass a folder of 3-20 photos")
    name = check_subject_name(subject_dir.resolve().name)
    paths = [f for f in subject_files(subject_dir) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(paths) < cfg.min_images:
        raise SubjectError(f"{subject_dir} has {len(paths)} image(s); at least {cfg.min_images} are needed",
                           fix=f"add photos of the subject until there are {cfg.min_images}-{cfg.max_images}")
    if len(paths) > cfg.max_images:
        raise SubjectError(f"{subject_dir} has {len(paths)} images; at most {cfg.max_images} are used",
                           fix=f"keep the best {cfg.max_images} photos")
    # Every file's size and header first: a bad last file fails before any photo is decoded.
    for path in paths:
        check_photo_file(path, cfg)
    images, originals, sources, notes, conversions, seen = [], [], [], [], [], {}
    for path in paths:
        decoded = _decode(path)
        img, conversion = to_rgb(decoded, path)
        if conversion:
            conversions.append({"file": path.name, "mode": decoded.mode, "conversion": conversion})
        short, long = min(img.size), max(img.size)
        if (short if cfg.fit == "center-crop" else long) < resolution:
            raise SubjectError(
                f"{path} is {img.width}x{img.height}, below the training resolution {resolution} px"
                + (" on its short side" if cfg.fit == "center-crop" else ""),
                fix=f"use photos of at least {resolution} px, or set subject.resolution lower",
            )
        digest = sha256_bytes(img.tobytes())
        if digest in seen:
            notes.append(f"{path.name} is a duplicate of {seen[digest]}: it adds nothing and weighs that view twice")
        seen.setdefault(digest, path.name)
        originals.append(img)
        images.append(fit(img, resolution, cfg.fit))
        sources.append({"file": path.name, "sha256": sha256_file(path)})
    if len(seen) < cfg.min_images:
        raise SubjectError(f"{subject_dir} has {len(paths)} photos but only {len(seen)} different ones "
                           f"({'; '.join(notes)}); at least {cfg.min_images} different photos are needed",
                           fix=f"replace the duplicates with other photos of the subject "
                               f"({cfg.min_images}-{cfg.max_images} in all)")
    return LoadedSubject(name, images, originals, sources, notes, conversions)


@dataclass
class RefinedSubject:
    """A refine output directory, read back for training and evaluation."""

    root: Path
    info: dict

    @classmethod
    def load(cls, refine_dir: Path) -> RefinedSubject:
        path = Path(refine_dir) / "subject.json"
        if not path.exists():
            raise SubjectError(f"{refine_dir} is not a refine output (no subject.json)",
                               fix="run `subjectops refine` first")
        return cls(Path(refine_dir), json.loads(path.read_text()))

    @property
    def class_word(self) -> str:
        return self.info["class_word"]

    @property
    def resolution(self) -> int:
        return self.info["resolution"]

    def images(self) -> list[Image.Image]:
        return [Image.open(self.root / p).convert("RGB") for p in self.info["images"]]

    def masks(self) -> list[Image.Image]:
        return [Image.open(self.root / p).convert("L") for p in self.info["masks"]]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1]; PIL L -> (1, H, W) in [0, 1]."""
    import torch  # here: refine reads and checks photos without torch's import

    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    if arr.ndim == 2:
        return arr[None]
    return arr.permute(2, 0, 1) * 2 - 1
