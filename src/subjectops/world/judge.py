"""The world judge: a small CNN trained on the world's ground truth (never on generated images).

One network, the world's counterpart of an ImageNet classifier, serves three roles:
- ground-truth classifiers (class, color, pattern, scene) and an object-mask head: the world-accuracy
  metrics of `evaluate` ("does the image show the prompted class, scene, color");
- its pooled features are the FID features (as Inception's pool3 is for real photos);
- its stage activations are the LPIPS backbone (as AlexNet's are), with uniform channel weights: the
  per-channel weights of real LPIPS are fitted to human judgements, which the world does not have.
Saved as safetensors plus a JSON config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from subjectops.world.vocab import CLASSES, COLORS, PATTERNS, SCENES

HEADS = {"class": len(CLASSES), "color": len(COLORS), "pattern": len(PATTERNS), "scene": len(SCENES)}
MEAN, STD = 0.5, 0.25


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class WorldJudge(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.widths = tuple(widths)
        chans = (3,) + self.widths
        self.stages = nn.ModuleList(_stage(a, b) for a, b in zip(chans, chans[1:]))
        self.heads = nn.ModuleDict({k: nn.Linear(self.widths[-1], n) for k, n in HEADS.items()})
        # mask: the 16x16 stage's activations, upsampled to the image
        self.mask_head = nn.Sequential(nn.Conv2d(self.widths[1] + self.widths[2], 64, 3, padding=1),
                                       nn.ReLU(inplace=True), nn.Conv2d(64, 1, 1))

    def stage_features(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, 64, 64) in [0, 1] -> activations at 64, 32, 16, 8 px."""
        x = (images - MEAN) / STD
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else F.max_pool2d(x, 2))
            outs.append(x)
        return outs

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.stage_features(images)
        pooled = feats[-1].mean((2, 3))
        out = {k: head(pooled) for k, head in self.heads.items()}
        mid = torch.cat([F.interpolate(feats[1], scale_factor=0.5, mode="bilinear", align_corners=False),
                         feats[2]], 1)
        out["mask"] = F.interpolate(self.mask_head(mid), size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        out["features"] = pooled
        return out

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().half().contiguous() for k, v in self.state_dict().items()
                   if v.dtype.is_floating_point}, folder / "model.safetensors")
        counts = {k: v for k, v in self.state_dict().items() if not v.dtype.is_floating_point}
        (folder / "config.json").write_text(json.dumps({
            "architecture": "subjectops.world.judge.WorldJudge", "widths": list(self.widths),
            "heads": {k: list(v) for k, v in (("class", CLASSES), ("color", list(COLORS)), ("pattern", PATTERNS),
                                               ("scene", SCENES))},
            "num_batches_tracked": {k: int(v) for k, v in counts.items()},
        }, indent=1))

    @classmethod
    def load(cls, folder: Path, device: torch.device | str = "cpu") -> WorldJudge:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        net = cls(tuple(cfg["widths"]))
        state = {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}
        state.update({k: torch.tensor(v) for k, v in cfg["num_batches_tracked"].items()})
        net.load_state_dict(state)
        return net.to(device).eval()
