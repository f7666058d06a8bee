"""refine: validate and normalize the subject photos, segment the subject, write the prompts."""

from __future__ import annotations

import json
from pathlib import Path

from subjectops.config import Params
from subjectops.stages.base import Argument, Stage
from subjectops.stages.common import stage_output, write_manifest

SEGMENT_MIN_RESOLUTION = 256


def refine(params: Params, subject_dir: Path, class_word: str, out: Path) -> Path:
    from subjectops.console import console
    from subjectops.data.subject import check_class_word, load_subject
    from subjectops.models.loading import training_resolution
    from subjectops.segment import get_backend

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
        images, masks, coverage = write_images_and_masks(work, subject, backend, resolution, seg_res,
                                                         params.subject.fit)
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
        world_truth = _world_truth(Path(subject_dir), subject.sources, work, masks)
        if world_truth:
            info["world"] = world_truth
            info["name"] = world_truth["name"]  # its folder is photos/: the subject's own name says which it is
        (work / "subject.json").write_text(json.dumps(info, indent=2))
        prompts = {
            "instance": f"a photo of {params.subject.token} {class_word}",
            "class": params.priors.prompt.format(class_word=class_word),
        }
        (work / "prompts.json").write_text(json.dumps(prompts, indent=2))
        write_manifest(work, "refine", params, {"subject": Path(subject_dir)}, subject=info["name"],
                       conversions=subject.conversions)
    return Path(out)


def write_images_and_masks(work: Path, subject, backend, resolution: int, seg_res: int,
                           fit_mode: str) -> tuple[list[str], list[str], list[float]]:
    """Each photo and its subject mask (segmented at `seg_res`, resized to the training resolution) as
    images/NN.png and masks/NN.png; returns their relative paths and each mask's coverage."""
    import numpy as np
    from PIL import Image

    from subjectops.console import track
    from subjectops.data.subject import fit
    from subjectops.segment import segment_all

    (work / "images").mkdir()
    (work / "masks").mkdir()
    images, masks, coverage = [], [], []
    sources = [fit(original, seg_res, fit_mode) if seg_res > resolution else img
               for original, img in zip(subject.originals, subject.images)]
    segmented = track(segment_all(backend, sources), len(sources), f"refine: masks ({backend.name})")
    for i, (img, mask) in enumerate(zip(subject.images, segmented)):
        mask = mask.resize((resolution, resolution), Image.BILINEAR)
        img.save(work / "images" / f"{i:02d}.png")
        mask.save(work / "masks" / f"{i:02d}.png")
        images.append(f"images/{i:02d}.png")
        masks.append(f"masks/{i:02d}.png")
        coverage.append(round(float(np.asarray(mask).mean()) / 255, 4))
    return images, masks, coverage


def _world_truth(subject_dir: Path, sources: list[dict], work: Path, masks: list[str]) -> dict | None:
    """A world subject's ground truth (its decal, for evaluate's decal match) and how well the mask backend
    found the object: IoU of each mask against the world's true mask."""
    import numpy as np
    from PIL import Image

    from subjectops.world.subjects import mask_iou, truth_beside

    truth = truth_beside(subject_dir)
    if truth is None:
        return None
    ious = []
    for source, rel in zip(sources, masks):
        true_path = truth["masks"].get(source["file"])
        if true_path is None or not true_path.is_file():
            return None  # a photo that is not the world's: no ground truth for this folder
        predicted = Image.open(work / rel).convert("L")
        true = Image.open(true_path).convert("L").resize(predicted.size, Image.NEAREST)
        ious.append(round(mask_iou(np.asarray(predicted) > 127, np.asarray(true) > 127), 4))
    return {"name": truth["name"], "seed": truth["seed"], "class_word": truth["class_word"],
            "palette": truth["palette"], "layout": truth["layout"], "mask_iou": ious,
            "mask_iou_mean": round(float(np.mean(ious)), 4)}


def record(out_dir: Path, rec, grids: Path) -> None:
    """The subject's name, class and content hashes (also on the parent run), its photos and masks as grids."""
    from subjectops.tracking.record import digest_of, dir_digest, image_grid, images_in, read_json

    subj = read_json(out_dir / "subject.json") or {}
    for k in ("name", "class_word", "token", "resolution"):
        if k in subj:
            rec.tags[f"subject.{k}"] = str(subj[k])
    sources = [(str(s.get("file")), str(s.get("sha256"))) for s in subj.get("sources", []) if isinstance(s, dict)]
    if sources:
        rec.tags["data.subject.sha256"] = digest_of(sources)
        rec.tags["data.subject.files"] = str(len(sources))
    refined = dir_digest(out_dir, "images")
    if refined:
        rec.tags["data.refined.sha256"] = refined
    rec.parent_tags.update({k: v for k, v in rec.tags.items() if k.startswith(("data.", "subject."))})
    if (out_dir / "subject.json").is_file():
        rec.artifacts.append((out_dir / "subject.json", "refine"))
    for sub, grid in (("images", "refine_images.png"), ("masks", "refine_masks.png")):
        g = image_grid(images_in(out_dir / sub), grids / grid)
        if g:
            rec.artifacts.append((g, "grids"))


STAGE = Stage(
    name="refine",
    help="Validate and normalize the photos, segment the subject, write prompts.",
    run=lambda ctx: refine(ctx.params, ctx.args["subject_dir"], ctx.args["class_word"], ctx.out),
    # model: the native resolution; priors.prompt: prompts.json
    params=("model", "subject", "refine", "priors.prompt"),
    code=("src/subjectops/segment", "src/subjectops/data/subject.py"),
    arguments=(Argument("subject_dir", None, "folder of 3-20 photos of one subject", folder=True),
               Argument("class_word", "--class", "the subject's class, e.g. teapot")),
    record=record,
)
