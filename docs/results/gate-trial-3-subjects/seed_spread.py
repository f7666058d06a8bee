"""The seed-spread gate rule (benchmark/regression.py) on this folder's DreamBooth leaderboards, read back: each
training seed's benchmark in turn is a clean rerun judged against the other training seeds as one champion, and the
two bugs (training seed 1) against seeds 0, 2 and 3.

These benchmarks predate per-subject seeds: one training seed was shared by the three subjects, which the rule
assumes it is not. The champion's seeds are merged from the per-seed leaderboards' per-subject means (all the rule
reads).

    python docs/results/gate-trial-3-subjects/seed_spread.py > docs/results/gate-trial-3-subjects/seed_spread.md
"""

import json
from pathlib import Path

from subjectops.benchmark.regression import regressions

HERE = Path(__file__).parent
SEEDS = {0: HERE / "all-seeds" / "champion", 1: HERE / "training-seeds" / "clean-1",
         2: HERE / "training-seeds" / "clean-2", 3: HERE / "training-seeds" / "clean-3"}
RERUNS = {f"other training and sampling seed {n}": (HERE / "all-seeds" / f"clean-seed-{n}", (0, 1, 2, 3))
          for n in (1, 2, 3)}
BUGS = {f"{bug}, {seeds}": (HERE / folder / f"bug-{bug}", (0, 2, 3))
        for folder, seeds in (("training-seeds", "training seed 1"), ("all-seeds", "training and sampling seed 1"))
        for bug in ("mirrored-timestep", "lr-100x")}


def board(folder: Path, seed: int | None = None) -> dict:
    """A leaderboard, its groups renamed to `subject@seed-<seed>`."""
    doc = json.loads((folder / "leaderboard.json").read_text())
    if seed is None:
        return doc
    name = {group: f"{group.split('@seed-')[0]}@seed-{seed}" for group in doc["by_subject"]}
    return {**doc, "subjects": [name[g] for g in doc["subjects"]],
            "by_subject": {name[g]: rows for g, rows in doc["by_subject"].items()}}


def champion(seeds) -> dict:
    boards = [board(SEEDS[s], s) for s in seeds]
    return {**boards[0], "subjects": [g for b in boards for g in b["subjects"]],
            "by_subject": {g: rows for b in boards for g, rows in b["by_subject"].items()}}


def line(name: str, found: list[dict], seeds) -> str:
    verdict = "<br>".join(f"{r['column']} change {r['subject_change']['change']:+.4f} "
                          f"(p = {r['subject_change']['p']:.2g} < {r['subject_change']['level']:.2g})"
                          for r in found) or "passes"
    return f"| {name} | {', '.join(map(str, seeds))} | {verdict} |"


rows = [line(f"training seed {k} (held out)", regressions(board(SEEDS[k], k), champion(others), "seed-spread"),
             others) for k in SEEDS for others in [tuple(s for s in SEEDS if s != k)]]
rows += [line(name, regressions(board(folder), champion(seeds), "seed-spread"), seeds)
         for name, (folder, seeds) in {**RERUNS, **BUGS}.items()]
print("| benchmark | champion's training seeds | gate `seed-spread` |\n|---|---|---|\n" + "\n".join(rows))
