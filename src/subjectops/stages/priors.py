"""priors: class-prior images for DreamBooth's prior preservation, from the base model, in a
content-addressed cache keyed by everything that determines them, so a second subject of the same
class reuses them instead of generating again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from PIL import Image
from rich.progress import Progress

from subjectops.config import Params
from subjectops.data.subject import RefinedSubject, to_tensor
from subjectops.digest import digest_json
from subjectops.models.loading import fingerprint, load_pipeline
from subjectops.models.sampling import generate, use_scheduler
from subjectops.stages.common import require_stage_dir, stage_output, write_manifest


def cache_key(params: Params, class_prompt: str, resolution: int) -> tuple[str, dict]:
    p = params.priors
    fields = {"model": fingerprint(params.model), "prompt": class_prompt, "count": p.num_images,
              "resolution": resolution, "scheduler": p.scheduler, "steps": p.steps,
              "guidance_scale": p.guidance_scale, "seed": p.seed}
    return digest_json(fields), fields


def generate_priors(params: Params, prompt: str, resolution: int, target: Path, pipe=None) -> None:
    """Generate the class images into target/images (image i always from seed + i), with the given base
    pipeline (its scheduler is restored afterwards) or one loaded here."""
    import torch

    p = params.priors
    pipe = pipe if pipe is not None else load_pipeline(params.model)
    scheduler = pipe.scheduler
    use_scheduler(pipe, p.scheduler)
    (target / "images").mkdir(parents=True)
    # inference mode: no autograd bookkeeping at all (no_grad still tracks versions and views)
    with Progress(transient=True) as progress, torch.inference_mode():
        task = progress.add_task(f"priors: {prompt!r}", total=p.num_images)
        for start in range(0, p.num_images, p.batch_size):
            idx = list(range(start, min(start + p.batch_size, p.num_images)))
            images = generate(pipe, [prompt] * len(idx), [p.seed + i for i in idx], p.steps, p.guidance_scale, resolution)
            for i, img in zip(idx, images):
                img.save(target / "images" / f"{i:04d}.png")
            progress.advance(task, len(idx))
    pipe.scheduler = scheduler


def priors(params: Params, refine_dir: Path, out: Path, pipe=None) -> Path:
    subject = RefinedSubject.load(require_stage_dir(refine_dir, "refine", "priors"))
    prompt = params.priors.prompt.format(class_word=subject.class_word)
    key, fields = cache_key(params, prompt, subject.resolution)
    entry = Path(params.priors.cache_dir) / key
    generated = False
    if params.priors.num_images and not (entry / "cache.json").exists():
        tmp = entry.with_name(f"{key}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        generate_priors(params, prompt, subject.resolution, tmp, pipe)
        (tmp / "cache.json").write_text(json.dumps(fields, indent=2))
        try:
            tmp.rename(entry)
        except OSError:  # a concurrent run filled the same entry: identical content
            shutil.rmtree(tmp)
        generated = True
    with stage_output(out) as work:
        (work / "images").mkdir()
        names = sorted(p.name for p in (entry / "images").glob("*.png")) if params.priors.num_images else []
        for name in names:
            _link_or_copy(entry / "images" / name, work / "images" / name)
        info = {"class_word": subject.class_word, "prompt": prompt, "cache_key": key, "cache_dir": str(entry),
                "count": len(names), "images": [f"images/{n}" for n in names], "generated": generated}
        (work / "priors.json").write_text(json.dumps(info, indent=2))
        write_manifest(work, "priors", params, {"refine": Path(refine_dir)}, cache_key=key, generated=generated)
    return Path(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def load_priors(priors_dir: Path | None) -> list:
    """The class images of a priors output as (3, H, W) tensors in [-1, 1]; none without a directory."""
    if priors_dir is None:
        return []
    info = json.loads((Path(priors_dir) / "priors.json").read_text())
    return [to_tensor(Image.open(Path(priors_dir) / p).convert("RGB")) for p in info["images"]]
