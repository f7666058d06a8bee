"""The papers' comparative claims, put to the test on what a benchmark ran (`OUT/claims.{html,md,json}`).

Each claim is declared once here: what the paper says, the paper (its seed id, as the README's papers table lists
them) and its numbers, the variants it needs, and the tests that decide it. A test compares two variants on one
metric, paired over the images both drew (same subject, benchmark seed, prompt set, prompt and seed): the world's
number is the mean per-image difference, oriented so that positive means "better" by the metric's definition, with
its 95% bootstrap interval (selection/compare.py `interval`).

- `better`: holds when the interval lies above 0, does not hold when it lies below 0, else inconclusive.
- `not-worse` (margin m): holds when the interval lies above -m, does not hold when it lies below -m.
- `within` (margin m, "about constant"): holds when the interval lies inside [-m, m], does not hold when it lies
  outside, else inconclusive.
- a front claim (DreamBlend, seed 003 sec. 2) reads the sweep's operating points of the run (RUN/sweep): a DreamBlend
  point advances the checkpoints' front when, against every checkpoint point, it is better on DINO or on CLIP-T
  (paired interval above 0); it is dominated when some checkpoint point is better on one (interval below 0) and it is
  better on neither. Holds when a DreamBlend point advances the front, does not hold when every one is dominated.

A claim holds when every test holds, does not hold when one does not, and is inconclusive otherwise (a test
without paired images, e.g. a prompt set the benchmark did not draw, is inconclusive and says why). Only claims
whose variants were all run get a row; the others are listed with what they need.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from subjectops.selection.compare import LEADERBOARD_CSS

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
MODEL_KEY = "model.base"
# Prior preservation (DreamBooth sec. 4.3) is measured on class-prompt images: PRES, how much they look like the
# subject (lower: less drift), and DIV, how much they differ from each other (higher: more diverse).
OWN_DIRECTIONS = {"pres": False, "div": True}


def higher_is_better(metric: str) -> bool:
    from subjectops.metrics.definitions import METRICS

    return OWN_DIRECTIONS[metric] if metric in OWN_DIRECTIONS else METRICS[metric].higher_is_better


@dataclass(frozen=True)
class Needs:
    """A variant a claim needs: the method, its strategy (None: the method's own) and settings its params must
    have (a run's own settings must all be among them, so a retuned run never stands in for the paper's)."""

    method: str
    strategy: Optional[str] = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.method + (f"@{self.strategy}" if self.strategy else "") + "".join(
            f"+{k}={json.dumps(v)}" for k, v in self.settings)

    def matches(self, variant, params) -> bool:
        from subjectops.methods import get_method

        if variant.method != self.method:
            return False
        if params.infer.strategy != (self.strategy or get_method(self.method).default_strategy):
            return False
        fixed = dict(self.settings)
        # the base model is not a method setting: `alchemy+model.base=world-sdxl` is Image-Alchemy as the paper runs
        # it, and which model each side of a test ran on is in its run label
        if any(key not in fixed for key, _ in variant.settings if key != MODEL_KEY):
            return False
        dumped = params.model_dump(mode="json")
        for key, value in fixed.items():
            node: Any = dumped
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return False
                node = node[part]
            if node != value:
                return False
        return True


@dataclass(frozen=True)
class Test:
    kind: str  # better | not-worse | within
    metric: str
    a: Needs  # better than / not worse than / about equal to `b`
    b: Needs
    prompt_sets: Optional[tuple[str, ...]] = None  # None: every prompt set both drew
    margin: float = 0.0


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str
    paper: str  # seed id
    paper_numbers: str
    tests: tuple[Test, ...]
    note: str = ""  # what the row should be read with (the paper's model, what the world lacks)
    front: Optional[Needs] = None  # a front claim: the variant whose sweep points are compared
    # a reason the comparison is not the paper's (None: it is), from the needed variants' params by method
    condition: Optional[Callable[[Mapping[str, Any]], Optional[str]]] = None

    @property
    def needs(self) -> list[Needs]:
        tested = [n for t in self.tests for n in (t.a, t.b)]
        return list(dict.fromkeys(tested + ([self.front] if self.front else [])))


def _same_or_fewer_unet_steps(params: Mapping[str, Any]) -> Optional[str]:
    two, db = params["two-stage"].finetune.two_stage.unet_steps, params["dreambooth"].finetune.dreambooth.steps
    return None if two <= db else f"two-stage trains the UNet {two} steps, DreamBooth {db}: more, not the same or " \
                                  "fewer"


DB, TI = Needs("dreambooth"), Needs("textual-inversion")
HIFI = "finetune.hifi_tuner"
# seed 001 Table 2's ablation chain: textual inversion's objective, then each component added in turn
HIFI_STEPS = [
    Needs("hifi-tuner", "plain", ((f"{HIFI}.mask_guidance", False), (f"{HIFI}.reg_weight", 0.0),
                                  (f"{HIFI}.stepwise_steps", 0))),
    Needs("hifi-tuner", "plain", ((f"{HIFI}.mask_guidance", True), (f"{HIFI}.reg_weight", 0.0),
                                  (f"{HIFI}.stepwise_steps", 0))),
    Needs("hifi-tuner", "plain", ((f"{HIFI}.mask_guidance", True), (f"{HIFI}.stepwise_steps", 0))),
    Needs("hifi-tuner", "plain", ((f"{HIFI}.mask_guidance", True),)),
    Needs("hifi-tuner", "reference-guided", ((f"{HIFI}.mask_guidance", True),)),
]
HIFI_STEP_NAMES = ["mask guidance", "parameter regularization", "step-wise subject representations",
                   "reference-guided generation"]
HIFI_DINO = [0.567, 0.606, 0.612, 0.626, 0.665]
CLIP_T_CONSTANT = 0.01  # "about constant CLIP-T": Table 2's CLIP-T moves by at most 0.006 along the chain

CLAIMS: tuple[Claim, ...] = (
    Claim("db-over-ti-dino", "DreamBooth above textual inversion on DINO", "001",
          "Table 1: DINO 0.668 vs 0.569", (Test("better", "dino", DB, TI),)),
    Claim("ti-lowest-clip-t", "textual inversion below DreamBooth on CLIP-T", "001",
          "Table 1: CLIP-T 0.305 vs 0.255", (Test("better", "clip-t", DB, TI),)),
    Claim("hifi-over-ti", "HiFi Tuner above textual inversion on DINO", "001",
          "Table 2: DINO 0.665 vs 0.567", (Test("better", "dino", Needs("hifi-tuner"), TI),)),
    *(Claim(f"hifi-ablation-{i + 1}", f"HiFi Tuner: adding {name} raises DINO at about constant CLIP-T", "001",
            f"Table 2: DINO {HIFI_DINO[i]} -> {HIFI_DINO[i + 1]}",
            (Test("better", "dino", HIFI_STEPS[i + 1], HIFI_STEPS[i]),
             Test("within", "clip-t", HIFI_STEPS[i + 1], HIFI_STEPS[i], margin=CLIP_T_CONSTANT)))
      for i, name in enumerate(HIFI_STEP_NAMES)),
    Claim("reference-guidance-over-db", "reference-guided generation raises DreamBooth's DINO", "001",
          "Table 2: DINO 0.662 -> 0.680",
          (Test("better", "dino", Needs("dreambooth", "reference-guided"), Needs("dreambooth", "plain")),)),
    Claim("alchemy-over-db", "Image-Alchemy's two-stage generation above DreamBooth on DINO, scene fidelity kept "
          "(the paper's output: the img2img image)", "002", "Table 1: DINO 0.789 vs 0.668",
          (Test("better", "dino", Needs("alchemy", settings=(("infer.alchemy.composite", False),)), DB),
           Test("not-worse", "world-scene", Needs("alchemy", settings=(("infer.alchemy.composite", False),)), DB,
                margin=0.05)),
          note="the paper's Alchemy runs on SDXL, its DreamBooth on SD 1.5; here DreamBooth on Alchemy's model when "
               "the benchmark ran it there (e.g. dreambooth+model.base=world-sdxl), the run labels say which"),
    Claim("alchemy-composite-over-db", "Image-Alchemy with the feathered composite (the project's addition) above "
          "DreamBooth on DINO, scene fidelity kept", "002", "Table 1: DINO 0.789 vs 0.668 (without the composite)",
          (Test("better", "dino", Needs("alchemy", settings=(("infer.alchemy.composite", True),)), DB),
           Test("not-worse", "world-scene", Needs("alchemy", settings=(("infer.alchemy.composite", True),)), DB,
                margin=0.05))),
    Claim("two-stage-over-db", "TI -> DreamBooth two-stage above DreamBooth at the same or fewer UNet steps", "004",
          "Table 1: DINO 0.718 vs 0.690 (simple prompt), 0.629 vs 0.540 (diverse)",
          (Test("better", "dino", Needs("two-stage"), DB), Test("better", "clip-t", Needs("two-stage"), DB)),
          note="the paper trains on SD 2.1-base",
          condition=_same_or_fewer_unet_steps),
    Claim("dreamblend-advances-front", "DreamBlend's points advance the front of the checkpoints alone (CLIP-T, DINO)",
          "003", "sec. 2 and fig. 1: DreamBlend beyond the checkpoints' trade-off", (),
          front=Needs("dreambooth", "dreamblend")),
    *(Claim(f"hypnos-over-db-{ps}", f"Hypnos above DreamBooth on the subject region ({ps} prompts)", "000",
            f"Table {1 if ps == 'prompt-invariant' else 2}: DINO and CLIP-I higher on 2 of 3 subjects",
            (Test("better", "dino-subject", Needs("hypnos"), DB, sets),
             Test("better", "clip-i-subject", Needs("hypnos"), DB, sets)), note=note)
      for ps, sets, note in (
          ("prompt-invariant", ("prompt-invariant",), ""),
          # the project's mapping, not the paper's: on the world's models the `world` set (DreamBench's contexts
          # the world can draw) is the varying prompts; the paper's prompt-varying set has words the world lacks
          ("prompt-varying", ("prompt-varying", "world"),
           "varying prompts: the prompt-varying set, and on the world's models the world set (DreamBench's "
           "contexts the world can draw)"))),
    *(Claim(f"prior-preservation-{m}", f"{m} with class-prior preservation drifts less (PRES) and keeps class "
            "images diverse (DIV)", "DreamBooth",
            "DreamBooth sec. 4.3 (PRES lower, DIV higher with the prior loss; not among the five seed papers)",
            (Test("better", "pres", Needs(m, settings=((f"finetune.{m}.prior_preservation", True),)),
                  Needs(m, settings=((f"finetune.{m}.prior_preservation", False),))),
             Test("better", "div", Needs(m, settings=((f"finetune.{m}.prior_preservation", True),)),
                  Needs(m, settings=((f"finetune.{m}.prior_preservation", False),)))))
      for m in ("dreambooth", "lora")),
)


def paired(a: Mapping[tuple, Mapping[str, float]], b: Mapping[tuple, Mapping[str, float]], metric: str,
           prompt_sets: Optional[Sequence[str]]) -> tuple[list[float], list[float]]:
    """The metric's values of the images both variants drew, in the same order (key: group, prompt set, image,
    seed)."""
    keys = sorted(k for k in a.keys() & b.keys() if metric in a[k] and metric in b[k]
                  and (prompt_sets is None or k[1] in prompt_sets))
    return [a[k][metric] for k in keys], [b[k][metric] for k in keys]


def decide(test: Test, a: list[float], b: list[float]) -> dict:
    """One test's world numbers and verdict from the paired per-image values."""
    from subjectops.selection.compare import interval

    if not a:
        where = (f" on {' or '.join(test.prompt_sets)} (the benchmark's --set infer.prompt_sets must include "
                 f"{' or '.join(test.prompt_sets)})") if test.prompt_sets else ""
        return {"kind": test.kind, "metric": test.metric, "n_pairs": 0, "verdict": INCONCLUSIVE,
                "why": f"no image both drew with {test.metric}{where}"}
    sign = 1.0 if higher_is_better(test.metric) else -1.0
    diff_mean, low, high = interval([sign * (x - y) for x, y in zip(a, b)])
    m = test.margin
    if test.kind == "better":
        verdict = HOLDS if low > 0 else FAILS if high < 0 else INCONCLUSIVE
    elif test.kind == "not-worse":
        verdict = HOLDS if low > -m else FAILS if high < -m else INCONCLUSIVE
    elif test.kind == "within":
        verdict = HOLDS if -m <= low and high <= m else FAILS if low > m or high < -m else INCONCLUSIVE
    else:
        raise ValueError(f"unknown test kind {test.kind!r}")
    return {"kind": test.kind, "metric": test.metric, "prompt_sets": list(test.prompt_sets or []),
            "margin": m, "n_pairs": len(a), "a": dict(zip(("mean", "low", "high"), interval(a))),
            "b": dict(zip(("mean", "low", "high"), interval(b))),
            "difference": {"mean": diff_mean, "low": low, "high": high}, "verdict": verdict}


FRONT_METRICS = ("dino", "clip-t")


def decide_front(points: Mapping[str, Mapping]) -> list[dict]:
    """Each DreamBlend point against every checkpoint point (see the module): `points` is point label ->
    {"strategy", "values"} with per-image values keyed as `paired` reads them."""
    from subjectops.selection.compare import interval

    checkpoints = {k: p for k, p in points.items() if p["strategy"] != "dreamblend"}
    blends = {k: p for k, p in points.items() if p["strategy"] == "dreamblend"}
    if not checkpoints or not blends:
        return [{"kind": "front", "metric": "dino, clip-t", "n_pairs": 0, "verdict": INCONCLUSIVE,
                 "why": "the sweep has no " + ("checkpoint" if not checkpoints else "DreamBlend") + " point"}]
    out = []
    for label, point in blends.items():
        against, advances, dominated, n = {}, True, False, 0
        for other, check in checkpoints.items():
            diffs = {}
            for metric in FRONT_METRICS:
                a, b = paired(point["values"], check["values"], metric, None)
                n = max(n, len(a))
                mean, low, high = interval([x - y for x, y in zip(a, b)]) if a else (0.0, 0.0, 0.0)
                diffs[metric] = {"mean": mean, "low": low, "high": high}
            better = any(d["low"] > 0 for d in diffs.values())
            advances = advances and better
            dominated = dominated or (not better and any(d["high"] < 0 for d in diffs.values()))
            against[other] = diffs
        status = "advances the front" if advances else "dominated" if dominated else "undecided"
        out.append({"kind": "front", "metric": "dino, clip-t", "point": label, "status": status, "n_pairs": n,
                    "against": against,
                    "verdict": HOLDS if advances else FAILS if dominated else INCONCLUSIVE})
    return out


def first_match(need: Needs, runs: Mapping[str, tuple], model: Optional[str] = None) -> Optional[str]:
    """The first run (in the benchmark's variant order) that `need` matches, one on `model` first when given: a
    benchmark that ran DreamBooth on world-sd15 and world-sdxl compares Image-Alchemy (world-sdxl) with the
    world-sdxl one."""
    matching = [label for label, (v, p) in runs.items() if need.matches(v, p)]
    on_model = [label for label in matching if runs[label][1].model.base == model]
    return (on_model or matching or [None])[0]


def combine(verdicts: Sequence[str]) -> str:
    return FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE


def claims_table(values: Mapping[str, Mapping[tuple, Mapping[str, float]]], runs: Mapping[str, tuple],
                 claims: Sequence[Claim] = CLAIMS, points: Optional[Mapping[str, Mapping]] = None,
                 warning: Optional[str] = None) -> dict:
    """Rows for the claims whose variants were all run. `values`: run label -> per-image values (local.per_image);
    `runs`: run label -> (Variant, Params); `points`: run label -> its sweep's points (local.sweep_points);
    `warning`: what the numbers measure (the leaderboard's first line: random backbones, or the miniature world)."""
    rows, not_run = [], []
    for claim in claims:
        found = {n.label: first_match(n, runs) for n in claim.needs}
        if None in found.values():
            not_run.append({"id": claim.id, "needs": [k for k, v in found.items() if v is None]})
            continue
        tests = []
        for t in claim.tests:
            a_run = found[t.a.label]
            b_run = first_match(t.b, runs, model=runs[a_run][1].model.base)  # both sides on one model if run
            a, b = paired(values[a_run], values[b_run], t.metric, t.prompt_sets)
            tests.append(dict(decide(t, a, b), a_run=a_run, b_run=b_run))
        if claim.front is not None:
            tests = [dict(t, a_run=found[claim.front.label]) for t in decide_front((points or {}).get(
                found[claim.front.label], {}))]
            # the claim is that some DreamBlend point advances the front
            verdicts = [t["verdict"] for t in tests]
            verdict = HOLDS if HOLDS in verdicts else FAILS if verdicts and all(v == FAILS for v in verdicts) \
                else INCONCLUSIVE
        else:
            verdict = combine([t["verdict"] for t in tests])
        caveat = claim.condition({n.method: runs[found[n.label]][1] for n in claim.needs}) if claim.condition \
            else None
        if caveat and verdict == HOLDS:
            verdict = INCONCLUSIVE  # it held, but not under the paper's condition
        rows.append({"id": claim.id, "claim": claim.claim, "paper": claim.paper, "paper_numbers": claim.paper_numbers,
                     "needs": found, "tests": tests, "verdict": verdict, "note": claim.note, "caveat": caveat})
    return {"rows": rows, "not_run": not_run, "warning": warning,
            "decided_by": "paired per-image differences, 95% bootstrap interval: above 0 holds, below 0 does not "
                          "hold, overlapping 0 inconclusive (margins for `within` and `not-worse`)"}


def _test_text(t: dict) -> str:
    if not t["n_pairs"]:
        return f"{t['metric']}: {t['why']}"
    if t["kind"] == "front":
        worst = min(t["against"].items(), key=lambda kv: max(d["low"] for d in kv[1].values()))
        return (f"{t['a_run']} {t['point']}: {t['status']} ({len(t['against'])} checkpoint points, {t['n_pairs']} "
                f"pairs; hardest: {worst[0]}, " + ", ".join(
                    f"{m} {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" for m, d in worst[1].items()) + ")")
    d = t["difference"]
    return (f"{t['metric']}{' (' + ', '.join(t['prompt_sets']) + ')' if t['prompt_sets'] else ''}: "
            f"{t['a_run']} {t['a']['mean']:.4f} vs {t['b_run']} {t['b']['mean']:.4f}, difference {d['mean']:+.4f} "
            f"[{d['low']:+.4f}, {d['high']:+.4f}], {t['n_pairs']} pairs, {t['kind']}"
            + (f" (margin {t['margin']})" if t["kind"] != "better" else "") + f": {t['verdict']}")


def _paper(row: dict) -> str:
    return f"seed {row['paper']}" if row["paper"].isdigit() else row["paper"]


def markdown(table: dict) -> str:
    lines = ([f"**{table['warning']}**", ""] if table.get("warning") else []) + [
        "Claims of the papers in this benchmark; " + table["decided_by"], "",
             "| claim | paper | paper's numbers | world's numbers | verdict |", "|---|---|---|---|---|"]
    for r in table["rows"]:
        world = "<br>".join(_test_text(t) for t in r["tests"])
        notes = "".join(f"<br>*{n}*" for n in (r["note"], r["caveat"]) if n)
        lines.append(f"| {r['claim']}{notes} | {_paper(r)} | {r['paper_numbers']} | {world} | "
                     f"**{r['verdict']}** |")
    if table["not_run"]:
        lines += ["", "Not run (their variants are missing): " + "; ".join(
            f"{n['id']} needs {', '.join(n['needs'])}" for n in table["not_run"])]
    return "\n".join(lines) + "\n"


def page(table: dict) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r['claim'])}"
        + "".join(f"<br><em>{html.escape(n)}</em>" for n in (r["note"], r["caveat"]) if n)
        + f"</td><td>{html.escape(_paper(r))}</td><td>{html.escape(r['paper_numbers'])}</td><td>"
        + "<br>".join(html.escape(_test_text(t)) for t in r["tests"])
        + f"</td><td class=\"verdict {r['verdict'].replace(' ', '-')}\">{html.escape(r['verdict'])}</td></tr>"
        for r in table["rows"])
    missing = "".join(f"<li>{html.escape(n['id'])}: needs {html.escape(', '.join(n['needs']))}</li>"
                      for n in table["not_run"])
    banner = (f"<p class=\"warning\" id=\"quality-warning\">{html.escape(table['warning'])}</p>"
              if table.get("warning") else "")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>subjectops claims</title><style>"
            f"{LEADERBOARD_CSS}td{{vertical-align:top;max-width:520px}}.holds{{background:#d4f4d4}}"
            ".does-not-hold{background:#f6d0d0}.inconclusive{background:#eee}td.verdict{font-weight:600}"
            f"</style></head><body>{banner}<h1>The papers' claims</h1>"
            f"<p>{html.escape(table['decided_by'])}</p><table class=\"claims\"><tr><th>claim</th><th>paper</th>"
            f"<th>paper's numbers</th><th>world's numbers</th><th>verdict</th></tr>{rows}</table>"
            + (f"<h2>Not run</h2><ul>{missing}</ul>" if missing else "") + "</body></html>")


def write_claims(table: dict, out: Path) -> Path:
    out = Path(out)
    (out / "claims.json").write_text(json.dumps(table, indent=2))
    (out / "claims.md").write_text(markdown(table))
    (out / "claims.html").write_text(page(table))
    return out
