"""Promotion gates as a pure function: no MLflow, no I/O.

`evaluate_gates(challenger, champion, gates_cfg)` compares two evaluations and returns a
`GateDecision`. It is used by `subjectops promote` and by the Kubeflow benchmark pipeline to fail a
regression run.

An evaluation is the evaluate stage's `RUN/evaluate/metrics.json` document, its list of metric records
(`[{metric, key, prompt_set, backbone, pretrained, n_pairs, mean, std}]`), or a summary
`{"records": [...], "seeds": {prompt_set: {n, sha256}}, "prompt_sets": {name: "version:digest"}}` as the
register stage stores it with each model version.

Decision status:
- "passed": every gate held on every compared (prompt set, backbone);
- "failed": the comparison is valid and at least one gate did not hold;
- "refused": the numbers cannot be compared (different backbones, prompt sets, prompt set versions,
  seeds or sample counts; a random backbone; a gated metric missing). A refused comparison never
  promotes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

from subjectops.config import GateCfg, RegistryCfg
from subjectops.digest import digest_json
from subjectops.metrics.definitions import METRICS

REQUIRED_FIELDS = ("metric", "prompt_set", "backbone", "mean")


def normalize_records(records) -> list[dict]:
    """Rows with `metric` as the machine name (`dino`, `clip-t`): metrics.json names it `key` (its `metric`
    is the display name); rows of a stored summary already carry the machine name."""
    return [dict(r, metric=r["key"]) if "key" in r else dict(r) for r in records or [] if isinstance(r, Mapping)]


def seeds_digest(seeds: Sequence) -> dict:
    """How many samples a prompt set has and which seeds: equal for two evaluations of the same samples."""
    return {"n": len(seeds), "sha256": digest_json(sorted(seeds, key=str))}


def summary_from_metrics_json(data: Mapping) -> dict:
    """An evaluation summary (records, prompt set versions, seeds) from the evaluate stage's metrics.json."""
    missing = [k for k in ("metrics", "prompt_sets", "per_image") if k not in data]
    if missing:
        raise ValueError(f"not an evaluate stage's metrics.json: it lacks {', '.join(missing)}")
    seeds: dict[str, list] = {}
    for row in data["per_image"]:
        seeds.setdefault(str(row["prompt_set"]), []).append(row["seed"])
    return {
        "records": normalize_records(data["metrics"]),
        "prompt_sets": {str(ps["name"]): f"{ps['version']}:{ps['digest']}" for ps in data["prompt_sets"]},
        "seeds": {ps: seeds_digest(v) for ps, v in seeds.items()},
    }


@dataclass(frozen=True)
class Evaluation:
    records: tuple[dict, ...]
    seeds: Mapping[str, Any] = field(default_factory=dict)
    prompt_sets: Mapping[str, Any] = field(default_factory=dict)
    # why the run's own records contradict its numbers' claims (tracking.provenance): never promoted
    unverified: tuple[str, ...] = ()

    @staticmethod
    def of(obj: Evaluation | Mapping | Sequence[Mapping] | None) -> Evaluation | None:
        if obj is None or isinstance(obj, Evaluation):
            return obj
        if isinstance(obj, Mapping):
            if "records" not in obj:
                if "metrics" not in obj:
                    raise ValueError("an evaluation needs 'records' (a summary) or 'metrics' "
                                     "(a metrics.json document)")
                obj = summary_from_metrics_json(obj)
            return Evaluation(tuple(normalize_records(obj["records"])), dict(obj.get("seeds") or {}),
                              dict(obj.get("prompt_sets") or {}), tuple(obj.get("unverified") or ()))
        return Evaluation(tuple(normalize_records(obj)))

    def problems(self, who: str, metrics: set[str] | None = None) -> list[str]:
        out = [f"{who}'s numbers are not quality: {reason}" for reason in self.unverified]
        for i, r in enumerate(self.records):
            if metrics is not None and r.get("metric") not in metrics:
                continue
            missing = [k for k in REQUIRED_FIELDS if k not in r]
            if missing:
                out.append(f"{who} metrics record {i} lacks {', '.join(missing)}")
            elif not isinstance(r["mean"], (int, float)) or isinstance(r["mean"],
                                                                       bool) or not math.isfinite(r["mean"]):
                out.append(f"{who} {r['metric']} on {r['prompt_set']} ({r['backbone']}) is not a finite number: "
                           f"{r['mean']!r}")
        return out

    def select(self, metric: str, prompt_set: str) -> dict[str, dict]:
        """Records of one metric on one prompt set, by backbone."""
        return {str(r["backbone"]): r for r in self.records
                if r.get("metric") == metric and r.get("prompt_set") == prompt_set}

    def prompt_set_names(self) -> list[str]:
        return sorted({str(r["prompt_set"]) for r in self.records if "prompt_set" in r})


@dataclass
class GateResult:
    metric: str
    prompt_set: str
    backbone: str
    higher_is_better: bool
    tolerance: float
    bound: Optional[float]  # the gate's floor (higher is better) or ceiling (lower is better)
    challenger: Optional[float]
    champion: Optional[float]
    # challenger - champion, signed so that positive is better (None without a champion)
    improvement: Optional[float]
    passed: bool
    reason: str


@dataclass
class GateDecision:
    status: Literal["passed", "failed", "refused"]
    reasons: list[str]
    gates: list[GateResult]
    compared_with_champion: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "passed": self.passed,
            "compared_with_champion": self.compared_with_champion,
            "reasons": list(self.reasons),
            "gates": [asdict(g) for g in self.gates],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def summary(self) -> str:
        head = {"passed": "all gates passed", "failed": "gates failed", "refused": "comparison refused"}[self.status]
        return head + (": " + "; ".join(self.reasons) if self.reasons else "")


def _gate_list(gates_cfg: RegistryCfg | Iterable[GateCfg | Mapping]) -> tuple[list[GateCfg], Optional[list[str]]]:
    if isinstance(gates_cfg, RegistryCfg):
        return list(gates_cfg.gates), gates_cfg.prompt_sets
    return [g if isinstance(g, GateCfg) else GateCfg.model_validate(g) for g in gates_cfg], None


def _fmt(x: Optional[float]) -> str:
    return "none" if x is None else f"{x:.6g}"


def evaluate_gates(
    challenger: Evaluation | Mapping | Sequence[Mapping],
    champion: Evaluation | Mapping | Sequence[Mapping] | None,
    gates_cfg: RegistryCfg | Iterable[GateCfg | Mapping],
    prompt_sets: Optional[Sequence[str]] = None,
) -> GateDecision:
    """Judge `challenger` against `champion` (None: no champion yet, only absolute floors apply).

    `gates_cfg` is the `registry` section of params.yaml (its `gates` and `prompt_sets`) or a list of
    gates; `prompt_sets` overrides which prompt sets are compared.
    """
    gates, cfg_sets = _gate_list(gates_cfg)
    ch = Evaluation.of(challenger)
    cp = Evaluation.of(champion)
    with_champion = cp is not None
    gated = {g.metric for g in gates}
    refusals = ch.problems("challenger", gated) + (cp.problems("champion", gated) if cp is not None else [])
    if refusals:
        return GateDecision("refused", refusals, [], with_champion)
    if not gates:
        return GateDecision("refused",
                            ["no gates are configured (registry.gates is empty): nothing justifies a promotion"], [],
                            with_champion)
    sets = list(prompt_sets or cfg_sets or ch.prompt_set_names())
    if not sets:
        return GateDecision("refused", ["the challenger has no evaluation metrics"], [], with_champion)
    if cp is not None:
        refusals += _prompt_set_differences(ch, cp, sets, chosen=bool(prompt_sets or cfg_sets))
    results = [result for gate in gates for ps in sets for result in _judge(gate, ps, ch, cp, refusals)]
    if refusals:
        return GateDecision("refused", refusals, results, with_champion)
    failed = [f"{g.prompt_set}/{g.backbone}: {g.reason}" for g in results if not g.passed]
    if failed:
        return GateDecision("failed", failed, results, with_champion)
    return GateDecision("passed", [], results, with_champion)


def _prompt_set_differences(ch: Evaluation, cp: Evaluation, sets: list[str], chosen: bool) -> list[str]:
    """Why the compared prompt sets are not the same prompt sets (same name, version and seeds) for both; without a
    `chosen` list of sets, a set only the champion was evaluated on differs too."""
    refusals = []
    cp_sets = set(cp.prompt_set_names())
    for ps in sets:
        if ps not in cp_sets:
            refusals.append(
                f"different prompt sets: the challenger was evaluated on {ps!r}, the champion only on "
                f"{', '.join(sorted(cp_sets)) or 'nothing'}"
            )
            continue
        v1, v2 = ch.prompt_sets.get(ps), cp.prompt_sets.get(ps)
        if v1 is not None and v2 is not None and v1 != v2:
            refusals.append(f"prompt set {ps!r} differs: challenger version {v1!r}, champion version {v2!r}")
        s1, s2 = ch.seeds.get(ps), cp.seeds.get(ps)
        if s1 is not None and s2 is not None and s1 != s2:
            refusals.append(f"different seeds on prompt set {ps!r}: challenger {s1!r}, champion {s2!r}")
    extra = sorted(cp_sets - set(sets)) if not chosen else []
    if extra:
        refusals.append(
            f"different prompt sets: the champion was evaluated on {', '.join(extra)} and the challenger was not"
        )
    return refusals


def _judge(gate: GateCfg, ps: str, ch: Evaluation, cp: Evaluation | None, refusals: list[str]) -> list[GateResult]:
    """One gate on one prompt set, per backbone; what makes the records incomparable is added to `refusals`."""
    mine = ch.select(gate.metric, ps)
    if not mine:
        refusals.append(f"the challenger has no {gate.metric!r} on prompt set {ps!r}: the gate cannot be judged")
        return []
    random_bb = sorted(b for b, r in mine.items() if r.get("pretrained") is not True)
    if random_bb:
        refusals.append(
            f"{gate.metric} on {ps!r} comes from random (not pretrained) backbone(s) {', '.join(random_bb)}: "
            "such numbers are not quality and are never used for promotion"
        )
        return []
    theirs = cp.select(gate.metric, ps) if cp is not None else {}
    if cp is not None:
        if not theirs:
            if ps in cp.prompt_set_names():
                refusals.append(f"the champion has no {gate.metric!r} on prompt set {ps!r}")
            return []
        if set(mine) != set(theirs):
            refusals.append(
                f"different backbones for {gate.metric} on {ps!r}: challenger {', '.join(sorted(mine))}, "
                f"champion {', '.join(sorted(theirs))}"
            )
            return []
    results = []
    for bb, rec in sorted(mine.items()):
        theirs_bb = theirs.get(bb)
        if theirs_bb is not None:
            n1, n2 = rec.get("n_pairs"), theirs_bb.get("n_pairs")
            if n1 is not None and n2 is not None and n1 != n2:
                refusals.append(
                    f"{gate.metric} on {ps!r} ({bb}) was computed over {n1} pairs for the challenger and "
                    f"{n2} for the champion: not the same samples"
                )
                continue
        results.append(_gate_result(gate, ps, bb, float(rec["mean"]),
                                    float(theirs_bb["mean"]) if theirs_bb is not None else None))
    return results


def _gate_result(gate: GateCfg, ps: str, bb: str, c_val: float, p_val: Optional[float]) -> GateResult:
    """The gate's verdict on the challenger's value against the champion's (None: no champion) and the bound."""
    higher_is_better = METRICS[gate.metric].higher_is_better
    sign = 1.0 if higher_is_better else -1.0
    improvement = None if p_val is None else sign * (c_val - p_val)
    ok, why = True, []
    if improvement is not None and improvement < -gate.tolerance - 1e-12:
        ok = False
        why.append(
            f"{gate.metric} {_fmt(c_val)} is {_fmt(-improvement)} "
            f"{'below' if higher_is_better else 'above'} "
            f"the champion's {_fmt(p_val)} (tolerance {_fmt(gate.tolerance)})"
        )
    if gate.bound is not None:
        bad = c_val < gate.bound if higher_is_better else c_val > gate.bound
        if bad:
            ok = False
            why.append(
                f"{gate.metric} {_fmt(c_val)} is "
                f"{'below the floor' if higher_is_better else 'above the ceiling'} "
                f"{_fmt(gate.bound)}"
            )
    if ok:
        if improvement is None:
            why.append(f"{gate.metric} {_fmt(c_val)}, no champion to compare with")
        else:
            why.append(
                f"{gate.metric} {_fmt(c_val)} vs champion {_fmt(p_val)} (change {improvement:+.6g}, "
                f"tolerance {_fmt(gate.tolerance)})"
            )
    return GateResult(gate.metric, ps, bb, higher_is_better, gate.tolerance, gate.bound, c_val, p_val,
                      improvement, ok, "; ".join(why))
