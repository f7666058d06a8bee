"""One leaderboard across methods (and inference strategies): `subjectops compare RUN_DIR ...` and the benchmark
pipeline's aggregation.

Each row is a (method, strategy) pair, each column a metric on a prompt set (its direction marked: higher or lower
is better), each cell the mean of the per-image values pooled over the row's runs with its 95% bootstrap interval
(scipy.stats.bootstrap, percentile method, fixed seed). A set-level metric (FID: one distance between two image
sets) has no per-image values to resample, so its cell is the mean alone, never an interval.

Runs are comparable only when they share one base model and one kind of metric backbones (random, world-pretrained,
pretrained: the numbers of one kind say nothing about another's), and, subject by subject, the same prompt sets
(name, version, template and settings; the identifier may differ by method), the same seeds and the same metric
backbones; otherwise the leaderboard is refused, naming what differs and in which runs. Runs of several subjects
are pooled only when every row has run on every subject (else a row would be compared on other subjects than the
next), and the page shows one table per subject under the pooled one. A leaderboard of random backbones says so on
its first line, as the run report does.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from subjectops.errors import SubjectopsError
from subjectops.metrics.definitions import METRICS
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
    base_model: str = ""
    provenance: str = "pretrained"  # random | world-pretrained | pretrained (metrics.json's, evaluate.py)
    random_roles: tuple[str, ...] = ()
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # column -> its metric's direction
    set_level: set[str] = field(default_factory=set)  # columns with one value per set (FID), no per-image values
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
    infer = _read(run_dir / "infer" / "manifest.json", f"run `subjectops infer --run {run_dir}` again", "inference")
    spec = infer["inference"]
    if not isinstance(spec.get("strategy"), str):
        raise SubjectopsError(f"{run_dir / 'infer' / 'manifest.json'} records no inference strategy",
                              fix=f"run `subjectops infer --run {run_dir}` again")
    sets = [{k: v for k, v in dict(s["config"], name=s["name"], version=s["version"]).items() if k != "identifier"}
            for s in metrics["prompt_sets"]]
    seeds = {s["name"]: [row["seed"] for row in metrics["per_image"] if row["prompt_set"] == s["name"]]
             for s in metrics["prompt_sets"]}
    backbones = {role: info["id"] for role, info in sorted(metrics["backbones"].items())}
    values: dict[str, list[float]] = {}
    higher: dict[str, bool] = {}
    set_level: set[str] = set()
    for record in metrics["metrics"]:
        column = f"{record['prompt_set']}/{record['metric']}"
        per_image = [row[record["key"]] for row in metrics["per_image"]
                     if row["prompt_set"] == record["prompt_set"] and row.get(record["key"]) is not None]
        if per_image or isinstance(record["mean"], (int, float)):  # a set-level number (FID) is its own only value
            values[column] = per_image or [record["mean"]]
            higher[column] = METRICS[record["key"]].higher_is_better
            if not per_image:
                set_level.add(column)
    subject = _read(run_dir / "refine" / "subject.json",
                    f"run `subjectops refine` again into {run_dir / 'refine'}").get("name", run_dir.name)
    base = method.get("base_model") or ((infer.get("params") or {}).get("model") or {}).get("base") or "unknown"
    random_roles = tuple(sorted(role for role, info in metrics["backbones"].items() if not info["pretrained"]))
    provenance = "random" if random_roles else (
        "world-pretrained" if any(info.get("provenance") == "world-pretrained"
                                  for info in metrics["backbones"].values()) else "pretrained")
    return RunScores(run_dir, subject, method["method"], spec["strategy"],
                     {"prompt sets": sets, "seeds": seeds, "backbones": backbones}, values, str(base), provenance,
                     random_roles, higher, set_level)


def _refuse_mixed(runs: list[RunScores], attribute: str, what: str, fix: str) -> None:
    kinds: dict[str, list[str]] = {}
    for run in runs:
        kinds.setdefault(getattr(run, attribute), []).append(str(run.run_dir))
    if len(kinds) > 1:
        listed = "; ".join(f"{kind}: {', '.join(dirs)}" for kind, dirs in kinds.items())
        raise SubjectopsError(f"these runs were made with different {what} ({listed}); a leaderboard across them "
                              f"would compare the {what}, not the methods", fix=fix)


def check_comparable(runs: list[RunScores], one_base_model: bool = True) -> None:
    """Refuse, naming the difference, when runs differ in base model (unless `one_base_model` is off) or kind of
    backbones, when two runs of one subject differ in prompt sets, seeds or backbones, or when the rows did not all
    run on the same subjects."""
    if one_base_model:
        _refuse_mixed(runs, "base_model", "base models", "compare runs of one base model (model.base), one "
                                                         "`subjectops compare` per base model")
    _refuse_mixed(runs, "provenance", "kinds of metric backbones (random, world-pretrained, pretrained)",
                  "compare runs evaluated with the same kind of encoders (evaluate.tiny, evaluate.backbones)")
    subjects = sorted({run.subject for run in runs})
    covered: dict[str, set[str]] = {}
    for run in runs:
        covered.setdefault(run.row, set()).add(run.subject)
    lacking = {row: sorted(set(subjects) - done) for row, done in covered.items() if set(subjects) - done}
    if lacking:
        listed = "; ".join(f"{row} has no run of {', '.join(missing)}" for row, missing in lacking.items())
        raise SubjectopsError(f"the runs cover different subjects ({listed}): pooled, each row would be scored on "
                              "other subjects than the next",
                              fix="pass a run of every method on every subject, or compare one subject at a time")
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


Cell = tuple[float, Optional[float], Optional[float]]  # mean, and its interval (None for a set-level metric)
SET_LEVEL_NOTE = "set-level metric (one value per image set): no interval"


@dataclass
class Leaderboard:
    columns: list[str]
    rows: dict[str, dict[str, Cell]]  # row -> column -> (mean, low, high), pooled over the subjects
    runs: dict[str, list[str]]  # row -> its run directories
    subjects: list[str]
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # column -> direction
    by_subject: dict[str, dict[str, dict[str, Cell]]] = field(default_factory=dict)  # subject -> row -> column
    base_model: str = ""  # the base models, comma-separated when the rows ran on several (see row_models)
    warning: str | None = None  # the first line when the numbers measure nothing (random backbones) or the world
    row_models: dict[str, str] = field(default_factory=dict)  # row -> the base model it ran on

    @property
    def several_models(self) -> bool:
        return len(set(self.row_models.values())) > 1

    def header(self, column: str) -> str:
        arrow = {True: " ↑", False: " ↓"}.get(self.higher_is_better.get(column), "")
        return column + arrow

    @staticmethod
    def format(cells: dict[str, Cell], column: str) -> str:
        if column not in cells:
            return "-"
        mean, low, high = cells[column]
        return f"{mean:.4f}" if low is None else f"{mean:.4f} [{low:.4f}, {high:.4f}]"

    @staticmethod
    def html_cell(cells: dict[str, Cell], column: str) -> str:
        """The mean with its interval on a line of its own below it, so a dozen metric columns fit a screen; the
        cell's text still reads `mean [low, high]`, as in the markdown."""
        if column not in cells or cells[column][1] is None:
            return Leaderboard.format(cells, column)
        mean, low, high = cells[column]
        return f"{mean:.4f} <br><span class=\"ci\">[{low:.4f}, {high:.4f}]</span>"

    def cell(self, row: str, column: str) -> str:
        return self.format(self.rows[row], column)

    def _tables(self) -> list[tuple[str, dict[str, dict[str, Cell]]]]:
        """(title, rows) of each table: the pooled one, then one per subject when there are several."""
        pooled = (f"all {len(self.subjects)} subjects pooled ({', '.join(self.subjects)})" if len(self.subjects) > 1
                  else f"subject {self.subjects[0]}")
        tables = [(pooled, self.rows)]
        if len(self.subjects) > 1:
            tables += [(f"subject {subject}", rows) for subject, rows in self.by_subject.items()]
        return tables

    def _explanation(self) -> str:
        models = (f"Base models {self.base_model} (each row's in its column: rows on different models compare the "
                  "models as well as the methods)") if self.several_models else f"Base model {self.base_model}"
        return (f"{models}; mean [95% bootstrap interval] over the per-image values; ↑ higher is better, ↓ lower is "
                f"better; a mean without an interval is a {SET_LEVEL_NOTE}.")

    def _model_header(self) -> list[str]:
        return ["base model"] if self.several_models else []

    def _model_cells(self, row: str) -> list[str]:
        return [self.row_models.get(row, "")] if self.several_models else []

    def markdown(self) -> str:
        lines = [f"**{self.warning}**", ""] if self.warning else []
        lines += [f"Leaderboard over {len(self.subjects)} subject(s): {', '.join(self.subjects)}. "
                  + self._explanation()]
        for title, rows in self._tables():
            header = ["method / strategy", *self._model_header(), *map(self.header, self.columns)]
            lines += ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join([row, *self._model_cells(row), *(self.format(cells, c) for c in self.columns)])
                      + " |" for row, cells in rows.items()]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in [*self._model_header(), *map(self.header, self.columns)])
        tables = "".join(
            f"<h2>{html.escape(title)}</h2><table class=\"{'leaderboard' if i == 0 else 'leaderboard subject'}\">"
            f"<tr><th>method / strategy</th>{head}</tr>" + "".join(
                f"<tr><td>{html.escape(row)}</td>"
                + "".join(f"<td>{html.escape(m)}</td>" for m in self._model_cells(row)) + "".join(
                    f"<td class=\"num\">{self.html_cell(cells, c)}</td>" for c in self.columns) + "</tr>"
                for row, cells in rows.items()) + "</table>"
            for i, (title, rows) in enumerate(self._tables()))
        banner = f"<p class=\"warning\" id=\"quality-warning\">{html.escape(self.warning)}</p>" if self.warning else ""
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>subjectops leaderboard</title>"
                f"<style>{LEADERBOARD_CSS}</style></head><body>{banner}<h1>Leaderboard</h1>"
                f"<p>{len(self.subjects)} subject(s): {html.escape(', '.join(self.subjects))}. "
                f"{html.escape(self._explanation())}</p>{tables}</body></html>")

    def to_dict(self) -> dict:
        def cells_dict(rows):
            return {row: {c: dict(zip(("mean", "low", "high"), v)) for c, v in cells.items()}
                    for row, cells in rows.items()}

        return {"columns": self.columns, "subjects": self.subjects, "runs": self.runs, "base_model": self.base_model,
                "row_models": self.row_models, "warning": self.warning, "higher_is_better": self.higher_is_better,
                "rows": cells_dict(self.rows),
                "by_subject": {subject: cells_dict(rows) for subject, rows in self.by_subject.items()}}


LEADERBOARD_CSS = ("body{font-family:system-ui,sans-serif;margin:24px;color:#1d232a}"
                   ".warning{background:#ffebe9;border:2px solid #cf222e;color:#82071e;padding:10px 14px;"
                   "font-weight:600;font-size:16px}"
                   "table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}"
                   "th,td{border:1px solid #d0d7de;padding:4px 8px}th{background:#f6f8fa;text-align:left}"
                   "td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}"
                   ".ci{color:#57606a;font-size:11px}")


def _warning(runs: list[RunScores]) -> str | None:
    from subjectops.report.html import RANDOM_WARNING, WORLD_NOTE

    random_roles = sorted({role for run in runs for role in run.random_roles})
    if random_roles:
        return RANDOM_WARNING.format(roles=", ".join(random_roles))
    if runs[0].provenance == "world-pretrained":  # one kind for all: check_comparable refused mixed kinds
        return WORLD_NOTE.format(roles="world-pretrained encoders")
    return None


def _cells(runs: list[RunScores]) -> dict[str, dict[str, Cell]]:
    """Per row, per column: the mean and interval of the values pooled over the runs (the mean alone when the
    column is set-level)."""
    pooled: dict[str, dict[str, list[float]]] = {}
    set_level = {c for run in runs for c in run.set_level}
    for run in runs:
        for column, values in run.values.items():
            pooled.setdefault(run.row, {}).setdefault(column, []).extend(values)
    return {row: {c: (float(sum(v) / len(v)), None, None) if c in set_level else interval(v)
                  for c, v in cells.items()} for row, cells in pooled.items()}


def leaderboard(run_dirs: list[Path]) -> Leaderboard:
    """The leaderboard of the runs: refused unless they are comparable subject by subject."""
    if not run_dirs:
        raise SubjectopsError("compare needs at least one run directory", fix="pass RUN_DIR arguments")
    return leaderboard_of([load_run(d) for d in run_dirs])


def leaderboard_of(runs: list[RunScores], one_base_model: bool = True) -> Leaderboard:
    """The leaderboard of loaded runs: refused unless they are comparable subject by subject. `one_base_model` off
    (the benchmark, whose variants may name their own model.base): rows on several base models, each row's shown."""
    check_comparable(runs, one_base_model)
    members: dict[str, list[str]] = {}
    for run in runs:
        members.setdefault(run.row, []).append(str(run.run_dir))
    rows = _cells(runs)
    subjects = sorted({r.subject for r in runs})
    return Leaderboard(sorted({c for cells in rows.values() for c in cells}), rows, members, subjects,
                       {c: h for run in runs for c, h in run.higher_is_better.items()},
                       {s: _cells([r for r in runs if r.subject == s]) for s in subjects},
                       ", ".join(dict.fromkeys(r.base_model for r in runs)), _warning(runs),
                       {r.row: r.base_model for r in runs})


def write_leaderboard(board: Leaderboard, out: Path) -> Path:
    """leaderboard.md, leaderboard.html and leaderboard.json in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.md").write_text(board.markdown())
    (out / "leaderboard.html").write_text(board.html())
    (out / "leaderboard.json").write_text(json.dumps(board.to_dict(), indent=2))
    return out
