"""`subjectops`: the command line. Every stage command is a thin adapter over one stage function.
DVC's stages (dvc.yaml) call these commands; Kubeflow components call the stage functions themselves,
inside the project image (components/stages.py), except multi-GPU finetune, which `accelerate launch`es
`subjectops finetune`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from subjectops.cli_common import (IfNeededOpt, MethodOpt, ModelOpt, ParamsOpt, RunOpt, SetOpt, build_params, console, done,
                                   user_errors)
from subjectops.errors import SubjectopsError
from subjectops.world.cli import world_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Personalize text-to-image diffusion models from a few photos of one subject.")
models_app = typer.Typer(no_args_is_help=True, help="Base models and metric encoders.")
app.add_typer(models_app, name="models")
tokens_app = typer.Typer(no_args_is_help=True, help="Rare identifier tokens (Image-Alchemy sec. 3.1).")
app.add_typer(tokens_app, name="tokens")
data_app = typer.Typer(no_args_is_help=True, help="Subjects in an object store (S3, MinIO): AWS_ENDPOINT_URL, "
                                                 "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY as in the chart's Secret.")
app.add_typer(data_app, name="data")
app.add_typer(world_app, name="world")


def stage_path(explicit: Optional[Path], run: Optional[Path], stage: str, required: bool = True) -> Optional[Path]:
    if explicit is not None:
        return explicit
    if run is not None and (required or (run / stage).exists()):
        return run / stage
    if required:
        raise SubjectopsError(f"no directory given for {stage}", fix=f"pass --{stage.replace('_', '-')} DIR or --run RUN_DIR")
    return None


def if_needed_skip_reason(params: Params, stage: str) -> Optional[str]:
    """Why `plan(params)` leaves `stage` out, or None when it is planned (`--if-needed`, for DVC)."""
    from subjectops.methods.plan import plan

    planned = plan(params)
    return None if planned.has(stage) else planned.why_not(stage)


def skipped_as_not_planned(params: Params, stage: str, out: Path) -> bool:
    """`--if-needed`: when the plan leaves `stage` out, write its output that says why, and say it; decided before
    the stage's module is imported (diffusers and torch: seconds that a skipped DVC stage need not pay)."""
    reason = if_needed_skip_reason(params, stage)
    if reason is None:
        return False
    from subjectops.stages.common import not_needed

    done(f"{stage.replace('_', '-')} ({reason})", not_needed(stage, params, out, reason))
    return True


def planned_input(params: Params, stage: str, explicit: Optional[Path], run: Optional[Path], source: str) -> Optional[Path]:
    """An input directory of `stage`: required when the plan has `source` feed it, else optional (and ignored)."""
    from subjectops.methods.plan import plan

    return stage_path(explicit, run, source, required=source in plan(params).inputs(stage))


@app.command()
@user_errors
def run(subject_dir: Path = typer.Argument(..., help="folder of 3-20 photos of one subject"),
        class_word: str = typer.Option(..., "--class", help="the subject's class, e.g. teapot"),
        method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt,
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<run-id>)"),
        params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
        track: bool = typer.Option(True, "--track/--no-track", help="log to MLflow and register the model (MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")):
    """Run the whole pipeline in-process: refine, priors, pretrain-disc (when the method needs it), finetune, infer,
    sweep (when the run keeps snapshots), evaluate."""
    from subjectops.pipeline import default_run_dir, run as run_pipeline
    from subjectops.tracking import NullTracker
    from subjectops.tracking.cli import make_tracker

    params = build_params(params_path, sets, model, method)
    if out is None:
        out = default_run_dir(subject_dir, params)
        # named up front: resuming after a preemption (exit 75) means running again with --out of this folder
        console.print(f"run folder: {out}", highlight=False)
    dirs = run_pipeline(params, subject_dir, class_word, out, tracker=make_tracker(params) if track else NullTracker())
    for stage, path in dirs.items():
        done(stage, path)
    done("report", dirs["evaluate"] / "report.html")
    if not track and if_needed_skip_reason(params, "register") is None:
        console.print(f"register: left for later (--no-track): `subjectops sync {out}` registers the model", highlight=False)


@app.command()
@user_errors
def refine(subject_dir: Path = typer.Argument(...), class_word: str = typer.Option(..., "--class"),
           out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
           model: Optional[str] = ModelOpt, params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Validate and normalize the photos, segment the subject, write prompts."""
    from subjectops.stages.refine import refine as stage

    params = build_params(params_path, sets, model)
    done("refine", stage(params, subject_dir, class_word, stage_path(out, run, "refine")))


@app.command()
@user_errors
def priors(refine_dir: Optional[Path] = typer.Option(None, "--refine"), out: Optional[Path] = typer.Option(None, "--out"),
           run: Optional[Path] = RunOpt, model: Optional[str] = ModelOpt, method: Optional[str] = MethodOpt,
           if_needed: bool = IfNeededOpt, params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Class-prior images from the base model (content-addressed cache)."""
    params = build_params(params_path, sets, model, method)
    if if_needed and skipped_as_not_planned(params, "priors", stage_path(out, run, "priors")):
        return
    from subjectops.stages.priors import priors as stage

    done("priors", stage(params, stage_path(refine_dir, run, "refine"), stage_path(out, run, "priors")))


@app.command("pretrain-disc")
@user_errors
def pretrain_disc(refine_dir: Optional[Path] = typer.Option(None, "--refine"),
                  priors_dir: Optional[Path] = typer.Option(None, "--priors", help="class images (Table 3's fakes)"),
                  out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
                  model: Optional[str] = ModelOpt, method: Optional[str] = MethodOpt, if_needed: bool = IfNeededOpt,
                  params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Pretrain Hypnos' latent discriminator on the Table 3 image types (seed 000 app. B.2)."""
    params = build_params(params_path, sets, model, method)
    if if_needed and skipped_as_not_planned(params, "pretrain_disc", stage_path(out, run, "pretrain_disc")):
        return
    from subjectops.stages.pretrain_disc import pretrain_disc as stage

    pri = planned_input(params, "pretrain_disc", priors_dir, run, "priors")
    done("pretrain-disc", stage(params, stage_path(refine_dir, run, "refine"), pri, stage_path(out, run, "pretrain_disc")))


@app.command()
@user_errors
def finetune(refine_dir: Optional[Path] = typer.Option(None, "--refine"),
             priors_dir: Optional[Path] = typer.Option(None, "--priors"),
             disc_dir: Optional[Path] = typer.Option(None, "--disc", help="pretrain-disc output (Hypnos)"),
             out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
             checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="checkpoint folder (default "
                                                        "OUT.partial/checkpoints), e.g. on a volume a retried pod mounts"),
             method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt, params_path: Path = ParamsOpt,
             sets: Optional[List[str]] = SetOpt):
    """Train the method; resumes from the latest checkpoint of an interrupted run with the same params and inputs.
    On SIGTERM it finishes the step, writes a checkpoint and exits 75 (run it again to resume)."""
    from subjectops.stages.finetune import finetune as stage

    params = build_params(params_path, sets, model, method)
    pri = planned_input(params, "finetune", priors_dir, run, "priors")
    disc = planned_input(params, "finetune", disc_dir, run, "pretrain_disc")
    done("finetune", stage(params, stage_path(refine_dir, run, "refine"), pri, stage_path(out, run, "finetune"), disc,
                           checkpoint_dir=checkpoints))


@app.command()
@user_errors
def infer(refine_dir: Optional[Path] = typer.Option(None, "--refine"),
          finetune_dir: Optional[Path] = typer.Option(None, "--finetune"),
          out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
          model: Optional[str] = ModelOpt, params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Generate the prompt sets with the fine-tuned model."""
    from subjectops.stages.infer import infer as stage

    params = build_params(params_path, sets, model)
    done("infer", stage(params, stage_path(refine_dir, run, "refine"), stage_path(finetune_dir, run, "finetune"),
                        stage_path(out, run, "infer")))


@app.command()
@user_errors
def sweep(run_dir: Optional[Path] = typer.Argument(None, help="run directory: uses RUN/refine, RUN/finetune, RUN/sweep"),
          refine_dir: Optional[Path] = typer.Option(None, "--refine"),
          finetune_dir: Optional[Path] = typer.Option(None, "--finetune"),
          out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
          model: Optional[str] = ModelOpt, method: Optional[str] = MethodOpt, if_needed: bool = IfNeededOpt,
          params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Score every snapshot and DreamBlend combination of the finetune output (operating points, Pareto front)."""
    params = build_params(params_path, sets, model, method)
    run = run_dir or run
    if if_needed and skipped_as_not_planned(params, "sweep", stage_path(out, run, "sweep")):
        return
    from subjectops.stages.sweep import sweep as stage

    done("sweep", stage(params, stage_path(refine_dir, run, "refine"), stage_path(finetune_dir, run, "finetune"),
                        stage_path(out, run, "sweep")))


@app.command()
@user_errors
def evaluate(run_dir: Optional[Path] = typer.Argument(None, help="run directory: uses RUN/refine, RUN/infer, RUN/sweep, RUN/evaluate"),
             refine_dir: Optional[Path] = typer.Option(None, "--refine"),
             infer_dir: Optional[Path] = typer.Option(None, "--infer"),
             sweep_dir: Optional[Path] = typer.Option(None, "--sweep", help="sweep output whose Pareto front the report draws "
                                                      "(read when the plan has a sweep)"),
             out: Optional[Path] = typer.Option(None, "--out"), run: Optional[Path] = RunOpt,
             model: Optional[str] = ModelOpt, params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Score the generated images (DINO, CLIP-I, CLIP-T, FID, LPIPS, SSIM, PSNR) and write report.html."""
    from subjectops.stages.evaluate import evaluate as stage

    params = build_params(params_path, sets, model)
    run = run_dir or run
    result = stage(params, stage_path(refine_dir, run, "refine"), stage_path(infer_dir, run, "infer"),
                   stage_path(out, run, "evaluate"), planned_input(params, "evaluate", sweep_dir, run, "sweep"))
    done("evaluate", result)
    done("report", result / "report.html")


@app.command()
@user_errors
def replace(image: Path = typer.Argument(..., help="photo whose subject is replaced"),
            run: Path = typer.Option(..., "--run", help="a run fine-tuned with --method hifi-tuner"),
            word: str = typer.Option(..., "--word", help="the word for the subject to replace, e.g. cat"),
            out: Path = typer.Option(..., "--out"), params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Replace the subject of a photo with the run's subject (HiFi Tuner alg. 3: null-text inversion, prompt-to-prompt)."""
    from subjectops.stages.replace import replace as stage

    done("replace", stage(build_params(params_path, sets), image, run, word, out))


@models_app.command("check")
@user_errors
def models_check(params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt, model: Optional[str] = ModelOpt,
                 method: Optional[str] = MethodOpt):
    """Say which real weights are present and how to provide the missing ones."""
    from rich.table import Table

    from subjectops.models.check import check_weights

    params = build_params(params_path, sets, model, method)
    table = Table(title="weights")
    for col in ("purpose", "id or path", "status", "how to provide"):
        table.add_column(col)
    rows = check_weights(params)
    for row in rows:
        table.add_row(row.purpose, row.ident, "[green]present" if row.present else "[red]missing", row.how)
    console.print(table)


@app.command()
@user_errors
def choose(run_dir: Path = typer.Argument(..., help="run directory with sweep/ (`subjectops sweep RUN`)"),
           min_clip_t: Optional[float] = typer.Option(None, "--min-clip-t", help="CLIP-T floor (default registry.choose.min_clip_t)"),
           name: Optional[str] = typer.Option(None, "--name", help="registered model name (default registry.model_name)"),
           tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI"),
           params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Choose the operating point with the highest DINO at CLIP-T >= the floor and register it (writes RUN/choose/)."""
    from subjectops.selection.choose import choose_and_register

    info = choose_and_register(build_params(params_path, sets), run_dir, min_clip_t, tracking_uri=tracking_uri,
                               model_name=name)
    console.print(f"chosen: {info['chosen']} ({info['rule']})", highlight=False)
    done("registered", Path(f"models:/{info['model_name']}/{info['version']}"))


@app.command()
@user_errors
def compare(run_dirs: List[Path] = typer.Argument(..., help="run directories (several methods, strategies, subjects)"),
            out: Optional[Path] = typer.Option(None, "--out", help="write leaderboard.md, .html and .json here")):
    """One leaderboard: methods (and strategies) x metrics, mean and 95% bootstrap interval over the per-image values;
    refuses runs whose prompt sets, seeds or backbones differ."""
    from subjectops.selection.compare import leaderboard, write_leaderboard

    board = leaderboard(run_dirs)
    typer.echo(board.markdown())
    if out is not None:
        done("leaderboard", write_leaderboard(board, out) / "leaderboard.html")


@tokens_app.command("scan")
@user_errors
def tokens_scan(model: Optional[str] = ModelOpt, force: bool = typer.Option(False, "--force", help="rescore cached tokens"),
                vocabulary: int = typer.Option(0, "--vocabulary", help="scan N words of the tokenizer's vocabulary "
                                               "instead of finetune.alchemy.token_scan.candidates"),
                dictionary: Optional[Path] = typer.Option(None, "--dictionary", help="word list (one a line) whose "
                                                          "words are not rare, for --vocabulary"),
                params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Rank candidate tokens by the mean pairwise SSIM of the base model's images of them (lower = weaker prior)."""
    from rich.table import Table

    from subjectops.data import rare_tokens

    params = build_params(params_path, sets, model)
    cfg = params.finetune.alchemy.token_scan
    candidates = None
    if vocabulary != 0:
        candidates = rare_tokens.vocabulary_candidates(rare_tokens.tokenizer_vocabulary(params.model),
                                                       rare_tokens.read_dictionary(dictionary), vocabulary, cfg.seed)
    ranking = rare_tokens.scan(cfg, params.model, candidates, force,
                               on_score=lambda t, s: console.print(f"  {t}: {s:.4f}", highlight=False))
    table = Table(title=f"tokens for {params.model.base} (mean pairwise SSIM of {cfg.images_per_token} images)")
    for col in ("rank", "token", "score", "reference token's prior"):
        table.add_column(col)
    for i, score in enumerate(ranking.candidates, 1):
        table.add_row(str(i), score.token, f"{score.score:.4f}", "")
    for score in ranking.references:
        prior = "strong (above the candidates' median)" if ranking.strong_prior(score) else "weak"
        table.add_row("-", score.token, f"{score.score:.4f}", prior)
    console.print(table)
    done(f"tokens (best: {ranking.best})", ranking.cache_file)


@data_app.command("push")
@user_errors
def data_push(subject_dir: Path = typer.Argument(..., help="folder of the subject's photos"),
              uri: str = typer.Argument(..., help="s3://BUCKET/PREFIX"),
              force: bool = typer.Option(False, "--force", help="replace a different subject stored at the prefix")):
    """Upload a subject's photos with a SHA-256 manifest; every object is read back and checked."""
    from subjectops.data.objectstore import push

    manifest = push(subject_dir, uri, force=force)
    console.print(f"[green]pushed:[/] {len(manifest['files'])} files of {manifest['subject']!r} to {uri}", highlight=False)


@data_app.command("pull")
@user_errors
def data_pull(uri: str = typer.Argument(..., help="s3://BUCKET/PREFIX written by `subjectops data push`"),
              dest: Path = typer.Argument(..., help="directory to create"),
              force: bool = typer.Option(False, "--force", help="replace DEST if it exists")):
    """Download a pushed subject; DEST appears only when every file matches its SHA-256."""
    from subjectops.data.objectstore import pull

    done("pulled", pull(uri, dest, force=force))


# register / promote / sync (MLflow registry and tracking)
from subjectops.tracking.cli import add_tracking_commands  # noqa: E402

add_tracking_commands(app)

# submit / benchmark submit|schedule|aggregate (Kubeflow Pipelines; kfp is imported only when used)
from subjectops import kfp_submit  # noqa: E402

app.command("submit")(kfp_submit.submit)
app.add_typer(kfp_submit.benchmark_app, name="benchmark")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
