"""Is a world subject learned? A finished run (with `infer.baseline`) against its base model, on ground truth.

For the run's images and the base model's images of the same prompts and seeds (class word only):
- DINO-role similarity of each image to the subject's held-out photos (never trained on), mean over them;
- decal match (the world judge's object region wears the subject's decal colors);
- scene accuracy (the judge sees the prompted context);
each with its mean and 95% bootstrap interval over images (selection/compare.py's `interval`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subjectops.selection.compare import interval


def _load(paths: list[Path]) -> torch.Tensor:
    from subjectops.metrics.images import load_images

    return load_images(paths, size=(64, 64))


def measure(run_dir: Path, subject_dir: Path, prompt_set: str = "world") -> dict[str, Any]:
    """Per-image values and intervals for the run's images ("personalized") and the base model's ("base")."""
    from subjectops.metrics.backbones import load_dino
    from subjectops.world.subjects import read_subject

    run_dir, subject_dir = Path(run_dir), Path(subject_dir)
    samples = json.loads((run_dir / "infer" / "samples.json").read_text())
    samples = [s for s in samples if s["prompt_set"] == prompt_set]
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    truth = read_subject(subject_dir)
    dino = load_dino("world", torch.device("cpu"))
    heldout = dino.embed(_load([subject_dir / e["file"] for e in truth["heldout"]]))
    heldout = torch.nn.functional.normalize(heldout, dim=-1)
    out: dict[str, Any] = {"subject": truth["name"], "class_word": truth["class_word"], "n_images": len(samples)}
    for side, key, set_name in (("personalized", "path", prompt_set), ("base", None, prompt_set + "@base")):
        paths = [run_dir / "infer" / (s[key] if key else s["baseline"]["path"]) for s in samples]
        emb = torch.nn.functional.normalize(dino.embed(_load(paths)), dim=-1)
        values = {"dino_heldout": (emb @ heldout.T).mean(1).tolist()}
        for metric in ("world-decal", "world-scene"):
            column = [row.get(metric) for row in metrics["per_image"] if row["prompt_set"] == set_name]
            values[metric] = [float(v) for v in column if v is not None]
        out[side] = {name: {"values": v, "mean_ci": interval(v) if v else None} for name, v in values.items()}
    return out


def separated(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """The 95% intervals of a (mean, low, high) and b do not overlap, a above b."""
    return a[1] > b[2]


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table: per subject, each measure for the subject model and the base model, with intervals."""
    def fmt(m):
        return "-" if m is None else f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]"

    lines = ["| subject | DINO-role to held-out: subject | base | decal match: subject | base | scene acc.: subject |"
             " base |", "|---|---|---|---|---|---|---|"]
    for r in results:
        s, b = r["personalized"], r["base"]
        lines.append(f"| {r['subject']} ({r['class_word']}) | {fmt(s['dino_heldout']['mean_ci'])} | "
                     f"{fmt(b['dino_heldout']['mean_ci'])} | {fmt(s['world-decal']['mean_ci'])} | "
                     f"{fmt(b['world-decal']['mean_ci'])} | {fmt(s['world-scene']['mean_ci'])} | "
                     f"{fmt(b['world-scene']['mean_ci'])} |")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> dict[str, Any]:
    s, b = r["personalized"], r["base"]
    return {
        "dino_separated": separated(s["dino_heldout"]["mean_ci"], b["dino_heldout"]["mean_ci"]),
        "decal_separated": separated(s["world-decal"]["mean_ci"], b["world-decal"]["mean_ci"]),
        "scene_accuracy": float(np.mean(s["world-scene"]["values"])),
    }
