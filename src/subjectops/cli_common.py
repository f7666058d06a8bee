"""What every `subjectops` command shares: the error printer, the common options, how params are built
from them, and how a result is announced."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.markup import escape

from subjectops.config import Params, load_params
from subjectops.console import console
from subjectops.errors import SubjectopsError
from subjectops.methods import METHODS

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params.yaml (built-in defaults if absent)")
SetOpt = typer.Option(None, "--set", help="override, e.g. --set finetune.lora.lr=1e-4 (repeatable)")
ModelOpt = typer.Option(None, "--model", help="hub id, local diffusers dir, or a preset: tiny-sd15, tiny-sdxl, "
                        "small-sd15 (random weights), world-sd15, world-sdxl (the miniature world's) (= model.base)")
MethodOpt = typer.Option(None, "--method", help=" | ".join(METHODS) + " (= finetune.method)")
RunParamsOpt = typer.Option(None, "--params", help="params.yaml (default: the run folder's own params.yaml when a "
                            "run folder is given, else ./params.yaml; built-in defaults if absent)")
RunOpt = typer.Option(None, "--run", help="run directory: RUN/<stage> for every path not given")
TrackingUriOpt = typer.Option(None, "--tracking-uri",
                              help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db here)")
ModelNameOpt = typer.Option(None, "--name", help="registered model name (default registry.model_name)")
IfNeededOpt = typer.Option(False, "--if-needed",
                           help="only when the method needs this stage (for DVC); else record why not")


def user_errors(fn: Callable) -> Callable:
    """Print a SubjectopsError as its message and fix, without a traceback, and exit 2 (or the error's own
    `exit_code`: 75 when finetune stopped on SIGTERM after a checkpoint)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SubjectopsError as exc:
            # escaped: a message's own brackets (`[evaluate.backbones.dino]`, `lacks ['identifier']`) are not markup
            console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            if exc.fix:
                console.print(f"[bold]fix:[/] {escape(exc.fix)}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(exc, "exit_code", 2)) from None

    return wrapper


def build_params(params_path: Path | None, sets: Optional[List[str]], model: Optional[str] = None,
                 method: Optional[str] = None) -> Params:
    """The CLI's options (`--params`, `--set`, `--model`, `--method`) through `config.load_params`."""
    return load_params(params_path, list(sets or []), model=model or "", method=method or "")


def done(what: str, path: Path) -> None:
    console.print(f"[green]{what}:[/] {path}", highlight=False, soft_wrap=True)


def run_folder(positional: Optional[Path], option: Optional[Path], required: bool = True) -> Optional[Path]:
    """The run folder of a command that takes one: `--run RUN` on every such command, or the same folder as its
    first argument where the run is its only argument (`subjectops evaluate RUN`); two different ones are refused."""
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise SubjectopsError(f"two run folders given: {positional} and --run {option}",
                              fix="give the run folder once, as --run RUN_DIR")
    run = positional if positional is not None else option
    if run is None and required:
        raise SubjectopsError("no run folder given", fix="pass --run RUN_DIR")
    return run
