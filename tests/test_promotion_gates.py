"""The pure gate function: what passes, what fails, what is refused, and the numbers it reports."""

import json

import pytest
from synthetic_runs import metrics_json, metrics_records

from subjectops.config import ConfigError, GateCfg, RegistryCfg, load_params, validate_params
from subjectops.tracking.gates import evaluate_gates

CFG = RegistryCfg(gates=[GateCfg(metric="dino", tolerance=0.02), GateCfg(metric="clip-t", tolerance=0.01)])


def summary(seeds_sha="s0", version="1:abc", **kw):
    return {"records": metrics_records(**kw), "seeds": {"prompt-invariant": {"n": 4, "sha256": seeds_sha}},
            "prompt_sets": {"prompt-invariant": version}}


def test_better_challenger_passes_with_numbers():
    d = evaluate_gates(summary(dino=0.70, clip_t=0.31), summary(dino=0.60, clip_t=0.30), CFG)
    assert d.status == "passed" and d.passed and d.compared_with_champion
    by = {g.metric: g for g in d.gates}
    assert by["dino"].challenger == pytest.approx(0.70) and by["dino"].champion == pytest.approx(0.60)
    assert by["dino"].improvement == pytest.approx(0.10)
    assert by["clip-t"].backbone == "openai/clip-vit-base-patch32"
    assert json.loads(d.to_json())["gates"][0]["passed"] is True


def test_small_drop_within_tolerance_passes_larger_drop_fails():
    ok = evaluate_gates(summary(dino=0.59, clip_t=0.30), summary(dino=0.60, clip_t=0.30), CFG)
    assert ok.passed, ok.summary()
    bad = evaluate_gates(summary(dino=0.50, clip_t=0.30), summary(dino=0.60, clip_t=0.30), CFG)
    assert bad.status == "failed" and not bad.passed
    assert [g.metric for g in bad.failed_gates] == ["dino"]
    assert "0.1 below the champion's 0.6" in bad.reasons[0]


@pytest.mark.parametrize("metric,better,worse,champ", [("fid", 30.0, 50.0, 40.0), ("lpips", 0.3, 0.5, 0.4)])
def test_fid_and_lpips_gates_treat_lower_as_better(metric, better, worse, champ, tmp_path):
    """From a params file through the evaluate stage's metrics.json to the decision: direction from the definition."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"registry:\n  gates:\n    - metric: {metric}\n      tolerance: 1.0e-3\n      bound: "
                           f"{champ + 5}\n")
    gates = load_params(params_file).registry
    champion = metrics_json(**{metric: champ})
    up = evaluate_gates(metrics_json(**{metric: better}), champion, gates)
    assert up.passed, up.summary()
    assert up.gates[0].higher_is_better is False and up.gates[0].improvement == pytest.approx(champ - better)
    down = evaluate_gates(metrics_json(**{metric: worse}), champion, gates)
    assert down.status == "failed" and f"{_num(worse - champ)} above the champion's {_num(champ)}" in down.reasons[0]
    ceiling = evaluate_gates(metrics_json(**{metric: champ + 6}), None, gates)
    assert ceiling.status == "failed" and f"above the ceiling {_num(champ + 5)}" in ceiling.reasons[0]


def _num(x: float) -> str:
    return f"{x:.6g}"


def test_a_gate_cannot_set_its_own_direction():
    with pytest.raises(ConfigError,
                       match=r"registry\.gates\.0.*fid is lower is better by definition; remove this line"):
        validate_params({"registry": {"gates": [{"metric": "fid", "higher_is_better": True}]}})


def test_the_old_min_value_key_is_refused_naming_bound():
    with pytest.raises(ConfigError,
                       match=r"registry\.gates\.0.*min_value is now called bound.*rename the key to bound"):
        validate_params({"registry": {"gates": [{"metric": "fid", "min_value": 30.0}]}})


def test_absolute_floor():
    floor = [GateCfg(metric="dino", bound=0.65)]
    d = evaluate_gates(summary(dino=0.6), None, floor)
    assert d.status == "failed" and "below the floor 0.65" in d.reasons[0]
    first = evaluate_gates(summary(dino=0.7), None, floor)
    assert first.passed and not first.compared_with_champion and first.gates[0].champion is None


def test_different_backbones_are_refused():
    d = evaluate_gates(summary(backbone_dino="facebook/dinov2-small"), summary(), CFG)
    assert d.status == "refused" and not d.passed
    assert any("different backbones for dino" in r and "facebook/dinov2-small" in r for r in d.reasons)


def test_different_prompt_sets_are_refused():
    d = evaluate_gates(summary(prompt_set="dreambench"), summary(prompt_set="prompt-invariant"), CFG)
    assert d.status == "refused"
    assert any("different prompt sets" in r for r in d.reasons)
    v = evaluate_gates(summary(version="2:def"), summary(version="1:abc"), CFG)
    assert v.status == "refused" and "prompt set 'prompt-invariant' differs" in v.reasons[0]


def test_different_seeds_or_sample_counts_are_refused():
    d = evaluate_gates(summary(seeds_sha="other"), summary(), CFG)
    assert d.status == "refused" and "different seeds" in d.reasons[0]
    n = evaluate_gates(summary(n_pairs=8), summary(n_pairs=4), CFG)
    assert n.status == "refused" and "8 pairs for the challenger and 4 for the champion" in n.reasons[0]


def test_random_backbones_are_refused_even_without_champion():
    d = evaluate_gates(summary(pretrained=False, backbone_dino="tiny-random-dino"), None, CFG)
    assert d.status == "refused"
    assert any("random (not pretrained) backbone(s) tiny-random-dino" in r for r in d.reasons)


def test_missing_metric_and_bad_numbers_are_refused():
    recs = [r for r in metrics_records() if r["key"] != "clip-t"]
    d = evaluate_gates(recs, metrics_records(), CFG)
    assert d.status == "refused" and "no 'clip-t'" in d.reasons[0]
    nan = metrics_records(dino=float("nan"))
    assert evaluate_gates(nan, None, CFG).status == "refused"
    assert evaluate_gates([], None, CFG).status == "refused"


def test_gates_come_from_params_yaml(repo_root):
    import yaml

    params = validate_params(yaml.safe_load((repo_root / "params.yaml").read_text()))
    metrics = {g.metric for g in params.registry.gates}
    assert {"dino", "clip-t"} <= metrics
    assert evaluate_gates(summary(dino=0.7, clip_t=0.31), summary(), params.registry).passed
    with pytest.raises(Exception, match="registry.gates.0.tolerance"):
        validate_params({"registry": {"gates": [{"metric": "dino", "tolerance": -1}]}})
