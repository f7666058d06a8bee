"""The metrics' formulas on tensors: cosine similarities, CLIP-T, the Frechet distance (on given features or
Inception-v3's), SSIM and PSNR of every generated/reference pair.

Pure functions of tensors (and the encoders handed to them), separate from reading images, loading encoders and
the evaluator that pairs them up; metrics/evaluator.py says which paper defines each number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from subjectops.data.prompts import strip_identifier
from subjectops.errors import SubjectopsError
from subjectops.metrics import backbones as B


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) cosine similarity between rows of a and rows of b."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def clip_t(clip: B.ClipEncoder, image_emb: Tensor, prompts: Sequence[str], identifiers: Sequence[str]) -> Tensor:
    """(N,) CLIP-T: each image against its own prompt with the identifier removed (seed 003 sec. 5)."""
    texts = [strip_identifier(p, i) for p, i in zip(prompts, identifiers)]
    unique = sorted(set(texts))
    emb = clip.embed_text(unique)
    idx = torch.tensor([unique.index(t) for t in texts], device=emb.device)
    return (F.normalize(image_emb.double().to(emb.device), dim=-1) * F.normalize(emb.double(), dim=-1)[idx]).sum(-1)


class _Precomputed(torch.nn.Module):
    """Feature 'extractor' for torchmetrics' FID that receives features already computed by the evaluator
    (DINO or CLIP embeddings), so the encoder runs once per image for all metrics."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets, through torchmetrics' FID
    (d^2 = |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)))."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise SubjectopsError(f"FID needs at least 2 reference and 2 generated images (got {real.shape[0]} and "
                              f"{fake.shape[0]})", fix="generate more images or drop fid from evaluate.metrics")
    fid = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    fid.update(real.double().cpu(), real=True)
    fid.update(fake.double().cpu(), real=False)
    return float(fid.compute())


class InceptionFID:
    """torchmetrics FID with torch-fidelity's Inception-v3 (2048-d pool3), weights from a local file."""

    def __init__(self, weights: Path, device: torch.device):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=2048, normalize=True,
                                               feature_extractor_weights_path=str(weights)).to(device)
        self.device = device
        self.info = B.BackboneInfo("inception", "inception-v3-compat", True, str(weights),
                                   "FID Inception-v3 pool3 (torch-fidelity weights)")

    def update(self, images: Tensor, real: bool) -> None:
        self.metric.update(images.to(self.device), real=real)

    def compute(self) -> float:
        value = float(self.metric.compute())
        self.metric.reset()
        return value


# SSIM as torchmetrics defines it (Wang et al. 2004): gaussian window sigma 1.5 (11 taps), K1 0.01, K2 0.03,
# data range 1, reflect padding, the SSIM map averaged over the whole image.
SSIM_SIGMA, SSIM_C1, SSIM_C2 = 1.5, 0.01 ** 2, 0.03 ** 2


def _ssim_window(x: Tensor) -> Tensor:
    """Local gaussian mean of each channel; (B, C, H, W) -> same. One 2-D convolution, as torchmetrics does: on a CPU
    it measured faster than the two 1-D passes the separable window allows."""
    k = int(3.5 * SSIM_SIGMA + 0.5) * 2 + 1
    pad = (k - 1) // 2
    t = torch.arange(k, dtype=x.dtype, device=x.device) - pad
    g = torch.exp(-((t / SSIM_SIGMA) ** 2) / 2)
    g = g / g.sum()
    c = x.shape[1]
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), torch.outer(g, g).expand(c, 1, k, k), groups=c)


def _ssim(mx2: Tensor, my2: Tensor, mxy: Tensor, vx: Tensor, vy: Tensor, cov: Tensor) -> Tensor:
    """The SSIM map from local means (squared, crossed), variances and covariance."""
    return ((2 * mxy + SSIM_C1) * (2 * cov + SSIM_C2)) / ((mx2 + my2 + SSIM_C1) * (vx + vy + SSIM_C2))


def ssim_map(a: Tensor, b: Tensor) -> Tensor:
    """(B, C, H, W) per-pixel SSIM of a and b, image by image (torchmetrics' definition, above)."""
    mx, my = _ssim_window(a), _ssim_window(b)
    vx = (_ssim_window(a * a) - mx * mx).clamp_min(0)
    vy = (_ssim_window(b * b) - my * my).clamp_min(0)
    return _ssim(mx * mx, my * my, mx * my, vx, vy, _ssim_window(a * b) - mx * my)


def ssim_pairs(gen: Tensor, refs: Tensor) -> Tensor:
    """(N, M) SSIM of every gen/ref pair (torchmetrics' definition, above). Each image's local means and variances
    are filtered once; per pair, only the cross term E[xy] is (torchmetrics filters five maps per pair)."""
    mx, my = _ssim_window(gen), _ssim_window(refs)
    mx2, my2 = mx * mx, my * my
    vx = (_ssim_window(gen * gen) - mx2).clamp_min(0)
    vy = (_ssim_window(refs * refs) - my2).clamp_min(0)
    out = torch.empty(gen.shape[0], refs.shape[0], dtype=torch.float64)
    for j in range(refs.shape[0]):
        mxy = mx * my[j]
        cov = _ssim_window(gen * refs[j]) - mxy
        out[:, j] = _ssim(mx2, my2[j], mxy, vx, vy[j], cov).flatten(1).mean(1).double()
    return out


def psnr_pairs(gen: Tensor, refs: Tensor) -> Tensor:
    """(N, M) PSNR in dB (torchmetrics, data range 1) of every gen/ref pair; identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    n, m = gen.shape[0], refs.shape[0]
    a = gen.repeat_interleave(m, 0)
    b = refs.repeat(n, 1, 1, 1)
    return psnr(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).double().view(n, m)
