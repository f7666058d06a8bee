"""What fine-tuning did to the class (DreamBooth sec. 4.3's PRES and DIV), for the benchmark's prior-preservation
claims: the fine-tuned model draws the plain class prompt (`priors.prompt`, "a photo of a dog") at infer's seeds,
and each image gets

- PRES: its DINO-role similarity to the subject's photos (mean cosine over the references): how much the class has
  drifted toward the subject (lower is better);
- DIV: its mean LPIPS distance to the other class images: how diverse the class stayed (higher is better).

Written to `RUN/class-prompts/` (images and `scores.json`) for the methods that can train with class priors.
"""

from __future__ import annotations

import json
from pathlib import Path

from subjectops.config import Params

FOLDER = "class-prompts"
PROMPT_SET = "class-prompt"  # the prompt set name the claims table pairs these images under


def uses_class_priors(params: Params) -> bool:
    """The method has a class-prior preservation setting (on or off): its class can drift."""
    from subjectops.methods import get_method

    section = getattr(params.finetune, get_method(params.finetune.method).config_key)
    return hasattr(section, "prior_preservation")


def class_prompt_scores(params: Params, run_dir: Path) -> list[dict]:
    """Draw the class prompt with the run's fine-tuned model and score PRES and DIV per image (see the module)."""
    import torch

    from subjectops.console import track
    from subjectops.inference import finetuned_pipeline, get_strategy
    from subjectops.inference.plain import sample
    from subjectops.metrics.evaluator import Evaluator
    from subjectops.metrics.images import load_images
    from subjectops.models.sampling import use_scheduler

    run_dir = Path(run_dir)
    subject = json.loads((run_dir / "refine" / "subject.json").read_text())
    prompt = params.priors.prompt.format(class_word=subject["class_word"])
    spec = get_strategy("plain").spec_for(params.infer, subject["resolution"])
    pipe = finetuned_pipeline(params.model, run_dir / "finetune")
    use_scheduler(pipe, spec.scheduler)
    out = run_dir / FOLDER
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    n = max(2, params.infer.prompt_invariant.num_images)  # DIV needs two images at least
    for i in track(range(n), total=n, description=f"class prompt for PRES/DIV: {prompt!r}"):
        seed, rel = params.infer.seed + i, f"images/{i:04d}.png"
        sample(pipe, prompt, seed, spec).save(out / rel)
        rows.append({"prompt": prompt, "seed": seed, "path": rel})
    evaluator = Evaluator(params, ["dino", "lpips"], generated_by=params.model.base)
    refs = evaluator.references([run_dir / "refine" / p for p in subject["images"]])
    images = load_images([out / r["path"] for r in rows], size=tuple(refs.pixels.shape[-2:]))
    enc = evaluator.enc
    with torch.no_grad():
        emb = torch.nn.functional.normalize(enc.dino.embed(images), dim=-1)
        pres = (emb @ torch.nn.functional.normalize(refs.dino, dim=-1).T).mean(1)
        feats = enc.lpips.features(images)
        distances = enc.lpips.pairwise(feats, feats)
    div = distances.sum(1) / (len(rows) - 1)  # the diagonal is 0: the mean over the other images
    for row, p, d in zip(rows, pres.tolist(), div.tolist()):
        row.update(pres=float(p), div=float(d))
    (out / "scores.json").write_text(json.dumps({"prompt": prompt, "backbones": enc.infos(), "images": rows},
                                                indent=2))
    return rows


def read_scores(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / FOLDER / "scores.json"
    return json.loads(path.read_text())["images"] if path.is_file() else []
