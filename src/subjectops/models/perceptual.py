"""Hypnos perceptual encoder C (seed 000 eq. 5, app. B.1): EfficientNet-B1 activations of blocks 2, 3 and 4
(weights 0.35, 0.45, 0.2), compared between the reference image x and the decoded z0 estimate D(z0).

Block k is torchvision's `features[k]`: features[0] is the stem, features[1..7] the seven MBConv stages, so
blocks 2, 3, 4 are the 24-, 40- and 80-channel stages at strides 4, 8 and 16 (the shallow ones, sec. 3.4).
Only the stages up to the deepest one used are kept.

Weights never download. `finetune.hypnos.efficientnet`:
- `auto`: `tiny` when model.base is a tiny preset, else torchvision's B1 file in the torch hub cache;
- a path to a .pth / .safetensors state dict of torchvision's `efficientnet_b1` (or a directory holding one);
- `tiny`: a small seeded random network with B1's block structure (7 MBConv stages, same kernels, strides and
  expansion ratios, narrow and one layer each): plumbing tests only, its loss measures nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from subjectops.errors import ModelNotFoundError

# torchvision's EfficientNet_B1_Weights IMAGENET1K_V1 and IMAGENET1K_V2 file names.
B1_FILES = ("efficientnet_b1_rwightman-bac287d4.pth", "efficientnet_b1-c27df63c.pth")
B1_URL = "https://download.pytorch.org/models/efficientnet_b1_rwightman-bac287d4.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_SEED = 0
# B0/B1 stage table (expand, kernel, stride, in, out, layers), as in the EfficientNet paper.
B_STAGES = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
            (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]


def how_to_provide() -> str:
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"download {B1_URL} on a machine with network access and copy it to {hub}/ (found by "
            f"finetune.hypnos.efficientnet=auto), or set finetune.hypnos.efficientnet=/path/to/{B1_FILES[0]}; "
            f"for a smoke test without weights set finetune.hypnos.efficientnet=tiny (random, measures nothing)")


def tiny_efficientnet() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    torch.manual_seed(TINY_SEED)
    stages = [MBConvConfig(e, k, s, i, o, n, width_mult=0.25, depth_mult=0.1) for e, k, s, i, o, n in B_STAGES]
    return EfficientNet(stages, dropout=0.2, num_classes=10)


def _weight_file(source: str) -> Path:
    if source == "auto":
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        for name in B1_FILES:
            if (hub / name).exists():
                return hub / name
        raise ModelNotFoundError(f"EfficientNet-B1 weights (perceptual loss) are not in {hub}", fix=how_to_provide())
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted([*path.glob("*.safetensors"), *path.glob("*.pth"), *path.glob("*.pt")])
        if len(files) != 1:
            raise ModelNotFoundError(f"{path} should hold exactly one EfficientNet-B1 weight file, found {len(files)}",
                                     fix=how_to_provide())
        return files[0]
    if not path.exists():
        raise ModelNotFoundError(f"EfficientNet-B1 weight file {path} does not exist", fix=how_to_provide())
    return path


def load_efficientnet(source: str, tiny: bool) -> tuple[nn.Module, dict]:
    """The network and a description of what was loaded (recorded with the run)."""
    if source == "tiny" or (source == "auto" and tiny):
        return tiny_efficientnet(), {"source": "tiny", "pretrained": False}
    from torchvision.models import efficientnet_b1

    path = _weight_file(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = efficientnet_b1(weights=None)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelNotFoundError(f"{path} is not a torchvision efficientnet_b1 state dict ({str(exc)[:200]})",
                                 fix=how_to_provide()) from None
    return net, {"source": str(path), "pretrained": True}


class PerceptualEncoder(nn.Module):
    """Frozen EfficientNet features; `loss(x, y)` = sum_k w_k * mean((C_k(x) - C_k(y))^2) per sample (eq. 5)."""

    def __init__(self, net: nn.Module, blocks: list[int], weights: list[float], info: dict | None = None):
        super().__init__()
        n_features = len(net.features)
        if any(not 1 <= b < n_features for b in blocks):
            raise ValueError(f"blocks {blocks} outside 1..{n_features - 1}")
        self.features = net.features[: max(blocks) + 1]
        self.blocks, self.weights = list(blocks), list(weights)
        self.info = info or {}
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.calls = 0  # forward passes, so a test can check that nothing runs after s_p

    def train(self, mode: bool = True):
        return super().train(False)  # batch-norm statistics stay frozen

    def activations(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images in [-1, 1] -> the activations of the configured blocks."""
        self.calls += 1
        x = ((images.float() + 1) / 2 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.blocks:
                out.append(x)
        return out

    def loss(self, reference: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Per-sample weighted feature distance; the reference path carries no gradient."""
        with torch.no_grad():
            ref = self.activations(reference)
        gen = self.activations(generated)
        total = torch.zeros(generated.shape[0], device=generated.device)
        by_block = dict(zip(self.blocks, self.weights))
        for block, r, g in zip(sorted(self.blocks), ref, gen):
            total = total + by_block[block] * F.mse_loss(g.float(), r.float(), reduction="none").flatten(1).mean(1)
        return total
