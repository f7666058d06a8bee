"""Operating points in (CLIP-T, DINO) and their non-dominated set (DreamBlend fig. 7 / supplement sec. 2).

Both axes are higher-is-better: a point is dominated when another is at least as good on both and better on one.
Equal points do not dominate each other, so ties on the front are all kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from subjectops.errors import SubjectopsError
from subjectops.report.html import figure_data_uri

POINTS_FILE = "points.json"  # in a sweep's output (stages/sweep.py): the points, the front, the chosen one, the rule


@dataclass(frozen=True)
class OperatingPoint:
    """One way to generate from a run: a snapshot with plain sampling, or a DreamBlend combination; scored on the
    run's prompt sets, seeds and backbones (mean and std over the per-image values)."""

    label: str
    strategy: str  # plain | dreamblend
    settings: dict = field(default_factory=dict)  # {"snapshot": step} or infer.dreamblend's fields
    clip_t: float = float("nan")
    clip_t_std: float = float("nan")
    dino: float = float("nan")
    dino_std: float = float("nan")
    n_images: int = 0
    path: str = ""  # the point's folder in the sweep (infer/, evaluate/)

    def to_dict(self) -> dict:
        return asdict(self)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(coords: Sequence[tuple[float, float]]) -> list[int]:
    """Indices, in input order, of the points no other point dominates (both coordinates higher-is-better)."""
    return [i for i, p in enumerate(coords) if not any(dominates(q, p) for j, q in enumerate(coords) if j != i)]


def choose(points: Sequence[OperatingPoint], min_clip_t: float | None) -> OperatingPoint:
    """Maximise DINO subject to CLIP-T >= min_clip_t (no constraint when None), among the front; a DINO tie goes to
    the higher CLIP-T. The best DINO at any CLIP-T lies on the front, so restricting to it loses nothing."""
    front = [points[i] for i in pareto_front([(p.clip_t, p.dino) for p in points])]
    allowed = [p for p in front if min_clip_t is None or p.clip_t >= min_clip_t]
    if not allowed:
        best = max(p.clip_t for p in points)
        raise SubjectopsError(f"no operating point reaches CLIP-T >= {min_clip_t} (the highest is {best:.4f})",
                              fix=f"lower --min-clip-t (registry.choose.min_clip_t) to at most {best:.4f}")
    return max(allowed, key=lambda p: (p.dino, p.clip_t))


LABEL_FONT = 10  # pt: the front plot is shown at its natural size (report template), so this is what one reads
# Where a point's label may go, in points from the point, tried in order until it overlaps no label placed before.
LABEL_OFFSETS = [(dx * r, dy * r) for r in (1, 2, 3, 4) for dx, dy in ((6, 6), (6, -14), (-6, 6), (-6, -14))]


def _place_labels(ax, fig, points: Sequence[OperatingPoint]) -> list:
    """One label per point, each moved off the labels already placed (ties and close points stack readably)."""
    renderer = fig.canvas.get_renderer()
    placed, boxes = [], []
    for p in points:
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(p.label, (p.clip_t, p.dino), textcoords="offset points", xytext=(dx, dy),
                               ha="left" if dx > 0 else "right", fontsize=LABEL_FONT,
                               bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
                               arrowprops={"arrowstyle": "-", "color": "#8c959f", "lw": 0.6})
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in boxes) or (dx, dy) == LABEL_OFFSETS[-1]:
                break
            text.remove()
        placed.append(text)
        boxes.append(box)
    return placed


def front_plot(points: Sequence[OperatingPoint], chosen: str | None = None, figure: list | None = None) -> str:
    """The points with their spread (std bars), the front joined, every point labelled and the chosen one ringed;
    a PNG data URI (`figure`, when given, receives the matplotlib figure before it is closed, for tests)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = set(pareto_front([(p.clip_t, p.dino) for p in points]))
    fig, ax = plt.subplots(figsize=(8.0, 5.6), dpi=100)
    for i, p in enumerate(points):
        color = "#57606a" if "snapshot" in p.settings else "#1a7f37"  # one snapshot, or a blend of several
        ax.errorbar(p.clip_t, p.dino, xerr=p.clip_t_std, yerr=p.dino_std, fmt="o", color=color,
                    alpha=0.9 if i in front else 0.45,
                    capsize=2, markersize=6)
        if p.label == chosen:
            ax.scatter([p.clip_t], [p.dino], s=220, facecolors="none", edgecolors="#cf222e", linewidths=2, zorder=4,
                       label=f"chosen: {p.label}")
    on_front = sorted((points[i] for i in front), key=lambda p: p.clip_t)
    ax.plot([p.clip_t for p in on_front], [p.dino for p in on_front], "--", color="#0969da", label="Pareto front")
    ax.set_xlabel("CLIP-T (prompt fidelity, higher is better)", fontsize=LABEL_FONT + 1)
    ax.set_ylabel("DINO (subject fidelity, higher is better)", fontsize=LABEL_FONT + 1)
    ax.tick_params(labelsize=LABEL_FONT)
    ax.legend(fontsize=LABEL_FONT - 1, loc="best")
    fig.tight_layout()  # before placing labels: their overlap is measured where they will be drawn
    _place_labels(ax, fig, points)
    if figure is not None:
        figure.append(fig)
    return figure_data_uri(fig)


def read_front(sweep_dir: Path) -> dict:
    """The operating points of a sweep as the report draws them: points, front, chosen, rule and the plot's uri."""
    from subjectops.metrics.schema import read_points

    doc = read_points(Path(sweep_dir) / POINTS_FILE)
    points = [OperatingPoint(**p) for p in doc["points"]]
    return {**doc, "points": points, "uri": front_plot(points, doc["chosen"])}
