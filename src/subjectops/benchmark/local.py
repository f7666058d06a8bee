"""`subjectops benchmark run`: methods x subjects (x seeds) in one process, through the very stages `subjectops run`
calls (`pipeline.run`), with the same prompts, seeds and encoders for every method.

Each (variant, subject, seed) is a cell, run into `OUT/runs/<variant>/<subject>[/seed-<s>]/`, a run folder like any
other. A finished cell leaves `benchmark-cell.json` (the digest of the params it reads); a rerun skips it, so a
killed benchmark resumes where it stopped. The base pipeline and the metric encoders are loaded once for the whole
benchmark (models/shared.py); class images come from the class-prior cache (`priors.cache_dir`), so subjects of one
class share them. Then `OUT/leaderboard.{html,md,json}` (selection/compare.py, with image grids per subject: every
variant on the same prompts and seeds) and `OUT/claims.{html,md,json}` (benchmark/claims.py).

With `--seeds`, benchmark seed N trains and samples each subject with its own seed, drawn from N and the subject's
name (`subject_seed`): one seed's luck (its training timesteps and noises, its images) is then independent across
subjects, as the gate's seed-spread rule assumes (benchmark/regression.py). With one seed shared by the subjects,
the gate trial on 3 world subjects saw training seed 0 score the highest SSIM on all three (README).

A variant is `METHOD[@STRATEGY][+KEY=VALUE...]`: `dreambooth`, `dreambooth@reference-guided`,
`dreambooth+finetune.dreambooth.prior_preservation=false`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from subjectops.benchmark.regression import DEFAULT_GATE_RULE, check_regressions, check_rule
from subjectops.config import Params, load_params, shortcut_overrides
from subjectops.digest import digest_json
from subjectops.errors import SubjectopsError

CELL_FILE = "benchmark-cell.json"
GRID_IMAGES = 6  # images per grid row: the first prompts and seeds of the first prompt set
# what must be the same for every variant, so that the methods are compared on the same images' prompts and seeds
# and scored by the same encoders
SHARED_KEYS = ("infer.prompt_sets", "infer.seed", "infer.prompt_invariant", "infer.prompt_varying",
               "infer.dreambench", "infer.world", "evaluate", "subject")


@dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a method, an inference strategy (None: the method's own) and settings."""

    method: str
    strategy: Optional[str] = None
    settings: tuple[tuple[str, str], ...] = ()  # (params key, value as typed)

    @property
    def label(self) -> str:
        return self.method + (f"@{self.strategy}" if self.strategy else "") + "".join(
            f"+{k}={v}" for k, v in self.settings)

    @property
    def slug(self) -> str:
        """Its folder name under OUT/runs/."""
        return re.sub(r"[^A-Za-z0-9_.=@+-]", "_", self.label)

    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.settings] + ([f"infer.strategy={self.strategy}"] if self.strategy else [])


def parse_variant(text: str) -> Variant:
    from subjectops.inference import STRATEGIES
    from subjectops.methods import METHODS

    head, *settings = [part.strip() for part in str(text).split("+")]
    method, _, strategy = head.partition("@")
    fix = "write a variant as METHOD[@STRATEGY][+KEY=VALUE...], e.g. dreambooth@reference-guided"
    if method not in METHODS:
        raise SubjectopsError(f"unknown method {method!r} in --methods {text!r}",
                              fix=f"choose among {', '.join(METHODS)}; {fix}")
    if strategy and strategy not in STRATEGIES:
        raise SubjectopsError(f"unknown inference strategy {strategy!r} in --methods {text!r}",
                              fix=f"choose among {', '.join(STRATEGIES)}; {fix}")
    pairs = []
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq or not key:
            raise SubjectopsError(f"setting {s!r} of --methods {text!r} is not KEY=VALUE", fix=fix)
        pairs.append((key.strip(), value.strip()))
    return Variant(method, strategy or None, tuple(pairs))


@dataclass(frozen=True)
class BenchSubject:
    name: str
    photos: Path  # what `subjectops run` takes
    class_word: str


def find_subjects(folders: Sequence[Path], class_word: Optional[str]) -> list[BenchSubject]:
    """Each folder is a world subject (subject.json and photos/), a folder of photos (its class from `--class` or
    its `class.txt`), or a folder of such subjects."""
    from subjectops.data.subject import IMAGE_SUFFIXES

    out: list[BenchSubject] = []

    def add(folder: Path, nested: bool) -> None:
        record = folder / "subject.json"
        if record.is_file() and (folder / "photos").is_dir():
            data = json.loads(record.read_text())
            out.append(BenchSubject(str(data.get("name") or folder.name), folder / "photos", str(data["class_word"])))
            return
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file()):
            word = (folder / "class.txt").read_text().strip() if (folder / "class.txt").is_file() else class_word
            if not word:
                raise SubjectopsError(f"subject folder {folder} has no class word",
                                      fix=f"pass --class WORD, or write the class word into {folder / 'class.txt'}")
            out.append(BenchSubject(folder.name, folder, word))
            return
        subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if nested or not subfolders:
            raise SubjectopsError(f"{folder} is not a subject folder (no photos, no subject.json with photos/)",
                                  fix="pass a world subject folder, a folder of 3-20 photos, or a folder of them")
        for sub in subfolders:
            add(sub, nested=True)

    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise SubjectopsError(f"--subjects {folder} is not a folder", fix="pass existing subject folders")
        add(folder, nested=False)
    names = [s.name for s in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SubjectopsError(f"two subjects are named {', '.join(twice)}",
                              fix="give each subject folder its own name (a cell's folder is named after it)")
    if not out:
        raise SubjectopsError("the benchmark needs subjects", fix="pass --subjects DIR")
    return out


@dataclass
class Cell:
    variant: Variant
    subject: BenchSubject
    seed: Optional[int]
    params: Params
    run_dir: Path

    @property
    def group(self) -> str:
        """The images that are comparable across variants: one subject, one seed."""
        return self.subject.name if self.seed is None else f"{self.subject.name}@seed-{self.seed}"

    def digest(self) -> str:
        """The digest of the params this cell's run reads: a method reads only its own `finetune.<config_key>`
        section (methods/base.py), so the other methods' sections are left out. A benchmark-wide `--set` for one
        method (two-stage's UNet rate scaled to the world, say) then leaves the other methods' finished cells valid."""
        from subjectops.methods import METHODS, get_method

        own = get_method(self.params.finetune.method).config_key
        others = {m.config_key for m in METHODS.values()} - {own}
        dumped = self.params.model_dump(mode="json")
        dumped["finetune"] = {k: v for k, v in dumped["finetune"].items() if k not in others}
        return digest_json(dumped)

    def done(self) -> bool:
        """Finished with these params (a folder finished with other params is refused, never overwritten)."""
        marker = self.run_dir / CELL_FILE
        if not marker.is_file():
            return False
        try:
            record = json.loads(marker.read_text())
            recorded = record.get("params_digest")
        except (OSError, ValueError, AttributeError):
            record, recorded = {}, None
        digest = self.digest()
        if recorded == digest_json(self.params.model_dump(mode="json")) != digest:
            # finished before the digest left the other methods' sections out (it covered all the params): the same
            # params, so the cell is kept and recorded with today's digest
            marker.write_text(json.dumps({**record, "params_digest": digest}, indent=2))
            recorded = digest
        if recorded != digest:
            raise SubjectopsError(f"{self.run_dir} holds a finished run of {self.variant.label} on "
                                  f"{self.subject.name} made with other settings",
                                  fix="pass another --out, or delete that folder to run it again with these settings")
        return True


def _setting(params: Params, key: str) -> Any:
    value: Any = params.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


def subject_seed(seed: int, subject: str) -> int:
    """The seed of `subject`'s cells in benchmark seed `seed` (see the module)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{subject}".encode()).digest()[:4], "big") % 1_000_000


def variant_params(params_path: Path, sets: Sequence[str], model: Optional[str], variant: Variant,
                   subject: str, seed: Optional[int]) -> Params:
    """The params of one variant on one subject: the benchmark's (`--set`, then `--model`), the variant's settings
    and, with a benchmark seed, the subject's seed for training and sampling (`subject_seed`). A variant's settings
    are the most specific, so they win: `alchemy+model.base=world-sdxl` in a `--model world-sd15` benchmark runs on
    world-sdxl."""
    own = None if seed is None else subject_seed(seed, subject)
    seeded = [] if own is None else [f"finetune.seed={own}", f"infer.seed={own}"]
    benchmark = [*sets, *shortcut_overrides("", model or "")]
    return load_params(params_path, [*benchmark, *variant.overrides(), *seeded], method=variant.method)


def plan_cells(variants: Sequence[Variant], subjects: Sequence[BenchSubject], seeds: Sequence[Optional[int]],
               out: Path, build: Callable[[Variant, str, Optional[int]], Params]) -> list[Cell]:
    """Every cell with its validated params, refused before any work when two variants would not be compared on the
    same prompts, seeds and encoders."""
    params = {(v, subj.name, s): build(v, subj.name, s) for v in variants for subj in subjects for s in seeds}
    first, subject, seed = variants[0], subjects[0].name, seeds[0]
    for v in variants[1:]:
        for key in SHARED_KEYS:
            if _setting(params[v, subject, seed], key) != _setting(params[first, subject, seed], key):
                raise SubjectopsError(f"variant {v.label} sets {key} unlike {first.label}: the methods would not be "
                                      "compared on the same prompts, seeds and encoders",
                                      fix=f"set {key} with --set for the whole benchmark, not in one variant")
    return [Cell(v, subj, seed, params[v, subj.name, seed],
                 out / "runs" / v.slug / subj.name / ("" if seed is None else f"seed-{seed}"))
            for v in variants for subj in subjects for seed in seeds]


@dataclass
class BenchmarkResult:
    out: Path
    cells: list[Cell]
    ran: list[Cell] = field(default_factory=list)  # cells this invocation ran (the others were finished before)
    seconds: float = 0.0
    loads: dict = field(default_factory=dict)


def run_benchmark(*, params_path: Path, sets: Sequence[str], model: Optional[str], variants: Sequence[str],
                  subject_dirs: Sequence[Path], class_word: Optional[str], seeds: Sequence[int], out: Path,
                  track: bool = False, champion: Optional[Path] = None, gate_rule: str = DEFAULT_GATE_RULE,
                  on_cell: Optional[Callable[[Cell, bool], None]] = None) -> BenchmarkResult:
    """Run every unfinished cell, then write the leaderboard and the claims table (and gate against `champion` by
    `gate_rule`, benchmark/regression.py)."""
    from subjectops.benchmark.prior_drift import class_prompt_scores, uses_class_priors
    from subjectops.data.subject import check_class_word, load_subject
    from subjectops.models.loading import training_resolution
    from subjectops.models.shared import SharedModels
    from subjectops.pipeline import run as run_pipeline
    from subjectops.preflight import require_writable

    start = time.monotonic()
    parsed = list(dict.fromkeys(parse_variant(v) for v in variants))
    if not parsed:
        raise SubjectopsError("the benchmark needs methods", fix="pass --methods A,B,...")
    subjects = find_subjects(subject_dirs, class_word)
    seed_list: list[Optional[int]] = list(dict.fromkeys(seeds)) or [None]

    out = Path(out)
    cells = plan_cells(parsed, subjects, seed_list, out, functools.partial(variant_params, params_path, sets, model))
    for subject in subjects:  # every photo checked before the first cell starts
        check_class_word(subject.class_word)
        load_subject(subject.photos, cells[0].params.subject, training_resolution(cells[0].params))
    champion_board = read_champion(champion) if champion is not None else None
    check_rule(gate_rule, len(subjects), champion_board)
    require_writable(out, "the benchmark folder (--out)")
    result = BenchmarkResult(out, cells)
    shared = SharedModels()
    for cell in cells:
        finished = cell.done()
        if on_cell:
            on_cell(cell, finished)
        if finished:
            continue
        began = time.monotonic()
        with shared.active():
            run_pipeline(cell.params, cell.subject.photos, cell.subject.class_word, cell.run_dir)
            if uses_class_priors(cell.params):  # PRES and DIV of the prior-preservation claims
                class_prompt_scores(cell.params, cell.run_dir)
        (cell.run_dir / CELL_FILE).write_text(json.dumps({
            "variant": cell.variant.label, "subject": cell.subject.name, "seed": cell.seed,
            "params_digest": cell.digest(), "seconds": round(time.monotonic() - began, 3)}, indent=2))
        result.ran.append(cell)
    result.loads = {f"{kind}:{key if isinstance(key, str) else key[0]}": n for (kind, key), n in shared.loads.items()}
    write_reports(out, cells, track=track)
    result.seconds = time.monotonic() - start
    if champion_board is not None:
        check_regressions(json.loads((out / "leaderboard.json").read_text()), champion_board, out, gate_rule)
    return result


def read_champion(path: Path) -> dict:
    """A champion benchmark's leaderboard.json (its folder or the file), read before any work."""
    path = Path(path)
    path = path / "leaderboard.json" if path.is_dir() else path
    try:
        board = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SubjectopsError(f"--champion {path} is not a readable leaderboard.json ({exc})",
                              fix="pass the folder or leaderboard.json of an earlier `subjectops benchmark run`") \
            from None
    if not isinstance(board, dict) or not isinstance(board.get("rows"), dict):
        raise SubjectopsError(f"--champion {path} holds no leaderboard rows",
                              fix="pass the leaderboard.json an earlier `subjectops benchmark run` wrote")
    return board


def load_scores(cells: Sequence[Cell]):
    """Each cell's scores as the leaderboard reads them, named by variant and comparable per subject and seed."""
    from subjectops.selection.compare import load_run

    runs = []
    for cell in cells:
        run = load_run(cell.run_dir)
        run.label, run.subject = cell.variant.label, cell.group
        runs.append(run)
    return runs


def per_image(cell: Cell) -> dict[tuple, dict[str, float]]:
    """(group, prompt set, image, seed) -> metric -> value: the key pairs one image across variants (with the
    class-prompt images' PRES and DIV, benchmark/prior_drift.py)."""
    from subjectops.benchmark.prior_drift import PROMPT_SET, read_scores

    doc = json.loads((cell.run_dir / "evaluate" / "metrics.json").read_text())
    keys = [r.get("key", r["metric"]) for r in doc["metrics"]]
    out: dict[tuple, dict[str, float]] = {}
    for row in doc["per_image"]:
        values = {k: float(row[k]) for k in keys if isinstance(row.get(k), (int, float))}
        out[(cell.group, row["prompt_set"], row["path"], row["seed"])] = values
    for row in read_scores(cell.run_dir):
        out[(cell.group, PROMPT_SET, row["path"], row["seed"])] = {"pres": row["pres"], "div": row["div"]}
    return out


def sweep_points(cell: Cell) -> dict[str, dict]:
    """The run's sweep (when it kept snapshots): point label -> {"strategy", "values"}, values keyed as `per_image`."""
    path = cell.run_dir / "sweep" / "points.json"
    if not path.is_file():
        return {}
    out = {}
    for point in json.loads(path.read_text())["points"]:
        view = dataclasses.replace(cell, run_dir=cell.run_dir / "sweep" / point["path"])
        out[point["label"]] = {"strategy": point["strategy"], "values": per_image(view)}
    return out


def write_reports(out: Path, cells: Sequence[Cell], track: bool) -> None:
    from subjectops.benchmark.claims import claims_table, write_claims
    from subjectops.selection.compare import leaderboard_of, write_leaderboard

    board = leaderboard_of(load_scores(cells), one_base_model=False)  # a variant may name its model.base
    write_leaderboard(board, out)
    grids = write_grids(out, cells)
    page = (out / "leaderboard.html").read_text()
    (out / "leaderboard.html").write_text(page.replace("</body>", grids + "</body>"))
    values: dict[str, dict[tuple, dict[str, float]]] = {}
    for cell in cells:
        values.setdefault(cell.variant.label, {}).update(per_image(cell))
    effective = {cell.variant.label: (cell.variant, cell.params) for cell in cells}
    points: dict[str, dict[str, dict]] = {}
    for cell in cells:  # a point's images of every subject and seed pool under its label
        for label, point in sweep_points(cell).items():
            pooled = points.setdefault(cell.variant.label, {}).setdefault(label, {"strategy": point["strategy"],
                                                                                  "values": {}})
            pooled["values"].update(point["values"])
    write_claims(claims_table(values, effective, points=points, warning=board.warning), out)
    if track:
        from subjectops.benchmark.leaderboard import log_leaderboard

        log_leaderboard(out, cells[0].params.tracking.experiment, f"benchmark-{out.name}", skip=("runs",))


def write_grids(out: Path, cells: Sequence[Cell]) -> str:
    """`OUT/grids/<subject>/<variant>/NN.png` and their HTML: per subject, one row per variant, the same prompts and
    seeds side by side (the first images of the first prompt set)."""
    from subjectops.data.prompts import strip_identifier

    root = out / "grids"
    shutil.rmtree(root, ignore_errors=True)
    by_group: dict[str, list[Cell]] = {}
    for cell in cells:
        by_group.setdefault(cell.group, []).append(cell)
    parts = ["<h2>Images</h2><p>Per subject, each variant on the same prompts and seeds (the first images of the "
             "first prompt set).</p>"]
    for group, members in by_group.items():
        samples = {c.variant.label: json.loads((c.run_dir / "infer" / "samples.json").read_text()) for c in members}
        first = samples[members[0].variant.label]
        shown = [s for s in first if s["prompt_set"] == first[0]["prompt_set"]][:GRID_IMAGES]
        head = "".join(f"<th>{html.escape(strip_identifier(s['prompt'], s['identifier']))}<br>seed {s['seed']}</th>"
                       for s in shown)
        rows = []
        for c in members:
            own = {(s["prompt_set"], s["seed"], Path(s["path"]).name): s for s in samples[c.variant.label]}
            cells_html = []
            for i, s in enumerate(shown):
                mine = own.get((s["prompt_set"], s["seed"], Path(s["path"]).name))
                if mine is None:
                    cells_html.append("<td>-</td>")
                    continue
                rel = Path("grids") / group / c.variant.slug / f"{i:02d}.png"
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(c.run_dir / "infer" / mine["path"], out / rel)
                cells_html.append(f"<td><img src=\"{html.escape(rel.as_posix())}\" width=\"128\" height=\"128\" "
                                  f"alt=\"{html.escape(c.variant.label)}\"></td>")
            rows.append(f"<tr><th>{html.escape(c.variant.label)}</th>{''.join(cells_html)}</tr>")
        parts.append(f"<h3>{html.escape(group)}</h3><table class=\"grid\"><tr><th>variant</th>{head}</tr>"
                     f"{''.join(rows)}</table>")
    return "".join(parts)
