"""The benchmark's aggregate and its gate: the registered versions' evaluation summaries (and their champions'),
the mean over subjects per (metric, prompt set, backbone), and the promotion gates applied to the aggregate
against the champions' aggregate, a regression failing the run with every compared number."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

from subjectops.digest import digest_json
from subjectops.errors import SubjectopsError


def aggregate_summaries(summaries: Sequence[Mapping]) -> dict:
    """The benchmark's aggregate: per (metric, prompt set, backbone), the mean over subjects.

    Each summary is what the register stage stores (`{"records", "seeds", "prompt_sets"}`). `n_pairs` adds
    up, `pretrained` holds only if it holds for every subject, prompt set versions must agree, and seeds are
    combined into one digest per prompt set.
    """
    from subjectops.tracking.gates import normalize_records

    groups: dict[tuple, list[dict]] = {}
    seeds: dict[str, list] = {}
    versions: dict[str, set] = {}
    for s in summaries:
        for r in normalize_records(s["records"]):
            groups.setdefault((r["metric"], r["prompt_set"], str(r["backbone"])), []).append(r)
        for ps, v in (s.get("seeds") or {}).items():
            seeds.setdefault(ps, []).append(v)
        for ps, v in (s.get("prompt_sets") or {}).items():
            versions.setdefault(ps, set()).add(json.dumps(v, sort_keys=True))
    records = []
    for (metric, ps, bb), rows in sorted(groups.items()):
        means = [float(r["mean"]) for r in rows]
        n_pairs = [r.get("n_pairs") for r in rows]
        records.append({
            "metric": metric, "prompt_set": ps, "backbone": bb,
            "pretrained": all(r.get("pretrained") is True for r in rows),
            "n_subjects": len(rows),
            "n_pairs": sum(n_pairs) if all(isinstance(n, int) for n in n_pairs) else None,
            "mean": sum(means) / len(means) if all(math.isfinite(m) for m in means) else float("nan"),
            "min": min(means), "max": max(means),
        })
    return {
        "records": records,
        "seeds": {ps: digest_json(sorted(v, key=lambda x: json.dumps(x, sort_keys=True))) for ps, v in seeds.items()},
        "prompt_sets": {ps: (json.loads(next(iter(v))) if len(v) == 1 else "mixed:" + ",".join(sorted(v)))
                        for ps, v in versions.items()},
        "n_subjects": len(summaries),
    }


class BenchmarkRegression(SubjectopsError):
    """The benchmark's aggregate is worse than the champions' on a promotion gate."""


def check_benchmark(decision, *, fail_on_refused: bool = False) -> None:
    """Raise `BenchmarkRegression`, with every compared number in the message, when a gate regressed
    (and, with `fail_on_refused`, when the numbers could not be compared)."""
    if decision.status == "passed" or (decision.status == "refused" and not fail_on_refused):
        return
    what = "regressed against the champion" if decision.status == "failed" else "cannot be compared with the champion"
    lines = [f"  {g.metric} on {g.prompt_set} ({g.backbone}): {'ok' if g.passed else 'REGRESSED'}: {g.reason}"
             for g in decision.gates]
    reasons = [f"  {r}" for r in decision.reasons]
    raise BenchmarkRegression(
        "\n".join([f"benchmark {what}: {decision.status}", *reasons, *(["gates:", *lines] if lines else [])]),
        fix="inspect the per-subject reports in MLflow; promote nothing from this run",
    )


def registry_summaries(registrations: Sequence[Mapping], tracking_uri: Optional[str] = None) -> list[dict]:
    """For each registered version of a benchmark: its evaluation summary and its model's champion's.

    Reads the summaries the register stage stored with each version (`tracking.registry.version_summary`);
    `champion` is None where the model has no `champion` alias yet.
    """
    from subjectops.tracking.client import mlflow_client, resolve_tracking_uri, setup_environment
    from subjectops.tracking.registry import CHAMPION, version_summary

    setup_environment()
    client = mlflow_client(resolve_tracking_uri(tracking_uri))  # the sqlite store opened under its lock
    out = []
    for reg in registrations:
        name, version = reg["model_name"], str(reg["version"])
        try:
            champion_version: Optional[str] = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except Exception as exc:  # noqa: BLE001 - MLflow raises one exception type for every error
            if getattr(exc, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE",
                                                        "NOT_FOUND"):
                raise
            champion_version = None
        out.append({
            "model_name": name, "version": version, "champion_version": champion_version,
            "challenger": version_summary(client, name, version),
            "champion": version_summary(client, name, champion_version)
            if champion_version and champion_version != version else None,
        })
    return out


def benchmark_aggregate(rows: Sequence[Mapping], registry_cfg) -> tuple[dict, Any]:
    """Aggregate a benchmark's subjects and judge the aggregate against their champions' aggregate.

    The comparison is paired: both aggregates are taken over the subjects that have a champion (all
    subjects when none has one; then only the gates' absolute floors apply). Returns the result to
    record and the `GateDecision`; `check_benchmark` turns a regression into an error.
    """
    from subjectops.tracking.gates import evaluate_gates

    paired = [r for r in rows if r.get("champion") is not None]
    challenger = aggregate_summaries([r["challenger"] for r in (paired or rows)])
    champion = aggregate_summaries([r["champion"] for r in paired]) if paired else None
    decision = evaluate_gates(challenger, champion, registry_cfg)
    result = {
        "subjects": [f"{r['model_name']}/{r['version']}" for r in rows],
        "compared_with_champions": [f"{r['model_name']}/{r['champion_version']}" for r in paired],
        "challenger": challenger,
        "champion": champion,
        "decision": decision.to_dict(),
    }
    return result, decision


def parse_registration(text: str) -> dict:
    """`name/version` (the register step's output) -> `{"model_name", "version"}`."""
    name, sep, version = str(text).rpartition("/")
    if not sep or not name or not version:
        raise SubjectopsError(f"registration {text!r} is not of the form MODEL_NAME/VERSION",
                              fix="wire the personalize pipeline's output (the register step's) to the aggregation")
    return {"model_name": name, "version": version}
