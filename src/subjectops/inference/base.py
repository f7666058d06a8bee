"""The inference strategy: how a fine-tuned pipeline turns prompts and seeds into images.

`infer` and the registered MLflow model both build the strategy from one `InferenceSpec` (the strategy's name,
the scheduler, steps, guidance scale, resolution and the strategy's own config section) through
`subjectops.inference.load_strategy`, so the served model generates exactly what was evaluated.

A strategy declares what it needs beyond the fine-tuned pipeline in `requires`, from `REQUIREMENTS`:

- `references`, `masks`: the subject's refined photos and their masks (`refine` output: `RefinedSubject`),
  e.g. reference-guided generation that optimises each image against the references;
- `snapshots`: several weight snapshots of one finetune run (`finetune` output), e.g. guidance blended
  over an early and a late snapshot.

Each requirement names the stage output that provides it; `infer` passes the run's directories, and the
registered model carries a copy of every such output (`Strategy.stage_outputs`) and passes those copies.
A strategy that needs the base model without the finetune (e.g. a base-model first stage before an
img2img pass with the finetune) loads it from `StageInputs.model`.

A strategy module declares its own config section (`config_model`, read as `infer.<section>`), as a method module
declares its `finetune.<section>`; since `subjectops.config` reads the registry to build `InferCfg`, strategy modules
import torch, numpy and diffusers inside the functions that use them, and never import `subjectops.config`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, Field

from subjectops.config_base import ModelCfg, StrictModel
from subjectops.models.sampling import use_scheduler

if TYPE_CHECKING:
    from PIL import Image

# The params' `infer` section: `subjectops.config.InferCfg`, which config builds from this registry, so it is named
# here by its base class only (importing it, even for type checking, would make a cycle).
InferSection = BaseModel

def no_grad(function):
    """`torch.no_grad()` as a decorator that imports torch when the function runs, not when its module loads."""

    @functools.wraps(function)
    def without_gradients(*args, **kwargs):
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return without_gradients


# What a strategy may need -> the stage output that provides it.
REQUIREMENTS = {"references": "refine", "masks": "refine", "snapshots": "finetune"}


class InferenceSpec(BaseModel):
    """Everything besides the weights, the prompt and the seed that decides an image. Written by infer to its
    manifest, copied by the registry into the model's config, and the only thing a strategy is built from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str
    scheduler: str
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    resolution: int = Field(ge=8)
    config: dict[str, Any] = {}  # the strategy's section `infer.<section>` as infer read it ({} when it has none)


@dataclass(frozen=True)
class StageInputs:
    """Where a strategy finds what it requires: the run's stage outputs in `infer`, the copies packaged with the
    registered model when served. `model` is the base the pipeline was loaded from (before the finetune)."""

    model: ModelCfg
    finetune: Path
    refine: Path | None = None

    @classmethod
    def from_dirs(cls, model: ModelCfg, dirs: Mapping[str, str | Path]) -> StageInputs:
        """From a mapping of stage name -> directory (extra keys, like the packaged base model, are ignored)."""
        stages = {f.name for f in fields(cls)} - {"model"}
        return cls(model=model, **{name: Path(path) for name, path in dirs.items() if name in stages})


@dataclass(frozen=True)
class SweepPoint:
    """One operating point a strategy offers the `sweep` stage: its label, the infer section it samples with, and
    the settings recorded in points.json (from which `Strategy.point_weights` finds its weights again)."""

    label: str
    infer: InferSection
    settings: dict


class Strategy:
    """Base class; a subclass sets `name`, `section` and `config_model` when it has settings, and `requires` when it
    needs inputs.

    `load` prepares the strategy once on a pipeline that already holds the finetune (the base class sets the
    recorded scheduler; a subclass also reads its references, snapshots, ...); `generate` then draws images.
    """

    name: ClassVar[str]
    # The InferCfg field holding this strategy's settings (`infer.<section>` in params.yaml), or None, and the
    # pydantic model of that section (declared in the strategy's module; `subjectops.config` builds InferCfg of them).
    section: ClassVar[str | None] = None
    config_model: ClassVar[type[StrictModel] | None] = None
    # Keys of REQUIREMENTS; the planner runs (and the registered model packages) the stages that provide them.
    requires: ClassVar[frozenset[str]] = frozenset()
    # whether `generate` honours `negative_prompt` (`subjectops generate --negative-prompt`); infer leaves it None
    takes_negative_prompt: ClassVar[bool] = False

    def __init__(self, pipe, spec: InferenceSpec, inputs: StageInputs):
        self.pipe = pipe
        self.spec = spec
        self.inputs = inputs
        self.negative_prompt: str | None = None
        # the section's model validates the recorded settings again when served
        self.config = self.config_model.model_validate(spec.config) if self.config_model else None

    @classmethod
    def spec_for(cls, infer: InferSection, resolution: int) -> InferenceSpec:
        """The spec infer records for this strategy under the given config."""
        config = getattr(infer, cls.section).model_dump(mode="json") if cls.section else {}
        return InferenceSpec(strategy=cls.name, scheduler=infer.scheduler, steps=infer.steps,
                             guidance_scale=infer.guidance_scale, resolution=resolution, config=config)

    @classmethod
    def check_infer(cls, infer: InferSection) -> None:
        """Refuse (ValueError) settings of `infer` this strategy cannot run with, when the params are validated and
        before any work (e.g. a guidance window beyond infer.steps); every setting is fine by default."""

    @classmethod
    def weights(cls, spec: InferenceSpec, inputs: StageInputs) -> Path:
        """The finetune output (or snapshot in it) the strategy's pipeline is loaded with."""
        return inputs.finetune

    @classmethod
    def snapshot_steps(cls, infer: InferSection) -> set[int]:
        """The finetune steps whose snapshots this strategy reads under the given config."""
        return set()

    @classmethod
    def sweep_points(cls, infer: InferSection, steps: list[int]) -> list[SweepPoint]:
        """The operating points this strategy offers over a finetune output keeping snapshots of `steps`
        (ascending), under the run's infer section; none by default."""
        return []

    @classmethod
    def point_weights(cls, finetune_dir: Path, settings: dict) -> Path:
        """The weights an operating point of this strategy (its recorded `settings`) is served from: the finetune
        output by default (a strategy reading snapshots finds them in it)."""
        return Path(finetune_dir)

    @classmethod
    def stage_outputs(cls) -> set[str]:
        """The stage outputs the registered model must carry: the finetune, and whatever provides `requires`."""
        return {"finetune"} | {REQUIREMENTS[r] for r in cls.requires}

    @classmethod
    def load(cls, pipe, spec: InferenceSpec, inputs: StageInputs) -> Strategy:
        use_scheduler(pipe, spec.scheduler)
        return cls(pipe, spec, inputs)

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        """One image per (prompt, seed), each a function of its prompt and seed alone (not of the others)."""
        raise NotImplementedError

    def generate_explained(self, prompt: str, seed: int) -> tuple[Image.Image, dict[str, Image.Image], dict]:
        """The image of `generate`, plus named intermediate images and facts for the report (infer stores both
        beside the image; a strategy without intermediates returns empty ones)."""
        return self.generate([prompt], [seed])[0], {}, {}


def fill_subject(prompt: str, identifier: str, class_word: str) -> str:
    """A user's prompt with `{subject}` standing for the identifier and class word ("a {subject} on a beach" ->
    "a sks teapot on a beach"), as the registered model and `subjectops generate` read prompts."""
    return str(prompt).replace("{subject}", f"{identifier} {class_word}".strip())


def finetuned_pipeline(model, finetune_dir):
    """The base model with a finetune output (or one of its snapshots) applied, in float32, on the GPU if any."""
    import torch

    from subjectops.methods import load_finetuned
    from subjectops.models.loading import load_pipeline

    pipe = load_pipeline(model, dtype=torch.float32)
    load_finetuned(pipe, finetune_dir)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe
