"""Logs a person can read without a terminal (issue 26 item 3): a run piped to a file says when each stage starts and
ends and how long it took, shows the loss every `finetune.log_every` steps, the token scan's progress and ETA, and
ends with a summary; no color codes reach the file, and MLflow has no type-hint warning to print."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, TINY_OVERRIDES

from subjectops.config import ModelCfg, load_params
from subjectops.console import LineProgress
from subjectops.data import rare_tokens
from subjectops.data.rare_tokens import TokenScanCfg
from subjectops.stages.plan import plan
from subjectops.stages.registry import get_stage

DURATION = r"\d+(\.\d)? s|\d+ min \d\d s"


def test_a_run_piped_to_a_file_logs_stage_times_losses_and_a_summary(tmp_path, example_subject):
    sets = TINY_OVERRIDES + [f"priors.cache_dir={tmp_path / 'cache'}", "finetune.lora.steps=6",
                             "finetune.log_every=2"]
    log_file = tmp_path / "run.log"
    with log_file.open("w") as f:  # what `subjectops run ... > run.log 2>&1` (CI, nohup, a pod's log) gets
        proc = subprocess.run([sys.executable, "-m", "subjectops.cli", "run", str(example_subject), "--class",
                               "teapot", "--method", "lora", "--out", str(tmp_path / "run"), "--no-track",
                               *[a for s in sets for a in ("--set", s)]],
                              stdout=f, stderr=subprocess.STDOUT, timeout=600, cwd=REPO)
    text = log_file.read_text()
    assert proc.returncode == 0, text
    assert "\x1b[" not in text  # no escape codes in a file

    lines = text.splitlines()
    # register runs through the tracker: with --no-track it is left for `subjectops sync`, and said so in one line
    planned = [get_stage(p.name).command for p in plan(load_params(REPO / "params.yaml", sets)).stages
               if not get_stage(p.name).tracked]
    assert f"register: left for later (--no-track): `subjectops sync {tmp_path / 'run'}` registers the model" in lines
    assert {"refine", "priors", "finetune", "infer", "evaluate"} <= set(planned)
    for stage in planned:
        started = [i for i, line in enumerate(lines) if line == f"stage {stage}: started"]
        ended = [i for i, line in enumerate(lines) if re.fullmatch(rf"stage {stage}: finished in ({DURATION})", line)]
        assert len(started) == len(ended) == 1 and started[0] < ended[0], (stage, text)

    # a line per log_every (2) steps: steps 2, 4 and 6, each with its loss, the elapsed time and (before the end) ETA
    loss_lines = [line for line in lines if line.startswith("finetune lora: ")]
    assert [int(re.match(r"finetune lora: (\d+)/6 loss \d+\.\d{4} \(", line).group(1)) for line in loss_lines] == \
        [2, 4, 6], text
    assert all("ETA" in line for line in loss_lines[:-1]) and "nan" not in text

    summary = [line.removeprefix("summary: ") for line in lines if line.startswith("summary: ")]
    assert summary[0].startswith("identifier: sks (prompt: \"a photo of sks teapot\", method lora, base tiny-sd15)")
    assert any(line.startswith("metric prompt-invariant/dino: ") and "(random backbone" in line for line in summary)
    assert summary[-1] == f"report: {tmp_path / 'run' / 'evaluate' / 'report.html'}"


def test_line_progress_prints_every_n_units_with_an_eta(capsys):
    shown = LineProgress(every=3)
    task = shown.add_task("work", total=7, last="")
    for i in range(7):
        shown.update(task, advance=1, last=f"item {i}")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["work: 3/7 item 2", "work: 6/7 item 5", "work: 7/7 item 6"]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]


def test_token_scan_shows_each_score_with_progress(tmp_path, capsys):
    cfg = TokenScanCfg(candidates=["immen", "pasqu"], images_per_token=2, steps=1, resolution=32,
                       cache_dir=str(tmp_path))
    rare_tokens.scan(cfg, ModelCfg(base="tiny-sdxl"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("token scan of tiny-sdxl: ")]
    assert [re.match(r"token scan of tiny-sdxl: (\d)/3 (\w+): 0\.\d{4} \(", line).groups() for line in lines] == \
        [("1", "immen"), ("2", "pasqu"), ("3", "sks")]
    assert "ETA" in lines[0]


def test_loading_the_served_model_class_asks_for_no_type_hints():
    proc = subprocess.run([sys.executable, "-W", "always", "-c", "import subjectops.tracking.pyfunc"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Add type hints" not in proc.stderr


def test_the_alchemy_token_is_printed_once_with_where_it_came_from(capsys):
    from subjectops.methods import configured_method

    params = load_params(REPO / "params.yaml", ["finetune.method=alchemy", "finetune.alchemy.token=immen"])
    method = configured_method(params)
    assert method.identifier() == method.identifier() == "immen"
    assert capsys.readouterr().err.splitlines() == [
        "alchemy: identifier token 'immen' (chosen by finetune.alchemy.token)"]
