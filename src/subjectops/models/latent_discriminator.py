"""Hypnos latent discriminator LD (seed 000 sec. 3.4, app. B.2, fig. 3a).

    z (VAE latent) -> inverted-bottleneck conv -> concat with z -> 8x8 patches + positional embeddings
      -> [CLS] + 3 transformer blocks -> 3 MLP heads on the [CLS] embedding

Each head gives a real/fake logit; LD(z) = mean of the heads' sigmoids, in [0, 1] (1 = real), so that
eq. 7's generator loss ||1 - LD(z0)||^2 is bounded. The paper gives no widths; they come from
`pretrain_disc.model` and travel with the weights (`latent_discriminator.json`).

Saved as `latent_discriminator.safetensors` + `latent_discriminator.json` by the `pretrain-disc` stage and
loaded by Hypnos' `setup()`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from subjectops.errors import SubjectopsError

WEIGHTS = "latent_discriminator.safetensors"
CONFIG = "latent_discriminator.json"


class InvertedBottleneck(nn.Module):
    """MobileNetV2's inverted residual without the residual: 1x1 expand, 3x3 depthwise, 1x1 project."""

    def __init__(self, channels: int, expansion: int, out_channels: int):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.gelu(self.depthwise(F.gelu(self.expand(x)))))


class Block(nn.Module):
    """Pre-norm transformer block (ViT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class LatentDiscriminator(nn.Module):
    def __init__(self, latent_channels: int = 4, latent_size: int = 64, patch_size: int = 8, dim: int = 256,
                 depth: int = 3, heads: int = 4, mlp_ratio: float = 4.0, expansion: int = 6, conv_channels: int = 16,
                 mlp_heads: int = 3):
        super().__init__()
        if latent_size % patch_size:
            raise SubjectopsError(
                f"the latent discriminator's patch size {patch_size} does not divide the latent size {latent_size}",
                fix="set pretrain_disc.model.patch_size to a divisor of resolution / 8 (e.g. 8 for 512 px)")
        self.config = dict(latent_channels=latent_channels, latent_size=latent_size, patch_size=patch_size, dim=dim,
                           depth=depth, heads=heads, mlp_ratio=mlp_ratio, expansion=expansion,
                           conv_channels=conv_channels, mlp_heads=mlp_heads)
        self.conv = InvertedBottleneck(latent_channels, expansion, conv_channels)
        self.patch = nn.Conv2d(latent_channels + conv_channels, dim, patch_size, stride=patch_size)
        n_patches = (latent_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
                                    for _ in range(mlp_heads)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, C, h, w) scaled VAE latents -> (B, mlp_heads) real/fake logits."""
        if z.shape[-1] != self.config["latent_size"] or z.shape[-2] != self.config["latent_size"]:
            raise SubjectopsError(
                "the latent discriminator was pretrained on "
                f"{self.config['latent_size']}x{self.config['latent_size']} "
                f"latents but got {tuple(z.shape[-2:])}",
                fix="run `subjectops pretrain-disc` again on the refine output used for finetune")
        x = torch.cat([self.conv(z), z], dim=1)  # fig. 3a: conv features concatenated with the latent
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        cls = self.norm(x[:, 0])
        return torch.cat([head(cls) for head in self.heads], dim=1)

    def score(self, z: torch.Tensor) -> torch.Tensor:
        return scores_from_logits(self(z))

    def loss(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return bce_from_logits(self(z), labels)

    # --- files -----------------------------------------------------------------------------------------
    def save(self, out_dir: Path, **extra) -> list[str]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, out_dir / WEIGHTS)
        (out_dir / CONFIG).write_text(json.dumps({**self.config, **extra}, indent=2))
        return [WEIGHTS, CONFIG]

    @classmethod
    def load(cls, directory: Path) -> LatentDiscriminator:
        directory = Path(directory)
        if not (directory / WEIGHTS).exists() or not (directory / CONFIG).exists():
            raise SubjectopsError(
                f"{directory} holds no pretrained latent discriminator ({WEIGHTS} + {CONFIG})",
                fix="run `subjectops pretrain-disc --refine RUN/refine --priors RUN/priors --out RUN/pretrain_disc` "
                    "and pass its directory with --disc")
        info = json.loads((directory / CONFIG).read_text())
        keys = ("latent_channels", "latent_size", "patch_size", "dim", "depth", "heads", "mlp_ratio", "expansion",
                "conv_channels", "mlp_heads")
        model = cls(**{k: info[k] for k in keys})
        model.load_state_dict(load_file(directory / WEIGHTS))
        return model


def scores_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """LD(z) in [0, 1]: the mean of the heads' real probabilities."""
    return torch.sigmoid(logits).mean(dim=1)


def bce_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every head against labels (1 real, 0 fake)."""
    return F.binary_cross_entropy_with_logits(logits, labels.view(-1, 1).expand_as(logits).to(logits))
