"""How close each benchmark of this trial came to failing the two t-test gate rules: per benchmark and rule, the
gated column with the smallest p-value, its per-subject change and the level it is tested at (0.05 / the number of
gated columns). Read back from the committed leaderboards with the project's own tests (benchmark/regression.py).

    cd docs/results/gate-trial-dreambooth-3-subjects && python closest.py > closest.md
"""

import json
from pathlib import Path

from subjectops.benchmark.regression import TESTS, gated_columns

HERE = Path(__file__).parent
BENCHMARKS = {"clean rerun (seed 5)": ("clean-seed-5", "champion")}
BENCHMARKS |= {f"champion seed {k}, held out": (f"held-out-seed-{k}/clean", f"held-out-seed-{k}/champion")
               for k in range(4)}
BENCHMARKS |= {f"{bug} (seed 4)": (f"bug-{bug}", "champion") for bug in ("mirrored-timestep", "lr-100x")}


def load(rel: str) -> dict:
    return json.loads((HERE / rel / "leaderboard.json").read_text())


def closest(board: dict, champion: dict, rule: str) -> str:
    gated = gated_columns(board, champion)
    tests = [(TESTS[rule](board, champion, row, column, higher, len(gated)), column)
             for row, column, _, _, higher, _ in gated]
    t, column = min(tests, key=lambda x: x[0]["p"])
    return f"{column} {t['change']:+.4f}, p = {t['p']:.2g} (level {t['level']:.2g})"


print("| benchmark | `subject-paired`: closest column | `seed-spread`: closest column |\n|---|---|---|")
for name, (ours, theirs) in BENCHMARKS.items():
    board, champion = load(ours), load(theirs)
    print(f"| {name} | " + " | ".join(closest(board, champion, rule) for rule in TESTS) + " |")
