"""One self-contained report.html per run: reference images, a grid of generated images per prompt,
metric tables (mean +- std), one plot per metric (matplotlib, embedded), the run's config and versions.

Everything is inlined (images as data URIs), so the file opens anywhere, offline, and can be logged
as a single artifact. When any metric backbone has random weights, the first line of the page says
that the numbers measure nothing about quality.
"""

from __future__ import annotations

import base64
import io
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Sequence

import jinja2
import yaml
from PIL import Image

THUMB = 160  # px, longest side of an embedded image
MAX_PER_PROMPT = 12  # images shown per prompt in a grid (all are scored)

RANDOM_WARNING = (
    "These numbers measure nothing about image quality: they were computed with randomly initialised "
    "encoders (tiny mode: {roles}), not with the pretrained DINO/CLIP/Inception/LPIPS networks the papers use. "
    "They only show that the pipeline runs."
)

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("subjectops.report", "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def image_data_uri(path: Path, size: int = THUMB * 2) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def figure_data_uri(fig) -> str:
    """A matplotlib figure as an embedded PNG (the report is one self-contained file); closes the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}f}"


def _plot_metric(metric: str, records: list[dict], per_image: dict[str, list[float]], higher: bool) -> str:
    """A bar (mean +- std) per prompt set with the per-image values over it; PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.2, 3.2), dpi=96)
    names = [r["prompt_set"] for r in records]
    means = [float(r["mean"]) if not isinstance(r["mean"], str) else np.nan for r in records]
    stds = [float(r["std"]) if isinstance(r["std"], (int, float)) else 0.0 for r in records]
    xs = np.arange(len(names))
    ax.bar(xs, np.nan_to_num(means, posinf=0.0), yerr=stds, color="#54aeff", edgecolor="#0969da", capsize=4,
           alpha=0.8, label="mean ± std")
    rng = np.random.default_rng(0)
    for x, name in zip(xs, names):
        vals = np.asarray(per_image.get(name, []), dtype=float)
        vals = vals[np.isfinite(vals)]
        if vals.size:
            ax.scatter(x + rng.uniform(-0.25, 0.25, vals.size), vals, s=8, color="#1f2328", alpha=0.6,
                       label="per image" if x == 0 else None, zorder=3)
    ax.set_xticks(xs, names)
    ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)")
    ax.legend(fontsize=7, loc="best")
    return figure_data_uri(fig)


def _generated_groups(samples: Sequence[dict[str, Any]], metrics: dict[str, Any], infer_dir: Path) -> list[dict]:
    """Per prompt set, per prompt: the first MAX_PER_PROMPT images (embedded), each after the intermediate images
    a multi-stage strategy made it from, and how many there are."""
    out = []
    for pset in metrics["prompt_sets"]:
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for s in samples:
            if s["prompt_set"] == pset["name"]:
                groups.setdefault(s["prompt"], []).append(s)
        out.append({"name": pset["name"], "prompts": [
            {"prompt": prompt, "total": len(items),
             "images": [{"seed": s["seed"], "uri": image_data_uri(Path(infer_dir) / s["path"])}
                        for s in items[:MAX_PER_PROMPT]]}
            for prompt, items in groups.items()]})
    return out


def _explained(samples: Sequence[dict[str, Any]], infer_dir: Path) -> list[dict]:
    """Images an inference strategy explained, the first MAX_PER_PROMPT of each prompt (reference-guided: the plain
    image, the aligned reference, both masks and the fitted transform; alchemy: the stage-1 scene and its blur)."""
    rows, shown = [], Counter()
    for s in samples:
        if not s.get("intermediates") or shown[(s["prompt_set"], s["prompt"])] >= MAX_PER_PROMPT:
            continue
        shown[(s["prompt_set"], s["prompt"])] += 1
        images = {"result": image_data_uri(Path(infer_dir) / s["path"]),
                  **{name: image_data_uri(Path(infer_dir) / rel) for name, rel in s["intermediates"].items()}}
        rows.append({"prompt": s["prompt"], "seed": s["seed"], "images": images, "details": s.get("details", {})})
    return rows


def _metric_tables(metrics: dict[str, Any]) -> list[dict]:
    """One table per prompt set: every record with mean ± std."""
    tables = []
    for pset in metrics["prompt_sets"]:
        rows = [dict(r, mean_std=_fmt(r["mean"]) + ("" if r["std"] is None else " ± " + _fmt(r["std"])))
                for r in metrics["metrics"] if r["prompt_set"] == pset["name"]]
        tables.append(dict(pset, digest=pset.get("digest", ""), rows=rows))
    return tables


def _plots(metrics: dict[str, Any]) -> list[dict]:
    """One plot per metric, over the prompt sets."""
    per_metric: OrderedDict[str, list[dict]] = OrderedDict()
    for rec in metrics["metrics"]:
        per_metric.setdefault(rec["metric"], []).append(rec)
    plots = []
    for metric, recs in per_metric.items():
        key, higher = recs[0]["key"], recs[0]["higher_is_better"]
        per_image: dict[str, list[float]] = {}
        for row in metrics["per_image"]:
            if row.get(key) is not None:
                per_image.setdefault(row["prompt_set"], []).append(row[key])
        plots.append({"metric": metric, "direction": "higher is better" if higher else "lower is better",
                      "uri": _plot_metric(metric, recs, per_image, higher)})
    return plots


def render_report(
    out_path: Path,
    metrics: dict[str, Any],
    references: Sequence[Path],
    samples: Sequence[dict[str, Any]],
    infer_dir: Path,
    params: dict[str, Any],
    versions: dict[str, str],
    subject: dict[str, Any],
    front: dict[str, Any] | None = None,
) -> Path:
    """Write report.html from templates/report.html.j2 (autoescaped: prompts and names are text, never markup).
    ``metrics`` is the content of metrics.json; ``samples`` that of samples.json; ``front`` the operating points
    of a sweep (points, front, chosen, rule, the plot's uri) when the report is a sweep's."""
    backbones = metrics["backbones"]
    random_roles = [role for role, info in backbones.items() if not info["pretrained"]]
    page = _ENV.get_template("report.html.j2").render(
        title=f"subjectops evaluation: {subject.get('name', 'subject')} ({subject.get('class_word', '')})",
        subject_name=subject.get("name", "the subject"),
        random_roles=random_roles,
        warning=RANDOM_WARNING.format(roles=", ".join(random_roles)),
        backbone_ids=[f"{role}={info['id']}" for role, info in backbones.items()],
        backbones=backbones,
        prompt_set_names=[s["name"] for s in metrics["prompt_sets"]],
        fid_features=metrics.get("fid_features"),
        thumb=THUMB,
        references=[{"name": Path(p).name, "uri": image_data_uri(Path(p))} for p in references],
        generated=_generated_groups(samples, metrics, infer_dir),
        explained=_explained(samples, infer_dir),
        definitions=metrics["definitions"],
        tables=_metric_tables(metrics),
        plots=_plots(metrics),
        versions=versions,
        params_yaml=yaml.safe_dump(params, sort_keys=False),
        front=front,
    )
    out_path = Path(out_path)
    out_path.write_text(page, encoding="utf-8")
    return out_path
