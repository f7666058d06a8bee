"""A run folder is a build: `subjectops run` into a finished run reruns only the stages whose inputs, params keys or
code changed and says which it kept; a killed or preempted run resumes without redoing finished stages; stage
commands on a run folder use its own params and take its lock; `--out` never loses a user's files (issue 23 items
3, 4, 8, 12, 13; issue 26 item 2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_OVERRIDES, refused, sigterm_once, start_holder
from typer.testing import CliRunner

from subjectops.cli import app
from subjectops.config import load_params
from subjectops.digest import sha256_file
from subjectops.pipeline import run
from subjectops.stopping import EXIT_STOPPED

EARLIER_STAGES = ("refine", "priors", "finetune", "infer")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, example_subject):
    """A finished tiny LoRA run (with class priors), and the --set overrides it was made with."""
    root = tmp_path_factory.mktemp("finished")
    sets = TINY_OVERRIDES + [f"priors.cache_dir={root / 'prior-cache'}", "finetune.method=lora"]
    run(load_params(REPO / "params.yaml", sets), example_subject, "teapot", root / "run")
    return root / "run", sets


def copy_run(finished, to: Path) -> Path:
    return Path(shutil.copytree(finished[0], to))  # copy2: the files keep their mtimes


def files_of(run_dir: Path, stages=EARLIER_STAGES) -> dict[str, tuple[int, str]]:
    """Every file of the stages' outputs with its mtime and hash."""
    return {p.relative_to(run_dir).as_posix(): (p.stat().st_mtime_ns, sha256_file(p))
            for stage in stages for p in sorted((run_dir / stage).rglob("*")) if p.is_file()}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "subjectops.cli", *args]


def run_args(example_subject, out: Path, sets: list[str]) -> list[str]:
    return cli("run", str(example_subject), "--class", "teapot", "--out", str(out), "--no-track", "--params",
               "params.yaml", *[a for s in sets for a in ("--set", s)])


def test_a_rerun_keeps_what_did_not_change_and_reruns_evaluate_alone_for_an_evaluate_key(finished, example_subject,
                                                                                        tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    before = files_of(out, (*EARLIER_STAGES, "evaluate"))
    capsys.readouterr()
    run(load_params(REPO / "params.yaml", finished[1]), example_subject, "teapot", out)
    said = " ".join(capsys.readouterr().err.split())
    assert files_of(out, (*EARLIER_STAGES, "evaluate")) == before  # nothing changed: every stage kept
    for stage in (*EARLIER_STAGES, "evaluate"):
        assert f"{stage}: kept from the earlier run" in said, said

    run(load_params(REPO / "params.yaml", finished[1] + ["evaluate.batch_size=3"]), example_subject, "teapot", out)
    said = " ".join(capsys.readouterr().err.split())
    assert files_of(out) == {k: v for k, v in before.items() if not k.startswith("evaluate/")}
    for stage in EARLIER_STAGES:
        assert f"{stage}: kept from the earlier run" in said, said
    assert "evaluate: runs again (params changed: evaluate.batch_size)" in said, said
    evaluated = json.loads((out / "evaluate" / "manifest.json").read_text())
    assert evaluated["params"]["evaluate"]["batch_size"] == 3
    assert (out / "evaluate" / "manifest.json").stat().st_mtime_ns > before["evaluate/manifest.json"][0]


def test_a_run_stopped_during_infer_exits_75_and_resumes_without_redoing_finished_stages(finished, example_subject,
                                                                                        tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = files_of(out, ("refine", "priors", "finetune"))
    sets = finished[1] + ["infer.prompt_invariant.num_images=6"]  # infer runs again, long enough to be stopped
    proc = subprocess.Popen(run_args(example_subject, out, sets), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    work = out / "infer.partial"
    said = sigterm_once(proc, lambda: list(work.glob("images/*/0000.png")))
    assert proc.returncode == EXIT_STOPPED, said
    assert "infer stopped by SIGTERM after image" in said and "run the same command again" in said, said
    assert not work.exists() and (out / "infer" / "manifest.json").is_file()  # the earlier infer is kept

    again = subprocess.run(run_args(example_subject, out, sets), cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    said = " ".join((again.stdout + again.stderr).split())
    assert again.returncode == 0, said
    for stage in ("refine", "priors", "finetune"):
        assert f"{stage}: kept from the earlier run" in said, said
    assert "infer: runs again (params changed: infer.prompt_invariant.num_images)" in said, said
    assert files_of(out, ("refine", "priors", "finetune")) == before  # finetune was not trained again
    samples = json.loads((out / "infer" / "samples.json").read_text())
    assert len([s for s in samples if s["prompt_set"] == "prompt-invariant"]) == 6


def test_evaluate_on_a_copied_run_folder_uses_the_runs_own_params(finished, tmp_path, monkeypatch):
    run_dir = copy_run(finished, tmp_path / "elsewhere" / "run")
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults would say dreambooth on stable-diffusion-v1-5
    result = CliRunner().invoke(app, ["evaluate", str(run_dir), "--out", str(tmp_path / "evaluated")])
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "evaluated" / "manifest.json").read_text())["params"]
    assert params["finetune"]["method"] == "lora" and params["model"]["base"] == "tiny-sd15"
    assert params["infer"]["prompt_invariant"]["num_images"] == 2
    report = (tmp_path / "evaluated" / "report.html").read_text()
    assert "method: lora" in report and "base: tiny-sd15" in report and "method: dreambooth" not in report


def test_stage_commands_take_the_run_folders_lock(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    before = files_of(run_dir, (*EARLIER_STAGES, "evaluate"))
    holder = start_holder(run_dir)
    try:
        refused(["evaluate", run_dir], f"is in use by another run (pid {holder.pid}")
        refused(["finetune", "--run", run_dir], f"is in use by another run (pid {holder.pid}")
        refused(["infer", "--refine", run_dir / "refine", "--finetune", run_dir / "finetune", "--out",
                 run_dir / "infer"], f"is in use by another run (pid {holder.pid}")
    finally:
        holder.communicate("go on\n", timeout=60)
    assert files_of(run_dir, (*EARLIER_STAGES, "evaluate")) == before


# --- --out: nothing of a user's is lost (issue 23 item 3) ------------------------------------------------------
def test_an_out_folder_that_is_not_a_run_is_refused_before_any_work(example_subject, tmp_path):
    out = tmp_path / "thesis"
    (out / "evaluate").mkdir(parents=True)
    (out / "evaluate" / "thesis.txt").write_text("three years of work")
    refused(["run", example_subject, "--class", "teapot", "--model", "tiny-sd15", "--no-track", "--out", out],
            f"--out {out} is not a subjectops run folder", "--force")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["evaluate", "evaluate/thesis.txt"]


def test_the_subject_folder_as_out_is_refused(example_subject, tmp_path):
    subject = Path(shutil.copytree(example_subject, tmp_path / "teapot"))
    before = sorted(p.name for p in subject.iterdir())
    refused(["run", subject, "--class", "teapot", "--model", "tiny-sd15", "--no-track", "--out", subject, "--force"],
            "is inside the subject folder")
    assert sorted(p.name for p in subject.iterdir()) == before


def test_a_finished_run_of_another_class_is_not_replaced_unless_forced(finished, example_subject, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = files_of(out, (*EARLIER_STAGES, "evaluate"))
    refused(["run", example_subject, "--class", "mug", "--model", "tiny-sd15", "--no-track", "--out", out],
            "holds the run of another subject ('teapot', class 'teapot')", "--force")
    assert files_of(out, (*EARLIER_STAGES, "evaluate")) == before


def test_files_subjectops_did_not_write_in_a_stage_folder_are_refused_and_kept_when_forced(finished, example_subject,
                                                                                          tmp_path, capsys):
    out = copy_run(finished, tmp_path / "run")
    (out / "evaluate" / "thesis.txt").write_text("three years of work")
    refused(["run", example_subject, "--class", "teapot", "--no-track", "--out", out, "--params", REPO / "params.yaml",
             *[a for s in finished[1] for a in ("--set", s)]], "evaluate/thesis.txt")
    run(load_params(REPO / "params.yaml", finished[1]), example_subject, "teapot", out, force=True)
    said = " ".join(capsys.readouterr().err.split())
    assert "evaluate: runs again (its output's files changed since it was made)" in said, said
    kept = list(out.glob("evaluate.kept-*/thesis.txt"))
    assert [p.read_text() for p in kept] == ["three years of work"]
    assert (out / "evaluate" / "manifest.json").is_file() and not (out / "evaluate" / "thesis.txt").exists()


# --- SIGTERM and stale partials in priors (issue 23 item 12) -------------------------------------------------------
def test_sigterm_during_priors_exits_75_and_leaves_no_partial_cache_entry(finished, tmp_path):
    cache = tmp_path / "cache"
    sets = finished[1] + [f"priors.cache_dir={cache}", "priors.num_images=8", "priors.batch_size=1"]
    proc = subprocess.Popen(cli("priors", "--refine", str(finished[0] / "refine"), "--out", str(tmp_path / "priors"),
                                "--params", "params.yaml", *[a for s in sets for a in ("--set", s)]),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = sigterm_once(proc, lambda: list(cache.glob("*.partial-*/images/0000.png")))
    assert proc.returncode == EXIT_STOPPED, said
    assert "priors stopped by SIGTERM after class image" in said and "run the same command again" in said, said
    assert not list(cache.glob("*.partial-*")) and not (tmp_path / "priors").exists()


def test_partials_no_process_is_generating_are_removed(tmp_path):
    from subjectops.runlock import wait_for_lock
    from subjectops.stages.priors import remove_stale_partials

    cache = tmp_path / "cache"
    for name in ("dead.partial-999999", "live.partial-1"):
        (cache / name / "images").mkdir(parents=True)
        (cache / name / "images" / "0000.png").write_bytes(b"png")
        (cache / name / "images").chmod(0o555)  # as a generation leaves them: read-only
    with wait_for_lock(cache / "live.lock"):  # a generation in progress holds its entry's lock
        remove_stale_partials(cache)
    assert sorted(p.name for p in cache.glob("*.partial-*")) == ["live.partial-1"]


def test_an_output_killed_right_after_publishing_still_records_what_it_was_made_from(tiny_params, tmp_path):
    """The fingerprint is in the manifest before the output is published: a stage killed just after publishing is
    kept by the rerun (the interruption probe saw a finished pretrain-disc made again after a kill -9)."""
    from subjectops.stages.base import Stage, StageContext
    from subjectops.stages.common import stage_output, write_manifest
    from subjectops.stages.incremental import ContentHashes, reason_to_run, run_stage

    def publish_then_die(ctx):
        with stage_output(ctx.out) as work:
            (work / "made.txt").write_text("made")
            write_manifest(work, "publish_then_die", ctx.params, {})
        raise KeyboardInterrupt  # the process dies between publishing and anything after

    stage = Stage(name="publish_then_die", help="", run=publish_then_die, params=("evaluate",))
    ctx = StageContext(tiny_params, {}, tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, ctx)
    assert reason_to_run(stage, ctx, ContentHashes()) is None
