"""Measurements of the world's models, shared by the build (recorded in its manifest) and the tests.

- `generated_accuracy`: does a text-to-image pipeline draw what the caption says (the judge's verdict);
- `judge_accuracy`: the judge on true world images;
- `clip_retrieval`: a CLIP picks an image's caption among 10;
- `dino_auc`: the DINO-role encoder tells same-subject photo pairs from different-subject pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from subjectops.world.subjects import photograph, subject_spec
from subjectops.world.train import as_float

HEADS = ("class", "color", "pattern", "scene")


def instance_views(first_seed: int, count: int, views: int) -> np.ndarray:
    return np.stack([np.stack([p.image for p in photograph(subject_spec(first_seed + i), views, stream=3)])
                     for i in range(count)])



@torch.no_grad()
def generated_accuracy(pipe, judge, captions: list[str], labels: np.ndarray, steps: int = 25,
                       guidance_scale: float = 5.0, seed: int = 0,
                       batch: int = 32) -> tuple[dict[str, float], np.ndarray]:
    """Images of `captions` (one seeded batch at a time) and the share of them whose class, color, pattern and
    scene the judge reads as `labels` says; returns (accuracies, images in [0, 1] as (N, H, W, 3))."""
    images = []
    for i in range(0, len(captions), batch):
        g = torch.Generator().manual_seed(seed + i)
        images.append(pipe(captions[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                           generator=g, output_type="np").images)
    images = np.concatenate(images)
    out = judge(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    y = torch.from_numpy(np.asarray(labels))
    acc = {f"{h}_accuracy": round(float((out[h].argmax(1) == y[:, i]).float().mean()), 3) for i, h in enumerate(HEADS)}
    return acc, images


@torch.no_grad()
def vae_roundtrip(vae, d: dict[str, Any], batch: int = 256) -> dict[str, Any]:
    """`d` with its images replaced by the VAE's reconstructions (labels and masks kept)."""
    out = []
    for i in range(0, len(d["images"]), batch):
        x = as_float(d["images"], np.arange(i, min(i + batch, len(d["images"])))) * 2 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((rec / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return {**d, "images": np.concatenate(out)}


@torch.no_grad()
def judge_accuracy(judge, d: dict[str, Any]) -> dict[str, float]:
    out = judge(as_float(d["images"], np.arange(len(d["images"]))))
    y = torch.from_numpy(d["labels"])
    acc = {h: round(float((out[h].argmax(1) == y[:, i]).float().mean()), 4)
           for i, h in enumerate(("class", "color", "pattern", "scene"))}
    m = out["mask"] > 0
    t = torch.from_numpy(d["masks"])
    acc["mask_iou"] = round(float(((m & t).sum((1, 2)) / (m | t).sum((1, 2)).clamp_min(1)).mean()), 4)
    return acc


@torch.no_grad()
def clip_retrieval(folder: Path, d: dict[str, Any], seed: int, candidates: int = 10) -> float:
    """Share of images whose full caption scores highest among itself and 9 other images' captions."""
    from subjectops.metrics.backbones import load_clip

    clip = load_clip(str(folder), torch.device("cpu"))
    images = as_float(d["images"], np.arange(len(d["images"])))
    img = torch.nn.functional.normalize(clip.embed(images), dim=-1)
    caps = d["full_captions"]
    txt = torch.nn.functional.normalize(clip.embed_text(caps), dim=-1)
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(len(caps)):
        others = [j for j in rng.permutation(len(caps)) if caps[j] != caps[i]][:candidates - 1]
        scores = img[i] @ txt[[i, *others]].T
        hits += int(scores.argmax() == 0)
    return round(hits / len(caps), 4)


@torch.no_grad()
def dino_auc(folder: Path, first_seed: int, subjects: int, views: int = 4) -> float:
    """ROC AUC of DINO-role cosine similarity: same-subject photo pairs against different-subject pairs,
    on subjects the encoder never saw."""
    from subjectops.metrics.backbones import load_dino

    dino = load_dino(str(folder), torch.device("cpu"))
    photos = instance_views(first_seed, subjects, views).reshape(subjects * views, 64, 64, 3)
    emb = torch.nn.functional.normalize(dino.embed(as_float(photos, np.arange(len(photos)))), dim=-1)
    sim = emb @ emb.T
    owner = np.repeat(np.arange(subjects), views)
    iu = np.triu_indices(len(owner), 1)
    same = owner[iu[0]] == owner[iu[1]]
    return round(roc_auc(sim.numpy()[iu], same), 4)


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney U form of the ROC AUC (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
