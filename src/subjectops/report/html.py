"""One self-contained report.html per run: what the run was (method, base model, strategy, steps, identifier, data
hashes), reference images with their masks, a grid of generated images per prompt, the training's loss curve and
validation images, metric tables (mean +- std), one plot per metric (matplotlib, embedded), the run's config.

Everything is inlined (images as data URIs), so the file opens anywhere, offline, and can be logged
as a single artifact. When any metric backbone has random weights, the first line of the page says
that the numbers measure nothing about quality.
"""

from __future__ import annotations

import base64
import io
import json
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

WORLD_NOTE = (
    "These numbers measure the miniature world, not real photos: the images come from a model pretrained on "
    "subjectops' procedural world and were scored with encoders trained on that world ({roles}). They compare "
    "runs in the world with each other, never with numbers from real encoders."
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


def _stage_json(folder: Path | None, name: str) -> dict:
    """A JSON object a stage wrote, or {} (a report is still written for a run folder copied in part)."""
    if folder is None:
        return {}
    try:
        data = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def run_facts(subject: dict[str, Any], infer_dir: Path, finetune_dir: Path | None) -> list[tuple[str, str]]:
    """The run in a few lines, from what its stages recorded: what was trained on what, how it was sampled, and
    the hashes that tie the numbers to the data and weights (the same values MLflow's tags carry)."""
    from subjectops.tracking.record import digest_of

    infer = _stage_json(infer_dir, "manifest.json")
    method = _stage_json(finetune_dir, "method.json")
    params = infer.get("params") or {}
    spec = infer.get("inference") or {}
    name = method.get("method") or infer.get("method") or (params.get("finetune") or {}).get("method")
    inputs = infer.get("inputs") or {}
    sources = [(str(s.get("file")), str(s.get("sha256"))) for s in subject.get("sources", []) if isinstance(s, dict)]
    facts = [
        ("method", name),
        ("base model", method.get("base_model") or (params.get("model") or {}).get("base")),
        ("inference strategy", spec.get("strategy") and (
            f"{spec['strategy']} ({spec.get('scheduler')}, {spec.get('steps')} steps, guidance "
            f"{spec.get('guidance_scale')}, {spec.get('resolution')} px)")),
        ("training steps", method.get("steps")),
        ("identifier", method.get("identifier") or subject.get("token")),
        ("instance prompt", method.get("instance_prompt")),
        ("subject", f"{subject.get('name', '')} ({subject.get('class_word', '')}), {len(sources)} photo(s)"),
        ("subject photos sha256", digest_of(sources) if sources else None),
        ("refine output sha256", (inputs.get("refine") or {}).get("sha256")),
        ("finetune output sha256", (inputs.get("finetune") or {}).get("sha256")),
    ]
    return [(k, "-" if v is None or v == "" else str(v)) for k, v in facts]


def _loss_plot(log: Path) -> str | None:
    """The training loss per step (each step faint, a running mean over it), PNG data URI; None without a log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps, losses = [], []
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float)):
            steps.append(row["step"])
            losses.append(float(row["loss"]))
    if not steps:
        return None
    values = np.asarray(losses)
    window = max(1, len(values) // 25)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=110)
    ax.plot(steps, values, color="#54aeff", linewidth=0.8, alpha=0.6, label="loss per step")
    ax.plot(steps[window - 1:], smooth, color="#0969da", linewidth=2, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=9)
    return figure_data_uri(fig)


def _training(finetune_dir: Path | None) -> dict | None:
    """finetune's loss curve and its validation images (step_NNNNNN.png), oldest first."""
    if finetune_dir is None:
        return None
    folder = Path(finetune_dir)
    validation = []
    for p in sorted((folder / "validation").glob("step_*.png")):
        step = p.stem.split("_", 1)[1]
        validation.append({"step": int(step) if step.isdigit() else step, "uri": image_data_uri(p)})
    return {"loss_uri": _loss_plot(folder / "train_log.jsonl"), "validation": validation}


def _validation_prompt(params: dict[str, Any], finetune_dir: Path | None) -> str:
    """finetune.validation_prompt as the method filled it in (its identifier and class word, from method.json)."""
    template = str((params.get("finetune") or {}).get("validation_prompt", ""))
    method = _stage_json(finetune_dir, "method.json")
    identifier, class_word = method.get("identifier"), method.get("class_word")
    if not identifier or not class_word:
        return template
    try:
        return template.format(token=identifier, placeholder=identifier, class_word=class_word)
    except (KeyError, IndexError, ValueError):  # a template the method would have refused: shown as written
        return template


def _generated_groups(samples: Sequence[dict[str, Any]], metrics: dict[str, Any], infer_dir: Path) -> list[dict]:
    """Per prompt set, per prompt: the first MAX_PER_PROMPT images (embedded), each after the intermediate images
    a multi-stage strategy made it from, and how many there are."""
    out = []
    for pset in metrics["prompt_sets"]:
        if pset.get("config", {}).get("baseline_of"):
            continue  # a set's base-model images are shown beside it, prompt by prompt
        groups: OrderedDict[str, list[dict]] = OrderedDict()
        for s in samples:
            if s["prompt_set"] == pset["name"]:
                groups.setdefault(s["prompt"], []).append(s)
        out.append({"name": pset["name"], "prompts": [
            {"prompt": prompt, "total": len(items),
             "images": [{"seed": s["seed"], "uri": image_data_uri(Path(infer_dir) / s["path"])}
                        for s in items[:MAX_PER_PROMPT]],
             "baseline": [{"seed": s["seed"], "uri": image_data_uri(Path(infer_dir) / s["baseline"]["path"])}
                          for s in items[:MAX_PER_PROMPT] if isinstance(s.get("baseline"), dict)],
             "baseline_prompt": next((s["baseline"]["prompt"] for s in items if isinstance(s.get("baseline"), dict)),
                                     "")}
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
    masks: Sequence[Path] = (),
    finetune_dir: Path | None = None,
    missing_training: Path | None = None,
) -> Path:
    """Write report.html from templates/report.html.j2 (autoescaped: prompts and names are text, never markup).
    ``metrics`` is the content of metrics.json; ``samples`` that of samples.json; ``front`` the operating points
    of a sweep (points, front, chosen, rule, the plot's uri) when the report is a sweep's; ``masks`` refine's
    masks, one per reference; ``finetune_dir`` the training's output (loss log, validation images), or
    ``missing_training`` where it was looked for and not found."""
    backbones = metrics["backbones"]
    random_roles = [role for role, info in backbones.items() if not info["pretrained"]]
    world_roles = [role for role, info in backbones.items() if info.get("provenance") == "world-pretrained"]
    page = _ENV.get_template("report.html.j2").render(
        world_note=WORLD_NOTE.format(roles=", ".join(world_roles)) if world_roles and not random_roles else None,
        title=f"subjectops evaluation: {subject.get('name', 'subject')} ({subject.get('class_word', '')})",
        subject_name=subject.get("name", "the subject"),
        random_roles=random_roles,
        warning=RANDOM_WARNING.format(roles=", ".join(random_roles)),
        backbone_ids=[f"{role}={info['id']}" for role, info in backbones.items()],
        backbones=backbones,
        prompt_set_names=[s["name"] for s in metrics["prompt_sets"]],
        fid_features=metrics.get("fid_features"),
        thumb=THUMB,
        facts=run_facts(subject, infer_dir, finetune_dir),
        references=[{"name": Path(p).name, "uri": image_data_uri(Path(p))} for p in references],
        masks=[{"name": Path(p).name, "uri": image_data_uri(Path(p)), "coverage": c}
               for p, c in zip(masks, list(subject.get("mask_coverage") or []) + [None] * len(masks))],
        mask_backend=subject.get("mask_backend", ""),
        training=_training(finetune_dir),
        missing_training=str(missing_training) if missing_training else None,
        validation_prompt=_validation_prompt(params, finetune_dir),
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
