"""The miniature world's words: object classes, colors, surface patterns and scenes, the combinations held
out of pretraining, and DreamBench-style captions.

The scenes are eight of DreamBench's object contexts, phrased exactly as its prompts phrase them ("a {V}
{class} in the jungle"), so the world prompt set (data/prompts.py) is DreamBench's prompts restricted to
what the world can depict, and a scene classifier can say whether a generated image shows its context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

# DreamBench-like class words; each is a family of shapes (world/draw.py).
CLASSES = ("ball", "box", "cup", "vase", "teapot", "star", "backpack", "candle")

# Named colors (sRGB), each drawn with a small jitter so a color word covers a range.
COLORS = {
    "red": (214, 38, 38),
    "orange": (242, 133, 22),
    "yellow": (242, 208, 36),
    "green": (46, 160, 62),
    "blue": (36, 84, 214),
    "purple": (128, 52, 176),
    "pink": (240, 120, 178),
    "black": (34, 34, 38),
}

# "plain" is not said in captions ("a red cup"), the others are ("a red striped cup").
PATTERNS = ("plain", "striped", "dotted", "checkered")

# DreamBench's first eight object contexts (dreambench_prompts.json), word for word.
SCENES = (
    "in the jungle",
    "in the snow",
    "on the beach",
    "on a cobblestone street",
    "on top of pink fabric",
    "on top of a wooden floor",
    "with a city in the background",
    "with a mountain in the background",
)

# Never drawn during pretraining: prompt fidelity on these pairs measures composition, not memory.
HELDOUT_CLASS_SCENE = frozenset({
    ("ball", "in the snow"),
    ("box", "on the beach"),
    ("cup", "in the jungle"),
    ("vase", "with a city in the background"),
    ("teapot", "with a mountain in the background"),
    ("star", "on top of a wooden floor"),
    ("backpack", "on a cobblestone street"),
    ("candle", "on top of pink fabric"),
})
HELDOUT_COLOR_CLASS = frozenset({
    ("red", "vase"),
    ("orange", "box"),
    ("yellow", "backpack"),
    ("green", "star"),
    ("blue", "teapot"),
    ("purple", "cup"),
    ("pink", "ball"),
    ("black", "candle"),
})


def is_heldout(cls: str, color: Optional[str], scene: str) -> bool:
    return (cls, scene) in HELDOUT_CLASS_SCENE or (color, cls) in HELDOUT_COLOR_CLASS


@dataclass(frozen=True)
class Caption:
    """Which attributes a caption states; None = the caption leaves it unsaid (the image still has one)."""

    cls: str
    color: Optional[str]
    pattern: Optional[str]
    scene: Optional[str]
    prefix: str = "a photo of"

    def text(self, identifier: str = "") -> str:
        words = []
        if self.color:
            words.append(self.color)
        if self.pattern and self.pattern != "plain":
            words.append(self.pattern)
        if identifier:
            words.append(identifier)
        words.append(self.cls)
        noun = " ".join(words)
        article = "an" if noun[0] in "aeiou" else "a"
        head = f"{self.prefix} {article}" if self.prefix else article
        return f"{head} {noun}" + (f" {self.scene}" if self.scene else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# How often pretraining captions leave an attribute unsaid, so that short prompts ("a photo of a cup", the
# class-prior prompt; "a sks cup in the snow", DreamBench's) are in distribution. Our choice.
PREFIXES = (("a photo of", 0.5), ("", 0.4), ("a picture of", 0.1))
DROP_COLOR = 0.2
DROP_PATTERN = 0.15
DROP_SCENE = 0.2
