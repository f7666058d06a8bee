"""`subjectops world ...`: make a world subject, build the world's pretrained models."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from subjectops.cli_common import done, user_errors
from subjectops.world import SHIPPED_WEIGHTS

world_app = typer.Typer(no_args_is_help=True, help="The miniature world: subjects, and the build of its pretrained "
                                                   "world-sd15 / world-sdxl and metric encoders.")


@world_app.command("subject")
@user_errors
def subject(
    seed: int = typer.Option(..., "--seed", min=0, help="any seed gives a valid subject (class, shape, decal)"),
    out: Path = typer.Option(..., "--out", help="folder to write photos/, heldout/, masks/ and subject.json into"),
) -> None:
    """Write a world subject: 5 photos for `subjectops run`, 8 held-out photos, masks and its ground truth."""
    from subjectops.world.subjects import read_subject, write_subject

    write_subject(seed, out)
    done(f"world subject ({read_subject(out)['class_word']})", out)


@world_app.command("build")
@user_errors
def build(
    out: Path = typer.Option(SHIPPED_WEIGHTS, "--out", help="where the shipped models and manifest.json go"),
    work: Path = typer.Option(Path("cache/world-build"), "--work", help="data, checkpoints and finished parts "
                              "(a stopped build resumes from here)"),
    smoke: bool = typer.Option(False, "--smoke", help="a few steps of every part (tests)"),
    seed: int = typer.Option(0, "--seed", help="the build's seed"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0 = all cores)"),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="a build setting, e.g. --set unet_steps=8000 "
                                                  "(see world/build.py BuildConfig)"),
) -> None:
    """Train the world's models from scratch (about an hour on 2 CPU cores; --smoke: a minute)."""
    import torch

    from subjectops.world.build import Build, BuildConfig, ship

    if threads:
        torch.set_num_threads(threads)
    cfg = BuildConfig.smoke() if smoke else BuildConfig()
    cfg.seed = seed
    for item in overrides or []:
        cfg.set(item)
    b = Build(work, cfg, log=lambda line: print(line, flush=True))
    b.record_invocation("subjectops " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    b.run()
    ship(b, out, "subjectops " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    done("world models", out)
