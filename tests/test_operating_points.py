"""Operating points: the Pareto front in (CLIP-T, DINO) on hand-made points, ties included, and the rule that
chooses what ships."""

from __future__ import annotations

import re

import pytest

from subjectops.errors import SubjectopsError
from subjectops.selection.pareto import OperatingPoint, choose, pareto_front

# (CLIP-T, DINO), both higher-is-better
HAND_MADE = {
    "overfit": (0.20, 0.90),
    "overfit-twin": (0.20, 0.90),  # an exact tie with a front point: both stay
    "same-clip-lower-dino": (0.20, 0.80),  # dominated by "overfit" on DINO alone
    "middle": (0.50, 0.50),
    "inside": (0.40, 0.40),  # dominated by "middle" on both
    "underfit": (0.90, 0.10),
    "same-dino-lower-clip": (0.85, 0.10),  # dominated by "underfit" on CLIP-T alone
    "knee": (0.60, 0.45),  # trades DINO for CLIP-T against "middle": on the front
}


def test_front_is_exactly_the_non_dominated_set_with_ties():
    labels = list(HAND_MADE)
    front = [labels[i] for i in pareto_front(list(HAND_MADE.values()))]
    assert front == ["overfit", "overfit-twin", "middle", "underfit", "knee"]
    assert pareto_front([]) == [] and pareto_front([(0.1, 0.1)]) == [0]
    assert pareto_front([(0.3, 0.3)] * 3) == [0, 1, 2]


def points() -> list[OperatingPoint]:
    return [OperatingPoint(label, "plain", {}, clip_t, 0.01, dino, 0.01, 4) for label,
            (clip_t, dino) in HAND_MADE.items()]


def test_choose_maximises_dino_subject_to_the_clip_t_floor():
    assert choose(points(), None).label == "overfit"
    assert choose(points(), 0.45).label == "middle"
    assert choose(points(), 0.55).label == "knee"
    assert choose(points(), 0.9).label == "underfit"
    with pytest.raises(SubjectopsError, match=r"CLIP-T >= 0.95 \(the highest is 0.9000\)") as err:
        choose(points(), 0.95)
    assert "0.9000" in err.value.fix


def comparable_run(run, method: str, seed_offset: int = 0, shift: float = 0.0, subject: str = "teapot",
                   base: str | None = None, pretrained: bool = True):
    """A run directory as the stages write it (synthetic: no training), with per-image values that vary; the
    base model is infer's (tiny-sd15) unless finetune's method.json names another."""
    import json

    import numpy as np
    from synthetic_runs import metrics_json, synthetic_params, write_stage

    params = synthetic_params()
    write_stage(run, "refine", params)
    described = json.loads((run / "refine" / "subject.json").read_text())
    (run / "refine" / "subject.json").write_text(json.dumps(dict(described, name=subject)))
    write_stage(run, "infer", params)
    (run / "finetune").mkdir(parents=True)
    (run / "finetune" / "method.json").write_text(json.dumps({"method": method, **({"base_model": base} if base
                                                                                  else {})}))
    doc = metrics_json(pretrained=pretrained)
    rng = np.random.default_rng(len(method))
    for row in doc["per_image"]:
        row["seed"] += seed_offset
        for key in ("dino", "clip-t"):
            row[key] = float(row[key] + shift + rng.normal(0, 0.05))
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "metrics.json").write_text(json.dumps(doc))
    return run, doc


def test_compare_gives_one_leaderboard_of_three_methods(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from subjectops.cli import app

    runs = {m: comparable_run(tmp_path / m, m, shift=i * 0.1) for i,
            m in enumerate(["dreambooth", "lora", "two-stage"])}
    result = CliRunner().invoke(app,
                                ["compare", *[str(r) for r, _ in runs.values()], "--out", str(tmp_path / "board")])
    assert result.exit_code == 0, result.output
    board = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert list(board["rows"]) == ["dreambooth / plain", "lora / plain", "two-stage / plain"]
    for method, (_, doc) in runs.items():
        values = np.array([row["dino"] for row in doc["per_image"]])
        cell = board["rows"][f"{method} / plain"]["prompt-invariant/DINO"]
        assert cell["mean"] == pytest.approx(values.mean())
        assert values.min() <= cell["low"] < cell["mean"] < cell["high"] <= values.max()
    assert "| two-stage / plain |" in (tmp_path / "board" / "leaderboard.md").read_text()
    assert "<table class=\"leaderboard\">" in (tmp_path / "board" / "leaderboard.html").read_text()


def test_compare_refuses_runs_with_different_seeds_naming_them(tmp_path):
    from subjectops.selection.compare import leaderboard

    first, _ = comparable_run(tmp_path / "a", "lora")
    other, _ = comparable_run(tmp_path / "b", "dreambooth", seed_offset=100)
    with pytest.raises(SubjectopsError,
                       match=r"runs of teapot differ in seeds: .*/a has .*\[0, 1, 2, 3\].*/b has .*\[100, 101, 102, "
                             r"103\]"):
        leaderboard([first, other])


def test_the_benchmark_leaderboard_refuses_registered_runs_with_different_seeds(tmp_path, monkeypatch):
    """The benchmark's aggregation reads registered versions back from MLflow and refuses, naming the difference,
    when two runs of one subject were generated from different seeds."""
    import json

    from synthetic_runs import write_pipeline_stage

    from subjectops.benchmark.leaderboard import benchmark_leaderboard
    from subjectops.config import validate_params
    from subjectops.stages.catalog import stage_catalog
    from subjectops.tracking.sync import sync

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)  # the local MLflow artifact store lands here
    registered = []
    for method, seed_offset in (("lora", 0), ("textual-inversion", 100)):
        params = validate_params({"model": {"base": "tiny-sd15"}, "finetune": {"method": method}})
        run = tmp_path / method
        for stage in ("refine", "finetune", "infer", "evaluate"):
            write_pipeline_stage(stage, run / stage, params, "dog")
        metrics = run / "evaluate" / "metrics.json"
        doc = json.loads(metrics.read_text())
        for row in doc["per_image"]:
            row["seed"] += seed_offset
        metrics.write_text(json.dumps(doc))
        registered.append(sync(run, stage_catalog())["registered"])
    with pytest.raises(SubjectopsError, match=r"runs of dog differ in seeds: .*subjectops-dog-v1 has .*\[0, 1, 2, 3\]"
                                              r".*subjectops-dog-v2 has .*\[100, 101, 102, 103\]"):
        benchmark_leaderboard(registered, tmp_path / "board", "subjectops", "refused")
    assert not (tmp_path / "board" / "leaderboard.md").exists()


def test_the_front_plot_labels_every_point_readably_even_ties():
    """Each point's label at 10 pt, none overlapping another (the exact tie and the close points included)."""
    from subjectops.selection.pareto import front_plot

    figure = []
    uri = front_plot(points(), chosen="middle", figure=figure)
    assert uri.startswith("data:image/png;base64,")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    [fig] = figure
    renderer = FigureCanvasAgg(fig).get_renderer()  # the closed figure, measured as it was drawn
    labels = {t.get_text(): t for t in fig.axes[0].texts}
    assert set(labels) == set(HAND_MADE)
    assert all(t.get_fontsize() >= 10 for t in labels.values())
    boxes = [t.get_window_extent(renderer) for t in labels.values()]
    overlapping = [(a, b) for i, a in enumerate(labels) for j, b in enumerate(labels)
                   if i < j and boxes[i].overlaps(boxes[j])]
    assert not overlapping


def test_compare_refuses_runs_of_different_base_models(tmp_path):
    from subjectops.selection.compare import leaderboard

    first, _ = comparable_run(tmp_path / "a", "lora")
    other, _ = comparable_run(tmp_path / "b", "dreambooth", base="world-sd15")
    with pytest.raises(SubjectopsError, match=r"different base models \(tiny-sd15: .*/a; world-sd15: .*/b\)") as err:
        leaderboard([first, other])
    assert "one base model" in err.value.fix


def test_compare_refuses_random_and_pretrained_backbones_together(tmp_path):
    from subjectops.selection.compare import leaderboard

    first, _ = comparable_run(tmp_path / "a", "lora")
    other, _ = comparable_run(tmp_path / "b", "lora", subject="dog", pretrained=False)
    with pytest.raises(SubjectopsError, match=r"kinds of metric backbones .*pretrained: .*/a; random: .*/b"):
        leaderboard([first, other])


def test_compare_refuses_rows_that_ran_on_different_subjects(tmp_path):
    from subjectops.selection.compare import leaderboard

    runs = [comparable_run(tmp_path / "a", "lora")[0], comparable_run(tmp_path / "b", "dreambooth", subject="dog")[0]]
    with pytest.raises(SubjectopsError, match=r"cover different subjects \(lora / plain has no run of dog; "
                                              r"dreambooth / plain has no run of teapot\)"):
        leaderboard(runs)


def _leaderboard_page(tmp_path, runs):
    from typer.testing import CliRunner

    from subjectops.cli import app

    result = CliRunner().invoke(app, ["compare", *[str(r) for r in runs], "--out", str(tmp_path / "board")])
    assert result.exit_code == 0, result.output
    return (tmp_path / "board" / "leaderboard.html").read_text(), result.output


def test_compare_shows_each_subject_apart_under_the_pooled_table(tmp_path):
    from helpers import Outline

    runs = [comparable_run(tmp_path / f"{m}-{s}", m, subject=s, shift=0.2 * (s == "dog"))[0]
            for m in ("lora", "dreambooth") for s in ("teapot", "dog")]
    page, _ = _leaderboard_page(tmp_path, runs)
    outline = Outline(page)
    titles = [text for text in re.findall(r"<h2>([^<]*)</h2>", page)]
    assert titles == ["all 2 subjects pooled (dog, teapot)", "subject dog", "subject teapot"]
    assert len(outline.position("table", **{"class": "leaderboard"})) == 3
    dog, teapot = list(outline.tables.values())[1:]
    column = dog[0].index("prompt-invariant/DINO ↑")
    # the dog's runs were shifted up: its own table shows it, the pooled one lies between
    assert float(dog[1][column].split()[0]) > float(teapot[1][column].split()[0])


def test_compare_marks_directions_carries_the_random_banner_and_gives_fid_no_interval(tmp_path):
    from helpers import Outline

    from subjectops.report.html import RANDOM_WARNING

    runs = [comparable_run(tmp_path / m, m, pretrained=False) for m in ("lora", "dreambooth")]
    page, output = _leaderboard_page(tmp_path, [r for r, _ in runs])
    outline = Outline(page)
    banner = RANDOM_WARNING.format(roles="clip, dino, lpips")
    assert re.search(r"<body><p class=\"warning\" id=\"quality-warning\">([^<]*)</p>", page).group(1) == banner
    assert output.startswith(f"**{banner}**")  # the markdown printed by the command, first line
    [table] = outline.tables.values()
    head = table[0]
    assert "prompt-invariant/DINO ↑" in head and "prompt-invariant/CLIP-T ↑" in head
    assert "prompt-invariant/FID ↓" in head and "prompt-invariant/LPIPS ↓" in head
    fid, dino = head.index("prompt-invariant/FID ↓"), head.index("prompt-invariant/DINO ↑")
    for row in table[1:]:
        assert re.fullmatch(r"\d+\.\d{4}", row[fid]), row[fid]  # the mean, no [low, high]
        assert re.fullmatch(r"\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]", row[dino]), row[dino]
    # the interval on a line of its own under the mean: a dozen metric columns fit a screen
    assert re.search(r"<td class=\"num\">\d\.\d{4} <br><span class=\"ci\">\[\d\.\d{4}, \d\.\d{4}\]</span></td>", page)
    assert "set-level metric (one value per image set): no interval" in page
