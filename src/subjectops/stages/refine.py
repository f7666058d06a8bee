"""refine: validate and normalize the subject photos, segment the subject, write the prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from rich.progress import track

from subjectops.config import Params
from subjectops.console import console
from subjectops.data.subject import check_class_word, fit, load_subject
from subjectops.models.loading import training_resolution
from subjectops.segment import get_backend, segment_all
from subjectops.stages.common import stage_output, write_manifest

SEGMENT_MIN_RESOLUTION = 256


def refine(params: Params, subject_dir: Path, class_word: str, out: Path) -> Path:
    class_word = check_class_word(class_word)
    resolution = training_resolution(params)
    subject = load_subject(Path(subject_dir), params.subject, resolution)  # every check before any write
    for converted in subject.conversions:
        console.print(f"refine: {converted['file']}: {converted['conversion']}", highlight=False)
    for note in subject.warnings:
        console.print(f"[yellow]refine: {note}", highlight=False)
    # Segmentation needs detail that a small training resolution lacks: segment at >= 256 px, then resize.
    seg_res = max(resolution, SEGMENT_MIN_RESOLUTION)
    backend = get_backend(params.refine)
    with stage_output(out) as work:
        (work / "images").mkdir()
        (work / "masks").mkdir()
        images, masks, coverage = [], [], []
        sources = [fit(original, seg_res, params.subject.fit) if seg_res > resolution else img
                   for original, img in zip(subject.originals, subject.images)]
        segmented = track(segment_all(backend, sources), total=len(sources), description=f"refine: masks ({backend.name})",
                          transient=True)
        for i, (img, mask) in enumerate(zip(subject.images, segmented)):
            mask = mask.resize((resolution, resolution), Image.BILINEAR)
            img.save(work / "images" / f"{i:02d}.png")
            mask.save(work / "masks" / f"{i:02d}.png")
            images.append(f"images/{i:02d}.png")
            masks.append(f"masks/{i:02d}.png")
            coverage.append(round(float(np.asarray(mask).mean()) / 255, 4))
        info = {
            "name": subject.name,
            "class_word": class_word,
            "token": params.subject.token,
            "resolution": resolution,
            "images": images,
            "masks": masks,
            "mask_backend": backend.name,
            "mask_coverage": coverage,
            "sources": subject.sources,
            "conversions": subject.conversions,
            "warnings": subject.warnings,
        }
        (work / "subject.json").write_text(json.dumps(info, indent=2))
        prompts = {
            "instance": f"a photo of {params.subject.token} {class_word}",
            "class": params.priors.prompt.format(class_word=class_word),
        }
        (work / "prompts.json").write_text(json.dumps(prompts, indent=2))
        write_manifest(work, "refine", params, {"subject": Path(subject_dir)}, subject=info["name"],
                       conversions=subject.conversions)
    return Path(out)
