"""One self-contained report.html per run: reference images, a grid of generated images per prompt,
metric tables (mean +- std), one plot per metric (matplotlib, embedded), the run's config and versions.

Everything is inlined (images as data URIs), so the file opens anywhere, offline, and can be logged
as a single artifact. When any metric backbone has random weights, the first line of the page says
that the numbers measure nothing about quality.
"""

from __future__ import annotations

import base64
import html
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import yaml
from PIL import Image

THUMB = 160  # px, longest side of an embedded image
MAX_PER_PROMPT = 12  # images shown per prompt in a grid (all are scored)

RANDOM_WARNING = (
    "These numbers measure nothing about image quality: they were computed with randomly initialised "
    "encoders (tiny mode: {roles}), not with the pretrained DINO/CLIP/Inception/LPIPS networks the papers use. "
    "They only show that the pipeline runs."
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;max-width:1280px}
h1{font-size:22px;margin:8px 0 4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #d0d7de}
h3{font-size:15px;margin:16px 0 6px}
.warning{background:#ffebe9;border:2px solid #cf222e;color:#82071e;padding:10px 14px;font-weight:600;font-size:16px}
.ok{background:#dafbe1;border:1px solid #1a7f37;padding:8px 12px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px} th,td{border:1px solid #d0d7de;padding:4px 8px}
th{background:#f6f8fa;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:6px} .grid figure{margin:0;text-align:center;font-size:11px;color:#57606a}
.grid img{display:block;width:""" + str(THUMB) + """px;height:auto;border:1px solid #d0d7de}
.prompt{font-family:ui-monospace,monospace;font-size:12px;background:#f6f8fa;padding:2px 6px}
.plots{display:flex;flex-wrap:wrap;gap:12px} .plots img{width:420px;border:1px solid #d0d7de}
pre{background:#f6f8fa;padding:10px;font-size:12px;overflow:auto;max-height:480px}
.muted{color:#57606a;font-size:12px}
"""

# Marks every <img> as loaded or failed, so a headless browser (and a reader's devtools) can check the page.
LOAD_CHECK = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), ok = 0, bad = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok++; } else { bad++; } });
  document.body.setAttribute('data-images-total', imgs.length);
  document.body.setAttribute('data-images-loaded', ok);
  document.body.setAttribute('data-images-failed', bad);
  var s = document.getElementById('load-status');
  if (s) { s.textContent = ok + ' of ' + imgs.length + ' images loaded'; }
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def image_data_uri(path: Path, size: int = THUMB * 2) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_sections(references: Sequence[Path], samples: Sequence[dict[str, Any]], metrics: dict[str, Any],
                    infer_dir: Path) -> list[str]:
    """Reference photos, then a grid of generated images per prompt."""
    parts: list[str] = []
    # Reference images
    parts.append(f'<h2 id="references">Reference images ({len(references)})</h2><div class="grid">')
    for p in references:
        parts.append(f'<figure><img class="reference" alt="{_e(Path(p).name)}" src="{image_data_uri(Path(p))}">'
                     f"<figcaption>{_e(Path(p).name)}</figcaption></figure>")
    parts.append("</div>")

    # Generated images: a grid per prompt
    parts.append('<h2 id="generated">Generated images</h2>')
    for pset in metrics["prompt_sets"]:
        groups: "OrderedDict[str, list[dict]]" = OrderedDict()
        for s in samples:
            if s["prompt_set"] == pset["name"]:
                groups.setdefault(s["prompt"], []).append(s)
        parts.append(f"<h3>{_e(pset['name'])}: {len(groups)} prompt(s)</h3>")
        for prompt, items in groups.items():
            shown = items[:MAX_PER_PROMPT]
            more = f" (showing {len(shown)} of {len(items)})" if len(items) > len(shown) else ""
            parts.append(f"<p><span class='prompt'>{_e(prompt)}</span> <span class='muted'>{len(items)} image(s){more}"
                         "</span></p><div class='grid generated'>")
            for s in shown:
                parts.append(f'<figure><img class="generated" alt="seed {s["seed"]}" '
                             f'src="{image_data_uri(Path(infer_dir) / s["path"])}"><figcaption>seed {_e(s["seed"])}'
                             "</figcaption></figure>")
            parts.append("</div>")

    return parts


def render_report(
    out_path: Path,
    metrics: dict[str, Any],
    references: Sequence[Path],
    samples: Sequence[dict[str, Any]],
    infer_dir: Path,
    params: dict[str, Any],
    versions: dict[str, str],
    subject: dict[str, Any],
) -> Path:
    """Write report.html. ``metrics`` is the content of metrics.json; ``samples`` that of samples.json."""
    random_roles = [role for role, info in metrics["backbones"].items() if not info["pretrained"]]
    parts: list[str] = []
    title = f"subjectops evaluation: {subject.get('name', 'subject')} ({subject.get('class_word', '')})"
    # The first line: what the numbers are worth.
    if random_roles:
        parts.append(f'<p class="warning" id="quality-warning">{_e(RANDOM_WARNING.format(roles=", ".join(random_roles)))}</p>')
    else:
        parts.append('<p class="ok" id="quality-warning">Metrics computed with pretrained encoders: '
                     + ", ".join(_e(f"{r}={i['id']}") for r, i in metrics["backbones"].items()) + ".</p>")
    parts.append(f"<h1>{_e(title)}</h1>")
    parts.append('<p class="muted"><span id="load-status">images not checked yet</span> · '
                 f'prompt sets: {_e(", ".join(s["name"] for s in metrics["prompt_sets"]))} · '
                 f"FID features: {_e(metrics.get('fid_features') or '-')}</p>")

    # Pictures before numbers: what the model makes is the first thing to judge.
    parts += _image_sections(references, samples, metrics, infer_dir)

    # Metric tables (mean ± std), one per prompt set
    parts.append('<h2 id="metrics">Metrics</h2>')
    parts.append(f'<p class="muted">{_e(metrics["definitions"]["pairs"])} {_e(metrics["definitions"]["std"])}</p>')
    by_set: "OrderedDict[str, list[dict]]" = OrderedDict()
    for rec in metrics["metrics"]:
        by_set.setdefault(rec["prompt_set"], []).append(rec)
    for pset in metrics["prompt_sets"]:
        recs = by_set.get(pset["name"], [])
        parts.append(f"<h3>{_e(pset['name'])} <span class='muted'>version {_e(pset['version'])}, "
                     f"{pset['n_images']} images, digest {_e(pset.get('digest', ''))}</span></h3>")
        rows = ["<tr><th>metric</th><th>mean ± std</th><th>n pairs</th><th>pairing</th><th>backbone</th>"
                "<th>pretrained</th><th>note</th></tr>"]
        for r in recs:
            ms = _fmt(r["mean"]) + ("" if r["std"] is None else " ± " + _fmt(r["std"]))
            arrow = "↑" if r["higher_is_better"] else "↓"
            pre = {True: "yes", False: "<b>no (random)</b>", None: "n/a"}[r["pretrained"]]
            rows.append(f"<tr><td>{_e(r['metric'])} {arrow}</td><td class='num'>{_e(ms)}</td>"
                        f"<td class='num'>{_e(r['n_pairs'] if r['n_pairs'] is not None else '-')}</td>"
                        f"<td>{_e(r['pairing'])}</td><td>{_e(r['backbone'] or '-')}</td><td>{pre}</td>"
                        f"<td class='muted'>{_e(r['note'])}</td></tr>")
        parts.append(f"<table class='metrics' data-prompt-set='{_e(pset['name'])}'>" + "".join(rows) + "</table>")

    # Plots, one per metric
    parts.append('<h2 id="plots">Plots</h2><div class="plots">')
    per_metric: "OrderedDict[str, list[dict]]" = OrderedDict()
    for rec in metrics["metrics"]:
        per_metric.setdefault(rec["metric"], []).append(rec)
    for metric, recs in per_metric.items():
        key = recs[0]["key"]
        per_image = {}
        for row in metrics["per_image"]:
            if row.get(key) is not None:
                per_image.setdefault(row["prompt_set"], []).append(row[key])
        uri = _plot_metric(metric, recs, per_image, recs[0]["higher_is_better"])
        parts.append(f'<img class="plot" alt="{_e(metric)} plot" src="{uri}">')
    parts.append("</div>")

    # Config and versions
    parts.append('<h2 id="config">Run configuration</h2>')
    parts.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in versions.items())
                 + "</table>")
    parts.append("<h3>Metric backbones</h3><table><tr><th>role</th><th>id</th><th>pretrained</th><th>loaded from</th>"
                 "<th>description</th></tr>" + "".join(
                     f"<tr><td>{_e(r)}</td><td>{_e(i['id'])}</td><td>{'yes' if i['pretrained'] else '<b>no (random)</b>'}"
                     f"</td><td>{_e(i['source'])}</td><td>{_e(i['description'])}</td></tr>"
                     for r, i in metrics["backbones"].items()) + "</table>")
    parts.append("<h3>params</h3><pre>" + _e(yaml.safe_dump(params, sort_keys=False)) + "</pre>")

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(parts)
        + f"\n<script>{LOAD_CHECK}</script>\n</body></html>\n"
    )
    out_path = Path(out_path)
    out_path.write_text(page, encoding="utf-8")
    return out_path
