"""`subjectops benchmark run`: the claims table's verdicts, the regression gate, the injected bugs, the shared models
and a tiny benchmark killed midway and resumed."""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, artifact_paths
from PIL import Image
from typer.testing import CliRunner

WORLD_SUBJECT = REPO / "src" / "subjectops" / "world" / "shipped_subjects" / "world-cup-5"


# ------------------------------------------------------------------------------------------------- claims
def _values(group_means: dict[str, float], metric: str, n: int = 40, noise: float = 0.01, seed: int = 0) -> dict:
    """Per-image values of several variants on the same n images: variant -> key -> {metric: value}."""
    rng = np.random.default_rng(seed)
    image_effect = rng.normal(0, 0.05, n)  # what the images share across variants: pairing removes it
    return {label: {("s", "prompt-invariant", f"images/p/{i:04d}.png", i):
                    {metric: float(mean + image_effect[i] + rng.normal(0, noise))} for i in range(n)}
            for label, mean in group_means.items()}


def _runs(*labels_and_overrides):
    from subjectops.benchmark.local import parse_variant
    from subjectops.config import load_params

    out = {}
    for text in labels_and_overrides:
        v = parse_variant(text)
        out[text] = (v, load_params(REPO / "params.yaml", v.overrides(), method=v.method))
    return out


def test_claim_verdicts_hold_fail_and_stay_inconclusive_on_paired_values():
    from subjectops.benchmark.claims import CLAIMS, claims_table

    runs = _runs("dreambooth", "textual-inversion")
    dino = [c for c in CLAIMS if c.id == "db-over-ti-dino"]
    verdicts = {}
    for case, ti in (("db clearly above", 0.60), ("db clearly below", 0.70), ("no difference", 0.65)):
        values = _values({"dreambooth": 0.65, "textual-inversion": ti}, "dino", noise=0.01 if ti != 0.65 else 0.05)
        [row] = claims_table(values, runs, dino)["rows"]
        verdicts[case] = row["verdict"]
        test = row["tests"][0]
        assert test["n_pairs"] == 40 and test["a_run"] == "dreambooth" and test["b_run"] == "textual-inversion"
        assert test["difference"]["low"] <= test["difference"]["mean"] <= test["difference"]["high"]
    assert verdicts == {"db clearly above": "holds", "db clearly below": "does not hold",
                        "no difference": "inconclusive"}


def test_pairing_removes_what_the_images_share_and_lower_is_better_metrics_flip():
    """A difference of 0.01 under image-to-image spread of 0.05 is seen only when the comparison is paired; on LPIPS
    (lower is better) the lower variant is the better one."""
    from subjectops.benchmark.claims import Needs, Test, decide, paired

    values = _values({"a": 0.51, "b": 0.50}, "dino", noise=0.002)
    a, b = paired(values["a"], values["b"], "dino", None)
    assert decide(Test("better", "dino", Needs("dreambooth"), Needs("lora")), a, b)["verdict"] == "holds"
    assert decide(Test("better", "lpips", Needs("dreambooth"), Needs("lora")), a, b)["verdict"] == "does not hold"
    within = decide(Test("within", "dino", Needs("dreambooth"), Needs("lora"), margin=0.05), a, b)
    assert within["verdict"] == "holds"
    assert paired(values["a"], values["b"], "dino", ("prompt-varying",)) == ([], [])


def test_claims_get_rows_only_when_their_variants_ran_and_settings_must_match():
    from subjectops.benchmark.claims import claims_table

    runs = _runs("dreambooth", "textual-inversion", "dreambooth+finetune.dreambooth.lr=1e-3")
    values = {label: _values({label: 0.5}, "dino")[label] for label in runs}
    table = claims_table(values, runs)
    ids = [r["id"] for r in table["rows"]]
    assert "db-over-ti-dino" in ids and "ti-lowest-clip-t" in ids
    # prior preservation needs DreamBooth without it; a retuned DreamBooth never stands in for the paper's
    assert {"id": "prior-preservation-dreambooth",
            "needs": ["dreambooth+finetune.dreambooth.prior_preservation=false"]} in table["not_run"]
    [row] = [r for r in table["rows"] if r["id"] == "db-over-ti-dino"]
    assert row["needs"]["dreambooth"] == "dreambooth"
    # clip-t was not measured in these values: the row says so instead of deciding
    [clip_t] = [r for r in table["rows"] if r["id"] == "ti-lowest-clip-t"]
    assert clip_t["verdict"] == "inconclusive" and clip_t["tests"][0]["n_pairs"] == 0


def test_alchemy_on_world_sdxl_is_compared_with_dreambooth_on_world_sdxl_when_both_ran():
    """One benchmark, two base models: Image-Alchemy runs on world-sdxl (as the paper on SDXL) and DreamBooth on both.
    The Alchemy rows compare with the world-sdxl DreamBooth; the other rows keep the benchmark's own DreamBooth."""
    from subjectops.benchmark.claims import claims_table

    alchemy = "alchemy+infer.alchemy.composite=false+model.base=world-sdxl"
    runs = _runs("dreambooth+model.base=world-sd15", "textual-inversion+model.base=world-sd15",
                 "dreambooth+model.base=world-sdxl", alchemy)
    values = {label: _values({label: 0.5}, "dino")[label] for label in runs}
    rows = {r["id"]: r for r in claims_table(values, runs)["rows"]}
    assert [(t["a_run"], t["b_run"]) for t in rows["alchemy-over-db"]["tests"]] == [
        (alchemy, "dreambooth+model.base=world-sdxl")] * 2
    assert rows["db-over-ti-dino"]["tests"][0]["a_run"] == "dreambooth+model.base=world-sd15"
    # without a world-sdxl DreamBooth, the benchmark's is the comparison
    del runs["dreambooth+model.base=world-sdxl"]
    rows = {r["id"]: r for r in claims_table(values, runs)["rows"]}
    assert rows["alchemy-over-db"]["tests"][0]["b_run"] == "dreambooth+model.base=world-sd15"


def test_hypnos_varying_prompts_row_reads_the_world_set_and_the_invariant_row_names_the_missing_set():
    """A world benchmark draws the world set only: Hypnos' Table 2 row (varying prompts) is decided on it; the
    Table 1 row (prompt-invariant) has no pairs and says which prompt set the benchmark must add."""
    from subjectops.benchmark.claims import claims_table

    runs = _runs("dreambooth", "hypnos")
    values = {label: {(g, "world", img, seed): {"dino-subject": v["dino"], "clip-i-subject": v["dino"]}
                      for (g, _, img, seed), v in per_image.items()}
              for label, per_image in _values({"hypnos": 0.6, "dreambooth": 0.5}, "dino").items()}
    rows = {r["id"]: r for r in claims_table(values, runs)["rows"]}
    varying = rows["hypnos-over-db-prompt-varying"]
    assert varying["verdict"] == "holds" and [t["n_pairs"] for t in varying["tests"]] == [40, 40]
    invariant = rows["hypnos-over-db-prompt-invariant"]
    assert invariant["verdict"] == "inconclusive" and invariant["tests"][0]["n_pairs"] == 0
    assert "infer.prompt_sets must include prompt-invariant" in invariant["tests"][0]["why"]


def test_two_stage_claim_is_inconclusive_when_it_trains_the_unet_longer():
    from subjectops.benchmark.claims import CLAIMS, claims_table

    claim = [c for c in CLAIMS if c.id == "two-stage-over-db"]
    for steps, expected in ((400, "holds"), (2000, "inconclusive")):
        label = f"two-stage+finetune.two_stage.unet_steps={steps}"
        runs = _runs("dreambooth", label)
        values = _values({"dreambooth": 0.5, label: 0.6}, "dino")
        for run, images in _values({"dreambooth": 0.2, label: 0.3}, "clip-t", seed=1).items():
            for key, scores in images.items():
                values[run][key].update(scores)
        claim_with_steps = [dataclasses.replace(claim[0], tests=tuple(
            dataclasses.replace(t, a=dataclasses.replace(t.a, settings=(("finetune.two_stage.unet_steps", steps),)))
            for t in claim[0].tests))]
        [row] = claims_table(values, runs, claim_with_steps)["rows"]
        assert row["verdict"] == expected, row
        assert (row["caveat"] is None) == (expected == "holds")


def _point(strategy: str, dino: float, clip_t: float, seed: int) -> dict:
    values = _values({"p": dino}, "dino", seed=seed, noise=0.002)["p"]
    for key, scores in _values({"p": clip_t}, "clip-t", seed=seed + 100, noise=0.002)["p"].items():
        values[key].update(scores)
    return {"strategy": strategy, "values": values}


def test_dreamblend_front_claim_reads_the_sweep_points():
    """Checkpoints trading DINO for CLIP-T; a DreamBlend point beyond their front holds, one below it does not, one
    level with a checkpoint is inconclusive."""
    from subjectops.benchmark.claims import CLAIMS, claims_table

    claim = [c for c in CLAIMS if c.id == "dreamblend-advances-front"]
    runs = _runs("dreambooth@dreamblend")
    checkpoints = {"step 100": _point("plain", 0.50, 0.30, 1), "step 200": _point("plain", 0.60, 0.25, 2)}
    verdicts = {}
    for case, blend in (("beyond", (0.58, 0.29)), ("below", (0.48, 0.24)), ("level", (0.60, 0.25))):
        blended = _point("dreamblend", *blend, 3)
        if case == "level":  # the very images of a checkpoint: no difference at all
            blended = dict(checkpoints["step 200"], strategy="dreamblend")
        points = {"dreambooth@dreamblend": {**checkpoints, "dreamblend 100<200": blended}}
        [row] = claims_table({"dreambooth@dreamblend": {}}, runs, claim, points=points)["rows"]
        verdicts[case] = row["verdict"]
        assert row["tests"][0]["point"] == "dreamblend 100<200"
    assert verdicts == {"beyond": "holds", "below": "does not hold", "level": "inconclusive"}
    [row] = claims_table({"dreambooth@dreamblend": {}}, runs, claim, points={})["rows"]
    assert row["verdict"] == "inconclusive" and "no checkpoint point" in row["tests"][0]["why"]


# ------------------------------------------------------------------------------------------ regression gate
def _board(rows: dict) -> dict:
    return {"subjects": ["world-cup-5"], "rows": {
        row: {col: dict(zip(("mean", "low", "high"), v)) for col, v in cells.items()} for row, cells in rows.items()}}


def test_regression_gate_names_the_variant_and_metric_below_the_champions_interval(tmp_path):
    from subjectops.benchmark.aggregate import BenchmarkRegression
    from subjectops.benchmark.regression import check_regressions

    dino, lpips, fid = "prompt-invariant/DINO", "prompt-invariant/LPIPS", "prompt-invariant/FID"
    # FID is one number for the whole set: no interval, not gated (a rerun is worse than one value half the time)
    champion = _board({"lora": {dino: (0.60, 0.58, 0.62), lpips: (0.3, 0.28, 0.32), fid: (8.0, None, None)},
                       "dreambooth": {dino: (0.65, 0.63, 0.67), fid: (9.0, None, None)}})
    same = _board({"lora": {dino: (0.59, 0.57, 0.61), lpips: (0.31, 0.29, 0.33), fid: (7.5, None, None)},
                   "dreambooth": {dino: (0.66, 0.64, 0.68), fid: (9.0, None, None)}})
    check_regressions(same, champion, tmp_path)  # inside the intervals: passes
    assert json.loads((tmp_path / "gate.json").read_text())["passed"] is True
    broken = _board({"lora": {dino: (0.61, 0.6, 0.62), lpips: (0.4, 0.38, 0.42), fid: (7.0, None, None)},
                     "dreambooth": {dino: (0.50, 0.48, 0.52), fid: (9.5, None, None)}})
    with pytest.raises(BenchmarkRegression) as err:
        check_regressions(broken, champion, tmp_path)
    message = err.value.message
    assert "dreambooth: prompt-invariant/DINO" in message and "lora: prompt-invariant/LPIPS" in message
    assert "lora: prompt-invariant/DINO" not in message  # higher DINO is no regression
    assert "(gate rule disjoint)" in message  # the default: what the gate trial on world-sd15 supports
    gate = json.loads((tmp_path / "gate.json").read_text())
    assert gate["rule"] == "disjoint"
    assert gate["passed"] is False and {(r["variant"], r["metric"]) for r in gate["regressions"]} == {
        ("dreambooth", "dino"), ("lora", "lpips")}
    assert gate["not_gated"] == [fid]


def test_the_disjoint_rule_flags_only_a_score_whose_whole_interval_is_worse(tmp_path):
    from subjectops.benchmark.regression import regressions
    from subjectops.errors import SubjectopsError

    dino, lpips = "prompt-invariant/DINO", "prompt-invariant/LPIPS"
    champion = _board({"lora": {dino: (0.60, 0.55, 0.65), lpips: (0.30, 0.25, 0.35)}})
    # means outside the champion's intervals, intervals overlapping them (a rerun with another seed)
    shifted = _board({"lora": {dino: (0.52, 0.46, 0.58), lpips: (0.38, 0.33, 0.43)}})
    # whole intervals on the worse side (a broken method)
    broken = _board({"lora": {dino: (0.40, 0.35, 0.45), lpips: (0.50, 0.45, 0.55)}})
    flagged = {rule: {name: {r["metric"] for r in regressions(board, champion, rule)}
                      for name, board in (("shifted", shifted), ("broken", broken))}
               for rule in ("mean-outside", "disjoint")}
    assert flagged == {"mean-outside": {"shifted": {"dino", "lpips"}, "broken": {"dino", "lpips"}},
                       "disjoint": {"shifted": set(), "broken": {"dino", "lpips"}}}
    with pytest.raises(SubjectopsError, match="unknown gate rule"):
        regressions(broken, champion, "median")


def _subject_board(per_subject: dict, seed: int = 0, half: float = 0.05) -> dict:
    """A leaderboard of one variant per row whose columns have these per-subject means, each with an interval of
    +-`half` (its overall cell: their mean, with an interval of +-0.01 as one benchmark's image bootstrap gives)."""
    by_subject = {}
    rows = {}
    for row, columns in per_subject.items():
        for column, means in columns.items():
            for i, m in enumerate(means):
                by_subject.setdefault(f"world-s{i}@seed-{seed}", {}).setdefault(row, {})[column] = {
                    "mean": m, "low": m - half, "high": m + half}
            mean = sum(means) / len(means)
            rows.setdefault(row, {})[column] = {"mean": mean, "low": mean - 0.01, "high": mean + 0.01}
    return {"subjects": sorted(by_subject), "rows": rows, "by_subject": by_subject}


def test_the_subject_paired_rule_flags_a_drop_on_every_subject_not_a_rerun_that_moves_both_ways(tmp_path):
    from subjectops.benchmark.aggregate import BenchmarkRegression
    from subjectops.benchmark.regression import check_regressions, regressions

    dino, lpips = "world/DINO", "world/LPIPS"
    champion = _subject_board({"lora": {dino: [0.30, 0.20, 0.40, 0.25, 0.35, 0.30],
                                        lpips: [5.0, 5.1, 4.9, 5.0, 5.2, 4.8]}}, seed=0)
    # another seed: each subject moves by up to 0.06 either way, the overall mean 0.02 lower (outside the champion's
    # narrow image interval, so mean-outside fails this clean rerun)
    rerun = _subject_board({"lora": {dino: [0.24, 0.17, 0.43, 0.22, 0.31, 0.31],
                                     lpips: [5.05, 5.0, 4.95, 4.9, 5.25, 4.85]}}, seed=1)
    # a broken LoRA: every subject 0.09-0.13 lower on DINO, 0.3-0.4 higher (worse) on LPIPS
    broken = _subject_board({"lora": {dino: [0.19, 0.10, 0.28, 0.15, 0.23, 0.21],
                                      lpips: [5.35, 5.45, 5.3, 5.35, 5.6, 5.1]}}, seed=1)
    assert {r["metric"] for r in regressions(rerun, champion, "mean-outside")} == {"dino"}
    assert regressions(rerun, champion, "subject-paired") == []
    found = regressions(broken, champion, "subject-paired")
    assert {(r["variant"], r["metric"]) for r in found} == {("lora", "dino"), ("lora", "lpips")}
    dino_change = next(r["subject_change"] for r in found if r["metric"] == "dino")
    assert dino_change["subjects"] == 6 and dino_change["change"] == pytest.approx(-0.1067, abs=1e-4)
    assert dino_change["level"] == pytest.approx(0.05 / 2)  # Bonferroni over the 2 scores judged
    assert dino_change["bound"] < 0 and dino_change["p"] < dino_change["level"]
    # LPIPS is lower-is-better: its change is reported as it is (higher), its bound on the better (lower) side
    lpips_change = next(r["subject_change"] for r in found if r["metric"] == "lpips")
    assert lpips_change["change"] > 0 and lpips_change["bound"] > 0
    # the same drop on 6 subjects, but mixed with a rise on the others, is not significant
    mixed = _subject_board({"lora": {dino: [0.19, 0.10, 0.28, 0.35, 0.45, 0.40],
                                     lpips: [5.0, 5.1, 4.9, 5.0, 5.2, 4.8]}}, seed=1)
    assert regressions(mixed, champion, "subject-paired") == []
    with pytest.raises(BenchmarkRegression, match="per-subject change -0.1067 over 6 subjects"):
        check_regressions(broken, champion, tmp_path, "subject-paired")
    assert json.loads((tmp_path / "gate.json").read_text())["rule"] == "subject-paired"


def test_the_subject_paired_rule_needs_three_subjects_and_says_so_before_any_work(tmp_path):
    from subjectops.benchmark.regression import check_rule, regressions
    from subjectops.errors import SubjectopsError

    with pytest.raises(SubjectopsError, match="at least 3 subjects; this benchmark has 2") as err:
        check_rule("subject-paired", 2)
    assert "--gate-rule disjoint" in err.value.fix
    check_rule("subject-paired", 3)
    check_rule("disjoint", 1)
    two = _subject_board({"lora": {"world/DINO": [0.3, 0.2]}})
    with pytest.raises(SubjectopsError, match="2 subject"):
        regressions(two, two, "subject-paired")


def _seeds_board(*boards: dict) -> dict:
    """One leaderboard of several benchmark seeds (`--seeds 0,1,2`), from one `_subject_board` per seed."""
    merged = {"subjects": [], "rows": boards[0]["rows"], "by_subject": {}}
    for board in boards:
        merged["subjects"] += board["subjects"]
        merged["by_subject"].update(board["by_subject"])
    return merged


def test_the_seed_spread_rule_judges_a_rerun_by_the_champions_spread_between_seeds_not_its_luckiest_seed(tmp_path):
    """A champion run with 3 seeds: a clean rerun below its luckiest seed on every subject passes (the subject-paired
    rule against that seed alone fails it); a drop of 0.1 on every subject fails, with the pooled spread's t-test."""
    from subjectops.benchmark.aggregate import BenchmarkRegression
    from subjectops.benchmark.regression import check_regressions, regressions

    dino = "world/DINO"
    # per-subject intervals of +-0.01: a cell's sampling error (0.005) below the spread between seeds (0.02)
    seeds = [_subject_board({"lora": {dino: [0.34, 0.24, 0.44]}}, seed=0, half=0.01),  # the luckiest seed
             _subject_board({"lora": {dino: [0.32, 0.22, 0.42]}}, seed=1, half=0.01),
             _subject_board({"lora": {dino: [0.30, 0.20, 0.40]}}, seed=2, half=0.01)]
    champion = _seeds_board(*seeds)
    rerun = _subject_board({"lora": {dino: [0.30, 0.21, 0.40]}}, seed=3)
    broken = _subject_board({"lora": {dino: [0.22, 0.12, 0.32]}}, seed=3)
    assert [r["metric"] for r in regressions(rerun, seeds[0], "subject-paired")] == ["dino"]
    assert regressions(rerun, champion, "seed-spread") == []
    found = regressions(broken, champion, "seed-spread")
    assert [(r["variant"], r["metric"]) for r in found] == [("lora", "dino")]
    test = found[0]["subject_change"]
    # spread within each subject: sd 0.02 (6 degrees of freedom); the change's standard error
    # 0.02 * sqrt(3 * (1/3 + 1)) / 3 = 0.01333; one-sided bound -0.1 + t(0.95, 6) 1.943 * 0.01333
    assert test["subjects"] == 3 and test["seeds"] == {"champion": 9, "ours": 3}
    assert test["change"] == pytest.approx(-0.1) and test["bound"] == pytest.approx(-0.0741, abs=1e-4)
    assert test["p"] < test["level"] == pytest.approx(0.05)
    with pytest.raises(BenchmarkRegression, match="over 3 subjects \\(9 champion seeds\\)"):
        check_regressions(broken, champion, tmp_path, "seed-spread")


def test_the_seed_spread_rule_takes_at_least_one_cells_sampling_error_when_the_champions_seeds_agree_by_chance():
    """Three seeds that read the same accuracy on every subject (no spread) do not make a drop of 0.1 a regression
    when each cell's own 95% interval is +-0.17 (standard error 0.087): the spread is floored at that error."""
    from subjectops.benchmark.regression import regressions

    acc = "world/class acc."
    champion = _seeds_board(*[_subject_board({"lora": {acc: [0.25, 0.45, 0.625]}}, seed=k, half=0.17)
                              for k in range(3)])
    lower = _subject_board({"lora": {acc: [0.15, 0.35, 0.525]}}, seed=3, half=0.17)
    assert regressions(lower, champion, "seed-spread") == []
    # the same drop against cells with narrow intervals (error 0.005) is one
    narrow = _seeds_board(*[_subject_board({"lora": {acc: [0.25, 0.45, 0.625]}}, seed=k, half=0.01)
                            for k in range(3)])
    found = regressions(lower, narrow, "seed-spread")
    assert [r["metric"] for r in found] == ["world-class"]
    assert found[0]["subject_change"]["spread"] == 0 and found[0]["subject_change"]["floor"] == pytest.approx(
        0.01 / 1.96, rel=1e-3)


def test_the_seed_spread_rule_needs_a_champion_of_two_seeds_per_subject_and_says_so_before_any_work():
    from subjectops.benchmark.regression import check_rule, regressions
    from subjectops.errors import SubjectopsError

    one = _subject_board({"lora": {"world/DINO": [0.3, 0.2, 0.4]}})
    with pytest.raises(SubjectopsError, match="fewer than 2 seeds") as err:
        check_rule("seed-spread", 3, one)
    assert "--seeds 0,1,2" in err.value.fix
    with pytest.raises(SubjectopsError, match="at least 2 champion seeds"):
        regressions(one, one, "seed-spread")
    check_rule("seed-spread", 3, _seeds_board(one, _subject_board({"lora": {"world/DINO": [0.3, 0.2, 0.4]}}, 1)))


def test_regression_gate_refuses_a_champion_of_other_subjects(tmp_path):
    from subjectops.benchmark.regression import check_regressions
    from subjectops.errors import SubjectopsError

    champion = dict(_board({"lora": {"prompt-invariant/DINO": (0.6, 0.58, 0.62)}}), subjects=["world-ball-7"])
    with pytest.raises(SubjectopsError, match="not comparable"):
        check_regressions(_board({"lora": {"prompt-invariant/DINO": (0.6, 0.58, 0.62)}}), champion, tmp_path)


def test_inject_bug_plants_each_named_bug_in_a_copy(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import inject_bug
    finally:
        sys.path.remove(str(REPO / "scripts"))
    for name, bug in inject_bug.BUGS.items():
        src = inject_bug.inject(name, tmp_path / name)
        planted = (src.parent / bug.path).read_text()
        assert bug.new in planted and bug.old not in planted
        assert (REPO / bug.path).read_text().count(bug.old) == 1  # the original is untouched
        compile(planted, bug.path, "exec")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "inject_bug.py"), "lr-100x", "--dest",
                           str(tmp_path / "lr-100x")], capture_output=True, text=True)
    assert done.returncode == 2 and "error:" in done.stderr and "fix:" in done.stderr  # not an empty folder


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_benchmark_input_fails_before_any_work(tmp_path, example_subject):
    from subjectops.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["benchmark", "run", "--out", str(tmp_path / "out"), "--no-track",
                                        "--params", str(REPO / "params.yaml"), *args])

    cases = {
        "unknown method": (["--methods", "dreambooht", "--subjects", str(WORLD_SUBJECT)], "unknown method"),
        "no class word": (["--methods", "lora", "--subjects", str(example_subject)], "no class word"),
        "variant moves the prompts": (["--methods", "lora,lora+infer.seed=3", "--subjects", str(WORLD_SUBJECT)],
                                      "sets infer.seed unlike lora"),
        "seeds": (["--methods", "lora", "--subjects", str(WORLD_SUBJECT), "--seeds", "one"], "not a list"),
    }
    for case, (args, message) in cases.items():
        result = run(*args)
        assert result.exit_code == 2, (case, result.output)
        assert message in result.output and "fix:" in result.output, (case, result.output)
    assert not (tmp_path / "out").exists()


def test_seeds_rerun_every_pair_with_other_training_and_sampling_seeds_drawn_per_subject(tmp_path):
    """`--seeds 1,2`: each pair once per seed, in its own folder; benchmark seed N trains and samples each subject
    with its own seed drawn from N and the subject's name, the same for every variant of that subject (so a seed's
    luck is independent across subjects); the gate compares such a rerun with a champion of the same subjects."""
    from subjectops.benchmark.local import BenchSubject, parse_variant, plan_cells, subject_seed, variant_params
    from subjectops.benchmark.regression import regressions
    from subjectops.config import load_params

    cup, teapot = BenchSubject("world-cup-5", WORLD_SUBJECT / "photos", "cup"), \
        BenchSubject("world-teapot-3", WORLD_SUBJECT / "photos", "teapot")
    build = functools.partial(variant_params, REPO / "params.yaml", [], None)
    cells = plan_cells([parse_variant("lora"), parse_variant("dreambooth@reference-guided")], [cup, teapot], [1, 2],
                       tmp_path, build)
    seeds = {(c.variant.label, c.group): (c.params.finetune.seed, c.params.infer.seed) for c in cells}
    assert len(seeds) == 8
    for group in ("world-cup-5@seed-1", "world-cup-5@seed-2", "world-teapot-3@seed-1", "world-teapot-3@seed-2"):
        subject, seed = group.split("@seed-")
        drawn = subject_seed(int(seed), subject)
        assert seeds["lora", group] == seeds["dreambooth@reference-guided", group] == (drawn, drawn)
    drawn = {seeds["lora", group][0] for group in ("world-cup-5@seed-1", "world-cup-5@seed-2",
                                                   "world-teapot-3@seed-1", "world-teapot-3@seed-2")}
    assert len(drawn) == 4  # other subjects, other seeds
    assert cells[-1].run_dir == tmp_path / "runs" / "dreambooth@reference-guided" / "world-teapot-3" / "seed-2"
    assert cells[-1].params.infer.strategy == "reference-guided"
    own = load_params(REPO / "params.yaml", method="lora")
    unseeded = build(parse_variant("lora"), "world-cup-5", None)  # no --seeds: the params' own seeds
    assert (unseeded.finetune.seed, unseeded.infer.seed) == (own.finetune.seed, own.infer.seed)
    rerun = dict(_board({"lora": {"prompt-invariant/DINO": (0.6, 0.58, 0.62)}}),
                 subjects=["world-cup-5@seed-1", "world-cup-5@seed-2"])
    assert regressions(rerun, _board({"lora": {"prompt-invariant/DINO": (0.6, 0.58, 0.62)}})) == []


def test_a_variants_own_model_wins_over_the_benchmarks_model():
    """Image-Alchemy needs world-sdxl while the other methods run on world-sd15: `alchemy+model.base=world-sdxl` in a
    `--model world-sd15` benchmark runs on world-sdxl (it silently ran on world-sd15 before)."""
    from subjectops.benchmark.local import parse_variant, variant_params

    build = functools.partial(variant_params, REPO / "params.yaml", ["infer.prompt_sets=[world]"], "world-sd15")
    assert build(parse_variant("alchemy+model.base=world-sdxl"), "world-cup-5", None).model.base == "world-sdxl"
    assert build(parse_variant("dreambooth"), "world-cup-5", None).model.base == "world-sd15"


# ------------------------------------------------------------------------------------------ shared models
def test_a_benchmark_with_a_variant_on_its_own_base_model_writes_one_leaderboard_naming_each_rows_model(tmp_path):
    """`alchemy+model.base=world-sdxl` in a world-sd15 benchmark: `subjectops compare` refuses runs of two base
    models, the benchmark's leaderboard keeps both and says which model each row ran on."""
    from synthetic_runs import synthetic_params, write_stage

    from subjectops.benchmark.local import BenchSubject, Cell, parse_variant, write_reports
    from subjectops.errors import SubjectopsError
    from subjectops.selection.compare import leaderboard

    cells = []
    for label, base in (("lora", "tiny-sd15"), ("lora+model.base=tiny-sdxl", "tiny-sdxl")):
        params = synthetic_params(model__base=base)
        run = tmp_path / "runs" / label / "teapot"
        for stage in ("refine", "infer", "evaluate"):  # what the reports read; no adapter needed
            write_stage(run, stage, params)
        (run / "finetune").mkdir()
        (run / "finetune" / "method.json").write_text(json.dumps({"method": "lora", "base_model": base}))
        cells.append(Cell(parse_variant(label), BenchSubject("teapot", tmp_path, "teapot"), None, params, run))
    with pytest.raises(SubjectopsError, match="different base models"):
        leaderboard([c.run_dir for c in cells])
    write_reports(tmp_path, cells, track=False)
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["row_models"] == {"lora": "tiny-sd15", "lora+model.base=tiny-sdxl": "tiny-sdxl"}
    assert "| lora+model.base=tiny-sdxl | tiny-sdxl |" in (tmp_path / "leaderboard.md").read_text()
    assert "<th>base model</th>" in (tmp_path / "leaderboard.html").read_text()


def test_shared_models_load_a_pipeline_once_and_hand_out_private_copies(tiny_params):
    import torch

    from subjectops.models.loading import load_pipeline
    from subjectops.models.shared import SharedModels

    shared = SharedModels()
    with shared.active():
        first, second = load_pipeline(tiny_params.model), load_pipeline(tiny_params.model)
    assert list(shared.loads.values()) == [1]
    assert first is not second and first.unet is not second.unet
    with torch.no_grad():  # a finetune training one copy in place leaves the other as loaded
        next(first.unet.parameters()).add_(1.0)
    fresh = load_pipeline(tiny_params.model)  # outside: from disk, as `subjectops run` does
    assert torch.equal(next(second.unet.parameters()), next(fresh.unet.parameters()))
    assert not torch.equal(next(first.unet.parameters()), next(fresh.unet.parameters()))


# ------------------------------------------------------------------------------------- the benchmark itself
def _snapshot(folder: Path) -> dict:
    from subjectops.digest import sha256_file

    return {p.relative_to(folder).as_posix(): (sha256_file(p), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".subjectops.lock"}


def test_a_finished_cell_stays_valid_when_only_another_methods_settings_change(tmp_path):
    """A benchmark-wide --set for one method (two-stage's UNet rate scaled to the world) leaves the other methods'
    finished cells valid; a change to the cell's own method, or to what every method reads, is refused."""
    from subjectops.benchmark.local import CELL_FILE, BenchSubject, Cell, Variant
    from subjectops.config import load_params
    from subjectops.digest import digest_json
    from subjectops.errors import SubjectopsError

    subject = BenchSubject("world-cup-5", WORLD_SUBJECT / "photos", "cup")

    def cell(*sets):
        params = load_params(REPO / "params.yaml", list(sets), method="lora")
        return Cell(Variant("lora"), subject, None, params, tmp_path)

    finished = cell()
    (tmp_path / CELL_FILE).write_text(json.dumps({"params_digest": finished.digest()}))
    assert cell("finetune.two_stage.unet_lr=1e-4").done()
    for changed in ("finetune.lora.lr=1e-3", "infer.steps=7"):
        with pytest.raises(SubjectopsError, match="made with other settings"):
            cell(changed).done()
    # a cell recorded with the digest of all the params (before other methods' sections were left out) is kept and
    # recorded anew, so that another method's --set then leaves it valid too
    (tmp_path / CELL_FILE).write_text(json.dumps({"params_digest": digest_json(
        finished.params.model_dump(mode="json")), "seconds": 1.0}))
    assert cell().done()
    assert json.loads((tmp_path / CELL_FILE).read_text()) == {"params_digest": finished.digest(), "seconds": 1.0}
    assert cell("finetune.two_stage.unet_lr=1e-4").done()


def test_a_killed_benchmark_resumes_without_redoing_finished_pairs(tiny_overrides, tmp_path, monkeypatch):
    import subjectops.pipeline as pipeline_module
    from subjectops.benchmark.local import run_benchmark
    from subjectops.tracking.client import mlflow_client, resolve_tracking_uri

    out = tmp_path / "bench"
    kwargs = dict(params_path=REPO / "params.yaml", sets=tiny_overrides, model=None,
                  variants=["lora", "textual-inversion"], subject_dirs=[WORLD_SUBJECT], class_word=None, seeds=[],
                  out=out)
    real_get_stage, evaluations = pipeline_module.get_stage, []

    def killed_at_second_evaluate(name):
        stage = real_get_stage(name)
        if name != "evaluate":
            return stage

        def run(ctx):
            evaluations.append(ctx.out)
            if len(evaluations) == 2:
                raise KeyboardInterrupt  # the second pair dies after its infer stage
            return stage.run(ctx)
        return dataclasses.replace(stage, run=run)

    monkeypatch.setattr(pipeline_module, "get_stage", killed_at_second_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(**kwargs)
    monkeypatch.setattr(pipeline_module, "get_stage", real_get_stage)
    lora_run, ti_run = out / "runs" / "lora" / "world-cup-5", out / "runs" / "textual-inversion" / "world-cup-5"
    assert (lora_run / "benchmark-cell.json").is_file() and not (ti_run / "benchmark-cell.json").exists()
    assert (ti_run / "infer" / "samples.json").is_file() and not (out / "leaderboard.json").exists()
    before = _snapshot(lora_run)

    seen = []
    result = run_benchmark(**kwargs, track=True,
                           on_cell=lambda cell, finished: seen.append((cell.variant.label, finished)))
    assert seen == [("lora", True), ("textual-inversion", False)]
    assert [c.variant.label for c in result.ran] == ["textual-inversion"]
    assert _snapshot(lora_run) == before  # the finished pair's outputs are untouched, byte for byte and in time
    # textual inversion's finetune and infer had finished before the kill: kept, so the base model is not loaded
    assert not [n for key, n in result.loads.items() if key.startswith("pipeline:")]

    board = json.loads((out / "leaderboard.json").read_text())
    assert set(board["rows"]) == {"lora", "textual-inversion"}
    assert board["subjects"] == ["world-cup-5"]
    page = (out / "leaderboard.html").read_text()
    for label in ("lora", "textual-inversion"):  # each variant's images on the same prompts and seeds
        grid = sorted((out / "grids" / "world-cup-5" / label).glob("*.png"))
        assert len(grid) == 2 and all(f'src="{p.relative_to(out).as_posix()}"' in page for p in grid)
    claims = json.loads((out / "claims.json").read_text())
    assert claims["rows"] == [] and any(n["id"] == "db-over-ti-dino" for n in claims["not_run"])
    # the claims say what their numbers measure, as the leaderboard's first line does (random backbones here)
    assert board["warning"] and claims["warning"] == board["warning"]
    assert (out / "claims.md").read_text().startswith(f"**{board['warning']}**\n\nClaims of the papers")
    assert f'id="quality-warning">{html.escape(board["warning"])}</p>' in (out / "claims.html").read_text()
    # PRES and DIV for the method that trains with class priors (LoRA here), on its class-prompt images
    scores = json.loads((lora_run / "class-prompts" / "scores.json").read_text())
    assert scores["prompt"] == "a photo of a cup" and len(scores["images"]) == 2
    assert all(-1 <= r["pres"] <= 1 and r["div"] > 0 for r in scores["images"])
    assert not (ti_run / "class-prompts").exists()
    # tracking on: the leaderboard, the claims and the grids are in MLflow, the run folders are not
    client = mlflow_client(resolve_tracking_uri())
    [logged] = client.search_runs([client.get_experiment_by_name("subjectops").experiment_id],
                                  "tags.mlflow.runName = 'benchmark-bench'")
    files = artifact_paths(client, logged.info.run_id)
    assert {"leaderboard/leaderboard.html", "leaderboard/claims.html", "leaderboard/claims.json",
            "leaderboard/grids/world-cup-5/lora/00.png"} <= files
    assert not any(f.startswith("leaderboard/runs") for f in files)


def test_pres_is_similarity_to_the_subject_and_div_the_spread_of_class_images(tiny_overrides, tmp_path, monkeypatch,
                                                                             capsys):
    """Class images that are all the subject's first photo: no diversity at all (DIV 0), and PRES the similarity of
    that photo to the photos, above what another image of the class gets."""
    import subjectops.inference.plain as plain
    from subjectops.benchmark.prior_drift import class_prompt_scores
    from subjectops.config import load_params
    from subjectops.stages.finetune import finetune
    from subjectops.stages.priors import priors
    from subjectops.stages.refine import refine

    params = load_params(REPO / "params.yaml", tiny_overrides + ["finetune.method=lora", "finetune.lora.steps=1"])
    run = tmp_path / "run"
    refine(params, WORLD_SUBJECT / "photos", "cup", run / "refine")
    priors(params, run / "refine", run / "priors")
    finetune(params, run / "refine", run / "priors", run / "finetune")
    photos = sorted((run / "refine" / "images").glob("*.png"))
    other = sorted((run / "priors" / "images").glob("*.png"))[0]  # an image of the class, not of the subject

    def drawn(image):
        monkeypatch.setattr(plain, "sample", lambda pipe, prompt, seed, spec: Image.open(image).convert("RGB"))
        return class_prompt_scores(params, run)

    capsys.readouterr()
    subject_like, class_like = drawn(photos[0]), drawn(other)
    # the class-prompt images show their progress, as infer's do
    assert "class prompt for PRES/DIV: 'a photo of a cup': 2/2" in capsys.readouterr().err
    assert all(r["div"] == pytest.approx(0, abs=1e-9) for r in subject_like + class_like)
    assert subject_like[0]["pres"] > class_like[0]["pres"]
