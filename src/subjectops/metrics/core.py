"""Metric computations on tensors, and the evaluator that computes all of them in one pass over the images.

What each number means (the papers' definitions):

- DINO, CLIP-I (seed 001 sec. 4; seed 000 app. B.3): cosine similarity between the embedding of every
  generated image and every reference image; mean and std over all N x M pairs (Hypnos: 50 x 4 = 200).
- CLIP-T (seed 001 sec. 4; seed 003 sec. 5): cosine similarity between each generated image and its own
  prompt, the rare identifier removed from the prompt first; N pairs.
- FID (seed 000 tables 1-2): Frechet distance between Gaussians fitted to reference and generated
  features, through torchmetrics' FrechetInceptionDistance. Features: Inception-v3 pool3 when its weights
  are present, otherwise the configured DINO or CLIP encoder (recorded). One value per set, no std.
- LPIPS, SSIM, PSNR (seed 000 tables 1-2): between every generated and every reference image, at the
  references' resolution (torchmetrics; LPIPS from per-image features, see backbones.LpipsNet).
- DINO (subject), CLIP-I (subject) (seed 002 sec. 5.1): DINO and CLIP-I "in the subject region": each image
  reduced to its segmented subject (`subject_region`) before embedding; references use refine's masks, generated
  images are segmented with refine's mask backend.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from subjectops.config import ConfigError, Params
from subjectops.data.prompts import strip_identifier
from subjectops.errors import ModelNotFoundError, SubjectopsError
from subjectops.metrics import backbones as B
from subjectops.metrics.definitions import METRICS, WORLD_METRICS
from subjectops.segment import segment_all

DISPLAY = {name: d.display for name, d in METRICS.items()}
SUBJECT_REGION = {"dino-subject": "dino", "clip-i-subject": "clip"}  # subject-region metric -> its encoder


# ---------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------
def load_image(path: Path) -> Tensor:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise SubjectopsError(f"cannot read image {path}: {exc}", fix="re-run the stage that wrote it") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


def load_images(paths: Sequence[Path], size: Optional[tuple[int, int]] = None) -> Tensor:
    """(N, 3, H, W) float in [0, 1]; resized (bilinear, antialiased) to ``size`` when given."""
    out = []
    for p in paths:
        x = load_image(Path(p))
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x.clamp(0, 1))
    if not out:
        return torch.zeros(0, 3, *(size or (1, 1)))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        raise SubjectopsError(f"images have different sizes {sorted(shapes)}", fix="pass a common size")
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------
# Metric primitives
# ---------------------------------------------------------------------------------------------------
def subject_region(pixels: Tensor, mask: np.ndarray) -> Tensor:
    """One image (3, H, W) reduced to its subject: the mask's bounding box with the background outside the mask
    gray, resized back to H x W (the encoders see the subject, not the scene). An empty mask keeps the image."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    ys, xs = torch.nonzero(m, as_tuple=True)
    if ys.numel() == 0:
        return pixels
    region = torch.where(m, pixels, torch.full_like(pixels, 0.5))[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return F.interpolate(region[None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1)


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


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------
def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else ("inf" if x > 0 else ("-inf" if x < 0 else "nan"))


@dataclass
class MetricRecord:
    """One number of metrics.json, with everything needed to know what it means."""

    metric: str
    prompt_set: str
    prompt_set_version: str
    backbone: Optional[str]
    pretrained: Optional[bool]  # None: no learned weights involved (SSIM, PSNR)
    n_generated: int
    n_reference: int
    n_pairs: Optional[int]  # None for FID (one distance between two distributions)
    mean: float
    std: Optional[float]  # sample std (ddof=1) over the pairs; None for FID
    pairing: str
    higher_is_better: bool
    note: str = ""
    per_image: list[float] = field(default_factory=list)  # mean over references (or the pair) per image

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": DISPLAY[self.metric], "key": self.metric, "prompt_set": self.prompt_set,
            "prompt_set_version": self.prompt_set_version, "backbone": self.backbone, "pretrained": self.pretrained,
            "n_generated": self.n_generated, "n_reference": self.n_reference, "n_pairs": self.n_pairs,
            "mean": _finite(self.mean), "std": None if self.std is None else _finite(self.std),
            "pairing": self.pairing, "higher_is_better": self.higher_is_better, "note": self.note,
        }


def _summary(values: Tensor) -> tuple[float, Optional[float]]:
    v = values.double().flatten()
    finite = v[torch.isfinite(v)]
    mean = float(v.mean())
    if v.numel() < 2:
        return mean, None
    std = float(v.std(unbiased=True)) if finite.numel() == v.numel() else float("nan")
    if not math.isfinite(mean):  # PSNR of identical images: +inf; std of the finite part would mislead
        std = 0.0 if finite.numel() == 0 else float("nan")
    return mean, std


# ---------------------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------------------
def tiny_mode(params: Params, generated_by: Optional[str] = None) -> bool:
    """evaluate.tiny: true/false, or auto = the images come from an offline preset (models.tiny.TINY_PRESETS:
    random weights, so real encoders would measure nothing): ``generated_by`` (the base model recorded by
    infer) when known, else model.base."""
    from subjectops.models.loading import is_tiny

    t = params.evaluate.tiny
    if t == "auto":
        return is_tiny(generated_by or params.model.base)
    return bool(t)


def world_mode(params: Params, generated_by: Optional[str] = None) -> bool:
    """evaluate.tiny=auto and the images come from the miniature world's models: its encoders and judge score them."""
    from subjectops.models.loading import is_world

    return params.evaluate.tiny == "auto" and is_world(generated_by or params.model.base)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("evaluate.device = cuda but no CUDA device is visible",
                          fix="set evaluate.device=auto or cpu")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class Encoders:
    """The encoders one evaluation needs, loaded once (and shareable between evaluators)."""

    def __init__(self, params: Params, metrics: Iterable[str], generated_by: Optional[str] = None):
        cfg = params.evaluate
        self.tiny = tiny_mode(params, generated_by)
        self.world = world_mode(params, generated_by)
        self.device = pick_device(cfg.device)
        metrics = list(metrics)
        bb = cfg.backbones
        preset = "tiny" if self.tiny else B.WORLD if self.world else None
        ids = {role: preset or getattr(bb, role) for role in ("dino", "clip", "lpips")}
        self.fid_features = self._fid_features(cfg.fid_features, bb.inception) if "fid" in metrics else None
        # the world judge: world-accuracy metrics, and FID's features (the world's Inception)
        self.judge = B.load_world_judge(self.device) if self.world or self.fid_features == "judge" else None
        need_dino = bool({"dino", "dino-subject"} & set(metrics)) or self.fid_features == "dino"
        need_clip = bool({"clip-i", "clip-t", "clip-i-subject"} & set(metrics)) or self.fid_features == "clip"
        cache = params.model.cache_dir
        self.dino = B.load_dino(ids["dino"], self.device, cache) if need_dino else None
        self.clip = B.load_clip(ids["clip"], self.device, cache) if need_clip else None
        self.lpips = B.load_lpips(ids["lpips"], self.device) if "lpips" in metrics else None
        self.inception = None
        if self.fid_features == "inception":
            self.inception = InceptionFID(B.find_inception(bb.inception), self.device)

    @classmethod
    def from_parts(cls, *, dino=None, clip=None, lpips=None, inception=None, fid_features: Optional[str] = "dino",
                   device: Optional[torch.device] = None, tiny: bool = False) -> Encoders:
        """Encoders built elsewhere (benchmarks, notebooks): same evaluator, no loading."""
        self = cls.__new__(cls)
        self.dino, self.clip, self.lpips, self.inception = dino, clip, lpips, inception
        self.fid_features, self.tiny, self.world, self.judge = fid_features, tiny, False, None
        self.device = device or torch.device("cpu")
        return self

    def _fid_features(self, setting: str, inception_setting: str) -> str:
        if setting in ("dino", "clip", "judge"):
            return setting
        if self.world:
            return "judge"
        weights = None if self.tiny else B.find_inception(inception_setting)
        if setting == "inception":
            if self.tiny:
                return "dino"  # tiny mode never uses real weights; recorded as random DINO features
            if weights is None:
                raise ModelNotFoundError(
                    "evaluate.fid_features = inception but the Inception weights are not present "
                    f"({B.hub_checkpoint(B.INCEPTION_FILE)} missing, evaluate.backbones.inception = "
                    f"{inception_setting})",
                    fix=f"copy torch-fidelity's {B.INCEPTION_FILE} into that folder or point "
                        "evaluate.backbones.inception at it; or set evaluate.fid_features=auto to use DINO features")
            return "inception"
        return "inception" if weights is not None else "dino"

    def infos(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in ("dino", "clip", "lpips", "inception", "judge"):
            enc = getattr(self, name)
            if enc is not None:
                out[name] = enc.info.to_dict()
        return out


def shared_encoders(params: Params, metrics: Sequence[str], generated_by: Optional[str]) -> Encoders:
    """The encoders of these evaluation settings: loaded here, or the ones loaded earlier in this process when models
    are shared (models/shared.py)."""
    from subjectops.models.shared import shared_models

    shared = shared_models()
    if shared is None:
        return Encoders(params, metrics, generated_by)
    key = json.dumps([params.evaluate.model_dump(mode="json"), params.model.model_dump(mode="json"), list(metrics),
                      generated_by], sort_keys=True)
    return shared.encoders(key, lambda: Encoders(params, metrics, generated_by))


@dataclass
class References:
    pixels: Tensor  # (M, 3, H, W) in [0, 1]
    dino: Optional[Tensor] = None
    clip: Optional[Tensor] = None
    lpips: Optional[list[Tensor]] = None
    subject: dict[str, Tensor] = field(default_factory=dict)  # encoder role -> embeddings of the subject regions
    judge: Optional[Tensor] = None  # the world judge's features (FID on the world's models)
    palette: Optional[list] = None  # a world subject's decal colors (its ground truth, from refine)
    class_word: str = ""  # the subject's class (world accuracy: is the prompted class shown)


class Evaluator:
    """Computes every requested metric in one pass over the generated images: each batch is read and
    decoded once, each encoder runs once per image, and the embeddings serve every metric that needs them
    (DINO -> DINO and FID; CLIP -> CLIP-I and CLIP-T; LPIPS features -> all reference pairs)."""

    def __init__(self, params: Params, metrics: Optional[Sequence[str]] = None, encoders: Optional[Encoders] = None,
                 generated_by: Optional[str] = None):
        self.params = params
        self.metrics = list(metrics if metrics is not None else params.evaluate.metrics)
        if not self.metrics:
            raise ConfigError("evaluate.metrics is empty", fix=f"list some of {list(DISPLAY)}")
        self.enc = encoders or shared_encoders(params, self.metrics, generated_by)
        if self.enc.judge is not None and self.enc.world:
            self.metrics += [m for m in WORLD_METRICS if m not in self.metrics]
        self.batch_size = params.evaluate.batch_size
        want, fidf = set(self.metrics), self.enc.fid_features
        # which encoders this evaluator runs (an Encoders object may hold more, when shared)
        self.subject_roles = [role for metric, role in SUBJECT_REGION.items() if metric in want]
        self.need = {"dino": "dino" in want or ("fid" in want and fidf == "dino") or "dino" in self.subject_roles,
                     "clip": bool({"clip-i", "clip-t"} & want) or ("fid" in want and fidf == "clip")
                     or "clip" in self.subject_roles,
                     "lpips": "lpips" in want}
        self.segmenter = None
        if self.subject_roles:
            from subjectops.segment import get_backend

            self.segmenter = get_backend(params.refine)
        for role, needed in self.need.items():
            if needed and getattr(self.enc, role) is None:
                raise ConfigError(f"the {role} encoder is needed for {sorted(want)} but was not loaded",
                                  fix="build the Encoders with every metric the evaluators will compute")

    # -- references ---------------------------------------------------------------------------------
    def references(self, paths: Sequence[Path], mask_paths: Optional[Sequence[Path]] = None) -> References:
        """The references, and their masks (refine's) for the subject-region metrics: segmented here when absent."""
        if not paths:
            raise SubjectopsError("no reference images", fix="refine/subject.json must list the subject's images")
        first = load_image(Path(paths[0]))
        size = tuple(first.shape[-2:])
        pixels = load_images(paths, size=size)
        masks = None
        if mask_paths and self.subject_roles:
            masks = [load_images([p], size=size)[0, 0].numpy() > 0.5 for p in mask_paths]
        return self.references_from_tensor(pixels, masks)

    def subject_regions(self, pixels: Tensor, masks: Optional[Sequence[np.ndarray]] = None) -> Tensor:
        """Each image reduced to its subject (`subject_region`), segmented with refine's backend unless masks are
        given."""
        if masks is None:
            images = [Image.fromarray((p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                      for p in pixels.cpu()]
            masks = [np.asarray(m) > 127 for m in segment_all(self.segmenter, images)]
        return torch.stack([subject_region(p, m) for p, m in zip(pixels.cpu(), masks)])

    def references_from_tensor(self, pixels: Tensor, masks: Optional[Sequence[np.ndarray]] = None) -> References:
        refs = References(pixels=pixels)
        e, need = self.enc, self.need
        if self.subject_roles:
            regions = self.subject_regions(pixels, masks)
            refs.subject = {role: torch.cat([getattr(e, role).embed(b) for b in regions.split(self.batch_size)])
                            for role in self.subject_roles}
        if need["dino"]:
            refs.dino = torch.cat([e.dino.embed(b) for b in pixels.split(self.batch_size)])
        if need["clip"]:
            refs.clip = torch.cat([e.clip.embed(b) for b in pixels.split(self.batch_size)])
        if need["lpips"]:
            parts = [e.lpips.features(b) for b in pixels.split(self.batch_size)]
            refs.lpips = [torch.cat(layer) for layer in zip(*parts)]
        if e.judge is not None:
            refs.judge = torch.cat([e.judge.embed(b) for b in pixels.split(self.batch_size)])
        return refs

    # -- one prompt set -----------------------------------------------------------------------------
    def score_paths(self, prompt_set: str, version: str, paths: Sequence[Path], prompts: Sequence[str],
                    identifiers: Sequence[str], refs: References) -> list[MetricRecord]:
        size = tuple(refs.pixels.shape[-2:])

        def batches():
            for i in range(0, len(paths), self.batch_size):
                yield load_images(paths[i:i + self.batch_size], size=size)

        return self.score_batches(prompt_set, version, batches(), prompts, identifiers, refs)

    def score_batches(self, prompt_set: str, version: str, batches: Iterable[Tensor], prompts: Sequence[str],
                      identifiers: Sequence[str], refs: References) -> list[MetricRecord]:
        acc, judged, n = self._features(batches, prompts, refs)
        if n != len(prompts) or n != len(identifiers):
            raise SubjectopsError(f"prompt set {prompt_set}: {n} images but {len(prompts)} prompts",
                                  fix="samples.json must list one prompt per image")
        if n == 0:
            raise SubjectopsError(f"prompt set {prompt_set} has no images", fix="re-run infer")
        return self._records(prompt_set, version, acc, judged, n, prompts, identifiers, refs)

    def _features(self, batches: Iterable[Tensor], prompts: Sequence[str],
                  refs: References) -> tuple[dict[str, list[Tensor]], dict[str, list[Optional[float]]], int]:
        """Each batch of generated images through the encoders the metrics need (pairwise scores against the
        references where the metric is pairwise), the world judge's per-image verdicts, and the image count."""
        e, want = self.enc, set(self.metrics)
        acc: dict[str, list[Tensor]] = {k: [] for k in ("dino", "clip", "lpips", "ssim", "psnr", "judge",
                                                        *SUBJECT_REGION)}
        judged: dict[str, list[Optional[float]]] = {m: [] for m in WORLD_METRICS}
        if e.inception is not None and "fid" in want:
            e.inception.update(refs.pixels, real=True)
        n = 0
        for gen in batches:
            n += gen.shape[0]
            if self.need["dino"]:
                acc["dino"].append(e.dino.embed(gen))
            if self.need["clip"]:
                acc["clip"].append(e.clip.embed(gen))
            if "lpips" in want:
                acc["lpips"].append(e.lpips.pairwise(e.lpips.features(gen), refs.lpips).cpu())
            if "ssim" in want:
                acc["ssim"].append(ssim_pairs(gen.to(e.device), refs.pixels.to(e.device)).cpu())
            if "psnr" in want:
                acc["psnr"].append(psnr_pairs(gen.to(e.device), refs.pixels.to(e.device)).cpu())
            if e.inception is not None and "fid" in want:
                e.inception.update(gen, real=False)
            if e.judge is not None:
                verdict = e.judge.judge(gen)
                acc["judge"].append(verdict["features"].float())
                if e.world:
                    from subjectops.world.accuracy import score

                    first = n - gen.shape[0]
                    for metric, values in score(verdict, gen, prompts[first:n], refs.class_word,
                                                refs.palette).items():
                        judged[metric] += values
            if self.subject_roles:
                regions = self.subject_regions(gen)
                for metric, role in SUBJECT_REGION.items():
                    if role in self.subject_roles:
                        acc[metric].append(getattr(e, role).embed(regions))
        return acc, judged, n

    def _records(self, prompt_set: str, version: str, acc: dict[str, list[Tensor]],
                 judged: dict[str, list[Optional[float]]], n: int, prompts: Sequence[str], identifiers: Sequence[str],
                 refs: References) -> list[MetricRecord]:
        """One record per metric from the accumulated features, in display order."""
        e, want = self.enc, set(self.metrics)
        m = refs.pixels.shape[0]
        out: list[MetricRecord] = []

        def rec(metric: str, values: Tensor, info: Optional[B.BackboneInfo], pairing: str, note: str = "") -> None:
            mean, std = _summary(values)
            per_image = values.mean(1) if values.dim() == 2 else values
            out.append(MetricRecord(
                metric, prompt_set, version, info.id if info else None, info.pretrained if info else None,
                n, m, values.numel(), mean, std, pairing, METRICS[metric].higher_is_better, note,
                [float(v) for v in per_image.double()]))

        cross = f"{n} generated x {m} references"
        if "dino" in want:
            rec("dino", cosine_matrix(torch.cat(acc["dino"]), refs.dino).cpu(), e.dino.info, cross)
        if "clip-i" in want:
            rec("clip-i", cosine_matrix(torch.cat(acc["clip"]), refs.clip).cpu(), e.clip.info, cross)
        if "clip-t" in want:
            rec("clip-t", clip_t(e.clip, torch.cat(acc["clip"]), prompts, identifiers).cpu(), e.clip.info,
                f"{n} images x own prompt", "identifier removed from each prompt before text encoding")
        if "fid" in want:
            if e.fid_features == "inception":
                value, info = e.inception.compute(), e.inception.info
            else:
                feats = torch.cat(acc[e.fid_features])
                value = frechet_distance(getattr(refs, e.fid_features), feats)
                info = getattr(e, e.fid_features).info
            note = f"Frechet distance on {info.role} features ({info.id})"
            if m < 10:
                note += f"; only {m} reference images: the reference covariance has rank <= {m - 1}"
            out.append(MetricRecord("fid", prompt_set, version, info.id, info.pretrained, n, m, None, value, None,
                                    f"{n} generated vs {m} references (distributions)", False, note, []))
        for metric, role in SUBJECT_REGION.items():
            if metric in want:
                rec(metric, cosine_matrix(torch.cat(acc[metric]), refs.subject[role]).cpu(), getattr(e, role).info,
                    cross, f"subject regions (mask bounding box, background gray): generated images segmented with "
                           f"{self.segmenter.name}; references with refine's masks when given, else "
                    f"{self.segmenter.name}")
        for metric in ("lpips", "ssim", "psnr"):
            if metric in want:
                info = e.lpips.info if metric == "lpips" else None
                note = "resized to the references' resolution" if metric != "lpips" else \
                    "LPIPS features computed once per image; all pairs scored from them"
                rec(metric, torch.cat(acc[metric]), info, cross, note)
        for metric, values in judged.items():
            applies = [v for v in values if v is not None]
            if metric in want and applies:
                v = torch.tensor(applies, dtype=torch.float64)
                mean, std = _summary(v)
                out.append(MetricRecord(metric, prompt_set, version, e.judge.info.id, e.judge.info.pretrained,
                                        len(applies), m, len(applies), mean, std, f"{len(applies)} images",
                                        True, METRICS[metric].description, values))
        order = {k: i for i, k in enumerate(DISPLAY)}
        return sorted(out, key=lambda r: order[r.metric])
