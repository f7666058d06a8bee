"""`subjectops`: the command line. One command per stage of the registry, made from its declaration
(`stage_command`). DVC's stages (dvc.yaml) call these commands; Kubeflow components run the same stages inside
the project image (components/), except multi-GPU stages, which `accelerate launch` their command."""

from __future__ import annotations

import contextlib
import inspect
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from subjectops.benchmark.regression import DEFAULT_GATE_RULE
from subjectops.cli_common import (
    IfNeededOpt,
    MethodOpt,
    ModelNameOpt,
    ModelOpt,
    ParamsOpt,
    RunOpt,
    RunParamsOpt,
    SetOpt,
    TrackingUriOpt,
    build_params,
    console,
    done,
    run_folder,
    user_errors,
)
from subjectops.config import Params
from subjectops.console import log, timed
from subjectops.errors import SubjectopsError
from subjectops.run_folder import recorded_subject, run_params_file
from subjectops.runlock import is_main_process, run_lock
from subjectops.stages.base import Stage, StageContext
from subjectops.stages.common import not_needed
from subjectops.stages.incremental import run_stage
from subjectops.stages.plan import plan
from subjectops.stages.registry import all_stages, get_stage
from subjectops.stopping import sigterm_requests_stop
from subjectops.world.cli import world_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Personalize text-to-image diffusion models from a few photos of one subject.")


def _print_version(value: bool) -> None:
    if value:
        from subjectops import __version__

        typer.echo(f"subjectops {__version__}")
        raise typer.Exit()


@app.callback()
@user_errors
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Before any command: the compute threads for this process, from its CPU quota and affinity (or
    SUBJECTOPS_THREADS), chosen once (subjectops.threads)."""
    from subjectops import threads

    threads.configure()


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
        raise SubjectopsError(f"no directory given for {stage}",
                              fix=f"pass --{get_stage(stage).option} DIR or --run RUN_DIR")
    return None


def if_needed_skip_reason(params: Params, stage: str) -> Optional[str]:
    """Why `plan(params)` leaves `stage` out, or None when it is planned (`--if-needed`, for DVC)."""
    planned = plan(params)
    return None if planned.has(stage) else planned.why_not(stage)


def _stage_parameters(stage: Stage) -> list[inspect.Parameter]:
    """The command's parameters: the stage's own arguments, a folder per stage it reads, the output, the run folder,
    and the options every command shares."""
    P = inspect.Parameter
    params = [P(a.name, P.KEYWORD_ONLY,
                annotation=Path if a.folder else str if a.required else Optional[Path if a.folder else str],
                default=(typer.Argument(..., help=a.help) if a.flag is None else
                         typer.Option(... if a.required else None, a.flag, help=a.help)))
              for a in stage.arguments]
    if not any(a.flag is None for a in stage.arguments):  # `subjectops evaluate RUN` = `--run RUN`
        params.append(P("run_dir", P.KEYWORD_ONLY, annotation=Optional[Path],
                        default=typer.Argument(None, help="run directory: RUN/<stage> for every path not given")))
    for name in stage.reads:
        source = get_stage(name)
        params.append(P(f"{source.option.replace('-', '_')}_dir", P.KEYWORD_ONLY, annotation=Optional[Path],
                        default=typer.Option(None, f"--{source.option}", help=f"{source.command} output "
                                             "(required when the plan has it read)")))
    params += [P("out", P.KEYWORD_ONLY, annotation=Optional[Path],
                 default=typer.Option(None, "--out", help=f"output folder (default RUN/{stage.name})")),
               P("run", P.KEYWORD_ONLY, annotation=Optional[Path], default=RunOpt),
               P("model", P.KEYWORD_ONLY, annotation=Optional[str], default=ModelOpt),
               P("method", P.KEYWORD_ONLY, annotation=Optional[str], default=MethodOpt)]
    if stage.optional:
        params.append(P("if_needed", P.KEYWORD_ONLY, annotation=bool, default=IfNeededOpt))
    params += [P("params_path", P.KEYWORD_ONLY, annotation=Optional[Path], default=RunParamsOpt),
               P("sets", P.KEYWORD_ONLY, annotation=Optional[List[str]], default=SetOpt)]
    return params


def stage_command(stage: Stage) -> Callable:
    """`subjectops <stage>`: the stage's run on the folders given (or RUN/<stage>); an input the plan leaves out
    is ignored, and with `--if-needed` a stage the plan leaves out only records why (decided before the stage's
    work imports torch: seconds that a skipped DVC stage need not pay)."""

    def command(**kw):
        run = run_folder(kw.get("run_dir"), kw["run"], required=False)
        # a run folder's own params (what `subjectops run` resolved), unless a params file is given
        params_path = kw["params_path"] or run_params_file(run) or Path("params.yaml")
        params = build_params(params_path, kw["sets"], kw["model"], kw["method"])
        out = stage_path(kw["out"], run, stage.name)
        planned = plan(params)
        # one writer per run folder, as `subjectops run` holds it: the run given, or the run the output is a stage
        # of (outputs given apart, as two priors into one scratch folder, may run side by side)
        locked = run or (out.parent if recorded_subject(out.parent) else None)
        holding = run_lock(locked) if locked is not None and is_main_process() else contextlib.nullcontext()
        with holding, sigterm_requests_stop():
            if kw.get("if_needed") and not planned.has(stage.name):
                reason = planned.why_not(stage.name)
                done(f"{stage.command} ({reason})", not_needed(stage.name, params, out, reason))
                return
            from subjectops.preflight import require_stage_ready

            wanted = planned.inputs(stage.name) if planned.has(stage.name) else stage.reads
            inputs = {name: stage_path(kw[f"{get_stage(name).option.replace('-', '_')}_dir"], run, name,
                                       required=name in wanted) for name in stage.reads}
            require_stage_ready(params, stage.name, out, inputs)  # the weights it loads, its output: all at once
            with timed(stage.command):
                run_stage(stage, StageContext(params, inputs, out,
                                              args={a.name: kw[a.name] for a in stage.arguments}))
        done(stage.command, out)
        if stage.report:
            done("report", out / stage.report)

    command.__signature__ = inspect.Signature(_stage_parameters(stage))
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    command.__name__ = command.__qualname__ = stage.name
    command.__doc__ = stage.help
    return user_errors(command)


for _stage in all_stages():
    if not _stage.tracked:  # registration is `subjectops register RUN` (cli_tracking.py): it needs the server
        app.command(_stage.command)(stage_command(_stage))


@app.command(help="Run the whole pipeline in-process, each stage of the plan in order: "
             + ", ".join(s.command + (" (when the run needs it)" if s.optional else "")
                         for s in all_stages() if not s.tracked) + "; then register (with tracking).")
@user_errors
def run(subject_dir: Path = typer.Argument(..., help="folder of 3-20 photos of one subject"),
        class_word: str = typer.Option(..., "--class", help="the subject's class, e.g. teapot"),
        method: Optional[str] = MethodOpt, model: Optional[str] = ModelOpt,
        out: Optional[Path] = typer.Option(None, "--out", help="run directory (default runs/<run-id>); a finished "
                                           "run of the subject there is rerun where something changed"),
        force: bool = typer.Option(False, "--force", help="write into an --out that is not this subject's run "
                                   "(files subjectops did not write are kept)"),
        params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
        track: bool = typer.Option(True, "--track/--no-track",
                                   help="log to MLflow and register the model (MLFLOW_TRACKING_URI, else "
                                        "sqlite:///mlruns.db)"),
        tracking_uri: Optional[str] = TrackingUriOpt):
    from subjectops.cli_tracking import make_tracker
    from subjectops.pipeline import default_run_dir, summary
    from subjectops.pipeline import run as run_pipeline
    from subjectops.tracking import NullTracker

    params = build_params(params_path, sets, model, method)
    if out is None:
        out = default_run_dir(subject_dir, params)
        # named up front: resuming after a preemption (exit 75) means running again with --out of this folder
        console.print(f"run folder: {out}", highlight=False)
    if tracking_uri and not track:
        raise SubjectopsError("--tracking-uri with --no-track: nothing would be sent to it",
                              fix="drop one of the two")
    tracker = make_tracker(params, tracking_uri) if track else NullTracker()
    dirs = run_pipeline(params, subject_dir, class_word, out, tracker=tracker, force=force)
    for stage, path in dirs.items():
        done(stage, path)
    for line in summary(out):
        log(f"summary: {line}")
    from subjectops.stages.catalog import stage_catalog

    if not track and stage_catalog().wants_registration(params):
        log(f"register: left for later (--no-track): `subjectops sync {out}` registers the model")


@app.command()
@user_errors
def replace(image: Path = typer.Argument(..., help="photo whose subject is replaced"),
            run: Path = typer.Option(..., "--run", help="a run fine-tuned with --method hifi-tuner"),
            word: str = typer.Option(..., "--word", help="the word for the subject to replace, e.g. cat"),
            out: Path = typer.Option(..., "--out", help="folder for the edited photo and its record"),
            params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Replace the subject of a photo with the run's subject (HiFi Tuner alg. 3: null-text inversion,
    prompt-to-prompt)."""
    from subjectops.stages.replace import replace as stage

    done("replace", stage(build_params(params_path, sets), image, run, word, out))


@app.command()
@user_errors
def generate(prompt: str = typer.Option(..., "--prompt", help="what to draw; {subject} stands for the identifier and "
                                        "class word, e.g. \"a {subject} on a beach\""),
             out: Path = typer.Option(..., "--out", help="folder for NNNN.png and generated.json (new, or an earlier "
                                      "generate's)"),
             run: Optional[Path] = typer.Option(None, "--run", help="a finished run folder (its infer settings)"),
             model_uri: Optional[str] = typer.Option(None, "--model-uri", help="a registered model, e.g. "
                                                     "models:/NAME@champion"),
             negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt",
                                                           help="what to steer away from (plain strategy)"),
             seed: Optional[int] = typer.Option(None, "--seed", help="first seed (default: infer's first seed); "
                                                "image i uses seed + i"),
             num_images: int = typer.Option(1, "--num-images", min=1, help="images to draw"),
             attention_slicing: bool = typer.Option(False, "--attention-slicing",
                                                    help="attention in slices: less GPU memory, a little slower"),
             vae_tiling: bool = typer.Option(False, "--vae-tiling", help="decode in tiles (large images)"),
             cpu_offload: bool = typer.Option(False, "--cpu-offload",
                                              help="keep each model on the GPU only while it runs (needs a GPU)"),
             tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI for "
                                                        "--model-uri (default: MLFLOW_TRACKING_URI, else "
                                                        "sqlite:///mlruns.db)")):
    """Draw images of the subject from a run or a registered model, with the strategy, scheduler and steps infer
    used: the same prompt and seed give infer's image."""
    from subjectops.config import MemoryCfg
    from subjectops.generate import from_model_uri, from_run
    from subjectops.generate import generate as draw

    if (run is None) == (model_uri is None):
        raise SubjectopsError("generate draws from one model: a run folder or a registered model",
                              fix="pass either --run RUN or --model-uri models:/NAME@champion")
    memory = MemoryCfg(attention_slicing=attention_slicing, vae_tiling=vae_tiling, cpu_offload=cpu_offload)
    source = from_run(run, memory) if run is not None else from_model_uri(model_uri, memory, tracking_uri)
    images = draw(source, prompt, out, negative_prompt, seed, num_images)
    done(f"generated {len(images)} image(s)", out)


@models_app.command("check")
@user_errors
def models_check(params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt, model: Optional[str] = ModelOpt,
                 method: Optional[str] = MethodOpt):
    """Say which weights the configured plan loads (base model, method, segmentation, inference, every metric
    encoder), with the key that names each, whether each is here and how to provide it. Exits 1 when one is
    missing."""
    from rich.markup import escape

    from subjectops.weights_check import check_weights

    params = build_params(params_path, sets, model, method)
    rows = check_weights(params)
    # One line each, never wrapped or cut (soft_wrap): ids, paths and commands stay copyable at any terminal width.
    for row in rows:
        status = ("[green]present[/]" if row.present else "[yellow]absent (optional)[/]" if row.optional
                  else "[red]missing[/]")
        line = f"{row.purpose} ({row.stage or 'run'}): {row.key} = {row.ident}"
        console.print(f"{status}  {escape(line)}", highlight=False, soft_wrap=True)
    absent = [row for row in rows if not row.present]
    for row in absent:
        console.print(f"\n[bold]{escape(row.purpose)}[/] {escape(f'({row.key} = {row.ident})')}:", highlight=False,
                      soft_wrap=True)
        console.print(f"  {'optional' if row.optional else 'fix'}: {row.how}", highlight=False, soft_wrap=True,
                      markup=False)
    missing = [row for row in rows if row.missing]
    if missing:
        console.print(f"\n[red]{len(missing)} missing[/] of {len(rows)}: "
                      f"{', '.join(row.key for row in missing)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"\n[green]all {len(rows)} present[/] for method {params.finetune.method} on {params.model.base}",
                  highlight=False, soft_wrap=True)


@app.command()
@user_errors
def choose(run_dir: Optional[Path] = typer.Argument(None, help="run directory with sweep/ (`subjectops sweep RUN`), "
                                                          "or --run"),
           run: Optional[Path] = RunOpt,
           min_clip_t: Optional[float] = typer.Option(None, "--min-clip-t",
                                                      help="CLIP-T floor (default registry.choose.min_clip_t)"),
           name: Optional[str] = ModelNameOpt, tracking_uri: Optional[str] = TrackingUriOpt,
           params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt):
    """Choose the operating point with the highest DINO at CLIP-T >= the floor and register it (writes RUN/choose/)."""
    from subjectops.selection.choose import choose_and_register

    run_dir = run_folder(run_dir, run)
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


@app.command("dvc-yaml")
@user_errors
def dvc_yaml(subject_dir: str = typer.Argument(..., help="the subject's folder, as DVC finds it from the repository"),
             class_word: str = typer.Option(..., "--class", help="the subject's class word"),
             params_path: Path = ParamsOpt,
             out: Path = typer.Option(Path("dvc.yaml"), "--out", help="where to write it"),
             check: bool = typer.Option(False, "--check", help="write nothing; exit 1 when OUT is not up to date")):
    """Write dvc.yaml for one subject from the stage registry (the repository's is the example teapot's)."""
    from subjectops.dvc_yaml import write

    fresh = write(params_path, subject_dir, class_word, out, check=check)
    if check and not fresh:
        typer.echo(f"{out} is not what the stage registry gives; regenerate it: subjectops dvc-yaml {subject_dir} "
                   f"--class {class_word} --out {out} (this repository's: make generate)", err=True)
        raise typer.Exit(1)
    done("up to date" if fresh else "written", out)


@tokens_app.command("scan")
@user_errors
def tokens_scan(model: Optional[str] = ModelOpt,
                force: bool = typer.Option(False, "--force", help="rescore cached tokens"),
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
    ranking = rare_tokens.scan(cfg, params.model, candidates, force)
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
    console.print(f"[green]pushed:[/] {len(manifest['files'])} files of {manifest['subject']!r} to {uri}",
                  highlight=False)


@data_app.command("pull")
@user_errors
def data_pull(uri: str = typer.Argument(..., help="s3://BUCKET/PREFIX written by `subjectops data push`"),
              dest: Path = typer.Argument(..., help="directory to create"),
              force: bool = typer.Option(False, "--force", help="replace DEST if it exists")):
    """Download a pushed subject; DEST appears only when every file matches its SHA-256."""
    from subjectops.data.objectstore import pull

    done("pulled", pull(uri, dest, force=force))


# register / promote / sync (MLflow registry and tracking)
from subjectops.cli_tracking import add_tracking_commands  # noqa: E402

add_tracking_commands(app)

# submit / benchmark submit|schedule|aggregate (Kubeflow Pipelines; kfp is imported only when used)
from subjectops import kfp_submit  # noqa: E402

app.command("submit")(kfp_submit.submit)
app.add_typer(kfp_submit.benchmark_app, name="benchmark")


@kfp_submit.benchmark_app.command("run")
@user_errors
def benchmark_run(
        methods: List[str] = typer.Option(..., "--methods", help="variants, comma-separated: METHOD[@STRATEGY]"
                                          "[+KEY=VALUE...], e.g. dreambooth,dreambooth@reference-guided"),
        subjects: List[Path] = typer.Option(..., "--subjects", help="a world subject folder, a folder of photos, or a "
                                            "folder of them (repeatable)"),
        out: Path = typer.Option(..., "--out", help="the benchmark folder: runs/, leaderboard.*, claims.*"),
        model: Optional[str] = ModelOpt,
        class_word: Optional[str] = typer.Option(None, "--class", help="class word of photo folders without a "
                                                 "class.txt"),
        seeds: Optional[List[str]] = typer.Option(None, "--seeds", help="benchmark seeds, comma-separated: each draws "
                                                  "every subject's finetune.seed and infer.seed from it and the "
                                                  "subject's name (default: the params' seeds)"),
        champion: Optional[Path] = typer.Option(None, "--champion", help="an earlier benchmark's folder or "
                                                "leaderboard.json: fail when a score falls below its interval"),
        gate_rule: str = typer.Option(DEFAULT_GATE_RULE, "--gate-rule", help="when a score regressed against "
                                      "--champion: disjoint (its whole interval on the worse side of the champion's), "
                                      "mean-outside (its mean there), subject-paired (a paired t-test over the "
                                      "subjects, at least 3) or seed-spread (a t-test against the spread between "
                                      "the seeds of a champion run with --seeds 0,1,2 or more)"),
        params_path: Path = ParamsOpt, sets: Optional[List[str]] = SetOpt,
        track: bool = typer.Option(True, "--track/--no-track", help="log the leaderboard and claims to MLflow")):
    """Every method on every subject in this process (same prompts, seeds, encoders; models loaded once), resuming
    where a previous invocation stopped; writes the leaderboard and the papers' claims table."""
    from subjectops.benchmark.local import run_benchmark

    def split(values: Optional[List[str]]) -> list[str]:
        return [v.strip() for text in values or [] for v in text.split(",") if v.strip()]

    try:
        seed_values = [int(s) for s in split(seeds)]
    except ValueError:
        raise SubjectopsError(f"--seeds {','.join(seeds or [])} is not a list of integers",
                              fix="pass e.g. --seeds 0,1,2") from None
    result = run_benchmark(params_path=params_path, sets=sets or [], model=model, variants=split(methods),
                           subject_dirs=subjects, class_word=class_word, seeds=seed_values, out=out, track=track,
                           champion=champion, gate_rule=gate_rule,
                           on_cell=lambda cell, finished: console.print(
                               f"{'finished before' if finished else 'running'}: {cell.variant.label} on "
                               f"{cell.group}", highlight=False))
    console.print(f"{len(result.ran)} of {len(result.cells)} cell(s) run in {result.seconds:.0f} s", highlight=False)
    done("leaderboard", out / "leaderboard.html")
    done("claims", out / "claims.html")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
