"""What a stage is: one declaration (`Stage`) in the stage's own module, read by every orchestrator.

A stage module imports torch, diffusers and the rest of its work inside the functions that use them, so that
reading the declarations (the plan, the CLI, `--if-needed`, the Kubeflow `configure` step) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:
    from subjectops.config import Params
    from subjectops.tracking.record import StageRecord

# Requirements a run's params declare (methods and inference strategies declare theirs in their modules).
SNAPSHOTS = "snapshots"  # several weight snapshots of one finetune: `finetune.snapshots`, or the strategy's
REGISTRATION = "registration"  # `registry.auto_register`


@dataclass(frozen=True)
class StageContext:
    """Everything one stage run gets: the validated params, the planned input folders by stage name (None for
    an input the plan leaves out), the output folder, the base pipeline when the orchestrator shares one, and
    the stage's own arguments (`Stage.arguments`, by name)."""

    params: Params
    inputs: Mapping[str, Path | None]
    out: Path
    pipe: Any = None
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Argument:
    """An argument of a stage besides its inputs: a CLI argument or option, and a parameter of its component."""

    name: str  # the key in StageContext.args and the parameter name of the CLI command and the component
    flag: str | None  # the CLI option (`--class`); None: a positional argument
    help: str = ""
    folder: bool = False  # a folder (a Path on the CLI, an input artifact in Kubeflow) rather than a string
    required: bool = True
    kfp: bool = True  # False: set on the command line only (the Kubeflow step decides it itself)
    shapes_output: bool = True  # False: where the work is kept, not what it makes (a rerun ignores a change)


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG.

    `run(ctx)` does the work: it validates its inputs before writing anything, writes into `<out>.partial/`,
    renames it to `<out>/` on success and ends with `<out>/manifest.json` (`stages/common.py`).
    `record(out_dir, rec, grids)` adds to `rec` what MLflow logs for its output (the manifest is always logged;
    without `record`, every small file of the output is).
    """

    name: str
    help: str  # one line: the CLI command's help
    run: Callable[[StageContext], Any]
    reads: tuple[str, ...] = ()  # earlier stages whose outputs it reads when they are planned
    brought_by: str | None = None  # the requirement that puts it in the plan; None: always planned
    absent_because: str = ""  # why the plan leaves it out ({method}: the method's name)
    params: tuple[str, ...] = ()  # the params.yaml keys it reads (its DVC `params:`)
    code: tuple[str, ...] = ()  # source paths (beside its own module) whose change re-runs it under DVC
    gpu: bool = False  # runs on the GPU node pool, in the trainer image
    takes_pipe: bool = False  # can use the base pipeline `subjectops run` loaded for an earlier stage
    multi_gpu: bool = False  # runs data-parallel under `accelerate launch` when the pod has several GPUs
    artifact: str = "Dataset"  # the Kubeflow artifact type of its output (Dataset, Model, Artifact)
    flag: str | None = None  # the option later stages take its output by (`--disc`); default: its command
    arguments: tuple[Argument, ...] = ()
    record: Callable[[Path, StageRecord, Path], None] | None = None
    branches: bool = True  # optional and before the training: one Kubeflow branch each (False: runs in every
    # branch and records why when the plan leaves it out, as under DVC)
    tracked: bool = False  # runs through the tracker (registration needs the tracking server), not as a step
    report: str | None = None  # a self-contained HTML file of its output that Kubeflow shows
    metrics: Callable[[Path], dict[str, float]] | None = None  # the numbers of its output Kubeflow shows
    dvc_outs: tuple[str, ...] = ()  # files of its output DVC caches (default: the folder)
    dvc_metrics: str | None = None  # a file of its output DVC shows as metrics (not cached)

    @property
    def command(self) -> str:
        """The CLI command and the display name of its Kubeflow step (`pretrain-disc`)."""
        return self.name.replace("_", "-")

    @property
    def option(self) -> str:
        """The option (and `<option>_dir` component input) that passes its output to a later stage."""
        return self.flag or self.command

    @property
    def optional(self) -> bool:
        return self.brought_by is not None
