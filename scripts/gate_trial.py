"""Both errors of the benchmark's regression gate (issue 25, item 3), measured: a clean champion benchmark, clean
reruns with other seeds (every failed gate is a false alarm), and one benchmark per bug of `inject_bug.py` (caught
when a variant the bug breaks regresses; a regression of another variant is noise), each gated against the champion
with `--champion`.

    python scripts/gate_trial.py --out DIR --subjects SUBJECT [--subjects ...] [--methods dreambooth,lora]
                                 [--model world-sd15] [--champion-seeds 0 | --champion BENCHMARK_DIR]
                                 [--clean-seeds 1,2,3] [--bug-seed 1] [--leave-one-out]
                                 [--bugs mirrored-timestep,lr-100x,lora-not-loaded] [--set KEY=VALUE ...]

The bugged benchmarks use the seed of the first clean rerun, so each differs from a clean benchmark only by its bug,
and run only the methods their bug breaks (a regression of another method would be noise). `--champion` takes a
finished benchmark of the same methods, subjects and settings (for example the full world benchmark) instead of
running one.
A champion of several seeds (`--champion-seeds 0,1,2,3`, one benchmark run with `--seeds 0,1,2,3`) is what the
seed-spread rule judges against. With `--leave-one-out`, each of its seeds is also a clean rerun, judged against the
champion of the other seeds (`DIR/held-out-seed-N/{champion,clean}`: benchmarks whose cells link to the champion's,
so nothing is trained again).
Every benchmark is `subjectops benchmark run` in its own process and folder (`DIR/champion`, `DIR/clean-seed-N`,
`DIR/bug-NAME`); a stopped trial resumes where it stopped (finished benchmarks are read back, not redone). Writes
`DIR/trial.{json,md}`: per benchmark and gate rule (benchmark/regression.py, each applied to the same leaderboards;
a rule the champion cannot serve, such as seed-spread against one seed, is marked as not applied) the regressed
(variant, metric) pairs, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from inject_bug import BUGS, inject  # noqa: E402

from subjectops.benchmark.local import parse_variant  # noqa: E402
from subjectops.benchmark.regression import GATE_RULES, check_rule, regressions, seeds_per_subject  # noqa: E402
from subjectops.errors import SubjectopsError  # noqa: E402


def benchmark(out: Path, seeds: str, args, champion: Path | None, src: Path | None, methods: str) -> dict:
    """One benchmark (skipped when `out` holds a finished one): its gate, regressions and wall time."""
    record = out / "trial-entry.json"
    where = {"board": str(out), "champion": None if champion is None else str(champion)}
    if record.is_file():
        return {**json.loads(record.read_text()), **where}
    command = [sys.executable, "-m", "subjectops.cli", "benchmark", "run", "--model", args.model,
               "--methods", methods, "--out", str(out), "--seeds", seeds, "--no-track",
               *[a for s in args.subjects for a in ("--subjects", str(s))],
               *[a for s in args.set for a in ("--set", s)],
               *(["--champion", str(champion)] if champion else [])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(src) if src else None,
                                                                     os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    print(f"[gate trial] {out.name}: {' '.join(command[3:])}", flush=True)
    done = subprocess.run(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    seconds = round(time.perf_counter() - start)
    gate = json.loads((out / "gate.json").read_text()) if (out / "gate.json").is_file() else None
    if champion is None and done.returncode != 0 or champion is not None and gate is None:
        sys.exit(f"{out.name} failed ({done.returncode}) without a gate verdict:\n{done.stderr[-4000:]}")
    entry = {"name": out.name, "seed": seeds, "exit_code": done.returncode, "seconds": seconds,
             "gate": None if gate is None else ("passed" if gate["passed"] else "failed")}
    record.write_text(json.dumps(entry, indent=2))
    entry.update(where)
    print(f"[gate trial] {out.name}: gate {entry['gate']}, {seconds} s", flush=True)
    return entry


def champion_seeds(champion: Path) -> list[int]:
    board = json.loads((champion / "leaderboard.json").read_text())
    return sorted({int(group.split("@seed-")[1]) for groups in seeds_per_subject(board).values() for group in groups
                   if "@seed-" in group})


def held_out(champion: Path, seed: int, args) -> dict:
    """Champion seed `seed` as a clean rerun against the champion of its other seeds: two benchmarks whose cells are
    links to the champion's finished cells (each benchmark only writes its leaderboard)."""
    fold = args.out / f"held-out-seed-{seed}"
    others = [s for s in champion_seeds(champion) if s != seed]
    for part, seeds in (("champion", others), ("clean", [seed])):
        for cell in sorted((champion / "runs").glob("*/*/seed-*")):
            if int(cell.name.removeprefix("seed-")) in seeds:
                link = fold / part / cell.relative_to(champion)
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(cell.resolve(), target_is_directory=True)
    benchmark(fold / "champion", ",".join(map(str, others)), args, None, None, args.methods)
    return {**benchmark(fold / "clean", str(seed), args, fold / "champion", None, args.methods),
            "name": f"held-out-seed-{seed}"}


def applies(rule: str, champion: dict) -> bool:
    """Whether the champion can serve the rule (seed-spread needs a champion of several seeds)."""
    try:
        check_rule(rule, len(seeds_per_subject(champion)), champion)
    except SubjectopsError:
        return False
    return True


def judged(entry: dict) -> dict:
    """The entry with each gate rule's regressions of its leaderboard against its champion's (None: not applied)."""
    if entry["champion"] is None:
        return entry
    board = json.loads((Path(entry["board"]) / "leaderboard.json").read_text())
    champion = json.loads((Path(entry["champion"]) / "leaderboard.json").read_text())
    return {**entry, "rules": {rule: [
        {"variant": r["variant"], "column": r["column"],
         "interval": [round(r[k], 4) for k in ("mean", "low", "high")],
         "champion": [round(r["champion"][k], 4) for k in ("mean", "low", "high")],
         **({"subject_change": r["subject_change"]} if "subject_change" in r else {})}
        for r in regressions(board, champion, rule)] if applies(rule, champion) else None for rule in GATE_RULES}}


def markdown(trial: dict) -> str:
    def one(r: dict) -> str:
        if "subject_change" in r:
            c = r["subject_change"]
            return (f"{r['variant']}: {r['column']} change {c['change']:+.4f} over {c['subjects']} subjects "
                    f"(p = {c['p']:.2g})")
        return (f"{r['variant']}: {r['column']} {r['interval'][0]} [{r['interval'][1]}, {r['interval'][2]}] vs "
                f"{r['champion'][0]} [{r['champion'][1]}, {r['champion'][2]}]")

    def found(regressed: list[dict] | None) -> str:
        return "not applied" if regressed is None else "<br>".join(one(r) for r in regressed) or "passes"

    lines = [f"Regression-gate trial: {trial['methods']} on {', '.join(trial['subjects'])} ({trial['model']}), "
             f"champion seeds {trial['champion_seeds']}", "",
             "| benchmark | seed | " + " | ".join(f"gate `{rule}`: regressed (variant: metric, mean [95%] vs the "
                                                    "champion's)" for rule in GATE_RULES) + " | wall |",
             "|---|---|" + "---|" * len(GATE_RULES) + "---|"]
    for e in trial["benchmarks"]:
        cells = ["champion"] * len(GATE_RULES) if "rules" not in e else [found(e["rules"][r]) for r in GATE_RULES]
        lines.append(f"| {e['name']} | {e['seed']} | " + " | ".join(cells) + f" | {e['seconds']} s |")
    lines.append("")
    for rule, errors in trial["errors"].items():
        lines.append(f"- `{rule}`: false alarms {errors['false_alarms']} of {errors['clean_reruns']} clean reruns; "
                     f"bugs caught {errors['bugs_caught']} of {errors['bugs']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--subjects", type=Path, action="append", required=True)
    ap.add_argument("--methods", default="dreambooth,lora")
    ap.add_argument("--model", default="world-sd15")
    ap.add_argument("--champion-seeds", default="0", help="the champion benchmark's --seeds (several for the "
                    "seed-spread rule)")
    ap.add_argument("--champion", type=Path, default=None, help="a finished benchmark's folder to use as the "
                    "champion instead of running one (same methods, subjects and --set)")
    ap.add_argument("--clean-seeds", default="1,2,3")
    ap.add_argument("--leave-one-out", action="store_true", help="each champion seed is also a clean rerun, judged "
                    "against the champion of the others")
    ap.add_argument("--bug-seed", type=int, default=None, help="default: the first clean seed")
    ap.add_argument("--bugs", default=",".join(BUGS))
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE for every benchmark (repeatable)")
    args = ap.parse_args()
    clean_seeds = [int(s) for s in args.clean_seeds.split(",") if s]
    bugs = [b for b in args.bugs.split(",") if b]
    unknown = sorted(set(bugs) - set(BUGS))
    if unknown:
        sys.exit(f"unknown bug(s) {', '.join(unknown)}; inject_bug.py knows {', '.join(BUGS)}")
    broken = {bug: ",".join(v for v in args.methods.split(",") if BUGS[bug].breaks(parse_variant(v).method))
              for bug in bugs}
    idle = sorted(bug for bug, methods in broken.items() if not methods)
    if idle:
        sys.exit(f"bug(s) {', '.join(idle)} break none of --methods {args.methods}; add a method they break or drop "
                 "them from --bugs")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.champion is None:
        champion = args.out / "champion"
        entries = [benchmark(champion, args.champion_seeds, args, None, None, args.methods)]
    else:
        champion = args.champion
        entries = [{"name": "champion", "seed": f"{champion} (given)", "exit_code": 0, "seconds": 0, "gate": None,
                    "champion": None}]
    entries += [benchmark(args.out / f"clean-seed-{s}", str(s), args, champion, None, args.methods)
                for s in clean_seeds]
    if args.leave_one_out:
        entries += [held_out(champion, s, args) for s in champion_seeds(champion)]
    for bug in bugs:
        src = args.out / "sources" / bug / "src"
        if not src.is_dir():
            inject(bug, src.parent)
        seed = clean_seeds[0] if args.bug_seed is None else args.bug_seed
        entries.append(benchmark(args.out / f"bug-{bug}", str(seed), args, champion, src, broken[bug]))
    entries = [judged(e) for e in entries]
    clean = [e for e in entries if e["name"].startswith(("clean-", "held-out-"))]
    bugged = [e for e in entries if e["name"].startswith("bug-")]

    def caught(entry: dict, rule: str) -> bool:
        """A regression of a variant whose method the bug breaks (another variant's is a false alarm)."""
        bug = BUGS[entry["name"].removeprefix("bug-")]
        return any(bug.breaks(parse_variant(r["variant"]).method) for r in entry["rules"][rule])

    def errors(rule: str) -> dict:
        served = [e for e in clean if e["rules"][rule] is not None]
        tried = [e for e in bugged if e["rules"][rule] is not None]
        return {"false_alarms": sum(bool(e["rules"][rule]) for e in served), "clean_reruns": len(served),
                "bugs_caught": sum(caught(e, rule) for e in tried), "bugs": len(tried)}

    trial = {"model": args.model, "methods": args.methods, "subjects": [s.name for s in args.subjects],
             "champion_seeds": args.champion_seeds if args.champion is None else champion_seeds(champion),
             "champion": str(champion), "sets": args.set, "benchmarks": entries,
             "errors": {rule: errors(rule) for rule in GATE_RULES}}
    (args.out / "trial.json").write_text(json.dumps(trial, indent=2))
    (args.out / "trial.md").write_text(markdown(trial))
    print(markdown(trial))


if __name__ == "__main__":
    main()
