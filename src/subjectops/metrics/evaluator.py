"""The evaluator: every requested metric in one pass over the generated images, against the references.

It composes the pieces beside it: images.py (reading images, subject regions), primitives.py (the formulas on
tensors), encoders.py (device and encoder loading) and records.py (what metrics.json holds).

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from subjectops.config import Params
from subjectops.errors import ConfigError, SubjectopsError
from subjectops.metrics import backbones as B
from subjectops.metrics.definitions import DISPLAY, METRICS, WORLD_METRICS
from subjectops.metrics.encoders import Encoders, shared_encoders
from subjectops.metrics.images import load_image, load_images, subject_region
from subjectops.metrics.primitives import clip_t, cosine_matrix, frechet_distance, psnr_pairs, ssim_pairs
from subjectops.metrics.records import MetricRecord, mean_and_std
from subjectops.segment import segment_all

SUBJECT_REGION = {"dino-subject": "dino", "clip-i-subject": "clip"}  # subject-region metric -> its encoder


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
            mean, std = mean_and_std(values)
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
                mean, std = mean_and_std(v)
                out.append(MetricRecord(metric, prompt_set, version, e.judge.info.id, e.judge.info.pretrained,
                                        len(applies), m, len(applies), mean, std, f"{len(applies)} images",
                                        True, METRICS[metric].description, values))
        order = {k: i for i, k in enumerate(DISPLAY)}
        return sorted(out, key=lambda r: order[r.metric])
