"""One leaderboard across methods (and inference strategies): `subjectops compare RUN_DIR ...` and the benchmark
pipeline's aggregation.

Each row is a (method, strategy) pair, each column a metric on a prompt set, each cell the mean of the per-image
values pooled over the row's runs with its 95% bootstrap interval (scipy.stats.bootstrap, percentile method, fixed
seed). Runs are comparable only when, subject by subject, they used the same prompt sets (name, version, template
and settings; the identifier may differ by method), the same seeds and the same metric backbones; otherwise the
leaderboard is refused, naming what differs and in which runs.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from subjectops.errors import SubjectopsError
from subjectops.metrics.schema import read_metrics

CONFIDENCE = 0.95
RESAMPLES = 2000
# The files of a run directory `load_run` reads (the benchmark fetches exactly these from MLflow).
RUN_FILES = ("refine/subject.json", "finetune/method.json", "infer/manifest.json", "evaluate/metrics.json")


@dataclass
class RunScores:
    """What one run contributes: its identity, what makes runs comparable, and the per-image values."""

    run_dir: Path
    subject: str
    method: str
    strategy: str
    comparable: dict  # "prompt sets", "seeds", "backbones" -> a JSON-able value
    values: dict[str, list[float]] = field(default_factory=dict)  # "<prompt set>/<metric>" -> per-image values
    label: str | None = None  # the row's name when runs of one (method, strategy) differ in settings (a benchmark)

    @property
    def row(self) -> str:
        return self.label or f"{self.method} / {self.strategy}"


def _read(path: Path, fix: str, *keys: str) -> dict:
    """A JSON object of a run folder that holds `keys` (one a user edited or a copy cut short is refused)."""
    if not path.is_file():
        raise SubjectopsError(f"{path} is missing", fix=fix)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SubjectopsError(f"{path} is not readable JSON: {exc}", fix=fix) from None
    lacking = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), (str, dict))]
    if lacking:
        raise SubjectopsError(f"{path} lacks {', '.join(lacking)}", fix=fix)
    return data


def load_run(run_dir: Path) -> RunScores:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "evaluate" / "metrics.json")
    method = _read(run_dir / "finetune" / "method.json", f"run `subjectops finetune --run {run_dir}` again", "method")
    spec = _read(run_dir / "infer" / "manifest.json", f"run `subjectops infer --run {run_dir}` again",
                 "inference")["inference"]
    if not isinstance(spec.get("strategy"), str):
        raise SubjectopsError(f"{run_dir / 'infer' / 'manifest.json'} records no inference strategy",
                              fix=f"run `subjectops infer --run {run_dir}` again")
    sets = [{k: v for k, v in dict(s["config"], name=s["name"], version=s["version"]).items() if k != "identifier"}
            for s in metrics["prompt_sets"]]
    seeds = {s["name"]: [row["seed"] for row in metrics["per_image"] if row["prompt_set"] == s["name"]]
             for s in metrics["prompt_sets"]}
    backbones = {role: info["id"] for role, info in sorted(metrics["backbones"].items())}
    values: dict[str, list[float]] = {}
    for record in metrics["metrics"]:
        per_image = [row[record["key"]] for row in metrics["per_image"]
                     if row["prompt_set"] == record["prompt_set"] and row.get(record["key"]) is not None]
        if per_image or isinstance(record["mean"], (int, float)):  # a set-level number (FID) is its own only value
            values[f"{record['prompt_set']}/{record['metric']}"] = per_image or [record["mean"]]
    subject = _read(run_dir / "refine" / "subject.json",
                    f"run `subjectops refine` again into {run_dir / 'refine'}").get("name", run_dir.name)
    return RunScores(run_dir, subject, method["method"], spec["strategy"],
                     {"prompt sets": sets, "seeds": seeds, "backbones": backbones}, values)


def check_comparable(runs: list[RunScores]) -> None:
    """Refuse, naming the difference, when two runs of one subject differ in prompt sets, seeds or backbones."""
    by_subject: dict[str, list[RunScores]] = {}
    for run in runs:
        by_subject.setdefault(run.subject, []).append(run)
    for subject, group in by_subject.items():
        first = group[0]
        for other in group[1:]:
            for what, value in first.comparable.items():
                if other.comparable[what] != value:
                    raise SubjectopsError(
                        f"runs of {subject} differ in {what}: {first.run_dir} has "
                        f"{json.dumps(value, sort_keys=True)}, "
                        f"{other.run_dir} has {json.dumps(other.comparable[what], sort_keys=True)}",
                        fix=f"compare runs made with the same {what} (infer.prompt_sets, infer.seed, "
                            "evaluate.backbones)")


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its 95% bootstrap interval (a single value has none: its mean twice)."""
    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if data.size < 2 or np.ptp(data) == 0:
        return float(data.mean()), float(data.mean()), float(data.mean())
    ci = bootstrap((data,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES, method="percentile",
                   random_state=np.random.default_rng(0)).confidence_interval
    return float(data.mean()), float(ci.low), float(ci.high)


@dataclass
class Leaderboard:
    columns: list[str]
    rows: dict[str, dict[str, tuple[float, float, float]]]  # row -> column -> (mean, low, high)
    runs: dict[str, list[str]]  # row -> its run directories
    subjects: list[str]

    def cell(self, row: str, column: str) -> str:
        if column not in self.rows[row]:
            return "-"
        mean, low, high = self.rows[row][column]
        return f"{mean:.4f} [{low:.4f}, {high:.4f}]"

    def markdown(self) -> str:
        lines = [f"Leaderboard over {len(self.subjects)} subject(s): {', '.join(self.subjects)}; mean [95% bootstrap "
                 "interval] over the per-image values", "",
                 "| method / strategy | " + " | ".join(self.columns) + " |",
                 "|---|" + "---|" * len(self.columns)]
        lines += [f"| {row} | " + " | ".join(self.cell(row, c) for c in self.columns) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(f"<tr><td>{html.escape(row)}</td>" + "".join(
            f"<td class=\"num\">{self.cell(row, c)}</td>" for c in self.columns) + "</tr>" for row in self.rows)
        return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>subjectops leaderboard</title>"
                f"</head><body><h1>Leaderboard</h1><p>{len(self.subjects)} subject(s): "
                f"{html.escape(', '.join(self.subjects))}; mean [95% bootstrap interval] over the per-image values</p>"
                f"<table class=\"leaderboard\"><tr><th>method / strategy</th>{head}</tr>{body}</table></body></html>")

    def to_dict(self) -> dict:
        return {"columns": self.columns, "subjects": self.subjects, "runs": self.runs,
                "rows": {row: {c: dict(zip(("mean", "low", "high"), v)) for c, v in cells.items()}
                         for row, cells in self.rows.items()}}


def leaderboard(run_dirs: list[Path]) -> Leaderboard:
    """The leaderboard of the runs: refused unless they are comparable subject by subject."""
    if not run_dirs:
        raise SubjectopsError("compare needs at least one run directory", fix="pass RUN_DIR arguments")
    return leaderboard_of([load_run(d) for d in run_dirs])


def leaderboard_of(runs: list[RunScores]) -> Leaderboard:
    """The leaderboard of loaded runs: refused unless they are comparable subject by subject."""
    check_comparable(runs)
    pooled: dict[str, dict[str, list[float]]] = {}
    members: dict[str, list[str]] = {}
    for run in runs:
        members.setdefault(run.row, []).append(str(run.run_dir))
        for column, values in run.values.items():
            pooled.setdefault(run.row, {}).setdefault(column, []).extend(values)
    columns = sorted({c for cells in pooled.values() for c in cells})
    return Leaderboard(columns, {row: {c: interval(v) for c, v in cells.items()} for row, cells in pooled.items()},
                       members, sorted({r.subject for r in runs}))


def write_leaderboard(board: Leaderboard, out: Path) -> Path:
    """leaderboard.md, leaderboard.html and leaderboard.json in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(board.markdown())
    (out / "leaderboard.html").write_text(board.html())
    (out / "leaderboard.json").write_text(json.dumps(board.to_dict(), indent=2))
    return out
